"""Data-parallel fit: 2 CPU processes (gloo) train like 1 process with the same global batch.

The tiny RealNVP has no random layers, so the two runs differ only in the order of
floating-point sums; in float64 that is far below the 1e-8 tolerance used here.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_flows import moons, tiny_realnvp

import nfcourse.train as train_mod
from nfcourse.distributed import LossModule, free_port, launch, shard_bounds
from nfcourse.flows import ActNorm, glow, multiscale_flow
from nfcourse.train import fit, scaled_lr

pytestmark = pytest.mark.xdist_group("distributed")

# 131 points in batches of 64: shares of 32/32, then a last batch of 3 (shares 2/1).
N, BATCH, STEPS = 131, 64, 10
KW = dict(steps=STEPS, batch_size=BATCH, lr=5e-3, schedule="onecycle", grad_clip=1.0,
          seed=3, device="cpu", progress=False)
TOL = dict(rtol=1e-8, atol=1e-10)
LOSS_TOL = dict(rtol=1e-6, atol=1e-7)  # the history records losses in float32


def _data() -> torch.Tensor:
    return moons(N).double()


def _model(seed: int = 1):
    return tiny_realnvp(seed=seed).double()


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(5))


def _glow_actnorm_after_one_step() -> list[torch.Tensor]:
    """A tiny Glow trained at lr 0: ActNorm keeps its data-dependent init."""
    torch.manual_seed(0)
    g = glow(shape=(1, 4, 4), num_scales=1, steps_per_scale=1, hidden=4, num_layers=1)
    # two steps: DDP complains at the second one about parameters the loss did not use
    fit(g, _images(), steps=2, batch_size=40, lr=0.0, device="cpu", progress=False)
    norms = [m for m in g.modules() if isinstance(m, ActNorm)]
    return [t.detach().clone() for m in norms for t in (m.loc, m.log_scale)]


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class Crash(Exception):
    pass


def _worker(rank: int, folder: str) -> None:
    """Every scenario in one pair of processes (starting them is the slow part)."""
    torch.set_num_threads(1)
    out: dict = {}
    saves = []
    real_save = train_mod.save_checkpoint

    def counting_save(path, state):
        saves.append(int(state["step"]))
        return real_save(path, state)

    train_mod.save_checkpoint = counting_save
    folder = Path(folder)
    x = _data()

    # 1. an uninterrupted run with checkpoints and validation
    model = _model()
    h = fit(model, x, checkpoint=folder / "full.pt", checkpoint_every=4, val_data=x[:50],
            val_every=5, **KW)
    out["params"] = _params(model)
    out["history"] = h.to_dict()
    out["saves"] = list(saves)

    # 2. the same model trained on (resumed from its finished checkpoint, 3 more steps):
    # the DDP wrapper of the first call must not get in the way of the second
    more = fit(model, x, checkpoint=folder / "full.pt", **{**KW, "steps": STEPS + 3})
    out["more_params"] = _params(model)
    out["more_steps"] = more.steps

    # 3. a run that crashes at step 6 on every rank, then resumes in a fresh model
    calls = {"n": 0}

    def crashing(m, b):
        calls["n"] += 1
        if calls["n"] == 7:
            raise Crash
        return m.loss(b)

    try:
        fit(_model(), x, checkpoint=folder / "crash.pt", checkpoint_every=4, loss_fn=crashing,
            **KW)
    except Crash:
        out["crashed"] = True
    torch.distributed.barrier()
    fresh = _model(seed=99)
    torch.manual_seed(1234)
    resumed = fit(fresh, x, checkpoint=folder / "crash.pt", resume=True, **KW)
    out["resumed_params"] = _params(fresh)
    out["resumed_loss"] = resumed.loss

    # 4. ActNorm's data-dependent init: both ranks start from the whole first batch
    out["glow_actnorm"] = _glow_actnorm_after_one_step()

    # 5. a multi-scale flow with variational dequantization (noise drawn on each rank)
    torch.manual_seed(0)
    ms = multiscale_flow(shape=(1, 4, 4), hidden=(4, 4, 4), num_couplings=(1, 1, 1),
                         num_layers=1, vardeq_hidden=4, vardeq_layers=1, vardeq_couplings=1)
    h = fit(ms, _images(), steps=3, batch_size=16, lr=1e-3, device="cpu", progress=False)
    out["multiscale"] = (_params(ms), h.loss)

    with open(folder / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(out, f)


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    launch(_worker, 2, str(tmp_path), backend="gloo")
    r0 = pickle.loads((tmp_path / "rank0.pkl").read_bytes())
    r1 = pickle.loads((tmp_path / "rank1.pkl").read_bytes())

    single = _model()
    x = _data()
    h = fit(single, x, val_data=x[:50], val_every=5, **KW)

    # the same parameters on both ranks, and the same as one process
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    torch.testing.assert_close(r0["params"], _params(single), **TOL)
    # the same loss history (the global batch's mean) and validation losses
    for key in ("loss", "val", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor(r0["history"][key]), torch.tensor(getattr(h, key)), **LOSS_TOL
        )
    assert r0["history"]["lr"] == h.lr and r0["history"]["world_size"] == 2
    assert r1["history"]["loss"] == r0["history"]["loss"]

    # rank 0 alone writes checkpoints (steps 4, 8 and the end), atomically
    assert r0["saves"] == [4, 8, 10] and r1["saves"] == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt") == [
        "crash.pt", "full.pt"
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    state = torch.load(tmp_path / "full.pt", weights_only=False)
    assert len(state["rng_ranks"]) == 2 and state["config"]["world_size"] == 2

    # training on from the finished checkpoint with the same model
    assert r0["more_steps"] == STEPS + 3
    torch.testing.assert_close(r0["more_params"], r1["more_params"], rtol=0, atol=0)
    assert not torch.equal(r0["more_params"], r0["params"])

    # the crashed run resumed gives the uninterrupted result
    assert r0["crashed"] and r1["crashed"]
    torch.testing.assert_close(r0["resumed_params"], r0["params"], rtol=0, atol=0)
    assert r0["resumed_loss"] == r0["history"]["loss"]

    # ActNorm initialised from the same (whole) batch on both ranks, as on one process
    one = _glow_actnorm_after_one_step()
    assert len(one) == 2 and any(bool((p != 0).any()) for p in one)
    for a, b, c in zip(r0["glow_actnorm"], r1["glow_actnorm"], one, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)

    # a stochastic flow trains on both ranks in step, with one loss history
    torch.testing.assert_close(r0["multiscale"][0], r1["multiscale"][0], rtol=0, atol=0)
    assert r0["multiscale"][1] == r1["multiscale"][1] and len(r0["multiscale"][1]) == 3


TORCHRUN_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from tiny_flows import moons, tiny_realnvp
from nfcourse.train import fit
torch.set_num_threads(1)
model = tiny_realnvp(seed=1).double()
h = fit(model, moons(131).double(), steps=6, batch_size=64, lr=5e-3, seed=3, device="cpu",
        progress=False, checkpoint={ckpt!r}, checkpoint_every=2)
assert torch.distributed.is_initialized() and h.world_size == 2
torch.save([p.detach() for p in model.parameters()], {out!r} + f"{{torch.distributed.get_rank()}}")
"""


