"""The results store: a configuration maps to one file; hits load, misses train; writes
are atomic and exclusive; batches resume; corrupt files are named; stored runs replay."""
import gzip
import json
import multiprocessing
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fgtutor import store
from fgtutor.replay import check_replay
from fgtutor.store import (CorruptRunError, MissingRunsError, load, read,
                           run_config, run_key, run_path, save, stored_note, thin, train_and_save, train_runs)

ROOT = Path(__file__).resolve().parents[1]
# tiny but real: logistic regression on 256 images, one epoch, scored on the validation set
TINY = dict(model="logreg", method="backprop", lr=0.1, epochs=1, n_train=256, n_val=1000, eval_sets=["val"])


@pytest.fixture
def root(tmp_path):
    return tmp_path / "results"


def count_training(monkeypatch) -> list:
    """Record every configuration that is actually trained."""
    trained, real = [], store.train_config

    def spy(config, *args, **kwargs):
        trained.append(config)
        return real(config, *args, **kwargs)

    monkeypatch.setattr(store, "train_config", spy)
    return trained


# -- configurations ----------------------------------------------------------------------

def test_a_config_is_complete_and_its_key_depends_on_every_setting():
    config = run_config(**TINY)
    assert set(config) == set(store.DEFAULTS)
    assert run_key(config) == run_key(dict(reversed(list(config.items()))))  # order does not matter
    for name, value in [("lr", 0.2), ("seed", 1), ("epochs", 2), ("n_train", 128), ("decay", 0.0),
                        ("eval_sets", ["val", "test"]), ("model", "mlp")]:
        assert run_key(run_config(**{**TINY, name: value})) != run_key(config), name


def test_forward_only_settings_do_not_split_backprop_runs():
    a = run_config(**TINY, sampler="gaussian", num_tangents=4)
    assert run_key(a) == run_key(run_config(**TINY)) and a["sampler"] is None
    f = dict(TINY, method="forward")
    assert run_key(run_config(**f, sampler="gaussian")) != run_key(run_config(**f))


def test_later_settings_appear_only_when_they_differ_from_their_defaults():
    # runs stored before `optimizer` and `perturb` existed keep their keys
    plain = run_config(**TINY)
    assert "optimizer" not in plain and "perturb" not in plain
    assert run_config(**TINY, optimizer="sgd") == plain
    adam = run_config(**TINY, optimizer="adam")
    assert adam["optimizer"] == "adam" and run_key(adam) != run_key(plain)
    activities = run_config(**dict(TINY, method="forward"), perturb="activities")
    assert activities["perturb"] == "activities"
    assert "perturb" not in run_config(**TINY, perturb="activities")  # backprop perturbs nothing
    assert "adam" in store.describe(adam) and "activities" in store.describe(activities)


def test_standardized_inputs_are_a_setting_that_every_set_and_method_shares():
    assert "inputs" not in run_config(**TINY) and run_config(**TINY, inputs="raw") == run_config(**TINY)
    config = run_config(**dict(TINY, eval_sets=["val", "test"]), inputs="standardized")
    assert config["inputs"] == "standardized" and run_key(config) != run_key(run_config(**TINY))
    assert "inputs" not in store.fit_kwargs(config)  # a data setting: train_model never sees it
    (X, _), sets = store.config_data(config)
    (X_raw, _), raw_sets = store.config_data(run_config(**dict(TINY, eval_sets=["val", "test"])))
    for a, b in [(X, X_raw), (sets["val"][0], raw_sets["val"][0]), (sets["test"][0], raw_sets["test"][0])]:
        assert torch.allclose(a, (b - 0.1307) / 0.3081)
    assert "standardized" in store.describe(config)
    backprop = run_config(**dict(TINY, method="backprop"), inputs="standardized")
    assert backprop["inputs"] == "standardized"
    cosine = run_config(**TINY, lr_schedule="cosine", decay=0)
    assert cosine["lr_schedule"] == "cosine" and "lr_schedule" not in run_config(**TINY)
    assert store.fit_kwargs(cosine)["lr_schedule"] == "cosine"
    with pytest.raises(ValueError, match="use decay=0 with lr_schedule='cosine'"):
        run_config(**TINY, lr_schedule="cosine")
    with pytest.raises(ValueError, match="inputs='normalised' is not allowed: use one of 'raw', 'standardized'"):
        run_config(**TINY, inputs="normalised")


