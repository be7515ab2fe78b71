"""nfcourse.train.fit: learning, determinism, resume, the NaN guard, atomic checkpoints."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from tiny_flows import BlowUp, Coupling, TinyModel, moons, tiny_realnvp

from nfcourse.flows.base import Compose
from nfcourse.train import (
    CheckpointError,
    History,
    NonFiniteLossError,
    evaluate,
    fast_steps,
    fit,
    lr_factor,
)

CPU = {"device": "cpu", "progress": False}


def test_fit_lowers_the_nll_on_two_moons():
    x = moons(1024)
    model = tiny_realnvp()
    before = evaluate(model, x)
    history = fit(model, x, steps=150, batch_size=128, lr=5e-3, **CPU)
    after = evaluate(model, x)
    assert after < before - 0.3, (before, after)
    assert history.steps == 150 and len(history.loss) == 150 and len(history.lr) == 150
    assert history.unit == "nats"
    assert history.final_loss < history.loss[0]


def test_history_is_picklable_and_json_able(tmp_path):
    x = moons(256)
    history = fit(tiny_realnvp(), x, steps=5, batch_size=64, val_data=x[:64], val_every=2, **CPU)
    assert history.val_step == [2, 4, 5] and len(history.val) == 3
    again = pickle.loads(pickle.dumps(history))
    assert again == history
    path = tmp_path / "h.json"
    history.to_json(path)
    assert History.from_json(path) == History.from_dict(json.loads(path.read_text()))
    assert History.from_json(path).loss == history.loss
    assert "steps" in repr(history)


def test_same_seed_same_result_different_seed_different_result():
    x = moons(256)
    runs = []
    for seed in (0, 0, 1):
        model = tiny_realnvp(seed=123)
        fit(model, x, steps=10, batch_size=32, seed=seed, **CPU)
        runs.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


class Crash(Exception):
    pass


def test_resume_gives_bitwise_the_same_parameters(tmp_path):
    x = moons(300)  # 300 / 64 -> a short last batch, and epochs that straddle the resume
    kwargs = dict(steps=23, batch_size=64, lr=3e-3, schedule="onecycle", seed=7, **CPU)

    reference = tiny_realnvp(seed=1)
    full = fit(reference, x, checkpoint=tmp_path / "a.pt", checkpoint_every=5, **kwargs)

    model = tiny_realnvp(seed=1)
    calls = {"n": 0}

    def crashing_loss(m, b):
        calls["n"] += 1
        if calls["n"] == 14:
            raise Crash
        return m.loss(b)

    with pytest.raises(Crash):
        fit(
            model,
            x,
            checkpoint=tmp_path / "b.pt",
            checkpoint_every=5,
            loss_fn=crashing_loss,
            **kwargs,
        )
    saved = torch.load(tmp_path / "b.pt", weights_only=False)
    assert saved["step"] == 10

    fresh = tiny_realnvp(seed=99)  # different init: everything must come from the checkpoint
    torch.manual_seed(12345)  # and the global RNG too
    resumed = fit(fresh, x, checkpoint=tmp_path / "b.pt", resume=True, **kwargs)
    for p, q in zip(reference.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed.loss == full.loss and resumed.lr == full.lr and resumed.steps == 23


def test_keyboard_interrupt_saves_a_checkpoint_to_resume_from(tmp_path):
    x = moons(256)
    kwargs = dict(steps=12, batch_size=32, seed=3, **CPU)
    reference = tiny_realnvp(seed=2)
    fit(reference, x, **kwargs)

    calls = {"n": 0}

    def interrupted(m, b):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return m.loss(b)

    model = tiny_realnvp(seed=2)
    with pytest.raises(KeyboardInterrupt):
        fit(
            model,
            x,
            checkpoint=tmp_path / "c.pt",
            checkpoint_every=None,
            loss_fn=interrupted,
            **kwargs,
        )
    assert torch.load(tmp_path / "c.pt", weights_only=False)["step"] == 7
    fit(model, x, checkpoint=tmp_path / "c.pt", **kwargs)
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_nan_guard_names_the_planted_layer():
    torch.manual_seed(0)
    bad = BlowUp(after=6)
    model = TinyModel(Compose([Coupling(False), Coupling(True), bad, Coupling(False)]))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError) as info:
        fit(model, moons(256), steps=50, batch_size=64, **CPU)
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert err.step == 6
    assert err.layer == "flow.layers.2" and err.module_type == "BlowUp"
    msg = str(err)
    assert "step 6" in msg and "flow.layers.2" in msg and "BlowUp" in msg
    assert "learning rate" in msg and "log of zero" in msg
    # the bad step was not applied: the parameters are finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_nan_guard_blames_the_log_det_and_the_enclosing_layer():
    class BadLogDet(Coupling):
        def forward(self, x, context=None):
            z, ld = super().forward(x)
            return z, ld + torch.log(torch.zeros_like(ld))  # log of zero

    torch.manual_seed(0)
    model = TinyModel(Compose([Coupling(False), BadLogDet(True)]))
    with pytest.raises(NonFiniteLossError) as info:
        fit(model, moons(128), steps=5, batch_size=64, **CPU)
    assert info.value.step == 0
    assert info.value.layer == "flow.layers.1" and info.value.where == "log_det"


def test_nan_guard_names_the_flow_layer_around_a_bad_network():
    torch.manual_seed(0)
    model = TinyModel(Compose([Coupling(False), Coupling(True), Coupling(False)]))
    with torch.no_grad():
        model.flow.layers[1].net[2].weight.fill_(3e38)  # the shift t overflows to inf
    with pytest.raises(NonFiniteLossError) as info:
        fit(model, moons(128), steps=3, batch_size=64, **CPU)
    err = info.value
    assert err.layer == "flow.layers.1" and err.module == "flow.layers.1.net.2"
    assert "inside flow layer 'flow.layers.1' (Coupling)" in str(err)


def test_nan_guard_reports_bad_data():
    x = moons(128)
    x[5, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="batch itself"):
        fit(tiny_realnvp(), x, steps=3, batch_size=128, **CPU)


def test_checkpoints_are_atomic_and_corrupt_ones_give_a_clear_error(tmp_path):
    x = moons(128)
    path = tmp_path / "run" / "ckpt.pt"
    fit(tiny_realnvp(), x, steps=6, batch_size=32, checkpoint=path, checkpoint_every=2, **CPU)
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temp files
    state = torch.load(path, weights_only=False)
    assert {"model", "optimizer", "scheduler", "rng", "step", "history"} <= set(state)
    assert state["step"] == 6 and len(state["history"]["loss"]) == 6

    # resuming a finished run trains no further
    h = fit(tiny_realnvp(), x, steps=6, batch_size=32, checkpoint=path, **CPU)
    assert h.steps == 6

    good = path.read_bytes()
    path.write_bytes(good[:100])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        fit(tiny_realnvp(), x, steps=6, checkpoint=path, **CPU)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fit(tiny_realnvp(), x, steps=6, checkpoint=tmp_path / "missing.pt", resume=True, **CPU)
    # resuming with another batch size works but warns
    path.write_bytes(good)
    with pytest.warns(UserWarning, match="batch_size: 32 -> 16"):
        fit(tiny_realnvp(), x, steps=7, batch_size=16, checkpoint=path, **CPU)
    # resume=False starts afresh and overwrites
    fit(tiny_realnvp(), x, steps=2, checkpoint=path, resume=False, **CPU)
    assert torch.load(path, weights_only=False)["step"] == 2


def test_a_checkpoint_of_another_model_is_rejected(tmp_path):
    x = moons(64)
    path = tmp_path / "c.pt"
    fit(tiny_realnvp(layers=2), x, steps=1, checkpoint=path, **CPU)
    with pytest.raises(CheckpointError, match="does not fit"):
        fit(tiny_realnvp(layers=4), x, steps=2, checkpoint=path, **CPU)


def test_schedules_warmup_and_clipping():
    assert lr_factor("constant", 5, 10) == 1.0
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 10, 10) == pytest.approx(0)
    assert lr_factor("cosine", 0, 10, warmup=4) == pytest.approx(0.25)
    assert lr_factor("onecycle", 0, 100) == pytest.approx(1 / 25)
    assert max(lr_factor("onecycle", s, 100) for s in range(100)) == pytest.approx(1.0)
    assert lr_factor("step", 80, 100) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        lr_factor("linear", 0, 10)
    h = fit(
        tiny_realnvp(),
        moons(64),
        steps=4,
        lr=1e-2,
        schedule="constant",
        warmup=2,
        grad_clip=0.5,
        weight_decay=1e-4,
        **CPU,
    )
    assert h.lr == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2])


def test_epochs_uint8_data_log_prob_only_models_and_fast_steps(monkeypatch):
    class LogProbOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mu = torch.nn.Parameter(torch.zeros(3))

        def log_prob(self, x):
            return -0.5 * ((x.float() / 255 - self.mu) ** 2).sum(1)

    data = torch.randint(0, 256, (100, 3), dtype=torch.uint8)
    h = fit(LogProbOnly(), data, epochs=2, batch_size=32, **CPU)
    assert h.steps == 8 and h.epochs == pytest.approx(2.56) and h.unit == "nats"
    with pytest.raises(ValueError):
        fit(LogProbOnly(), data, steps=1, epochs=1, **CPU)
    monkeypatch.setenv("NFCOURSE_FAST", "1")
    assert fast_steps(1000, 10) == 10
    monkeypatch.setenv("NFCOURSE_FAST", "0")
    assert fast_steps(1000, 10) == 1000


def test_progress_bar_shows_loss_and_unit(capsys):
    fit(tiny_realnvp(), moons(64), steps=3, device="cpu", progress=True, desc="moons")
    err = capsys.readouterr().err
    assert "moons" in err and "nats" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_gpu_keeps_the_data_on_the_device_and_is_deterministic(tmp_path):
    x = moons(2048)
    results = []
    for _ in range(2):
        model = tiny_realnvp(seed=0)
        h = fit(
            model,
            x,
            steps=30,
            batch_size=256,
            device="cuda",
            progress=False,
            checkpoint=tmp_path / f"g{len(results)}.pt",
            checkpoint_every=10,
        )
        assert h.device.startswith("cuda")
        results.append(torch.cat([p.flatten() for p in model.parameters()]).cpu())
    assert torch.equal(results[0], results[1])
