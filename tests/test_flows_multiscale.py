"""Squeeze and Split."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nfcourse.flows import Split, Squeeze

FAST = settings(max_examples=5, deadline=None)
F64 = torch.float64


@FAST
@given(c=st.integers(1, 3), h=st.integers(1, 3), w=st.integers(1, 3), b=st.integers(1, 2))
def test_squeeze_exact_ordering(c, h, w, b):
    """out[b, 4c + 2i + j, y, x] == x[b, c, 2y + i, 2x + j]."""
    x = torch.randn(b, c, 2 * h, 2 * w)
    z, log_det = Squeeze()(x)
    assert z.shape == (b, 4 * c, h, w)
    assert torch.equal(log_det, torch.zeros(b))
    for ch in range(c):
        for i in range(2):
            for j in range(2):
                assert torch.equal(z[:, 4 * ch + 2 * i + j], x[:, ch, i::2, j::2])
    back, log_det_inv = Squeeze().inverse(z)
    assert torch.equal(back, x)
    assert torch.equal(log_det_inv, torch.zeros(b))


def test_squeeze_small_example():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    z, _ = Squeeze()(x)
    assert z[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert z[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_squeeze_is_a_permutation(flowcheck):
    """Its Jacobian is a permutation matrix: log|det| = 0 both ways."""
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    flowcheck.check_flow(Squeeze(), x)
    jac = torch.autograd.functional.jacobian(
        lambda v: Squeeze()(v.view(1, 2, 4, 4))[0].flatten(), x[0].flatten()
    )
    assert torch.equal(jac.sum(0), torch.ones(32, dtype=F64))
    assert torch.equal(jac.sum(1), torch.ones(32, dtype=F64))


def test_squeeze_errors():
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze()(torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze()(torch.randn(1, 1, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        Squeeze()(torch.randn(2, 16))
    with pytest.raises(ValueError, match="multiple of 4"):
        Squeeze().inverse(torch.randn(1, 6, 2, 2))


def test_split_log_det_is_prior_of_dropped_half():
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    z, log_det = Split()(x)
    assert torch.equal(z, x[:, :2])
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x[:, 2:]).flatten(1).sum(1)
    torch.testing.assert_close(log_det, expected)


def test_split_round_trip_with_given_half():
    split = Split()
    x = torch.randn(2, 6, 3, 3, dtype=F64)
    z, log_det = split(x)
    back, log_det_inv = split.inverse(z, z2=x[:, 3:])
    assert torch.equal(back, x)
    torch.testing.assert_close(log_det_inv, -log_det)
    # through the attribute
    split.z2 = x[:, 3:]
    assert torch.equal(split.inverse(z)[0], x)
    split.z2 = None


def test_split_samples_at_temperature():
    torch.manual_seed(0)
    split = Split()
    assert split.temperature == 1.0
    z = torch.zeros(500, 2, 4, 4)
    back, log_det = split.inverse(z)
    assert back.shape == (500, 4, 4, 4)
    assert abs(back[:, 2:].std().item() - 1.0) < 0.05
    torch.testing.assert_close(log_det, -Split.log_normal(back[:, 2:]))
    split.temperature = 0.5
    assert abs(split.inverse(z)[0][:, 2:].std().item() - 0.5) < 0.03
    split.temperature = 0.0
    assert split.inverse(z)[0].abs().max() == 0


def test_split_errors():
    with pytest.raises(ValueError, match="even number of channels"):
        Split()(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="second half must have shape"):
        Split().inverse(torch.randn(1, 2, 2, 2), z2=torch.randn(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        Split()(torch.randn(2, 4))
