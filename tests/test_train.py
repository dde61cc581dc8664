"""Tests for fgtutor.train: evaluate, fit, History and train_model.

Everything runs on a small, seeded, linearly separable 10-class problem (no MNIST).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fgtutor.train as train_mod
from fgtutor.losses import cross_entropy
from fgtutor.models import LogisticRegression
from fgtutor.optim import exp_decay
from fgtutor.train import History, evaluate, fit, train_model


N_TRAIN = 256
BATCH = 32
STEPS_PER_EPOCH = math.ceil(N_TRAIN / BATCH)


def separable(n: int, seed: int, flat: bool = False):
    """``n`` images of 10 well-separated Gaussian clusters (fixed centres, seeded noise)."""
    centres = torch.randn(10, 784, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    X = centres[y] + 0.5 * torch.randn(n, 784, generator=g)
    return (X if flat else X.reshape(n, 1, 28, 28)), y


@pytest.fixture(scope="module")
def data():
    return {"train": separable(N_TRAIN, seed=1), "test": separable(200, seed=2), "val": separable(90, seed=3)}


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def run_fit(method, data, lr, epochs=3, seed=0, init_seed=0, model_fn=LogisticRegression, **kwargs):
    torch.manual_seed(init_seed)
    model = model_fn()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    history = fit(model, method, optimizer, data["train"], {"test": data["test"], "val": data["val"]},
                  epochs=epochs, batch_size=BATCH, seed=seed, progress=False, **kwargs)
    return model, history


@pytest.fixture(scope="module")
def runs(data):
    return {
        "backprop": run_fit("backprop", data, lr=0.1),
        "forward": run_fit("forward", data, lr=1e-3, epochs=4),
    }


def without_times(rows):
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------


class TestEvaluate:
    def model(self):
        torch.manual_seed(0)
        # dropout makes a forgotten model.eval() visible: train mode would be random
        return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(784, 10))

    def test_loss_and_accuracy_cover_every_sample_weighted_by_batch_size(self):
        X, Y = separable(100, seed=5)
        model = self.model().eval()
        with torch.no_grad():
            logits = model(X)
        expected_loss = F.cross_entropy(logits, Y).item()
        expected_acc = (logits.argmax(1) == Y).sum().item() / len(Y)
        loss, acc = evaluate(model, X, Y, batch_size=64)  # batches of 64 and 36
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        assert acc == expected_acc
        # an unweighted mean of the two batch losses would differ
        unweighted = (F.cross_entropy(logits[:64], Y[:64]).item() + F.cross_entropy(logits[64:], Y[64:]).item()) / 2
        assert unweighted != pytest.approx(expected_loss, rel=1e-5)

    def test_accuracy_is_a_fraction_of_all_samples(self):
        X, Y = separable(100, seed=5)
        model = self.model()
        _, acc = evaluate(model, X, Y, batch_size=64)
        assert 0.0 <= acc <= 1.0
        assert (acc * 100) == pytest.approx(round(acc * 100))

    @pytest.mark.parametrize("training", [True, False])
    def test_restores_the_models_training_mode(self, training):
        X, Y = separable(100, seed=5)
        model = self.model().train(training)
        evaluate(model, X, Y, batch_size=64)
        assert model.training is training
        assert all(m.training is training for m in model.modules())

    def test_scores_in_eval_mode_so_dropout_is_off(self):
        X, Y = separable(100, seed=5)
        model = self.model().train()
        first = evaluate(model, X, Y, batch_size=64)
        second = evaluate(model, X, Y, batch_size=7)
        assert first[0] == pytest.approx(second[0], rel=1e-5)
        assert first[1] == second[1]

    def test_uses_the_given_loss_function(self):
        X, Y = separable(100, seed=5)
        model = self.model()
        loss, _ = evaluate(model, X, Y, batch_size=64, loss_fn=lambda z, y: z.new_tensor(3.0))
        assert loss == pytest.approx(3.0)

    @pytest.mark.parametrize("batch_size", [0, -1, 1.5, True, None])
    def test_bad_batch_size_raises_value_error(self, batch_size):
        X, Y = separable(10, seed=5)
        with pytest.raises(ValueError, match="batch_size"):
            evaluate(self.model(), X, Y, batch_size=batch_size)

    def test_mismatched_data_raises_value_error(self):
        X, Y = separable(10, seed=5)
        with pytest.raises(ValueError):
            evaluate(self.model(), X, Y[:5], batch_size=4)


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------


class TestFit:
    @pytest.mark.parametrize("method", ["backprop", "forward"])
    def test_lowers_the_loss(self, runs, method):
        _, h = runs[method]
        first, last = h.epochs[0], h.epochs[-1]
        assert not h.diverged and h.message == ""
        assert last["test_loss"] < first["test_loss"]
        assert last["test_accuracy"] > first["test_accuracy"]
        assert all(math.isfinite(v) for v in h.step_loss)

    def test_backprop_learns_the_separable_problem(self, runs):
        _, h = runs["backprop"]
        assert h.final("test_accuracy") > 0.9

    @pytest.mark.parametrize("method, epochs", [("backprop", 3), ("forward", 4)])
    def test_records_one_step_loss_per_step_and_one_row_per_epoch_plus_epoch_zero(self, runs, method, epochs):
        _, h = runs[method]
        assert len(h.step_loss) == epochs * STEPS_PER_EPOCH
        assert [row["epoch"] for row in h.epochs] == list(range(epochs + 1))
        assert [row["step"] for row in h.epochs] == [e * STEPS_PER_EPOCH for e in range(epochs + 1)]

    @pytest.mark.parametrize("method", ["backprop", "forward"])
    def test_every_eval_set_gets_loss_and_accuracy_columns(self, runs, method):
        _, h = runs[method]
        for row in h.epochs:
            for name in ("test", "val"):
                assert math.isfinite(row[f"{name}_loss"])
                assert 0.0 <= row[f"{name}_accuracy"] <= 1.0
        assert h.meta["eval_sets"] == {"test": 200, "val": 90}

    @pytest.mark.parametrize("method", ["backprop", "forward"])
    def test_train_and_eval_seconds_are_separate_non_negative_and_non_decreasing(self, runs, method):
        _, h = runs[method]
        for key in ("train_seconds", "eval_seconds"):
            values = [row[key] for row in h.epochs]
            assert all(v >= 0 for v in values)
            assert values == sorted(values)
        assert h.epochs[0]["train_seconds"] == 0.0  # epoch 0 is before any training
        assert h.epochs[-1]["train_seconds"] > 0.0
        assert h.epochs[0]["eval_seconds"] > 0.0

    @pytest.mark.parametrize("method", ["backprop", "forward"])
    def test_final_eval_metrics_equal_evaluate_on_the_final_model_over_every_sample(self, runs, data, method):
        model, h = runs[method]
        for name in ("test", "val"):
            loss, acc = evaluate(model, *data[name], batch_size=1000)
            assert h.final(f"{name}_loss") == pytest.approx(loss, rel=1e-5)
            assert h.final(f"{name}_accuracy") == acc

    def test_eval_batch_size_does_not_change_the_metrics(self, data):
        _, a = run_fit("backprop", data, lr=0.1, epochs=1, eval_batch_size=1000)
        _, b = run_fit("backprop", data, lr=0.1, epochs=1, eval_batch_size=64)
        for ra, rb in zip(a.epochs, b.epochs):
            assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)
            assert ra["val_accuracy"] == rb["val_accuracy"]

    def test_meta_records_the_run(self, runs):
        _, h = runs["forward"]
        m = h.meta
        assert m["method"] == "forward" and m["model"] == "LogisticRegression"
        assert m["lr"] == 1e-3 and m["seed"] == 0 and m["epochs"] == 4 and m["batch_size"] == BATCH
        assert m["n_train"] == N_TRAIN and m["num_params"] == 7850
        assert m["torch"] == torch.__version__ and m["device"] == "cpu"
        assert m["sampler"] == "rademacher" and m["num_tangents"] == 1
        assert "sampler" not in runs["backprop"][1].meta

    def test_schedule_is_stepped_every_iteration(self, data):
        torch.manual_seed(0)
        model = LogisticRegression()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 ** i)
        h = fit(model, "backprop", opt, data["train"], epochs=1, batch_size=BATCH, schedule=schedule, progress=False)
        assert h.epochs[0]["lr"] == pytest.approx(0.1)
        assert h.epochs[1]["lr"] == pytest.approx(0.1 * 0.5 ** STEPS_PER_EPOCH)

    def test_runs_without_eval_sets(self, data):
        torch.manual_seed(0)
        model = LogisticRegression()
        h = fit(model, "backprop", torch.optim.SGD(model.parameters(), lr=0.1), data["train"],
                epochs=2, batch_size=BATCH, progress=False)
        assert len(h.epochs) == 3
        assert not any(k.endswith("_loss") for k in h.epochs[-1])

    @pytest.mark.parametrize("kwargs, name", [
        ({"method": "adam"}, "method"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": -1}, "eval_batch_size"),
    ])
    def test_bad_arguments_raise_value_error_naming_them(self, data, kwargs, name):
        model = LogisticRegression()
        args = {"method": "backprop", **kwargs}
        with pytest.raises(ValueError, match=name):
            fit(model, args.pop("method"), torch.optim.SGD(model.parameters(), lr=0.1), data["train"],
                progress=False, **args)


# ---------------------------------------------------------------------------
# fairness: same seed, same data order, whatever the method
# ---------------------------------------------------------------------------


@pytest.fixture
def recorded_batches(monkeypatch):
    """Wrap fgtutor.train.batches to record the labels of every *training* batch."""
    seen = []
    original = train_mod.batches

    def recording(X, Y, batch_size, shuffle=True, generator=None):
        for x, y in original(X, Y, batch_size, shuffle=shuffle, generator=generator):
            if shuffle:
                seen.append(y.clone())
            yield x, y

    monkeypatch.setattr(train_mod, "batches", recording)
    return seen


def label_sequence(seen):
    return torch.cat(seen).tolist()


class TestFairness:
    def test_forward_and_backprop_see_the_same_batches_with_the_same_seed(self, data, recorded_batches):
        run_fit("backprop", data, lr=0.1, epochs=2, seed=7)
        backprop = [y.tolist() for y in recorded_batches]
        recorded_batches.clear()
        run_fit("forward", data, lr=1e-3, epochs=2, seed=7)
        forward = [y.tolist() for y in recorded_batches]
        assert len(backprop) == 2 * STEPS_PER_EPOCH
        assert forward == backprop

    def test_a_different_seed_gives_a_different_data_order(self, data, recorded_batches):
        run_fit("backprop", data, lr=0.1, epochs=1, seed=7)
        first = label_sequence(recorded_batches)
        recorded_batches.clear()
        run_fit("backprop", data, lr=0.1, epochs=1, seed=8)
        assert label_sequence(recorded_batches) != first

    def test_epochs_are_reshuffled(self, data, recorded_batches):
        run_fit("backprop", data, lr=0.1, epochs=2, seed=7)
        labels = label_sequence(recorded_batches)
        assert labels[:N_TRAIN] != labels[N_TRAIN:]
        assert sorted(labels[:N_TRAIN]) == sorted(labels[N_TRAIN:]) == sorted(data["train"][1].tolist())

    def test_data_order_does_not_depend_on_the_global_rng(self, data, recorded_batches):
        run_fit("backprop", data, lr=0.1, epochs=1, seed=7)
        first = label_sequence(recorded_batches)
        recorded_batches.clear()
        torch.manual_seed(999)
        torch.rand(10)
        run_fit("backprop", data, lr=0.1, epochs=1, seed=7)
        assert label_sequence(recorded_batches) == first

    @pytest.mark.parametrize("method, lr", [("backprop", 0.1), ("forward", 1e-3)])
    def test_two_runs_with_the_same_seed_and_weights_give_identical_histories(self, data, method, lr):
        model_a, a = run_fit(method, data, lr=lr, epochs=2, seed=3)
        model_b, b = run_fit(method, data, lr=lr, epochs=2, seed=3)
        assert a.step_loss == b.step_loss
        assert without_times(a.epochs) == without_times(b.epochs)
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(pa, pb)

    def test_forward_runs_with_different_seeds_differ(self, data):
        _, a = run_fit("forward", data, lr=1e-3, epochs=1, seed=3)
        _, b = run_fit("forward", data, lr=1e-3, epochs=1, seed=4)
        assert a.step_loss != b.step_loss


# ---------------------------------------------------------------------------
# divergence
# ---------------------------------------------------------------------------


def nan_after(k: int):
    """A cross-entropy that becomes NaN from its k-th call on (count in .calls)."""

    def loss_fn(logits, targets):
        loss_fn.calls += 1
        loss = cross_entropy(logits, targets)
        return loss * float("nan") if loss_fn.calls >= k else loss

    loss_fn.calls = 0
    return loss_fn


class TestDivergence:
    @pytest.mark.parametrize("method", ["backprop", "forward"])
    def test_a_nan_loss_stops_the_run_cleanly_with_a_warning(self, data, method):
        k = STEPS_PER_EPOCH + 3  # third step of epoch 2
        torch.manual_seed(0)
        model = LogisticRegression()
        # no eval sets, so every loss_fn call is a training step
        with pytest.warns(RuntimeWarning, match="learning rate") as record:
            h = fit(model, method, torch.optim.SGD(model.parameters(), lr=1e-3), data["train"],
                    epochs=4, batch_size=BATCH, loss_fn=nan_after(k), progress=False)
        assert h.diverged is True
        assert method in h.message and "learning rate" in h.message
        assert any(method in str(w.message) for w in record)
        assert len(h.step_loss) == k
        assert not math.isfinite(h.step_loss[-1])
        assert all(math.isfinite(v) for v in h.step_loss[:-1])
        assert [row["epoch"] for row in h.epochs] == [0, 1]  # epoch 2 never completed

    def test_the_diverged_step_does_not_update_the_weights(self, data):
        torch.manual_seed(0)
        model = LogisticRegression()
        with pytest.warns(RuntimeWarning):
            fit(model, "backprop", torch.optim.SGD(model.parameters(), lr=0.1), data["train"],
                epochs=1, batch_size=BATCH, loss_fn=nan_after(2), progress=False)
        assert all(torch.isfinite(p).all() for p in model.parameters())

    def test_a_huge_learning_rate_diverges_without_raising(self, data):
        torch.manual_seed(0)
        model = small_mlp()
        with pytest.warns(RuntimeWarning, match="backprop.*learning rate"):
            h = fit(model, "backprop", torch.optim.SGD(model.parameters(), lr=1e6), data["train"],
                    {"test": data["test"]}, epochs=3, batch_size=BATCH, progress=False)
        assert h.diverged
        assert "backprop" in h.message and "learning rate" in h.message
        assert not math.isfinite(h.step_loss[-1])
        assert len(h.step_loss) < 3 * STEPS_PER_EPOCH
        assert len(h.epochs) == 1 + (len(h.step_loss) - 1) // STEPS_PER_EPOCH

    def test_forward_divergence_message_suggests_tangents_or_clip(self, data):
        torch.manual_seed(0)
        model = LogisticRegression()
        with pytest.warns(RuntimeWarning):
            h = fit(model, "forward", torch.optim.SGD(model.parameters(), lr=1e-3), data["train"],
                    epochs=1, batch_size=BATCH, loss_fn=nan_after(1), progress=False)
        assert "tangents" in h.message and "clip" in h.message


# ---------------------------------------------------------------------------
# History
# ---------------------------------------------------------------------------


class TestHistory:
    def test_to_dataframe_has_method_and_model_columns_and_one_row_per_epoch(self, runs):
        _, h = runs["backprop"]
        df = h.to_dataframe()
        assert len(df) == len(h.epochs) == 4
        assert list(df.columns[:2]) == ["method", "model"]
        assert (df["method"] == "backprop").all() and (df["model"] == "LogisticRegression").all()
        for col in ("epoch", "step", "lr", "train_seconds", "eval_seconds", "test_loss", "test_accuracy",
                    "val_loss", "val_accuracy"):
            assert col in df.columns
        assert df["epoch"].tolist() == [0, 1, 2, 3]

    def test_to_dataframe_does_not_change_the_history(self, runs):
        _, h = runs["backprop"]
        before = [dict(row) for row in h.epochs]
        h.to_dataframe()
        assert h.epochs == before

    def test_json_text_round_trips(self, runs):
        _, h = runs["forward"]
        text = h.to_json()
        json.loads(text)
        back = History.from_json(text)
        assert back == h
        for key in ("method", "model", "lr", "seed", "torch", "device"):
            assert back.meta[key] == h.meta[key]

    def test_json_file_round_trips_via_str_and_path(self, runs, tmp_path):
        _, h = runs["backprop"]
        path = tmp_path / "sub" / "run.json"
        text = h.to_json(path)
        assert path.read_text() == text
        assert History.from_json(path) == h
        assert History.from_json(str(path)) == h

    def test_writing_to_a_path_leaves_no_temp_files(self, runs, tmp_path):
        _, h = runs["backprop"]
        path = tmp_path / "run.json"
        h.to_json(path)
        h.to_json(path)  # overwrite
        assert os.listdir(tmp_path) == ["run.json"]

    def test_a_diverged_history_round_trips_with_its_nan(self, data):
        torch.manual_seed(0)
        model = LogisticRegression()
        with pytest.warns(RuntimeWarning):
            h = fit(model, "backprop", torch.optim.SGD(model.parameters(), lr=0.1), data["train"],
                    epochs=1, batch_size=BATCH, loss_fn=nan_after(2), progress=False)
        back = History.from_json(h.to_json())
        assert back.diverged and back.message == h.message
        assert back.step_loss[:-1] == h.step_loss[:-1] and math.isnan(back.step_loss[-1])

    def test_final_returns_the_last_value_of_a_column(self, runs):
        _, h = runs["backprop"]
        assert h.final("test_accuracy") == h.epochs[-1]["test_accuracy"]
        assert h.final("epoch") == 3

    def test_final_of_a_missing_column_raises_value_error(self, runs):
        _, h = runs["backprop"]
        with pytest.raises(ValueError, match="train_accuracy"):
            h.final("train_accuracy")
        with pytest.raises(ValueError):
            History().final("test_accuracy")


# ---------------------------------------------------------------------------
# train_model
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return {"train": separable(64, seed=11, flat=True), "test": separable(40, seed=12, flat=True)}


class TestTrainModel:
    def test_same_seed_gives_both_methods_the_same_initial_weights(self, tiny):
        kw = dict(epochs=1, batch_size=16, seed=5, device="cpu", progress=False)
        _, f = train_model("logreg", "forward", tiny["train"], {"test": tiny["test"]}, **kw)
        _, b = train_model("logreg", "backprop", tiny["train"], {"test": tiny["test"]}, **kw)
        assert f.epochs[0]["test_loss"] == b.epochs[0]["test_loss"]
        assert f.epochs[0]["test_accuracy"] == b.epochs[0]["test_accuracy"]
        assert f.step_loss[0] == pytest.approx(b.step_loss[0], rel=1e-6)  # same weights, same first batch

    def test_a_different_seed_gives_different_initial_weights(self, tiny):
        kw = dict(epochs=1, batch_size=16, device="cpu", progress=False)
        _, a = train_model("logreg", "backprop", tiny["train"], {"test": tiny["test"]}, seed=5, **kw)
        _, b = train_model("logreg", "backprop", tiny["train"], {"test": tiny["test"]}, seed=6, **kw)
        assert a.epochs[0]["test_loss"] != b.epochs[0]["test_loss"]

    def test_records_seed_decay_lr_and_model_name(self, tiny):
        _, h = train_model("logreg", "backprop", tiny["train"], lr=0.05, decay=1e-3, epochs=1, batch_size=16,
                        seed=9, device="cpu", progress=False, meta={"note": "x"})
        m = h.meta
        assert m["seed"] == 9 and m["decay"] == 1e-3 and m["lr"] == 0.05
        assert m["model_name"] == "logreg" and m["model"] == "LogisticRegression"
        assert m["optimizer"] == "SGD" and m["note"] == "x"

    def test_applies_the_per_iteration_exponential_decay(self, tiny):
        _, h = train_model("logreg", "backprop", tiny["train"], lr=0.05, decay=1e-2, epochs=1, batch_size=16,
                        device="cpu", progress=False)
        assert h.epochs[1]["lr"] == pytest.approx(0.05 * math.exp(-1e-2 * 4))

    def test_accepts_a_model_constructor(self, tiny):
        _, h = train_model(LogisticRegression, "backprop", tiny["train"], lr=0.05, epochs=1, batch_size=16,
                        device="cpu", progress=False)
        assert h.meta["model"] == "LogisticRegression" and "model_name" not in h.meta

    def test_a_cosine_schedule_falls_to_zero_over_the_run_and_refuses_a_decay(self, tiny):
        kw = dict(lr=0.05, epochs=2, batch_size=16, device="cpu", progress=False, lr_schedule="cosine", decay=0)
        _, h = train_model("logreg", "backprop", tiny["train"], {"test": tiny["test"]}, **kw)
        lrs = [row["lr"] for row in h.epochs]
        assert lrs[0] == 0.05 and lrs[1] == pytest.approx(0.025) and lrs[2] == pytest.approx(0, abs=1e-12)
        assert h.meta["lr_schedule"] == "cosine"
        with pytest.raises(ValueError, match="decay=0.0001 is the 'exp' schedule's rate"):
            train_model("logreg", "backprop", tiny["train"], **dict(kw, decay=1e-4))
        with pytest.raises(ValueError, match="lr_schedule='linear' is not allowed"):
            train_model("logreg", "backprop", tiny["train"], **dict(kw, lr_schedule="linear"))

    def test_a_built_module_raises_value_error(self, tiny):
        with pytest.raises(ValueError, match="model"):
            train_model(LogisticRegression(), "backprop", tiny["train"], progress=False)

    @pytest.mark.parametrize("kwargs, name", [
        ({"method": "sgd"}, "method"),
        ({"model": "resnet"}, "model"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": -2}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"decay": -1e-4}, "decay"),
    ])
    def test_bad_arguments_raise_value_error_naming_them(self, tiny, kwargs, name):
        args = {"model": "logreg", "method": "backprop", **kwargs}
        with pytest.raises(ValueError, match=name):
            train_model(args.pop("model"), args.pop("method"), tiny["train"], device="cpu", progress=False,
                        **args)

    @pytest.mark.parametrize("train", [
        (torch.zeros(8, 784), torch.zeros(8, 1, dtype=torch.long)),  # 2-D labels
        (torch.zeros(8, 784), torch.zeros(7, dtype=torch.long)),     # N mismatch
        (torch.zeros(8), torch.zeros(8, dtype=torch.long)),          # X without features
        (torch.zeros(0, 784), torch.zeros(0, dtype=torch.long)),     # empty
        (torch.zeros(8, 784),),                                      # not a pair
        "not a dataset",
    ])
    def test_bad_train_data_raises_value_error(self, train):
        with pytest.raises(ValueError, match="train"):
            train_model("logreg", "backprop", train, device="cpu", progress=False)

    def test_bad_eval_set_raises_value_error_naming_it(self, tiny):
        bad = (torch.zeros(8, 784), torch.zeros(7, dtype=torch.long))
        with pytest.raises(ValueError, match="test"):
            train_model("logreg", "backprop", tiny["train"], {"test": bad}, device="cpu", progress=False)


# -- resumable training ------------------------------------------------------------------

KILLED_RUN = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
import fgtutor.train as train_mod
from fgtutor.optim import exp_decay
from test_train import separable, small_mlp
real = train_mod._save_checkpoint
def save_then_die(path, state):
    real(path, state)
    if state["history"]["epochs"][-1]["epoch"] == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, mid-run
train_mod._save_checkpoint = save_then_die
torch.manual_seed(0)
model = small_mlp()
opt = torch.optim.SGD(model.parameters(), **{settings!r})
train_mod.fit(model, {method!r}, opt, separable(256, seed=1), {{"test": separable(200, seed=2)}}, epochs=4,
              batch_size=32, schedule=exp_decay(opt, 1e-2), progress=False, checkpoint=sys.argv[1])
"""


