"""Replay: a stored run replays exactly on the machine that made it and by its float64
fingerprint on any other; other kernels pass, and every real change to the code fails."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fgtutor import forward, replay, store
from fgtutor.replay import (FINGERPRINT_RTOL, LOOSE_RTOL, StaleRunError, check_replay, fingerprint,
                            fingerprint_difference, kernels)
from fgtutor.store import read, run_config, run_path, train_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="logreg", method="forward", lr=0.01, epochs=1, n_train=256, n_val=1000, eval_sets=["val"])
#: kernels other than this CPU's best, chosen by environment variables (they act at start-up)
OTHER_KERNELS = {
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"},
}


@pytest.fixture
def root(tmp_path):
    return tmp_path / "results"


def stored_tiny(root, **settings) -> Path:
    config = dict(TINY, **settings)
    train_runs([config], root=root, progress=False)
    return run_path(run_config(**config), root)


def rewrite(path: Path, change) -> None:
    record = json.loads(gzip.decompress(path.read_bytes()))
    change(record)
    store.write_record(path, record)


def as_if_from_another_machine(record: dict) -> None:
    for prov in (record["provenance"], record["fingerprint"]["provenance"]):
        prov["kernels"] = {**prov["kernels"], "cpu_model": "another CPU"}


# -- the machine that made a run ---------------------------------------------------------

def test_provenance_names_the_cpu_its_kernels_and_the_variables_that_chose_them(root, monkeypatch):
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    here = kernels()
    assert {"cpu_model", "simd", "capability", "mkl", "onednn", "torch", "threads", "env"} <= set(here)
    assert here["capability"] == torch.backends.cpu.get_cpu_capability()
    assert here["env"] == {"DNNL_MAX_CPU_ISA": "AVX2"}
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    record = read(stored_tiny(root))
    assert record["provenance"]["kernels"] == kernels()
    assert "kernels" not in record["config"]  # provenance is not configuration: keys are unchanged


def test_on_the_machine_that_made_it_a_run_replays_exactly_and_any_changed_step_is_caught(root):
    path = stored_tiny(root)
    report = check_replay(path, steps=4)
    assert report == {"exact": True, "float32": 0.0, "float32_steps": 4, "fingerprint": 0.0}
    rewrite(path, lambda r: r["first_steps"].__setitem__(2, r["first_steps"][2] * (1 + 1e-7)))
    with pytest.raises(StaleRunError, match=r"float32 step 3 .*exactly.*make results"):
        check_replay(path, steps=4)


def test_on_another_machine_later_float32_steps_may_drift_but_the_first_and_the_fingerprint_may_not(root):
    path = stored_tiny(root)
    rewrite(path, as_if_from_another_machine)
    rewrite(path, lambda r: r["first_steps"].__setitem__(3, r["first_steps"][3] * 1.001))  # grown noise
    report = check_replay(path, steps=4)
    assert not report["exact"] and report["float32_steps"] == replay.LOOSE_STEPS
    rewrite(path, lambda r: r["first_steps"].__setitem__(0, r["first_steps"][0] * (1 + 10 * LOOSE_RTOL)))
    with pytest.raises(StaleRunError, match="float32 step 1 .*on another machine"):
        check_replay(path)
    rewrite(path, lambda r: r["first_steps"].__setitem__(0, r["first_steps"][0] / (1 + 10 * LOOSE_RTOL)))
    check_replay(path)
    rewrite(path, lambda r: r["fingerprint"].__setitem__("displacement", r["fingerprint"]["displacement"] * (1 + 1e-8)))
    with pytest.raises(StaleRunError, match="fingerprint .*differs"):
        check_replay(path)


def test_a_run_without_a_fingerprint_says_how_to_add_one_and_add_fingerprints_does(root):
    path = stored_tiny(root)
    rewrite(path, as_if_from_another_machine)
    rewrite(path, lambda r: r.pop("fingerprint"))
    with pytest.raises(StaleRunError, match="no fingerprint.*--add-fingerprints"):
        check_replay(path)
    assert replay.add_fingerprints(root, progress=False) == [path]
    record = read(path)
    assert record["fingerprint"]["provenance"]["float32_exact"] is True
    assert replay.add_fingerprints(root, progress=False) == []  # nothing left to add
    assert check_replay(path)["exact"]  # this machine reproduced the float32 steps: exact again


def test_the_fingerprint_is_the_run_in_float64_and_names_its_steps():
    config = run_config(**TINY)
    fp = fingerprint(config, steps=3)
    assert fp["steps"] == 3 and len(fp["loss"]) == 3 and len(fp["projections"]) == replay.PROJECTIONS
    assert fp["displacement"] > 0 and all(abs(p) <= fp["displacement"] for p in fp["projections"])
    assert fingerprint_difference(fp, fingerprint(config, steps=3)) == 0  # deterministic
    assert fingerprint_difference(fp, fingerprint(config, steps=2)) == float("inf")
    with pytest.raises(ValueError, match="steps=0"):
        fingerprint(config, steps=0)


# -- the committed store -----------------------------------------------------------------

def committed_samples() -> list:
    """One committed run per (model, method): the one with the largest learning rate that
    did not diverge, where float differences grow fastest."""
    picked = {}
    for path in store.stored_paths(ROOT / "results"):
        record = read(path)
        key = (path.parent.name, path.name.split("-")[0])
        if not record["history"]["diverged"] and record["config"]["lr"] > picked.get(key, (0, None))[0]:
            picked[key] = (record["config"]["lr"], path)
    return sorted(path for _, path in picked.values())


def sample_id(path: Path) -> str:
    return f"{path.parent.name}-{path.name.split('-')[0]}"


def test_every_committed_run_has_a_fingerprint():
    missing = [p.name for p in store.stored_paths(ROOT / "results") if "fingerprint" not in read(p)]
    assert not missing, f"run `python -m fgtutor.replay --add-fingerprints` for {missing}"


@pytest.mark.parametrize("path", committed_samples(), ids=sample_id)
def test_committed_runs_can_still_be_produced_by_todays_code(path):
    report = check_replay(path, steps=50)
    assert report["fingerprint"] <= FINGERPRINT_RTOL


def standardized_samples() -> list:
    """For each method, the committed run with standardized inputs that trains the fewest
    images (the cheapest to check)."""
    picked = {}
    for path in store.stored_paths(ROOT / "results"):
        config = read(path)["config"]
        if config.get("inputs") == "standardized":
            work = config["epochs"] * config["n_train"]
            if work < picked.get(config["method"], (float("inf"), None))[0]:
                picked[config["method"]] = (work, path)
    return [path for _, path in sorted(picked.values(), key=lambda wp: wp[1])]


def test_standardized_runs_of_every_method_are_stored_and_replay():
    samples = standardized_samples()
    assert {read(p)["config"]["method"] for p in samples} == {"forward", "backprop", "zeroth"}
    for path in samples:
        assert check_replay(path, steps=50)["fingerprint"] <= FINGERPRINT_RTOL, path


@pytest.mark.parametrize("name", OTHER_KERNELS)
def test_committed_runs_replay_under_other_cpu_kernels_with_a_wide_margin(name):
    """Another CPU, emulated: the environment variables make torch, MKL and oneDNN use
    other vector kernels, so the float32 steps round differently. Replay still passes, with
    the fingerprint's noise at least 100 times below its tolerance."""
    paths = [str(p) for p in committed_samples()]
    code = ("import json, sys; from fgtutor.replay import check_replay, kernels; "
            "print(json.dumps({'kernels': kernels(), 'reports': [check_replay(p) for p in sys.argv[1:]]}))")
    env = {**os.environ, **OTHER_KERNELS[name]}
    out = subprocess.run([sys.executable, "-c", code, *paths], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["kernels"]["env"] == OTHER_KERNELS[name]
    for path, report in zip(paths, result["reports"]):
        assert not report["exact"], path  # compared as another machine's run
        assert report["fingerprint"] <= FINGERPRINT_RTOL / 100, (path, report)


# -- real changes to the code fail the replay ---------------------------------------------

def committed_run(method: str) -> Path:
    """The book's MLP runs of seed 0: forward gradient at the original small rate 2e-4, and
    backprop at the largest rate it trained 50 epochs with."""
    runs = [(read(p)["config"], p) for p in store.stored_paths(ROOT / "results") if p.parent.name == "mlp"]
    runs = [(c, p) for c, p in runs if c["method"] == method and c["seed"] == 0 and c["epochs"] == 50
            and c["sampler"] in (None, "rademacher") and "optimizer" not in c and "perturb" not in c]
    if method == "forward":
        return next(p for c, p in runs if c["lr"] == 2e-4)
    return max(runs, key=lambda cp: cp[0]["lr"])[1]


def changed_setting(name: str, change):
    real = store.fit_kwargs

    def fit_kwargs(config: dict) -> dict:
        kwargs = real(config)
        kwargs[name] = change(kwargs[name])
        return kwargs
    return fit_kwargs


def scaled_direction(monkeypatch, method: str) -> None:
    """Every step's direction 1% longer: the tangent of a forward gradient, the gradient
    of backprop."""
    if method == "forward":
        real = forward.sample_
        monkeypatch.setattr(forward, "sample_", lambda t, *a, **k: real(t, *a, **k).mul_(1.01))
    else:
        real = store.model_constructor

        def constructor(config):
            def build():
                model = real(config)()
                for p in model.parameters():
                    p.register_hook(lambda g: g * 1.01)
                return model
            return build
        monkeypatch.setattr(store, "model_constructor", constructor)


MUTATIONS = {
    "lr x1.01": lambda mp, method: mp.setattr(store, "fit_kwargs", changed_setting("lr", lambda v: v * 1.01)),
    "another seed": lambda mp, method: mp.setattr(store, "fit_kwargs", changed_setting("seed", lambda v: v + 1)),
    "decay x1.1": lambda mp, method: mp.setattr(store, "fit_kwargs", changed_setting("decay", lambda v: v * 1.1)),
    "direction x1.01": lambda mp, method: scaled_direction(mp, method),
}


@pytest.mark.parametrize("method", ["forward", "backprop"])
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_real_change_to_the_code_fails_the_replay_by_a_wide_margin(mutation, method, monkeypatch):
    path = committed_run(method)
    record = read(path)
    MUTATIONS[mutation](monkeypatch, method)
    moved = fingerprint_difference(record["fingerprint"], fingerprint(record["config"]))
    assert moved >= 100 * FINGERPRINT_RTOL, f"{mutation} moves the fingerprint by only {moved:.2g}"
    with pytest.raises(StaleRunError, match="no longer produces this run"):
        check_replay(path, steps=replay.LOOSE_STEPS)
