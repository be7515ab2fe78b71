"""ActNorm, invertible 1x1 convolutions (plain and LU), permutations, the Glow step."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nfcourse.flows import (
    ActNorm,
    GlowStep,
    InvConv1x1,
    InvConv1x1LU,
    RandomPermutation,
    ReversePermutation,
)

FAST = settings(max_examples=4, deadline=None)
F64 = torch.float64


def test_actnorm_data_dependent_init():
    torch.manual_seed(0)
    norm = ActNorm(3)
    assert not bool(norm.initialized)
    x = torch.randn(32, 3, 4, 4) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 3
    z, _ = norm(x)
    assert bool(norm.initialized)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4,
                               rtol=0)
    # a second batch does not re-initialise
    loc = norm.loc.detach().clone()
    norm(torch.randn(8, 3, 4, 4))
    assert torch.equal(norm.loc, loc)


def test_actnorm_inverse_does_not_initialise():
    norm = ActNorm(2)
    norm.inverse(torch.randn(4, 2, 3, 3))
    assert not bool(norm.initialized)


@FAST
@given(seed=st.integers(0, 2**16), vector=st.booleans())
def test_actnorm_invertible_and_log_det(flowcheck, seed, vector):
    torch.manual_seed(seed)
    norm = ActNorm(2).double()
    x = torch.randn(3, 2, dtype=F64) if vector else torch.randn(3, 2, 4, 4, dtype=F64)
    norm(x * 3 + 1)  # initialise on another batch
    flowcheck.perturb_(norm, 0.3, seed)
    _, log_det = flowcheck.check_flow(norm, x)
    hw = 1 if vector else 16
    torch.testing.assert_close(log_det, (hw * norm.log_scale.sum()).expand(3))


def test_actnorm_state_dict_round_trip():
    torch.manual_seed(1)
    norm = ActNorm(4)
    norm(torch.randn(16, 4, 2, 2) * 2 + 1)
    state = norm.state_dict()
    assert "initialized" in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = ActNorm(4)
    loaded.load_state_dict(torch.load(buffer))
    assert bool(loaded.initialized)
    x = torch.randn(5, 4, 2, 2)
    z_loaded, ld_loaded = loaded(x)  # must not re-initialise on this batch
    z, ld = norm(x)
    assert torch.equal(z_loaded, z) and torch.equal(ld_loaded, ld)
    assert bool(ActNorm(4).double().initialized) is False  # dtype casts keep the flag a bool


@FAST
@given(seed=st.integers(0, 2**16), c=st.integers(2, 4))
def test_invconv_invertible_and_log_det(flowcheck, seed, c):
    torch.manual_seed(seed)
    for layer in (InvConv1x1(c), InvConv1x1LU(c)):
        flowcheck.perturb_(layer, 0.2, seed).double()
        x = torch.randn(2, c, 2, 3, dtype=F64)
        _, log_det = flowcheck.check_flow(layer, x)
        expected = 6 * torch.linalg.slogdet(layer.weight)[1]
        torch.testing.assert_close(log_det, expected.expand(2))
        assert log_det.abs().min() > 0  # perturbed away from orthogonal
        flowcheck.check_flow(layer, torch.randn(2, c, dtype=F64))  # vectors work too


def test_invconv_starts_orthogonal():
    for layer in (InvConv1x1(5), InvConv1x1LU(5)):
        w = layer.weight.detach()
        torch.testing.assert_close(w @ w.T, torch.eye(5), atol=1e-5, rtol=0)
        assert layer(torch.randn(2, 5, 3, 3))[1].abs().max() < 1e-4


def test_lu_and_plain_agree():
    """A plain 1x1 convolution with the LU layer's weight gives the same map and log-det."""
    torch.manual_seed(2)
    lu = InvConv1x1LU(4).double()
    with torch.no_grad():
        lu.log_s.add_(torch.randn(4, dtype=F64) * 0.5)
        lu.lower.add_(torch.randn(4, 4, dtype=F64) * 0.3)
        lu.upper.add_(torch.randn(4, 4, dtype=F64) * 0.3)
    plain = InvConv1x1(4).double()
    with torch.no_grad():
        plain.weight.copy_(lu.weight)
    x = torch.randn(3, 4, 5, 5, dtype=F64)
    z_lu, ld_lu = lu(x)
    z_plain, ld_plain = plain(x)
    torch.testing.assert_close(z_lu, z_plain)
    torch.testing.assert_close(ld_lu, ld_plain)
    torch.testing.assert_close(lu.inverse(z_lu)[0], plain.inverse(z_plain)[0])
    # the LU structure: unit lower triangle, sign of s fixed, permutation fixed
    lu.log_s.sum().backward()
    assert lu.perm.requires_grad is False and lu.sign_s.requires_grad is False


@pytest.mark.parametrize("cls", [ReversePermutation, RandomPermutation])
def test_permutations(flowcheck, cls):
    torch.manual_seed(3)
    layer = cls(6)
    x = torch.randn(2, 6, 2, 2, dtype=F64)
    z, log_det = flowcheck.check_flow(layer, x)
    assert torch.equal(log_det, torch.zeros(2, dtype=F64))
    assert sorted(z[0, :, 0, 0].tolist()) == sorted(x[0, :, 0, 0].tolist())
    if cls is ReversePermutation:
        assert torch.equal(z, x.flip(1))
    assert torch.equal(RandomPermutation(6, seed=1).perm, RandomPermutation(6, seed=1).perm)


@pytest.mark.parametrize("mixing", ["lu", "plain", "reverse", "random"])
def test_glow_step(flowcheck, mixing):
    torch.manual_seed(4)
    step = GlowStep(2, hidden=8, num_layers=1, mixing=mixing).double()
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    step(x * 2 - 1)  # ActNorm init
    flowcheck.perturb_(step, 0.2)
    flowcheck.check_flow(step, x)
    assert len(step) == 3 and isinstance(step[0], ActNorm)


def test_glow_step_lu_flag_and_errors():
    assert isinstance(GlowStep(4, 8, lu=False)[1], InvConv1x1)
    assert isinstance(GlowStep(4, 8, lu=True)[1], InvConv1x1LU)
    with pytest.raises(ValueError, match="unknown mixing"):
        GlowStep(4, mixing="shuffle")
    with pytest.raises(ValueError, match="at least 2 channels"):
        GlowStep(1)


def test_channel_layers_reject_bad_input():
    for layer in (ActNorm(3), InvConv1x1(3), InvConv1x1LU(3), ReversePermutation(3)):
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            layer(torch.randn(2, 4, 2, 2))
        with pytest.raises(ValueError):
            layer(torch.randn(2, 3, 2))
        with pytest.raises(TypeError, match="floating point"):
            layer(torch.ones(2, 3, dtype=torch.long))
