"""Affine coupling layers: vectors (MaskedAffineCoupling) and images (AffineCoupling)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nfcourse.flows import (
    MLP,
    AffineCoupling,
    GatedConvNet,
    MaskedAffineCoupling,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
)

FAST = settings(max_examples=5, deadline=None)
F64 = torch.float64


# ------------------------------------------------------------------------------- vectors
@FAST
@given(seed=st.integers(0, 2**16), dim=st.integers(2, 5), batch=st.integers(1, 3))
def test_masked_coupling_invertible_and_log_det(flowcheck, seed, dim, batch):
    torch.manual_seed(seed)
    mask = (torch.rand(dim) < 0.5).float()
    mask[0], mask[-1] = 1.0, 0.0  # both parts non-empty
    layer = flowcheck.perturb_(MaskedAffineCoupling(mask, hidden=16), 0.3, seed).double()
    x = torch.randn(batch, dim, dtype=F64)
    z, log_det = flowcheck.check_flow(layer, x)
    keep = mask.bool()
    torch.testing.assert_close(z[:, keep], x[:, keep])  # masked part unchanged
    assert not torch.allclose(z[:, ~keep], x[:, ~keep])  # the test is not trivial
    assert log_det.abs().min() > 0


def test_masked_coupling_formula(flowcheck):
    """z = x m + (1 - m)(x exp(s) + t) with s, t from the masked input."""
    torch.manual_seed(1)
    mask = torch.tensor([1.0, 0.0, 1.0])
    layer = flowcheck.perturb_(MaskedAffineCoupling(mask, hidden=8), 0.5).double()
    x = torch.randn(4, 3, dtype=F64)
    out = layer.net(x * mask.double())
    s_raw, t = out.chunk(2, dim=1)
    bound = layer.log_bound.exp()
    s = torch.tanh(s_raw / bound) * bound
    expected = x * mask + (1 - mask) * (x * torch.exp(s) + t)
    z, log_det = layer(x)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(log_det, ((1 - mask) * s).sum(1))


def test_masked_coupling_starts_as_identity():
    layer = MaskedAffineCoupling(alternating_mask(4), hidden=8)
    x = torch.randn(5, 4)
    z, log_det = layer(x)
    torch.testing.assert_close(z, x)
    assert log_det.abs().max() == 0


def test_masked_coupling_with_context(flowcheck):
    torch.manual_seed(2)
    layer = flowcheck.perturb_(
        MaskedAffineCoupling(alternating_mask(2), hidden=16, context_dim=3), 0.3
    ).double()
    x, ctx = torch.randn(3, 2, dtype=F64), torch.randn(3, 3, dtype=F64)
    z, _ = flowcheck.check_flow(layer, x, ctx)
    z_other, _ = layer(x, ctx + 1)
    assert not torch.allclose(z, z_other)  # the context matters
    with pytest.raises(ValueError, match="context"):
        layer(x)
    with pytest.raises(ValueError, match="context must have shape"):
        layer(x, torch.randn(3, 2, dtype=F64))


def test_masked_coupling_bound():
    """|s| never exceeds the bound, however large the network output is."""
    net = nn.Linear(2, 4)
    with torch.no_grad():
        net.weight.fill_(100.0)
        net.bias.fill_(100.0)
    fixed = MaskedAffineCoupling(alternating_mask(2), net, bound=1.5, learn_bound=False)
    assert "log_bound" not in dict(fixed.named_parameters())
    _, log_det = fixed(torch.ones(3, 2))
    assert log_det.abs().max() <= 1.5 + 1e-6
    learned = MaskedAffineCoupling(alternating_mask(2), MLP(2, 4, 8), bound=1.0)
    assert learned.log_bound.requires_grad
    learned(torch.randn(4, 2))[1].sum().backward()
    assert learned.log_bound.grad is not None


def test_masked_coupling_accepts_hidden_int_and_custom_net():
    layer = MaskedAffineCoupling(alternating_mask(2), 12)
    assert layer.net.net[0].out_features == 12
    custom = MaskedAffineCoupling(alternating_mask(2), MLP(2, 4, 8))
    custom(torch.randn(2, 2))
    bad = MaskedAffineCoupling(alternating_mask(2), nn.Linear(2, 3))
    with pytest.raises(ValueError, match="network must return"):
        bad(torch.randn(2, 2))


def test_masked_coupling_input_errors():
    layer = MaskedAffineCoupling(alternating_mask(3), hidden=8)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError):
        layer(torch.randn(2, 3, 1))
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="0 and 1"):
        MaskedAffineCoupling(torch.tensor([0.5, 1.0]))


# ------------------------------------------------------------------------------- images
MASKS = {
    "checkerboard": lambda c, h, w: checkerboard_mask(h, w),
    "checkerboard_inv": lambda c, h, w: checkerboard_mask(h, w, invert=True),
    "channel": lambda c, h, w: channel_mask(c),
    "named": lambda c, h, w: "checkerboard_inv",
    "named_channel": lambda c, h, w: "channel_inv",
}


@FAST
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(sorted(MASKS)), batch=st.integers(1, 2))
def test_image_coupling_invertible_and_log_det(flowcheck, seed, kind, batch):
    torch.manual_seed(seed)
    c, h, w = 2, 4, 4
    layer = AffineCoupling(c, MASKS[kind](c, h, w), c_hidden=8, num_layers=1)
    flowcheck.perturb_(layer, 0.2, seed).double()
    x = torch.randn(batch, c, h, w, dtype=F64)
    z, log_det = flowcheck.check_flow(layer, x)
    mask = layer.get_mask(x).expand_as(x).bool()
    torch.testing.assert_close(z[mask], x[mask])
    assert not torch.allclose(z[~mask], x[~mask])


def test_image_coupling_starts_as_identity():
    layer = AffineCoupling(1, checkerboard_mask(6, 6), c_hidden=8, num_layers=1)
    x = torch.randn(2, 1, 6, 6)
    z, log_det = layer(x)
    torch.testing.assert_close(z, x)
    assert log_det.abs().max() == 0


def test_image_coupling_scale_bound_per_channel():
    layer = AffineCoupling(2, channel_mask(2), c_hidden=8, num_layers=1)
    assert layer.log_scale.shape == (1, 2, 1, 1) and layer.log_scale.requires_grad
    with torch.no_grad():
        layer.net.last.bias.fill_(50.0)
        layer.log_scale.fill_(0.0)  # bound 1 per channel
    x = torch.randn(2, 2, 3, 3)
    _, log_det = layer(x)
    # one channel of 9 pixels is transformed, each |s| <= 1
    assert log_det.abs().max() <= 9 + 1e-4
    layer(x)[1].sum().backward()
    assert layer.log_scale.grad is not None


def test_image_coupling_with_context(flowcheck):
    torch.manual_seed(3)
    layer = AffineCoupling(1, checkerboard_mask(4, 4), c_hidden=8, num_layers=1,
                           context_channels=2)
    flowcheck.perturb_(layer, 0.2).double()
    x, ctx = torch.randn(2, 1, 4, 4, dtype=F64), torch.randn(2, 2, 4, 4, dtype=F64)
    z, _ = flowcheck.check_flow(layer, x, ctx)
    assert not torch.allclose(z, layer(x, ctx * 2)[0])
    with pytest.raises(ValueError, match="no context"):
        layer(x)
    with pytest.raises(ValueError, match="context must have shape"):
        layer(x, torch.randn(2, 1, 4, 4, dtype=F64))


def test_image_coupling_custom_net():
    net = GatedConvNet(3, 8, 6, num_layers=1)
    layer = AffineCoupling(3, channel_mask(3), net)
    assert layer.net is net
    assert layer(torch.randn(1, 3, 2, 2))[0].shape == (1, 3, 2, 2)


def test_image_coupling_errors():
    layer = AffineCoupling(1, checkerboard_mask(4, 4), c_hidden=4, num_layers=1)
    with pytest.raises(ValueError, match="images"):
        layer(torch.randn(2, 16))
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="mask is"):
        layer(torch.randn(2, 1, 6, 6))
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mask must have shape"):
        AffineCoupling(2, torch.ones(4, 4))
    with pytest.raises(ValueError, match="unknown mask"):
        AffineCoupling(2, "stripes")
    with pytest.raises(ValueError, match="at least 2 channels"):
        AffineCoupling(1, "channel")