# forward gradient with plain SGD (the fused step the book uses), backprop with momentum
# (optimizer state to restore)
SETTINGS = {"forward": {"lr": 0.002}, "backprop": {"lr": 0.05, "momentum": 0.9}}


def resumable_fit(method, data, checkpoint=None):
    torch.manual_seed(0)
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), **SETTINGS[method])
    return fit(model, method, opt, data["train"], {"test": data["test"]}, epochs=4, batch_size=32,
               schedule=exp_decay(opt, 1e-2), progress=False, checkpoint=checkpoint)


@pytest.mark.parametrize("method", ["forward", "backprop"])
def test_a_killed_run_resumes_from_its_checkpoint_with_the_history_of_an_uninterrupted_run(method, data, tmp_path):
    import subprocess
    import sys
    checkpoint = tmp_path / "run.pt"
    script = KILLED_RUN.format(tests=os.path.dirname(__file__), method=method, settings=SETTINGS[method])
    proc = subprocess.run([sys.executable, "-c", script, str(checkpoint)], capture_output=True, text=True)
    assert proc.returncode == -15, proc.stderr  # killed by SIGTERM after epoch 2
    assert checkpoint.exists()
    resumed = resumable_fit(method, data, checkpoint)
    whole = resumable_fit(method, data)
    assert resumed.step_loss == whole.step_loss
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]  # noqa: E731
    assert strip(resumed.epochs) == strip(whole.epochs)
    assert [r["epoch"] for r in resumed.epochs] == [0, 1, 2, 3, 4]
    assert not checkpoint.exists(), "the checkpoint is removed when the run ends"
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"


