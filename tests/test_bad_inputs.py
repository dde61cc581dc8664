"""Wrong types, out-of-range values, empty inputs: every public entry point answers with a
``ValueError`` that names the argument, before any work is done (a table, so that a new
case is one line), plus properties that hold for every input (hypothesis)."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fgtutor import analysis, plots, replay, store
from fgtutor import sweep as study  # (train.sweep is another thing)
from fgtutor.activity import ActivityGradient, cosines, reference_gradient, weight_cosine
from fgtutor.book import chapter_parameters, check_parameters, parse_args, parse_value, run_chapter, table
from fgtutor.data import batches, load_mnist, train_val_split
from fgtutor.forward import ForwardGradient, directional_derivative, forward_gradient, sample_tangents
from fgtutor.losses import clamp_probs, cross_entropy, functional_xent, softmax
from fgtutor.models import MLP, LocalMLP, count_parameters, make_model
from fgtutor.optim import ForwardAdam, ForwardSGD, exp_decay, forward_step, is_plain_sgd
from fgtutor.testfns import beale, optimize, sample_estimates, true_gradient
from fgtutor.train import History, at_grid_edge, best_run, evaluate, fit, sweep, train_model
from fgtutor.utils import check_writable, make_generator, pick_device, seed_everything


X = torch.randn(20, 1, 28, 28)
Y = torch.randint(0, 10, (20,))


def logreg():
    return make_model("logreg")


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def fit_logreg(**kwargs):
    model = logreg()
    return fit(model, "backprop", sgd(model), (X, Y), progress=False, **kwargs)


RUN = History(meta={"seed": 0}, epochs=[{"epoch": 0, "step": 10, "test_loss": 1.0, "test_accuracy": 0.5,
                                         "train_seconds": 1.0}])
RESULTS = pd.DataFrame({"method": ["forward"], "lr": [0.1], "decay": [1e-4], "val_loss": [1.0], "val_accuracy": [0.5],
                        "diverged": [False]})
CHAPTER = str(Path(__file__).resolve().parents[1] / "book" / "testfns.ipynb")



def _exits_2(main, argv):
    """A command line's error, as a ValueError carrying what it printed (for the table)."""
    import contextlib, io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    if code == 2:
        raise ValueError(err.getvalue())
    return code