def test_fit_under_torchrun_sets_up_the_process_group_itself(tmp_path):
    script = tmp_path / "train.py"
    out = str(tmp_path / "params")
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent),
                                             ckpt=str(tmp_path / "run.pt"), out=out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    single = _model()
    fit(single, moons(131).double(), steps=6, batch_size=64, lr=5e-3, seed=3, device="cpu",
        progress=False)
    for r in (0, 1):
        for p, q in zip(torch.load(out + str(r)), single.parameters(), strict=True):
            torch.testing.assert_close(p, q.detach(), **TOL)
    assert torch.load(tmp_path / "run.pt", weights_only=False)["step"] == 6


def test_shard_bounds_cover_the_batch_once():
    for n in range(0, 9):
        for w in (1, 2, 3):
            bounds = [shard_bounds(n, r, w) for r in range(w)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_bounds(4, 2, 2)


def test_loss_module_weights_the_loss_and_fit_refuses_distributed_without_a_group():
    model = _model()
    x = _data()[:8]
    module = LossModule(model, model.loss)
    torch.testing.assert_close(module(x, 0.5), 0.5 * model.loss(x))
    with pytest.raises(RuntimeError, match="process group"):
        fit(model, x, steps=1, distributed=True, device="cpu", progress=False)


def test_scaled_lr():
    assert scaled_lr(1e-3, 512, 128) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 512, 128, rule="linear") == pytest.approx(4e-3)
    with pytest.raises(ValueError):
        scaled_lr(1e-3, 0, 128)
    with pytest.raises(ValueError):
        scaled_lr(1e-3, 256, 128, rule="cubic")