def test_a_checkpoint_of_another_run_is_refused_by_name(data, tmp_path):
    checkpoint = tmp_path / "run.pt"
    torch.manual_seed(0)
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train_mod._save_checkpoint(checkpoint, {"history": {"meta": {"method": "backprop", "epochs": 9}}})
    with pytest.raises(ValueError, match="belongs to another run.*epochs"):
        fit(model, "backprop", opt, data["train"], epochs=2, batch_size=32, progress=False, checkpoint=checkpoint)
    checkpoint.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable fgtutor checkpoint.*delete it"):
        fit(model, "backprop", opt, data["train"], epochs=2, batch_size=32, progress=False, checkpoint=checkpoint)


def test_history_json_is_strict_and_round_trips_non_finite_values(tmp_path):
    h = History(meta={"method": "forward"}, step_loss=[2.3, float("nan"), float("inf")],
                epochs=[{"epoch": 0, "test_loss": float("-inf")}], diverged=True, message="diverged")
    text = h.to_json(tmp_path / "h.json")
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = History.from_json(tmp_path / "h.json")
    assert math.isnan(back.step_loss[1]) and back.step_loss[2] == math.inf and back.epochs[0]["test_loss"] == -math.inf


@pytest.mark.parametrize("content", ["garbage", '{"meta": {}, "step_l', '{"nonsense": 1}'])
def test_history_from_a_bad_file_names_the_file(tmp_path, content):
    path = tmp_path / "run.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path} is not a History"):
        History.from_json(path)


def test_final_of_a_diverged_run_warns_that_it_is_not_a_trained_score():
    h = History(epochs=[{"epoch": 0, "test_loss": 2.3}], diverged=True, message="forward diverged at step 3")
    with pytest.warns(RuntimeWarning, match="diverged.*epoch 0.*forward diverged at step 3"):
        assert h.final("test_loss") == 2.3


def test_train_model_builds_adam_when_asked_and_records_it():
    data = separable(256, seed=0)
    _, history = train_model("logreg", "backprop", data, {"train": data}, lr=1e-2, optimizer="adam", epochs=2,
                             progress=False)
    assert history.meta["optimizer"] == "Adam"
    assert history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "rmsprop"}, "optimizer='rmsprop' is not allowed"),
    ({"optimizer": "adam", "momentum": 0.9}, "momentum=0.9 is an SGD setting"),
])
def test_train_model_rejects_a_bad_optimizer_choice(kwargs, message):
    data = separable(32, seed=0)
    with pytest.raises(ValueError, match=message):
        train_model("logreg", "backprop", data, progress=False, **kwargs)
