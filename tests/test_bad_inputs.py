"""Wrong types, out-of-range values, empty inputs: every public entry point answers with a
``ValueError`` that names the argument, before any work is done (a table, so that a new
case is one line), plus properties that hold for every input (hypothesis)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fgtutor.book import parse_value
from fgtutor.data import batches, train_val_split
from fgtutor.forward import ForwardGradient, forward_gradient, sample_tangents
from fgtutor.losses import cross_entropy
from fgtutor.models import MLP, make_model
from fgtutor.optim import ForwardAdam, ForwardSGD, exp_decay
from fgtutor.testfns import beale, optimize
from fgtutor.train import History, evaluate, fit, sweep, train_model
from fgtutor.utils import check_writable, pick_device, seed_everything


X = torch.randn(20, 1, 28, 28)
Y = torch.randint(0, 10, (20,))


def logreg():
    return make_model("logreg")


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


CASES = {
    # data
    "split: n_val not an int": (lambda: train_val_split(X, Y, n_val=2.5), "n_val=2.5"),
    "batches: empty tensors": (lambda: batches(X[:0], Y[:0], 4), "empty"),
    "batches: a list for X": (lambda: batches([1, 2], Y, 4), "must be tensors"),
    "batches: batch size 0": (lambda: batches(X, Y, 0), "batch_size=0"),
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
    # models and optimizers
    "make_model: unknown name": (lambda: make_model("resnet"), "model='resnet'"),
    "make_model: unknown argument": (lambda: make_model("mlp", width=3), "does not take 'width'"),
    "MLP: hidden not an int": (lambda: make_model("mlp", hidden="a"), "hidden='a'"),
    "exp_decay: not an optimizer": (lambda: exp_decay("sgd", 1e-4), "optimizer='sgd'"),
    "exp_decay: negative k": (lambda: exp_decay(sgd(logreg()), -1), "k=-1"),
    "ForwardSGD: negative lr": (lambda: ForwardSGD(MLP(hidden=4), cross_entropy, lr=-1), "lr=-1"),
    "ForwardAdam: beta above 1": (lambda: ForwardAdam(MLP(hidden=4), cross_entropy, betas=(1.5, 0.9)), "beta"),
    # test functions
    "optimize: zero steps": (lambda: optimize(beale, (1.0, 1.0), steps=0, lr=0.01), "steps=0"),
    "optimize: negative lr": (lambda: optimize(beale, (1.0, 1.0), steps=2, lr=-1), "lr=-1"),
    "optimize: unknown method": (lambda: optimize(beale, (1.0, 1.0), steps=2, lr=0.01, method="adam"), "adam"),
    "optimize: 3-D start": (lambda: optimize(beale, (1.0, 1.0, 1.0), steps=2, lr=0.01), "start"),
    # training
    "evaluate: batch size 0": (lambda: evaluate(logreg(), X, Y, batch_size=0), "batch_size=0"),
    "evaluate: label 10": (lambda: evaluate(logreg(), X, torch.full((20,), 10)), "labels from 10 to 10"),
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
    "train_model: lr as text": (lambda: train_model("mlp", "backprop", (X, Y), lr="0.1"), "lr='0.1'"),
    "train_model: negative momentum": (lambda: train_model("logreg", "backprop", (X, Y), momentum=-1), "momentum=-1"),
    "train_model: unknown argument": (lambda: train_model("logreg", "backprop", (X, Y), epoch=3), "no argument 'epoch'"),
    "train_model: unknown device": (lambda: train_model("logreg", "backprop", (X, Y), device="tpu"), "device='tpu'"),
    "sweep: no learning rates": (lambda: sweep("logreg", "backprop", (X, Y), (X, Y), []), "at least one"),
    "History.from_json: a folder": (lambda: History.from_json("/"), "cannot read a History from /"),
    "seed_everything: negative": (lambda: seed_everything(-1), "seed=-1"),
    "pick_device: unknown": (lambda: pick_device("tpu"), "device='tpu'"),
    "check_writable: a folder": (lambda: check_writable("output", "/tmp"), "is a directory"),
}


@pytest.mark.parametrize("call, message", CASES.values(), ids=CASES.keys())
def test_bad_input_gets_a_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()


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