CASES = {
    # data
    "split: n_val not an int": (lambda: train_val_split(X, Y, n_val=2.5), "n_val=2.5"),
    "batches: empty tensors": (lambda: batches(X[:0], Y[:0], 4), "empty"),
    "batches: a list for X": (lambda: batches([1, 2], Y, 4), "must be tensors"),
    "batches: batch size 0": (lambda: batches(X, Y, 0), "batch_size=0"),
    "batches: generator not a Generator": (lambda: batches(X, Y, 4, generator=3), "generator=3"),
    "split: X None": (lambda: train_val_split(None, Y), "must be tensors"),
    "split: seed None": (lambda: train_val_split(X, Y, n_val=2, seed=None), "seed=None"),
    "split: negative seed": (lambda: train_val_split(X, Y, n_val=2, seed=-1), "seed=-1"),
    "load_mnist: root a number": (lambda: load_mnist(3), "root=3"),
    "load_mnist: train as text": (lambda: load_mnist(train="yes"), "train='yes'"),
    "load_mnist: sources None": (lambda: load_mnist(sources=None), "sources=None"),
    # estimator
    "forward_gradient: f not callable": (lambda: forward_gradient(3, torch.ones(3)), "f=3 is not allowed"),
    "forward_gradient: integer params": (lambda: forward_gradient(lambda p: p.sum(), torch.ones(3, dtype=torch.long)),
                                         "floating-point"),
    "forward_gradient: empty params": (lambda: forward_gradient(lambda p: 0, {}), "non-empty"),
    "forward_gradient: vector f": (lambda: forward_gradient(lambda p: 2 * p, torch.ones(3)), "scalar"),
    "forward_gradient: generator": (lambda: forward_gradient(lambda p: p.sum(), torch.ones(3), generator=3),
                                    "generator=3"),
    "forward_gradient: 0 tangents": (lambda: forward_gradient(lambda p: p.sum(), torch.ones(3), num_tangents=0),
                                     "num_tangents=0"),
    "sample_tangents: integer params": (lambda: sample_tangents(torch.ones(3, dtype=torch.long)), "floating-point"),
    "ForwardGradient: not a module": (lambda: ForwardGradient("mlp"), "model='mlp' is not allowed"),
    "ForwardGradient: wrong input shape": (lambda: ForwardGradient(MLP(hidden=4))(torch.randn(2, 5), Y[:2]),
                                           r"cannot take x of shape \(2, 5\)"),
    "ForwardGradient: clip 0": (lambda: ForwardGradient(MLP(hidden=4), clip=0), "clip=0"),
    "ForwardGradient: clip as text": (lambda: ForwardGradient(MLP(hidden=4), clip="1"), "clip='1'"),
    "ForwardGradient: loss_fn None": (lambda: ForwardGradient(MLP(hidden=4), None), "loss_fn=None"),
    "ForwardGradient: x None": (lambda: ForwardGradient(MLP(hidden=4))(None, Y), "x and y must be tensors"),
    "ForwardGradient: label 10": (lambda: ForwardGradient(MLP(hidden=4))(X, torch.full((20,), 10)), "out of bounds"),
    "ForwardGradient (torch.func): label 10": (lambda: ForwardGradient(MLP(hidden=4), fast=False)(
        X, torch.full((20,), 10)), "cannot take x"),
    "forward_gradient: f returns a float": (lambda: forward_gradient(lambda p: 1.0, torch.ones(3)), "scalar tensor"),
    "directional_derivative: tangents None": (lambda: directional_derivative(lambda p: p.sum(), torch.ones(3), None),
                                              "tangents must have"),
    "directional_derivative: tangent shape": (lambda: directional_derivative(lambda p: p.sum(), torch.ones(3),
                                                                             torch.ones(4)), r"\(4,\)"),
    "ActivityGradient: x None": (lambda: ActivityGradient(MLP(hidden=4))(None, Y), "x and y must be tensors"),
    "ActivityGradient: label 10": (lambda: ActivityGradient(LocalMLP(hidden=8, groups=2))(X, torch.full((20,), 10)),
                                   "cannot take x"),
    "reference_gradient: model None": (lambda: reference_gradient(None, X, Y), "model=None"),
    "cosines: estimate None": (lambda: cosines(None, MLP(hidden=4), X, Y, 2), "estimate=None"),
    "cosines: negative draws": (lambda: cosines(ForwardGradient(MLP(hidden=4)), MLP(hidden=4), X, Y, -1), "draws=-1"),
    "cosines: only None": (lambda: cosines(ForwardGradient(MLP(hidden=4)), MLP(hidden=4), X, Y, 2, only=None),
                           "only=None"),
    "weight_cosine: negative weights": (lambda: weight_cosine(-1), "num_weights=-1"),
    "weight_cosine: 0 tangents": (lambda: weight_cosine(10, 0), "num_tangents=0"),
    "weight_cosine: None": (lambda: weight_cosine(None), "num_weights=None"),
    # models and optimizers
    "make_model: unknown name": (lambda: make_model("resnet"), "model='resnet'"),
    "make_model: unknown argument": (lambda: make_model("mlp", width=3), "does not take 'width'"),
    "MLP: hidden not an int": (lambda: make_model("mlp", hidden="a"), "hidden='a'"),
    "MLP: hidden True": (lambda: MLP(hidden=True), "hidden=True"),
    "LocalMLP: negative classes": (lambda: LocalMLP(hidden=8, groups=2, classes=-1), "classes=-1"),
    "LocalMLP: classes None": (lambda: LocalMLP(hidden=8, groups=2, classes=None), "classes=None"),
    "count_parameters: None": (lambda: count_parameters(None), "model=None"),
    "exp_decay: not an optimizer": (lambda: exp_decay("sgd", 1e-4), "optimizer='sgd'"),
    "exp_decay: negative k": (lambda: exp_decay(sgd(logreg()), -1), "k=-1"),
    "ForwardSGD: negative lr": (lambda: ForwardSGD(MLP(hidden=4), cross_entropy, lr=-1), "lr=-1"),
    "ForwardAdam: beta above 1": (lambda: ForwardAdam(MLP(hidden=4), cross_entropy, betas=(1.5, 0.9)), "beta"),
    "ForwardAdam: betas None": (lambda: ForwardAdam(MLP(hidden=4), betas=None), "betas=None"),
    "ForwardAdam: one beta": (lambda: ForwardAdam(MLP(hidden=4), betas=(0.9,)), "betas="),
    "ForwardAdam: eps None": (lambda: ForwardAdam(MLP(hidden=4), eps=None), "eps=None"),
    "ForwardAdam: model None": (lambda: ForwardAdam(None), "model=None"),
    "ForwardSGD: model None": (lambda: ForwardSGD(None), "model=None"),
    "ForwardSGD: decay None": (lambda: ForwardSGD(MLP(hidden=4), decay=None), "decay=None"),
    "ForwardSGD: x None": (lambda: ForwardSGD(MLP(hidden=4)).step(None, Y), "x and y must be tensors"),
    "ForwardSGD: wrong input shape": (lambda: ForwardSGD(MLP(hidden=4)).step(torch.randn(2, 5), Y[:2]),
                                      r"cannot take x of shape \(2, 5\)"),
    "forward_step: estimate None": (lambda: forward_step(None, sgd(logreg()), X, Y), "estimate=None"),
    "forward_step: optimizer None": (lambda: forward_step(ForwardGradient(logreg()), None, X, Y), "optimizer=None"),
    "is_plain_sgd: model None": (lambda: is_plain_sgd(sgd(logreg()), None), "model=None"),
    # losses (the original's helpers)
    "softmax: empty": (lambda: softmax(torch.empty(0)), "at least one class"),
    "softmax: None": (lambda: softmax(None), "floating-point tensor"),
    "clamp_probs: integers": (lambda: clamp_probs(torch.ones(3, dtype=torch.long)), "floating-point"),
    "functional_xent: model None": (lambda: functional_xent({}, None, X, Y), "model=None"),
    # test functions
    "optimize: zero steps": (lambda: optimize(beale, (1.0, 1.0), steps=0, lr=0.01), "steps=0"),
    "optimize: negative lr": (lambda: optimize(beale, (1.0, 1.0), steps=2, lr=-1), "lr=-1"),
    "optimize: unknown method": (lambda: optimize(beale, (1.0, 1.0), steps=2, lr=0.01, method="adam"), "adam"),
    "optimize: 3-D start": (lambda: optimize(beale, (1.0, 1.0, 1.0), steps=2, lr=0.01), "start"),
    "optimize: start None": (lambda: optimize(beale, None, steps=2, lr=0.01), "start=None"),
    "optimize: start with None": (lambda: optimize(beale, [None, 1.0], steps=2, lr=0.01), "start="),
    "optimize: f None": (lambda: optimize(None, (1.0, 1.0), steps=2, lr=0.01), "f=None"),
    "optimize: negative seed": (lambda: optimize(beale, (1.0, 1.0), steps=2, lr=0.01, seed=-1), "seed=-1"),
    "optimize: seed None": (lambda: optimize(beale, (1.0, 1.0), steps=2, lr=0.01, seed=None), "seed=None"),
    "sample_estimates: 3-D point": (lambda: sample_estimates(beale, (1.0, 1.0, 1.0), 3), "point="),
    "sample_estimates: point None": (lambda: sample_estimates(beale, None, 3), "point=None"),
    "sample_estimates: f None": (lambda: sample_estimates(None, (1.0, 1.0), 3), "f=None"),
    "true_gradient: 1-D point": (lambda: true_gradient(beale, (1.0,)), "point="),
    "true_gradient: f None": (lambda: true_gradient(None, (1.0, 1.0)), "f=None"),
    # training
    "evaluate: batch size 0": (lambda: evaluate(logreg(), X, Y, batch_size=0), "batch_size=0"),
    "evaluate: label 10": (lambda: evaluate(logreg(), X, torch.full((20,), 10)), "labels from 10 to 10"),
    "evaluate: model None": (lambda: evaluate(None, X, Y), "model=None"),
    "evaluate: model a name": (lambda: evaluate("mlp", X, Y), "model='mlp'"),
    "evaluate: loss_fn None": (lambda: evaluate(logreg(), X, Y, loss_fn=None), "loss_fn=None"),
    "fit: unknown method": (lambda: fit(logreg(), "adjoint", sgd(logreg()), (X, Y)), "method='adjoint'"),
    "fit: not an optimizer": (lambda: fit(logreg(), "backprop", "sgd", (X, Y)), "optimizer='sgd'"),
    "fit: not a model": (lambda: fit("mlp", "backprop", sgd(logreg()), (X, Y)), "model='mlp'"),
    "fit: eval_sets a list": (lambda: fit(logreg(), "backprop", sgd(logreg()), (X, Y), [(X, Y)]), "eval_sets=<a list>"),
    "fit: zero epochs": (lambda: fit(logreg(), "backprop", sgd(logreg()), (X, Y), epochs=0), "epochs=0"),
    "fit: negative seed": (lambda: fit(logreg(), "backprop", sgd(logreg()), (X, Y), seed=-1), "seed=-1"),
    "fit: schedule_every": (lambda: fit(logreg(), "backprop", sgd(logreg()), (X, Y), schedule_every="batch"),
                            "schedule_every='batch'"),
    "fit: sampler": (lambda: fit(logreg(), "forward", sgd(logreg()), (X, Y), sampler="uniform"), "sampler='uniform'"),
    "fit: flat images for an MLP": (lambda: fit(logreg(), "backprop", sgd(logreg()), (torch.randn(20, 5), Y)),
                                    "cannot take train inputs of shape"),
    "fit: float labels": (lambda: fit(logreg(), "backprop", sgd(logreg()), (X, Y.float())), "integer class indices"),
    "fit: label 10": (lambda: fit(logreg(), "backprop", sgd(logreg()), (X, torch.full((20,), 10))), "0..9"),
    "fit: label -1 in an eval set": (lambda: fit(logreg(), "backprop", sgd(logreg()), (X, Y),
                                                 {"test": (X, torch.full((20,), -1))}), r"eval_sets\['test'\]"),
    "fit: schedule as text": (lambda: fit_logreg(schedule="exp"), "schedule='exp'"),
    "fit: schedule of another optimizer": (lambda: fit_logreg(schedule=exp_decay(sgd(logreg()), 1e-4)),
                                           "another optimizer"),
    "fit: loss_fn None": (lambda: fit_logreg(loss_fn=None), "loss_fn=None"),
    "fit: clip as text": (lambda: fit(logreg(), "forward", sgd(logreg()), (X, Y), clip="1", progress=False), "clip='1'"),
    "fit: meta a list": (lambda: fit_logreg(meta=[1]), r"meta=\[1\]"),
    "fit: on_epoch not callable": (lambda: fit_logreg(on_epoch=3), "on_epoch=3"),
    "fit: checkpoint a number": (lambda: fit_logreg(checkpoint=3), "checkpoint=3"),
    "fit: train None": (lambda: fit(logreg(), "backprop", sgd(logreg()), None), "train must be a pair"),
    "train_model: lr as text": (lambda: train_model("mlp", "backprop", (X, Y), lr="0.1"), "lr='0.1'"),
    "train_model: negative momentum": (lambda: train_model("logreg", "backprop", (X, Y), momentum=-1), "momentum=-1"),
    "train_model: unknown argument": (lambda: train_model("logreg", "backprop", (X, Y), epoch=3), "no argument 'epoch'"),
    "train_model: unknown device": (lambda: train_model("logreg", "backprop", (X, Y), device="tpu"), "device='tpu'"),
    "train_model: model None": (lambda: train_model(None, "forward", (X, Y)), "model=None is not allowed: use a model name"),
    "train_model: model a number": (lambda: train_model(3, "forward", (X, Y)), "zero-argument constructor"),
    "train_model: unknown model name": (lambda: train_model("resnet", "forward", (X, Y)), "model='resnet'"),
    "train_model: constructor needs an argument": (lambda: train_model(nn.Linear, "forward", (X, Y)),
                                                   "cannot be called without arguments"),
    "train_model: constructor returns no module": (lambda: train_model(lambda: 3, "forward", (X, Y)),
                                                   "returned 3, not a torch.nn.Module"),
    "train_model: method None": (lambda: train_model("logreg", None, (X, Y)), "method=None"),
    "train_model: method a list": (lambda: train_model("logreg", ["forward"], (X, Y)), r"method=\['forward'\]"),
    "train_model: meta None": (lambda: train_model("logreg", "forward", (X, Y), meta=None), "meta=None"),
    "sweep: no learning rates": (lambda: sweep("logreg", "backprop", (X, Y), (X, Y), []), "at least one"),
    "sweep: lrs None": (lambda: sweep("logreg", "backprop", (X, Y), (X, Y), None), "lrs=None"),
    "sweep: lrs one number": (lambda: sweep("logreg", "backprop", (X, Y), (X, Y), 0.1), "lrs=0.1"),
    "sweep: decays None": (lambda: sweep("logreg", "backprop", (X, Y), (X, Y), [0.1], None), "decays=None"),
    "sweep: model None": (lambda: sweep(None, "backprop", (X, Y), (X, Y), [0.1], progress=False), "model=None"),
    "best_run: None": (lambda: best_run(None), "results=None"),
    "best_run: no such metric": (lambda: best_run(RESULTS, "test_loss"), "no column 'test_loss'"),
    "best_run: no rows": (lambda: best_run(RESULTS[:0]), "no rows"),
    "at_grid_edge: None": (lambda: at_grid_edge(None, RESULTS.iloc[0]), "results=None"),
    "at_grid_edge: best None": (lambda: at_grid_edge(RESULTS, None), "best=None"),
    "at_grid_edge: no such column": (lambda: at_grid_edge(RESULTS, RESULTS.iloc[0], "momentum"), "'momentum'"),
    "History.final: a list": (lambda: RUN.final(["test_loss"]), "column="),
    "History.from_json: a folder": (lambda: History.from_json("/"), "cannot read a History from /"),
    "History.from_json: None": (lambda: History.from_json(None), "source=None"),
    # analysis
    "epoch_table: a History, not a list": (lambda: analysis.epoch_table(RUN, "test_loss"), "group="),
    "epoch_table: a None run": (lambda: analysis.epoch_table([None], "test_loss"), r"group\[0\]=None"),
    "final_scores: None": (lambda: analysis.final_scores(None), "groups=None"),
    "final_scores: a list": (lambda: analysis.final_scores([RUN]), "groups="),
    "final_scores: an empty group": (lambda: analysis.final_scores({"a": []}), r"groups\['a'\]=\[\]"),
    "final_scores: a run without evaluations": (lambda: analysis.final_scores({"a": [History()]}), "no evaluation rows"),
    "final_scores: unknown column": (lambda: analysis.final_scores({"a": [RUN]}, ["x"]), "column='x'"),
    "ms_per_step: no runs": (lambda: analysis.ms_per_step([]), r"group=\[\]"),
    "ms_per_step: a History": (lambda: analysis.ms_per_step(RUN), "group="),
    "time_to_loss: None": (lambda: analysis.time_to_loss(None, 1.0), "run=None"),
    "time_to_loss: target None": (lambda: analysis.time_to_loss(RUN, None), "target=None"),
    "time_to_loss: unknown column": (lambda: analysis.time_to_loss(RUN, 1.0, "x"), "column='x'"),
    "common_target: a list": (lambda: analysis.common_target([RUN]), "groups="),
    "common_target: unknown column": (lambda: analysis.common_target({"a": [RUN]}, "x"), "column='x'"),
    "time_to_loss_ratio: None": (lambda: analysis.time_to_loss_ratio(None, [RUN], 1.0), "numerator=None"),
    "time_to_loss_ratio: step_ms one number": (lambda: analysis.time_to_loss_ratio([RUN], [RUN], 1.0, step_ms=3),
                                               "step_ms=3"),
    "time_to_loss_ratio: negative step_ms": (lambda: analysis.time_to_loss_ratio([RUN], [RUN], 1.0, step_ms=(-1, 1)),
                                             r"step_ms\[0\]=-1"),
    "mean_sd: None": (lambda: analysis.mean_sd(None, 0.1), "mean=None"),
    "mean_sd: sd None": (lambda: analysis.mean_sd(0.5, None), "sd=None"),
    "mean_sd: negative digits": (lambda: analysis.mean_sd(0.5, 0.1, -1), "digits=-1"),
    "search_table: None": (lambda: analysis.search_table(None, [RUN]), "configs=None"),
    "search_table: a config without lr": (lambda: analysis.search_table([{}], [RUN]), r"configs\[0\]"),
    "search_table: more configs than runs": (lambda: analysis.search_table([{"method": "forward", "lr": 1, "decay": 0}],
                                                                           []), "1 entries and histories 0"),
    "search_table: no such metric": (lambda: analysis.search_table([{"method": "forward", "lr": 1, "decay": 0}], [RUN]),
                                     "column='val_loss'"),
    # plots
    "plot_loss: None": (lambda: plots.plot_loss(None), "runs=None"),
    "plot_loss: a run None": (lambda: plots.plot_loss({"a": None}), r"runs\['a'\]=None"),
    "plot_loss: smooth None": (lambda: plots.plot_loss({"a": [1.0, 2.0]}, smooth=None), "smooth=None"),
    "plot_loss: negative smooth": (lambda: plots.plot_loss({"a": [1.0, 2.0]}, smooth=-1), "smooth=-1"),
    "plot_curves: None": (lambda: plots.plot_curves(None), "runs=None"),
    "plot_curves: a run None": (lambda: plots.plot_curves({"a": None}), r"runs\['a'\]=None"),
    "plot_curves: eval_set None": (lambda: plots.plot_curves({"a": RUN}, None), "eval_set=None"),
    "smooth_curve: None": (lambda: plots.smooth_curve(None, 3), "values=None"),
    "smooth_curve: window None": (lambda: plots.smooth_curve([1.0, 2.0], None), "window=None"),
    "plot_contour: f None": (lambda: plots.plot_contour(None, {}, (0, 1), (0, 1)), "f=None"),
    "plot_contour: xlim None": (lambda: plots.plot_contour(beale, {}, None, (0, 1)), "xlim=None"),
    "plot_contour: trajectories None": (lambda: plots.plot_contour(beale, None, (0, 1), (0, 1)), "trajectories=None"),
    "plot_contour: empty trajectory": (lambda: plots.plot_contour(beale, {"a": np.zeros((0, 2))}, (0, 1), (0, 1)),
                                       r"n >= 1, got shape \(0, 2\)"),
    "plot_contour: negative arrows": (lambda: plots.plot_contour(beale, {}, (0, 1), (0, 1), arrows=-1), "arrows=-1"),
    "plot_contour: minimum a number": (lambda: plots.plot_contour(beale, {}, (0, 1), (0, 1), minimum=3), "minimum=3"),
    "plot_contour: f nowhere positive": (lambda: plots.plot_contour(lambda x, y: 0 * x, {}, (0, 1), (0, 1)),
                                         "nowhere positive"),
    "plot_surface: trajectories None": (lambda: plots.plot_surface(beale, None, (0, 1), (0, 1)), "trajectories=None"),
    "plot_estimates: estimates None": (lambda: plots.plot_estimates(beale, (1, 1), (1, 1), None, (0, 2), (0, 2)),
                                       r"\(n, 2\)"),
    "plot_estimates: no estimates": (lambda: plots.plot_estimates(beale, (1, 1), (1, 1), [], (0, 2), (0, 2)),
                                     r"\(n, 2\)"),
    "plot_estimates: point None": (lambda: plots.plot_estimates(beale, None, (1, 1), [[1, 1]], (0, 2), (0, 2)),
                                   "point=None"),
    "plot_estimates: true_grad None": (lambda: plots.plot_estimates(beale, (1, 1), None, [[1, 1]], (0, 2), (0, 2)),
                                       "true_grad=None"),
    "plot_bars: None": (lambda: plots.plot_bars(None), "table=None"),
    "plot_step_costs: None": (lambda: plots.plot_step_costs(None), "steps=None"),
    "plot_step_costs: no rows": (lambda: plots.plot_step_costs(pd.DataFrame(columns=[
        "batch", "forward gradient ms", "sample tangents ms", "forward-mode pass ms", "update ms"])), "no rows"),
    "plot_samples: None": (lambda: plots.plot_samples(None, (1, 1)), "samples=None"),
    "plot_samples: no clouds": (lambda: plots.plot_samples({}, (1, 1)), r"samples=\{\}"),
    "plot_samples: true_grad None": (lambda: plots.plot_samples({"a": np.zeros((3, 2))}, None), "true_grad=None"),
    "plot_samples: empty cloud": (lambda: plots.plot_samples({"a": np.zeros((0, 2))}, (1, 1)), r"\(n, 2\)"),
    "plot_distribution: values None": (lambda: plots.plot_distribution(None, 1.0, "x"), "values=None"),
    "plot_distribution: reference None": (lambda: plots.plot_distribution([1.0], None, "x"), "reference=None"),
    "plot_sweep: None": (lambda: plots.plot_sweep(None), "results=None"),
    "plot_sweep: no such metric": (lambda: plots.plot_sweep(RESULTS, "test_loss"), "no column 'test_loss'"),
    "plot_sweep: no such column": (lambda: plots.plot_sweep(RESULTS, by="protocol"), "no column 'protocol'"),
    "plot_cosines: None": (lambda: plots.plot_cosines(None), "measured=None"),
    "plot_cosines: no rows": (lambda: plots.plot_cosines(pd.DataFrame(columns=["estimator", "stage", "cosine"])),
                              "no rows"),
    # book
    "check_parameters: a list": (lambda: check_parameters([1]), "namespace=list"),
    "table: None": (lambda: table(None, "Scores."), "frame=None"),
    "table: caption None": (lambda: table(pd.DataFrame({"a": [1]}), None), "caption=None"),
    "table: negative digits": (lambda: table(pd.DataFrame({"a": [1.0]}), "Scores.", -1), "digits=-1"),
    "chapter_parameters: missing file": (lambda: chapter_parameters("/nonexistent.ipynb"), "does not exist"),
    "chapter_parameters: a folder": (lambda: chapter_parameters("/"), "is a folder"),
    "run_chapter: notebook None": (lambda: run_chapter(None), "notebook=None"),
    "run_chapter: parameters as text": (lambda: run_chapter(CHAPTER, None, "epochs"), "parameters='epochs'"),
    "parse_value: None": (lambda: parse_value(None), "text=None"),
    # utils
    "make_generator: seed None": (lambda: make_generator(None), "seed=None"),
    "make_generator: negative seed": (lambda: make_generator(-1), "seed=-1"),
    "pick_device: cuda:x": (lambda: pick_device("cuda:x"), "device='cuda:x'"),
    "check_writable: a number": (lambda: check_writable("output", 3), "output=3"),
    "seed_everything: negative": (lambda: seed_everything(-1), "seed=-1"),
    "pick_device: unknown": (lambda: pick_device("tpu"), "device='tpu'"),
    "check_writable: a folder": (lambda: check_writable("output", "/tmp"), "is a directory"),
    # the results store, replay and the search
    "run_path: no config": (lambda: store.run_path(None), "config=None"),
    "run_key: a list": (lambda: store.run_key([1]), r"config=\[1\]"),
    "describe: no config": (lambda: store.describe(None), "config=None"),
    "read: no path": (lambda: store.read(None), "path=None"),
    "train_runs: no list": (lambda: store.train_runs(None), "configs=None"),
    "train_runs: a string entry": (lambda: store.train_runs(["mlp"]), "configs entry='mlp'"),
    "stored_note: no runs": (lambda: store.stored_note([]), "non-empty list of Histories"),
    "thin: negative block": (lambda: store.thin([1.0], -1), "every=-1"),
    "fingerprint: no config": (lambda: replay.fingerprint(None), "config=None"),
    "fingerprint: 0 steps": (lambda: replay.fingerprint({}, steps=0), "steps=0"),
    "check_replay: no path": (lambda: replay.check_replay(None), "path=None"),
    "check_replay: negative steps": (lambda: replay.check_replay("x", steps=-1), "steps=-1"),
    "replay CLI: negative steps": (lambda: _exits_2(replay.main, ["--steps", "-1"]), "--steps=-1"),
    "study_table: no study": (lambda: study.study_table(None), "study=None"),
}


