"""Base contract, priors, masks and networks of nfcourse.flows."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nfcourse.flows import (
    MLP,
    Compose,
    Flow,
    GatedConvNet,
    Inverse,
    MaskedAffineCoupling,
    StandardNormal,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
)

FAST = settings(max_examples=5, deadline=None)


class Shift(Flow):
    def __init__(self, by):
        super().__init__()
        self.by = by

    def forward(self, x, context=None):
        return x + self.by, x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        return z - self.by, z.new_zeros(z.shape[0])


def test_flow_base_raises_not_implemented():
    with pytest.raises(NotImplementedError):
        Flow()(torch.zeros(1, 2))
    with pytest.raises(NotImplementedError):
        Flow().inverse(torch.zeros(1, 2))


def test_compose_order_and_inverse(flowcheck):
    torch.manual_seed(0)
    layers = [
        flowcheck.perturb_(MaskedAffineCoupling(alternating_mask(3, i % 2 == 1), hidden=8))
        for i in range(3)
    ]
    flow = Compose(layers).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    z, log_det = flowcheck.check_flow(flow, x)
    manual, total = x, 0
    for layer in layers:
        manual, ld = layer(manual)
        total = total + ld
    torch.testing.assert_close(z, manual)
    torch.testing.assert_close(log_det, total)
    assert len(flow.trajectory(x)) == 4 and len(flow.inverse_trajectory(z)) == 4
    torch.testing.assert_close(flow.inverse_trajectory(z)[-1], x)


def test_inverse_swaps_directions(flowcheck):
    layer = flowcheck.perturb_(MaskedAffineCoupling(alternating_mask(2), hidden=8)).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    z1, ld1 = Inverse(layer)(x)
    z2, ld2 = layer.inverse(x)
    torch.testing.assert_close(z1, z2)
    torch.testing.assert_close(ld1, ld2)
    flowcheck.check_flow(Inverse(layer), x)


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), n=st.integers(1, 5))
def test_standard_normal_log_prob_and_sample(shape, n):
    prior = StandardNormal(shape)
    z = prior.sample(n)
    assert z.shape == (n, *shape)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(prior.log_prob(z), expected)
    assert prior.event_dim == math.prod(shape)


def test_standard_normal_temperature_dtype_device():
    prior = StandardNormal(3)
    assert prior.shape == (3,)
    torch.manual_seed(0)
    z = prior.sample(20000, temperature=0.5)
    assert abs(z.std().item() - 0.5) < 0.02
    assert prior.sample(2, temperature=0.0).abs().max() == 0
    assert prior.sample(2, dtype=torch.float64).dtype == torch.float64
    assert prior.double().sample(2).dtype == torch.float64
    assert prior.sample(2, device="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(2, temperature=-1)


def test_standard_normal_shape_errors():
    prior = StandardNormal((1, 4, 4))
    with pytest.raises(ValueError, match=r"expected shape \(B, 1, 4, 4\)"):
        prior.log_prob(torch.zeros(2, 16))
    with pytest.raises(ValueError):
        StandardNormal(())
    with pytest.raises(TypeError):
        prior.log_prob([0.0])


def test_checkerboard_mask():
    mask = checkerboard_mask(3, 4)
    assert mask.shape == (1, 1, 3, 4) and mask.dtype == torch.get_default_dtype()
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]], dtype=mask.dtype)
    torch.testing.assert_close(mask[0, 0], expected)
    torch.testing.assert_close(checkerboard_mask(3, 4, invert=True), 1 - mask)
    assert checkerboard_mask(2, 2, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError):
        checkerboard_mask(0, 3)


def test_channel_and_vector_masks():
    mask = channel_mask(4)
    assert mask.shape == (1, 4, 1, 1)
    assert mask.flatten().tolist() == [1, 1, 0, 0]
    assert channel_mask(4, invert=True).flatten().tolist() == [0, 0, 1, 1]
    assert channel_mask(5).flatten().tolist() == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError):
        channel_mask(1)
    assert alternating_mask(3).tolist() == [1, 0, 1]
    assert alternating_mask(3, invert=True).tolist() == [0, 1, 0]


def test_mlp_zero_init_and_shapes():
    net = MLP(3, 5, hidden=16, num_hidden=2, zero_init=True)
    x = torch.randn(7, 3)
    assert net(x).shape == (7, 5)
    assert net(x).abs().max() == 0
    assert MLP(3, 5, hidden=16, num_hidden=1)(x).abs().max() > 0
    with pytest.raises(ValueError):
        MLP(3, 5, num_hidden=0)


def test_gated_conv_net_zero_init_and_shapes():
    net = GatedConvNet(2, 8, 4, num_layers=2)
    x = torch.randn(3, 2, 5, 6)
    out = net(x)
    assert out.shape == (3, 4, 5, 6)
    assert out.abs().max() == 0
    assert GatedConvNet(2, 8, num_layers=1).c_out == 4
    loss = GatedConvNet(2, 8, 4, num_layers=1, zero_init=False)(x).pow(2).sum()
    loss.backward()


def test_gated_conv_net_trains_from_zero():
    """The zero last layer still receives gradients, so the network can learn."""
    net = GatedConvNet(1, 8, 2, num_layers=1)
    net(torch.randn(2, 1, 4, 4)).sum().backward()
    assert net.last.weight.grad.abs().sum() > 0


def test_exports_and_docstring_examples():
    """Everything in ``__all__`` exists, and the examples in the docstrings run as written."""
    import doctest
    import importlib

    import nfcourse.flows as flows

    for name in flows.__all__:
        assert hasattr(flows, name), name
    for module in ("base", "priors", "masks", "nets", "coupling", "dequantization",
                   "multiscale", "glow", "model", "builders"):
        mod = importlib.import_module(f"nfcourse.flows.{module}")
        result = doctest.testmod(mod, extraglobs={"torch": torch, **vars(flows)},
                                 optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"docstring example failed in nfcourse.flows.{module}"
