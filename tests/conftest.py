"""Shared test helpers. Keep this file small: one fixture per shared need."""

from __future__ import annotations

import types

import pytest
import torch
from torch.autograd.functional import jacobian

# Tests use tiny tensors: with pytest-xdist workers on a 2-core machine, intra-op threads
# only contend (a 4x4 convolution goes from ~10 us to ~30 ms with 2 threads under load).
torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@torch.no_grad()
def perturb_(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add Gaussian noise to every parameter, so zero-initialised (identity) layers are not."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))
    return module


def jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """``log|det|`` of the Jacobian of ``fn`` at one sample ``x`` (flattened, square)."""
    jac = jacobian(lambda v: fn(v.view(1, *x.shape)).flatten(), x.flatten())
    return torch.linalg.slogdet(jac)[1]


def check_flow(flow, x, context=None, atol: float = 1e-7, rtol: float = 1e-6):
    """Invertibility and log-dets against autograd Jacobians, both directions, per sample.

    ``flow`` and ``x`` should be float64. Returns ``(z, log_det)``.
    """
    z, log_det = flow(x, context)
    assert log_det.shape == (x.shape[0],) and log_det.dtype == x.dtype
    x_back, log_det_inv = flow.inverse(z, context)
    assert log_det_inv.shape == (x.shape[0],)
    torch.testing.assert_close(x_back, x, atol=atol, rtol=rtol)
    torch.testing.assert_close(log_det_inv, -log_det, atol=atol, rtol=rtol)
    for b in range(x.shape[0]):
        ctx = None if context is None else context[b : b + 1]
        fwd = jacobian_logdet(lambda v, ctx=ctx: flow(v, ctx)[0], x[b])
        inv = jacobian_logdet(lambda v, ctx=ctx: flow.inverse(v, ctx)[0], z[b].detach())
        torch.testing.assert_close(fwd, log_det[b].detach(), atol=atol * 100, rtol=rtol)
        torch.testing.assert_close(inv, log_det_inv[b].detach(), atol=atol * 100, rtol=rtol)
    return z, log_det


@pytest.fixture(scope="session")
def flowcheck():
    """Helpers for flow tests: ``perturb_``, ``jacobian_logdet``, ``check_flow``,
    ``requires_cuda``."""
    return types.SimpleNamespace(
        perturb_=perturb_, jacobian_logdet=jacobian_logdet, check_flow=check_flow,
        requires_cuda=requires_cuda,
    )