@pytest.mark.parametrize("call, message", CASES.values(), ids=CASES.keys())
def test_bad_input_gets_a_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("model", [nn.Flatten(), nn.Sequential(nn.Flatten()),
                                   nn.Sequential(nn.Flatten(), nn.BatchNorm1d(784, affine=False))],
                         ids=["Flatten", "Sequential(Flatten)", "buffers only"])
def test_a_model_without_parameters_is_evaluated_where_its_inputs_are(model):
    assert not list(model.parameters())
    loss, accuracy = evaluate(model, X, Y)  # 784 "classes": every label 0..9 is one of them
    assert math.isfinite(loss) and 0 <= accuracy <= 1


@pytest.mark.parametrize("argv, name, value", [
    (["-p", "beale_lr", "-1e-3"], "beale_lr", -1e-3),
    (["-p", "beale_start", "[-1.5e0, 2]"], "beale_start", [-1.5, 2]),
    (["-p", "starts", "[[-1.5, 2]]"], "starts", [[-1.5, 2]]),
    (["-p", "lr", "1e-3"], "lr", 1e-3),
    (["-p", "x", "-2"], "x", -2),
    (["-p", "x", "-.5"], "x", -0.5),
    (["-p", "x", "-inf"], "x", -math.inf),
    (["-pbeale_lr", "-1.5e0"], "beale_lr", -1.5),
    (["--parameter", "beale_lr", "-1e-3"], "beale_lr", -1e-3),
    (["--param=beale_lr", "-1e-3"], "beale_lr", -1e-3),
])
def test_the_command_line_takes_the_token_after_a_name_as_its_value_even_a_negative_number(argv, name, value):
    args = parse_args([CHAPTER, *argv, "out.ipynb"])
    assert (args.notebook, args.output, args.list) == (CHAPTER, "out.ipynb", False)
    assert [(n, parse_value(v)) for n, v in args.parameter] == [(name, value)]


