"""Dequantization: logit transform, uniform and variational dequantization, pixel checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nfcourse.flows import (
    Dequantization,
    LogitTransform,
    Sigmoid,
    VariationalDequantization,
)

FAST = settings(max_examples=5, deadline=None)
F64 = torch.float64


def pixels(shape, levels=256, seed=0, dtype=torch.uint8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=gen).to(dtype)


@pytest.mark.parametrize("alpha", [0.0, 1e-5, 0.05])
def test_logit_transform(flowcheck, alpha):
    x = torch.rand(3, 2, 2, 2, dtype=F64) * 0.98 + 0.01
    flowcheck.check_flow(LogitTransform(alpha), x)


def test_sigmoid(flowcheck):
    flowcheck.check_flow(Sigmoid(), torch.randn(3, 4, dtype=F64) * 3)


@FAST
@given(seed=st.integers(0, 2**16), levels=st.sampled_from([2, 4, 256]))
def test_dequantization_log_det_is_jacobian_wrt_noise(flowcheck, seed, levels):
    """For fixed pixels, z is a smooth function of the noise u, and log_det = log|det dz/du|."""
    torch.manual_seed(seed)
    deq = Dequantization(levels)
    x = pixels((2, 2, 3, 3), levels, seed).double()
    u = torch.rand(x.shape, dtype=F64)
    z, log_det = deq(x, noise=u)
    assert log_det.shape == (2,) and log_det.dtype == F64
    for b in range(2):
        expected = flowcheck.jacobian_logdet(
            lambda v, b=b: deq(x[b : b + 1], noise=v)[0], u[b]
        )
        torch.testing.assert_close(log_det[b], expected)
    # the -D log(levels) term is there
    v = (x + u) / levels
    squashed = deq.alpha + (1 - 2 * deq.alpha) * v
    manual = (
        -x[0].numel() * math.log(levels)
        + (math.log(1 - 2 * deq.alpha) - torch.log(squashed) - torch.log1p(-squashed))
        .flatten(1)
        .sum(1)
    )
    torch.testing.assert_close(log_det, manual)


def test_dequantization_inverse_log_det(flowcheck):
    """The inverse's log-det is the continuous part's, minus the forward one at that point."""
    deq = Dequantization()
    x = pixels((2, 1, 3, 3)).double()
    u = torch.rand(x.shape, dtype=F64)
    z, log_det = deq(x, noise=u)
    _, log_det_inv = deq.inverse(z)
    torch.testing.assert_close(log_det_inv, -log_det)
    for b in range(2):
        expected = flowcheck.jacobian_logdet(
            lambda v: deq.logit.inverse(v)[0] * deq.levels, z[b]
        )
        torch.testing.assert_close(log_det_inv[b], expected)


@FAST
@given(seed=st.integers(0, 2**16), levels=st.sampled_from([2, 16, 256]))
def test_dequantization_round_trip_float64_exact(seed, levels):
    torch.manual_seed(seed)
    deq = Dequantization(levels).double()
    x = pixels((8, 1, 8, 8), levels, seed)
    z, _ = deq(x)
    assert z.dtype == F64
    back, _ = deq.inverse(z)
    assert back.dtype == F64
    assert torch.equal(back, x.double())
    # extreme pixel values, noise at the edges of [0, 1)
    edge = torch.tensor([0.0, levels - 1.0], dtype=F64).view(1, 1, 1, 2).repeat(3, 1, 1, 1)
    noise = torch.tensor([0.0, 0.5, 1 - 1e-9], dtype=F64).view(3, 1, 1, 1).expand_as(edge)
    back, _ = deq.inverse(deq(edge, noise=noise.contiguous())[0])
    assert torch.equal(back, edge)


def test_dequantization_float32_round_trip_documented():
    """float32: almost every pixel comes back; the rare misses are exactly one level off,
    and only happen for noise within about 1e-4 of the ends of [0, 1)."""
    torch.manual_seed(0)
    deq = Dequantization()
    x = pixels((64, 1, 28, 28))
    u = torch.rand(x.shape)
    back, _ = deq.inverse(deq(x, noise=u)[0])
    assert back.dtype == torch.float32
    diff = (back - x.float()).abs()
    assert diff.max() <= 1
    assert (diff > 0).float().mean() < 1e-3
    missed = diff > 0
    if missed.any():
        near_edge = torch.minimum(u[missed], 1 - u[missed])
        assert near_edge.max() < 1e-3
    # noise close to 1 next to 255: x + u rounds to 256 in float32, still clamped to 255
    top = torch.full((1, 1, 1, 1), 255, dtype=torch.uint8)
    back, _ = deq.inverse(deq(top, noise=torch.full((1, 1, 1, 1), 1 - 1e-8))[0])
    assert back.item() == 255


def test_dequantization_inputs_and_dtypes():
    deq = Dequantization()
    x = pixels((2, 1, 4, 4))
    z8, _ = deq(x)
    assert z8.dtype == torch.get_default_dtype()
    assert deq(x.float())[0].dtype == torch.float32
    assert deq(x.double())[0].dtype == F64
    assert deq.double()(x)[0].dtype == F64  # integer input follows the module's dtype
    assert deq(x.long())[0].shape == x.shape
    out, _ = deq.inverse(torch.tensor([[-1e4, 1e4, 0.0, float("inf")]]))
    assert out.tolist() == [[0.0, 255.0, 128.0, 255.0]]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.tensor([[0.0, float("nan")]]), "NaN"),
        (torch.tensor([[0.0, float("inf")]]), "inf"),
        (torch.tensor([[0.0, 256.0]]), r"\[0, 255\]"),
        (torch.tensor([[-1.0, 3.0]]), r"\[0, 255\]"),
        (torch.tensor([[0.5, 0.25]]), "non-integer"),
        (torch.tensor([[-1, 3]]), r"\[0, 255\]"),
    ],
)
def test_dequantization_rejects_bad_pixels(bad, match):
    with pytest.raises(ValueError, match=match):
        Dequantization()(bad)


def test_dequantization_rejects_bad_types():
    with pytest.raises(TypeError):
        Dequantization()(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError):
        Dequantization()([[0, 1]])
    with pytest.raises(ValueError, match="noise"):
        Dequantization()(pixels((2, 4)), noise=torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        Dequantization(levels=16)(torch.tensor([[16]]))
    with pytest.raises(ValueError):
        Dequantization(levels=1)
    with pytest.raises(ValueError):
        LogitTransform(alpha=0.5)


# ------------------------------------------------------------------------- variational
def make_vardeq(seed=0):
    torch.manual_seed(seed)
    vdeq = VariationalDequantization(channels=1, c_hidden=8, num_layers=1, num_couplings=2)
    return vdeq


def test_vardeq_log_det_is_uniform_minus_log_q(flowcheck):
    """log_det = log|det dz/du| (x fixed) - log q(u|x), with log q(u|x) from autograd."""
    vdeq = flowcheck.perturb_(make_vardeq(), 0.2).double()
    x = pixels((2, 1, 4, 4), seed=1).double()
    eps = torch.randn(x.shape, dtype=F64)
    z, log_det = vdeq(x, noise=eps)
    cond = x / 255 * 2 - 1
    for b in range(2):
        u, _ = vdeq.noise_flow(eps[b : b + 1], cond[b : b + 1])
        assert 0 < u.min() and u.max() < 1
        log_du_deps = flowcheck.jacobian_logdet(
            lambda e, b=b: vdeq.noise_flow(e, cond[b : b + 1])[0], eps[b]
        )
        log_q = torch.distributions.Normal(0.0, 1.0).log_prob(eps[b]).sum() - log_du_deps
        log_dz_du = flowcheck.jacobian_logdet(
            lambda v, b=b: Dequantization.forward(vdeq, x[b : b + 1], noise=v)[0], u[0]
        )
        torch.testing.assert_close(log_det[b], log_dz_du - log_q)
        z_b = Dequantization.forward(vdeq, x[b : b + 1], noise=u)[0]
        torch.testing.assert_close(z[b : b + 1], z_b)


def test_vardeq_round_trip_and_gradients():
    vdeq = make_vardeq().double()
    x = pixels((4, 1, 6, 6), seed=2)
    z, log_det = vdeq(x)
    assert torch.isfinite(log_det).all()
    back, _ = vdeq.inverse(z)
    assert torch.equal(back, x.double())
    log_det.sum().backward()
    grads = [p.grad for p in vdeq.noise_flow.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_vardeq_noise_depends_on_image(flowcheck):
    vdeq = flowcheck.perturb_(make_vardeq(), 0.3)
    eps = torch.randn(1, 1, 4, 4)
    u0, _ = vdeq.sample_noise(torch.zeros(1, 1, 4, 4), eps)
    u1, _ = vdeq.sample_noise(torch.full((1, 1, 4, 4), 255.0), eps)
    assert not torch.allclose(u0, u1)
    with pytest.raises(ValueError, match="noise"):
        vdeq(pixels((1, 1, 4, 4)), noise=torch.randn(1, 1, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        vdeq(torch.full((1, 1, 4, 4), float("nan")))
