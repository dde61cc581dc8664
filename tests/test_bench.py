"""Tests for fgtutor.bench: the benchmark measures what it says and writes its numbers.
(No timing thresholds here: timings are the benchmark's output, never a test's.)"""
import json

import pytest

from fgtutor import bench


def test_step_functions_time_every_step_and_part_and_leave_a_trained_step_possible():
    fns = bench.step_functions("logreg", 4, bench.pick_device("cpu"))
    assert set(fns) == {"forward", "backprop", "forward gradient", "torch.func", *bench.PARTS}
    for fn in fns.values():
        fn()  # every one runs on its own


def test_measure_steps_reports_medians_and_the_paper_ratios_from_them():
    steps = bench.measure_steps(["logreg"], batch=4, repeats=2, warmup=0, device="cpu", progress=None)
    row = steps.loc["logreg"]
    assert row["batch"] == 4
    assert all(row[f"{name} ms"] > 0 for name in ("forward", "backprop", "forward gradient", "torch.func"))
    assert row["R_f"] == pytest.approx(row["forward gradient ms"] / row["forward ms"])
    assert row["R_b"] == pytest.approx(row["backprop ms"] / row["forward ms"])
    assert row["forward gradient / backprop"] == pytest.approx(row["forward gradient ms"] / row["backprop ms"])


def test_measure_steps_rejects_an_unknown_model():
    with pytest.raises(ValueError, match="model='resnet'"):
        bench.measure_steps(["resnet"], repeats=1, warmup=0, device="cpu", progress=None)


def test_measure_sampling_times_the_three_samplers():
    ms = bench.measure_sampling(n=1000, repeats=2, warmup=0, device="cpu")
    assert set(ms.index) == {"gaussian normal_", "rademacher via bernoulli_", "rademacher from bits (fgtutor)"}
    assert (ms > 0).all()


def test_measure_estimators_times_a_step_of_every_estimator_against_backprop():
    frame = bench.measure_estimators(batch=2, repeats=1, warmup=0, device="cpu")
    assert list(frame.index) == ["backprop", "FG-W ×1", "FG-W ×4", "FG-A", "SPSA ×1", "MeZO ×1",
                                 "backprop, local MLP", "LG-FG-A"]
    assert (frame["ms"] > 0).all()
    assert frame.loc["backprop", "× backprop step"] == 1
    assert frame.loc["FG-A", "× backprop step"] == pytest.approx(frame.loc["FG-A", "ms"] / frame.loc["backprop", "ms"])


def test_measure_estimators_on_the_convnet_times_activity_perturbation_of_convolutions_and_local_losses():
    frame = bench.measure_estimators(batch=2, repeats=1, warmup=0, device="cpu", model="convnet")
    assert list(frame.index) == ["backprop", "FG-W ×1", "FG-A", "LG-FG-A", "backprop, local ConvNet"]
    assert (frame["ms"] > 0).all() and frame.loc["backprop", "× backprop step"] == 1


def test_measure_estimators_refuses_a_model_it_has_no_estimators_for():
    with pytest.raises(ValueError, match="model"):
        bench.measure_estimators(batch=2, repeats=1, warmup=0, device="cpu", model="logreg")


def test_measure_memory_probes_each_method_in_a_fresh_process():
    memory = bench.measure_memory(["logreg"], (4,), device="cpu", progress=None)
    row = memory.loc[("logreg", 4)]
    assert row["backprop MB"] >= 0 and row["forward MB"] >= 0
    assert row["forward / backprop"] == pytest.approx(row["forward MB"] / row["backprop MB"])


def test_measure_memory_probes_the_zeroth_order_step_and_inference_when_asked_and_names_an_unknown_method():
    memory = bench.measure_memory(["logreg"], (4,), device="cpu", progress=None, methods=bench.MEMORY_METHODS)
    row = memory.loc[("logreg", 4)]
    assert list(row.index) == ["backprop MB", "forward MB", "zeroth MB", "inference MB", "forward / backprop",
                               "zeroth / backprop", "inference / backprop"]
    assert row["inference MB"] >= 0, "inference: a forward pass without gradients, the floor of every step"
    assert row["zeroth MB"] >= 0 and row["zeroth / backprop"] == pytest.approx(row["zeroth MB"] / row["backprop MB"])
    with pytest.raises(ValueError, match="methods entry='adjoint'"):
        bench.measure_memory(["logreg"], (4,), device="cpu", progress=None, methods=("adjoint",))


def test_main_prints_tables_and_writes_json_with_the_machine(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "logreg", "--batch", "4", "8", "--repeats", "2", "--warmup", "0",
                       "--skip", "memory", "loading", "estimators", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {"torch", "threads", "cpu_count", "platform"} <= set(results["machine"])
    # every sampler (by default i.i.d. and rank-one signs) at every batch size
    assert [(r["sampler"], r["batch"]) for r in results["steps"]] == [
        ("rademacher", 4), ("rademacher", 8), ("rank1", 4), ("rank1", 8)]
    assert "sampling" in results and "memory" not in results
    assert "forward gradient / backprop" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # nothing half-written left


def test_main_rejects_a_bad_batch_size(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--batch", "0"])
    assert "batch=0 is not allowed" in capsys.readouterr().err


def test_main_rejects_an_unwritable_json_path_before_measuring_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "measure_steps", lambda *a, **k: pytest.fail("measured before checking --json"))
    with pytest.raises(SystemExit):
        bench.main(["--json", str(tmp_path)])
    assert "is a directory" in capsys.readouterr().err