def test_the_command_line_keeps_several_parameters_in_order_and_the_other_arguments():
    args = parse_args([CHAPTER, "-p", "beale_lr", "-1e-3", "--list", "-p", "beale_start", "[-1.5, 2]"])
    assert args.list and args.output is None
    assert [(n, parse_value(v)) for n, v in args.parameter] == [("beale_lr", -1e-3), ("beale_start", [-1.5, 2])]


def test_a_negative_value_reaches_the_chapter_check_instead_of_an_argparse_error(capsys):
    from fgtutor.book import main
    # the unknown name is rejected before anything runs, which shows that -1e-3 got through
    assert main([CHAPTER, "-p", "beale_lr", "-1e-3", "-p", "no_such", "-2"]) == 2
    err = capsys.readouterr().err
    assert "no parameter named 'no_such'" in err and "expected 2 arguments" not in err


@pytest.mark.parametrize("argv", [["-p", "lr"], ["-p"], ["--parameter", "lr"]])
def test_a_parameter_without_a_value_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args([CHAPTER, *argv])
    assert exit.value.code == 2 and "needs a NAME and a VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [torch.full((20,), 10), torch.full((20,), -1)])
def test_a_bad_label_stops_training_before_any_step(bad):
    model = logreg()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        fit(model, "backprop", sgd(model), (X, torch.cat([Y[:10], bad[10:]])), progress=False)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("method", ["forward", "backprop"])
