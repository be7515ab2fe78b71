"""fit's opt-in speed options (compile, channels_last, fused, tf32) and its callback."""

from __future__ import annotations

import pytest
import torch
from tiny_flows import moons, tiny_realnvp

from nfcourse.flows import multiscale_flow
from nfcourse.train import fit

CPU = {"device": "cpu", "progress": False}


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _eager_and(option: dict, steps: int = 8, x=None, build=tiny_realnvp):
    x = moons(256) if x is None else x
    runs = []
    for extra in ({}, option):
        model = build()
        h = fit(model, x, steps=steps, batch_size=64, lr=5e-3, seed=2, **CPU, **extra)
        runs.append((model, h))
    return runs


def test_compile_traces_the_loss_module_and_trains_the_same():
    # aot_eager: dynamo's tracing and AOT autograd without code generation (seconds, not a
    # minute), so the compiled path runs on every CI run; inductor is the slow test below.
    (a, ha), (b, hb) = _eager_and({"compile": {"backend": "aot_eager"}})
    torch.testing.assert_close(_params(a), _params(b), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ha.loss), torch.tensor(hb.loss), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_with_inductor_on_the_cpu():
    # Measured 2026-11-23 on the 2-core VM under load: 48 s with a cold inductor cache (9 s
    # warm; eager 1.7 s). A fresh CI machine starts cold, hence `slow`.
    (a, ha), (b, hb) = _eager_and({"compile": True})
    torch.testing.assert_close(_params(a), _params(b), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(ha.loss), torch.tensor(hb.loss), rtol=1e-4, atol=1e-5)


def test_channels_last_and_tf32_change_nothing_on_the_cpu():
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(0)
        return multiscale_flow(shape=(1, 8, 8), hidden=(4, 4, 4), num_couplings=(1, 1, 1),
                               num_layers=1, vardeq_hidden=4, vardeq_layers=1,
                               vardeq_couplings=1)

    (a, ha), (b, hb) = _eager_and({"channels_last": True, "tf32": True}, steps=3, x=images,
                                  build=build)
    conv = next(m for m in b.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_params(a), _params(b), rtol=1e-5, atol=1e-6)
    assert ha.unit == hb.unit == "bits/dim"


def test_fused_adamw_trains_like_the_loop_one():
    # fit uses it by default on CUDA only; PyTorch has a CPU kernel too, which this runs
    (a, ha), (b, hb) = _eager_and({"fused": True})
    torch.testing.assert_close(_params(a), _params(b), rtol=1e-5, atol=1e-6)
    assert not torch.equal(_params(a), _params(tiny_realnvp()))


def test_callback_sees_every_step_and_can_stop_training(tmp_path):
    seen = []

    def callback(step, history):
        seen.append((step, len(history.loss), history.wall_time > 0))
        return step == 4

    h = fit(tiny_realnvp(), moons(128), steps=10, batch_size=32, callback=callback,
            checkpoint=tmp_path / "c.pt", **CPU)
    assert [s for s, _, _ in seen] == [1, 2, 3, 4]
    assert all(n == s and positive for s, n, positive in seen)
    assert h.steps == 4 and len(h.loss) == 4
    assert torch.load(tmp_path / "c.pt", weights_only=False)["step"] == 4