def test_a_run_with_adam_and_activity_perturbation_trains_stores_and_replays(root):
    config = dict(TINY, model="mlp", method="forward", optimizer="adam", perturb="activities", lr=1e-3,
                  n_train=128)
    history, = train_runs([config], root=root, progress=False)
    assert history.meta["optimizer"] == "Adam" and history.meta["perturb"] == "activities"
    assert check_replay(run_path(run_config(**config), root), steps=3)["exact"]


@pytest.mark.parametrize("settings, message", [
    ({"optimizer": "rmsprop"}, "optimizer='rmsprop' is not allowed"),
    ({"optimizer": "adam", "momentum": 0.9}, "momentum=0.9 is an SGD setting"),
    ({"method": "forward", "perturb": "biases"}, "perturb='biases' is not allowed"),
    ({"method": "forward", "perturb": "activities", "num_tangents": 2}, "one tangent"),
    ({"epoch": 3}, "unknown run setting.*'epoch'"),
    ({"lr": -1.0}, "lr=-1.0 is not allowed"),
    ({"model": "resnet"}, "model='resnet' is not allowed"),
    ({"method": "adjoint"}, "method='adjoint' is not allowed"),
    ({"eval_sets": ["train"]}, "eval_sets entry='train' is not allowed"),
    ({"n_train": 59_500}, "more than the 60,000 training images of mnist"),
    ({"dataset": "cifar10"}, "dataset='cifar10' is not allowed"),
    ({"trainable": "first"}, "trainable='first' is not allowed"),
    ({"pretrain": 3}, "pretrain=3 is not allowed"),
    ({"pretrain": {"model": "mlp"}}, "a run starts from the weights of the same network"),
    ({"pretrain": {**TINY, "pretrain": TINY}}, "start from a run trained from scratch"),
    ({"method": "forward", "sampler": "uniform"}, "sampler='uniform' is not allowed"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        run_config(**{**TINY, **settings})


def test_the_file_name_carries_model_method_and_key(root):
    config = run_config(**TINY)
    assert run_path(config, root) == root / "logreg" / f"backprop-{run_key(config)}.json.gz"


# -- load on hit, train on miss ----------------------------------------------------------

def test_a_miss_trains_and_stores_then_a_hit_loads_without_training(root, monkeypatch):
    trained = count_training(monkeypatch)
    [first] = train_runs([TINY], root=root, progress=False)
    assert len(trained) == 1 and run_path(run_config(**TINY), root).is_file()
    [again] = train_runs([TINY], root=root, progress=False)
    assert len(trained) == 1, "a stored run is loaded, not trained"
    assert again.epochs == first.epochs and again.meta["provenance"]["commit"] == first.meta["provenance"]["commit"]


def test_duplicates_in_a_batch_train_once_and_come_back_in_order(root, monkeypatch):
    trained = count_training(monkeypatch)
    other = dict(TINY, seed=1)
    a, b, c = train_runs([TINY, other, TINY], root=root, progress=False)
    assert len(trained) == 2
    assert a.meta["seed"] == 0 and b.meta["seed"] == 1 and c.epochs == a.epochs


def test_retrain_trains_a_stored_run_again(root, monkeypatch):
    train_runs([TINY], root=root, progress=False)
    trained = count_training(monkeypatch)
    train_runs([TINY], root=root, progress=False, retrain=True)
    assert len(trained) == 1


def test_a_readonly_build_fails_fast_on_a_missing_run_and_says_what_to_do(root, monkeypatch):
    trained = count_training(monkeypatch)
    monkeypatch.setenv("FGTUTOR_STORE", "readonly")
    with pytest.raises(MissingRunsError, match=r"(?s)1 of this chapter's 1 runs are not stored.*make results"):
        train_runs([TINY], root=root, progress=False)
    assert not trained
    monkeypatch.setenv("FGTUTOR_STORE", "train")
    train_runs([TINY], root=root, progress=False)
    monkeypatch.setenv("FGTUTOR_STORE", "readonly")
    assert train_runs([TINY], root=root, progress=False)[0].epochs


def test_a_readers_runs_go_to_the_cache_and_make_results_runs_to_results(tmp_path, monkeypatch):
    monkeypatch.setenv("FGTUTOR_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("FGTUTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FGTUTOR_STORE")
    train_runs([TINY], progress=False)
    assert list((tmp_path / "cache").glob("*/*.json.gz")) and not (tmp_path / "results").exists()
    monkeypatch.setenv("FGTUTOR_STORE", "results")
    trained = count_training(monkeypatch)
    train_runs([TINY], progress=False)
    assert len(trained) == 1 and list((tmp_path / "results").glob("*/*.json.gz"))
    monkeypatch.delenv("FGTUTOR_STORE")
    train_runs([TINY, dict(TINY, seed=1)], progress=False)  # both stores are read: only seed 1 trains
    assert [c["seed"] for c in trained] == [0, 1]
    monkeypatch.setenv("FGTUTOR_STORE", "bogus")
    with pytest.raises(ValueError, match="FGTUTOR_STORE='bogus'"):
        train_runs([TINY], progress=False)


def test_parallel_jobs_store_the_same_runs_as_one_job(tmp_path):
    configs = [dict(TINY, seed=s) for s in (0, 1)]
    one = train_runs(configs, root=tmp_path / "one", progress=False, jobs=1)
    two = train_runs(configs, root=tmp_path / "two", progress=False, jobs=2)
    for a, b in zip(one, two):
        assert [r["val_loss"] for r in a.epochs] == pytest.approx([r["val_loss"] for r in b.epochs], rel=1e-5)


# -- what a stored run holds -------------------------------------------------------------

def test_a_stored_run_has_provenance_exact_first_steps_and_thinned_curves(root, monkeypatch):
    monkeypatch.setattr(store, "MAX_CURVE_POINTS", 2)
    config = run_config(**TINY)
    history, prov = store.train_config(config, progress=False)
    record = read(save(config, history, prov, root))
    assert {"commit", "dirty", "date", "machine", "torch", "threads", "wall_seconds", "fgtutor"} <= set(record["provenance"])
    assert record["config"] == config
    assert record["first_steps"] == history.step_loss  # 4 steps: all kept exactly
    assert record["history"]["step_every"] == 2 and len(record["history"]["step_loss"]) == 2
    assert record["history"]["epochs"] == history.epochs


def test_thin_averages_blocks_and_keeps_a_short_last_block():
    assert thin([1.0, 3.0, 5.0, 7.0, 9.0], 2) == [2.0, 6.0, 9.0]
    assert thin([1 / 3], 1) == [0.33333]


def test_stored_note_says_how_many_runs_seeds_when_and_where(root):
    runs = train_runs([TINY, dict(TINY, seed=1)], root=root, progress=False)
    note = stored_note(runs)
    assert note.startswith("2 stored runs (2 seeds: 0, 1), trained 20")
    assert "commit" in note and "CPUs" in note


# -- atomic and exclusive writes ---------------------------------------------------------

def test_a_failed_write_leaves_nothing_behind(root, monkeypatch):
    config = run_config(**TINY)
    history, prov = store.train_config(config, progress=False)

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        save(config, history, prov, root)
    assert not [p for p in root.rglob("*") if p.is_file()]


def _train_and_report(root, queue):
    queue.put(train_and_save(run_config(**TINY), root, progress=False)[1])


def test_two_processes_never_train_or_write_the_same_run_twice(root):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_train_and_report, args=(root, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert sorted(queue.get(timeout=5) for _ in procs) == [False, True], "one trains, the other finds it stored"
    assert len(list(root.glob("logreg/*.json.gz"))) == 1
    assert not list(root.glob("logreg/.*"))


# -- resuming an interrupted batch -------------------------------------------------------

BATCH = """
import sys, time
from fgtutor import store
real = store.train_config
def slow(config, *a, **k):
    out = real(config, *a, **k)
    time.sleep(2 if config["seed"] == 0 else 600)  # the second run never finishes
    return out
store.train_config = slow
store.train_runs([dict({tiny}, seed=s) for s in (0, 1, 2)], root=sys.argv[1], progress=False)
"""


def test_an_interrupted_batch_resumes_where_it_stopped(root, monkeypatch):
    proc = subprocess.Popen([sys.executable, "-c", BATCH.format(tiny=TINY), str(root)])
    try:
        deadline = time.time() + 120
        while len(list(root.glob("logreg/*.json.gz"))) < 1 and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1)  # now inside the second run
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(list(root.glob("logreg/*.json.gz"))) == 1
    trained = count_training(monkeypatch)
    runs = train_runs([dict(TINY, seed=s) for s in (0, 1, 2)], root=root, progress=False)
    assert sorted(c["seed"] for c in trained) == [1, 2], "the finished run is not trained again"
    assert [h.meta["seed"] for h in runs] == [0, 1, 2]


# -- corrupt files -----------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated", "edited"])
def test_a_corrupt_stored_file_is_named_and_never_used(root, damage):
    [_] = train_runs([TINY], root=root, progress=False)
    path = run_path(run_config(**TINY), root)
    if damage == "garbage":
        path.write_bytes(b"not a run")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    else:
        record = json.loads(gzip.decompress(path.read_bytes()))
        record["config"]["lr"] = 0.5
        path.write_bytes(gzip.compress(json.dumps(record).encode()))
    with pytest.raises(CorruptRunError, match=str(path)):
        train_runs([TINY], root=root, progress=False)
    with pytest.raises(CorruptRunError, match="make results"):
        load(run_config(**TINY), root)


def test_every_committed_file_is_a_readable_run():
    for path in store.stored_paths(ROOT / "results"):
        read(path)


def test_the_results_command_rejects_a_missing_chapter(capsys):
    assert store.main(["book/no-such-chapter.ipynb"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_initialisation_is_a_model_setting_with_its_own_key_and_replayed_weights():
    mlp = dict(TINY, model="mlp")
    config = run_config(**mlp, model_kwargs={"init": "kaiming"})
    assert run_key(config) != run_key(run_config(**mlp)) and "init=kaiming" in store.describe(config)
    torch.manual_seed(0)
    layer = store.model_constructor(config)()[1]
    assert abs(layer.weight.std().item() * (784 / 2) ** 0.5 - 1) < 0.05 and torch.count_nonzero(layer.bias) == 0


def test_a_model_setting_the_model_does_not_take_is_refused_before_training():
    with pytest.raises(ValueError, match="model 'logreg' takes no settings"):
        run_config(**TINY, model_kwargs={"init": "kaiming"})


# -- fine-tuning: another dataset, from a pretrained run's weights -------------------------

PRETRAIN = dict(model="mlp", method="backprop", lr=0.1, epochs=1, n_train=256, n_val=1000, eval_sets=["val"])
FINE_TUNE = dict(PRETRAIN, method="forward", lr=1e-3, dataset="fashion_mnist", pretrain=PRETRAIN)


def test_a_fine_tuning_run_starts_from_the_pretrained_weights_in_its_own_folder():
    config = run_config(**FINE_TUNE)
    assert run_path(config, "r").parent.name == "mlp_fashion_mnist"
    assert config["pretrain"] == run_config(**PRETRAIN)  # complete, so its defaults are in the key
    model = store.model_constructor(config)()
    state = store.pretrained_state(json.dumps(config["pretrain"], sort_keys=True))
    assert all(state[name].dtype == torch.float64 for name in state)  # trained in float64 on every CPU
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), state[name].float()), name
    scratch = store.model_constructor(run_config(**PRETRAIN))()
    assert not torch.equal(scratch[1].weight, model[1].weight)


def test_pretraining_leaves_the_random_number_generators_alone():
    """A fine-tuning run's own seed decides its batches and tangents: pretraining, done
    inside the constructor after the seed is set, must not move the generators."""
    config = run_config(**dict(FINE_TUNE, pretrain=dict(PRETRAIN, seed=7)))
    store.pretrained_state.cache_clear()
    torch.manual_seed(0)
    store.model_constructor(config)()  # pretrains
    after_pretraining = torch.rand(3)
    torch.manual_seed(0)
    store.model_constructor(config)()  # cached: only draws the fresh model's weights
    assert torch.equal(torch.rand(3), after_pretraining)


def test_training_only_the_last_layer_leaves_every_other_weight_as_pretrained(root):
    config = run_config(**dict(FINE_TUNE, trainable="last"))
    assert "training the last layer from backprop on mnist" in store.describe(config)
    net, history = store.train_model(store.model_constructor(config), "forward", *store.config_data(config),
                                     progress=False, **store.fit_kwargs(config))
    state = store.pretrained_state(json.dumps(config["pretrain"], sort_keys=True))
    for name, p in net.named_parameters():
        assert p.requires_grad == name.startswith("5."), name
        assert torch.equal(p.detach(), state[name].float()) != p.requires_grad, name  # only the head moved
    stored, = train_runs([config], root=root, progress=False)
    assert stored.epochs[-1]["val_loss"] == history.epochs[-1]["val_loss"]  # the store trains the same run
    assert check_replay(run_path(config, root), steps=3)["exact"]