def test_a_model_with_nothing_trainable_cannot_be_fit(method):
    model = logreg().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(model, method, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), (X, Y), progress=False)


# -- properties --------------------------------------------------------------------------

numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32))


@given(st.lists(numbers, max_size=6))
def test_parse_value_reads_every_list_of_numbers_as_numbers(values):
    text = "[" + ", ".join(f"{v:.6e}" if isinstance(v, float) else str(v) for v in values) + "]"
    parsed = parse_value(text)
    assert isinstance(parsed, list) and len(parsed) == len(values)
    assert all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parsed)
    assert all(math.isclose(p, v, rel_tol=1e-6, abs_tol=1e-30) for p, v in zip(parsed, values))


@given(st.one_of(numbers, st.booleans()))
def test_parse_value_round_trips_single_numbers_and_booleans(value):
    parsed = parse_value(str(value).lower() if isinstance(value, bool) else repr(value))
    assert parsed == value and type(parsed) is type(value)


shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.sampled_from("abc"), shapes, min_size=1), st.integers(1, 3),
       st.sampled_from(["gaussian", "rademacher"]))
def test_the_estimate_has_the_structure_shapes_and_dtypes_of_the_parameters(tree, k, sampler):
    params = {name: torch.randn(shape) for name, shape in tree.items()}
    value, grads = forward_gradient(lambda p: sum((t ** 2).sum() for t in p.values()), params,
                                    num_tangents=k, sampler=sampler)
    assert value.dim() == 0 and grads.keys() == params.keys()
    assert all(g.shape == p.shape and g.dtype == p.dtype for g, p in zip(grads.values(), params.values()))
