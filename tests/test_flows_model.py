"""FlowModel and the builders: densities, bpd, importance sampling, sampling, validation."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nfcourse.flows import (
    Compose,
    Dequantization,
    FlowModel,
    Split,
    Squeeze,
    StandardNormal,
    VariationalDequantization,
    glow,
    multiscale_flow,
    realnvp_2d,
    simple_image_flow,
)

FAST = settings(max_examples=4, deadline=None)
F64 = torch.float64


def pixels(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


class LogisticPrior(torch.nn.Module):
    """The standard logistic distribution: the logit of a uniform variable has this law."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def log_prob(self, z):
        return (F.logsigmoid(z) + F.logsigmoid(-z)).flatten(1).sum(1)

    def sample(self, n, temperature=1.0):
        u = torch.rand(n, *self.shape)
        return torch.log(u) - torch.log1p(-u)


SMALL_BUILDERS = {
    "simple": lambda: simple_image_flow((1, 8, 8), num_couplings=2, hidden=8, num_layers=1),
    "simple_vardeq": lambda: simple_image_flow(
        (1, 8, 8), num_couplings=2, hidden=8, num_layers=1, vardeq=True, vardeq_hidden=4,
        vardeq_layers=1, vardeq_couplings=2,
    ),
    "multiscale": lambda: multiscale_flow(
        (1, 8, 8), hidden=(8, 8, 8), num_couplings=(1, 1, 1), num_layers=1, vardeq=True,
        vardeq_hidden=4, vardeq_layers=1, vardeq_couplings=2,
    ),
    "glow": lambda: glow((1, 8, 8), steps_per_scale=1, hidden=8, num_layers=1),
    "glow_plain": lambda: glow((2, 8, 8), num_scales=3, steps_per_scale=1, hidden=8,
                               num_layers=1, mixing="plain"),
}


# ----------------------------------------------------------------------------- vectors
def test_realnvp_2d_log_prob(flowcheck):
    torch.manual_seed(0)
    model = realnvp_2d(num_layers=4, hidden=16)
    assert model.data_shape == (2,) and model.loss_unit == "nats" and not model.is_discrete
    x = torch.randn(6, 2)
    log_prob = model.log_prob(x)
    assert log_prob.shape == (6,) and torch.isfinite(log_prob).all()
    # a new model is N(0, I): every coupling starts as the identity
    torch.testing.assert_close(log_prob, StandardNormal(2).log_prob(x))
    flowcheck.perturb_(model, 0.2)
    z, log_det = model.flow(x)
    torch.testing.assert_close(model.log_prob(x), model.prior.log_prob(z) + log_det)
    torch.testing.assert_close(model(x), model.log_prob(x))
    torch.testing.assert_close(model.loss(x), -model.log_prob(x).mean())
    torch.testing.assert_close(model.bits_per_dim(x), -model.log_prob(x) / (2 * math.log(2)))
    assert model.sample(5).shape == (5, 2)
    flowcheck.check_flow(model.flow.double(), x.double())


def test_realnvp_2d_defaults_and_context(flowcheck):
    model = realnvp_2d()
    assert len(model.flow) == 6 and model.num_parameters() > 0
    cond = flowcheck.perturb_(realnvp_2d(num_layers=2, hidden=8, context_dim=3), 0.3)
    x, ctx = torch.randn(4, 2), torch.randn(4, 3)
    assert cond.log_prob(x, ctx).shape == (4,)
    assert cond.sample(4, context=ctx).shape == (4, 2)
    with pytest.raises(ValueError, match="context has batch size"):
        cond.log_prob(x, ctx[:2])


def test_realnvp_2d_learns():
    torch.manual_seed(0)
    model = realnvp_2d(num_layers=2, hidden=16, num_hidden=1)
    data = torch.randn(512, 2) * torch.tensor([0.3, 2.0]) + torch.tensor([1.0, -1.0])
    start = model.loss(data).item()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        model.loss(data).backward()
        opt.step()
    assert model.loss(data).item() < start - 0.3


def test_vector_model_validation():
    model = realnvp_2d(num_layers=2, hidden=8)
    with pytest.raises(ValueError, match=r"expected a batch of shape \(B, 2\)"):
        model.log_prob(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model.log_prob(torch.randn(2))
    with pytest.raises(TypeError, match="floating point"):
        model.log_prob(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="float64"):
        model.log_prob(torch.randn(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="NaN"):
        model.log_prob(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="empty"):
        model.log_prob(torch.randn(0, 2))
    with pytest.raises(TypeError):
        model.log_prob([[0.0, 1.0]])
    with pytest.raises(ValueError, match="k >= 1"):
        model.importance_bpd(torch.randn(2, 2), k=0)


# ----------------------------------------------------------------------------- bits/dim
def test_uniform_model_has_8_bits_per_dim():
    """Uniform dequantization + a logistic prior on logit(v) is the uniform model: 8 bpd."""
    torch.manual_seed(0)
    model = FlowModel(Compose([Dequantization(alpha=0.0)]), LogisticPrior((1, 4, 4)))
    model.double()
    x = pixels((5, 1, 4, 4))
    torch.testing.assert_close(model.bits_per_dim(x), torch.full((5,), 8.0, dtype=F64))
    torch.testing.assert_close(model.importance_bpd(x, k=4), torch.full((5,), 8.0, dtype=F64))
    assert model.loss_unit == "bits/dim"
    torch.testing.assert_close(model.loss(x), torch.tensor(8.0, dtype=F64))
    levels16 = FlowModel(Dequantization(16, alpha=0.0), LogisticPrior((3,)), data_shape=(3,))
    bpd = levels16.bits_per_dim(torch.tensor([[0, 7, 15]]))
    torch.testing.assert_close(bpd, torch.tensor([4.0]))


def test_importance_bpd_with_k_1_is_one_sample_bpd(flowcheck):
    model = flowcheck.perturb_(SMALL_BUILDERS["simple"](), 0.1)
    x = pixels((3, 1, 8, 8))
    torch.manual_seed(5)
    one = model.bits_per_dim(x)
    torch.manual_seed(5)
    torch.testing.assert_close(model.importance_bpd(x, k=1), one)
    torch.manual_seed(6)
    samples = torch.stack([model.log_prob(x) for _ in range(3)])
    torch.manual_seed(6)
    expected = -(torch.logsumexp(samples, 0) - math.log(3)) / (64 * math.log(2))
    torch.testing.assert_close(model.importance_bpd(x, k=3), expected)


@pytest.mark.parametrize("name", ["simple", "simple_vardeq"])
def test_importance_bpd_below_bpd_on_average(flowcheck, name):
    torch.manual_seed(0)
    model = flowcheck.perturb_(SMALL_BUILDERS[name](), 0.1)
    x = pixels((8, 1, 8, 8), seed=3)
    with torch.no_grad():
        one_sample = torch.stack([model.bits_per_dim(x) for _ in range(16)]).mean()
        importance = model.importance_bpd(x, k=16).mean()
    assert importance <= one_sample


# ----------------------------------------------------------------------------- builders
@pytest.mark.parametrize("name", sorted(SMALL_BUILDERS))
def test_small_builders(flowcheck, name):
    torch.manual_seed(0)
    model = SMALL_BUILDERS[name]()
    shape = model.data_shape
    assert model.is_discrete and model.loss_unit == "bits/dim"
    x = pixels((3, *shape))
    log_prob = model.log_prob(x)
    assert log_prob.shape == (3,) and torch.isfinite(log_prob).all()
    flowcheck.perturb_(model, 0.05)
    bpd = model.bits_per_dim(x)
    assert bpd.shape == (3,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    loss = model.loss(x)
    assert loss.dim() == 0
    loss.backward()
    assert model.log_prob(x.float()).shape == (3,)  # float tensors of integers work too
    samples = model.sample(4)
    assert samples.shape == (4, *shape) and samples.dtype == torch.float32
    assert torch.equal(samples, samples.round())
    assert samples.min() >= 0 and samples.max() <= 255
    low = model.sample(2, temperature=0.3)
    assert low.shape == (2, *shape)


@pytest.mark.parametrize("builder", [simple_image_flow, multiscale_flow, glow])
def test_builder_defaults_mnist(builder):
    model = builder()
    assert model.data_shape == (1, 28, 28)
    x = pixels((2, 1, 28, 28))
    with torch.no_grad():
        assert torch.isfinite(model.bits_per_dim(x)).all()
    assert model.sample(1).shape == (1, 1, 28, 28)


def test_builder_shapes_and_options():
    assert simple_image_flow((1, 14, 14), num_couplings=1, hidden=4, num_layers=1).sample(
        1
    ).shape == (1, 1, 14, 14)
    ms = multiscale_flow()
    assert ms.prior.shape == (8, 7, 7)
    assert isinstance(ms.flow[0], VariationalDequantization)
    assert sum(isinstance(m, Split) for m in ms.modules()) == 1
    assert isinstance(simple_image_flow(vardeq=True).flow[0], VariationalDequantization)
    assert not isinstance(simple_image_flow().flow[0], VariationalDequantization)
    assert glow().prior.shape == (8, 7, 7)
    # 3x8x8 -> 12x4x4 -> split 6 -> 24x2x2 -> split 12 -> 48x1x1
    three = glow((3, 8, 8), num_scales=3, steps_per_scale=1, hidden=4)
    assert three.prior.shape == (48, 1, 1)
    with pytest.raises(ValueError, match="divisible by 4"):
        multiscale_flow((1, 14, 14))
    with pytest.raises(ValueError, match="divisible by 8"):
        glow((1, 28, 28), num_scales=3)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        simple_image_flow((28, 28))


def test_multiscale_model_is_invertible_given_split_latents():
    """Decoding the final latent with the recorded split halves gives the dequantized input."""
    torch.manual_seed(1)
    model = SMALL_BUILDERS["multiscale"]().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flow = Compose(list(model.flow)[1:])  # the continuous part, after dequantization
    splits = [m for m in flow.modules() if isinstance(m, Split)]

    def record(module, inputs, output):
        module.z2 = inputs[0].chunk(2, dim=1)[1]

    hooks = [s.register_forward_hook(record) for s in splits]
    y = torch.randn(2, 1, 8, 8, dtype=F64)
    z, log_det = flow(y)
    for h in hooks:
        h.remove()
    back, log_det_inv = flow.inverse(z)
    torch.testing.assert_close(back, y)
    torch.testing.assert_close(log_det_inv, -log_det)
    for s in splits:
        s.z2 = None


def test_temperature_reaches_splits():
    torch.manual_seed(2)
    model = SMALL_BUILDERS["multiscale"]()
    model.sample(2, temperature=0.4)
    assert all(s.temperature == 0.4 for s in model.modules() if isinstance(s, Split))
    cold = model.sample(3, temperature=0.0)
    assert torch.equal(cold[0], cold[1]) and torch.equal(cold[1], cold[2])


def test_sample_with_given_latents_and_trajectories():
    torch.manual_seed(3)
    model = SMALL_BUILDERS["glow"]()
    z = model.prior.sample(2)
    torch.manual_seed(0)
    a = model.sample(2, z=z)
    torch.manual_seed(0)
    assert torch.equal(a, model.sample(2, z=z))
    with pytest.raises(ValueError, match="rows"):
        model.sample(3, z=z)
    x = pixels((2, 1, 8, 8))
    forward = model.trajectory(x)
    assert len(forward) == len(model.flow) + 1 and forward[-1].shape == (2, *model.prior.shape)
    backward = model.sample_trajectory(2, z=z)
    assert len(backward) == len(model.flow) + 1 and backward[-1].shape == (2, 1, 8, 8)


def test_data_shape_inference_keeps_rng():
    state = torch.random.get_rng_state()
    model = FlowModel(Compose([Squeeze(), Split()]), StandardNormal((2, 2, 2)))
    assert model.data_shape == (1, 4, 4)
    assert torch.equal(state, torch.random.get_rng_state())
    assert FlowModel(Compose([]), StandardNormal(3)).data_shape == (3,)


def test_image_model_validation():
    model = SMALL_BUILDERS["simple"]()
    good = pixels((2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"expected a batch of shape \(B, 1, 8, 8\)"):
        model.log_prob(good[:, :, :4])
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        model.log_prob(good.float() + 300)
    with pytest.raises(ValueError, match="non-integer"):
        model.log_prob(good.float() / 255)
    nan = good.float()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.log_prob(nan)
    with pytest.raises(TypeError, match="integer pixels"):
        model.log_prob(good.bool())
    assert model.double().log_prob(good.float()).dtype == F64  # float32 pixels are cast


def test_glow_state_dict_round_trip():
    torch.manual_seed(4)
    model = glow((1, 8, 8), steps_per_scale=1, hidden=8, num_layers=1)
    x = pixels((4, 1, 8, 8))
    model.log_prob(x)  # ActNorm data-dependent init
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = glow((1, 8, 8), steps_per_scale=1, hidden=8, num_layers=1)
    fresh.load_state_dict(torch.load(buffer))
    torch.manual_seed(9)
    a = model.log_prob(x[:1])
    torch.manual_seed(9)
    torch.testing.assert_close(fresh.log_prob(x[:1]), a)


@FAST
@given(seed=st.integers(0, 2**16), hw=st.sampled_from([4, 8]))
def test_simple_flow_any_size(seed, hw):
    torch.manual_seed(seed)
    model = simple_image_flow((1, hw, hw), num_couplings=2, hidden=4, num_layers=1)
    x = pixels((2, 1, hw, hw), seed)
    # a new model is the identity after dequantization: z is the dequantized input
    torch.manual_seed(seed)
    z, log_det = model.flow(x)
    torch.manual_seed(seed)
    y, deq_log_det = model.flow[0](x)
    torch.testing.assert_close(z, y)
    torch.testing.assert_close(log_det, deq_log_det)
    torch.manual_seed(seed)
    log_prob = model.log_prob(x)
    torch.testing.assert_close(log_prob, StandardNormal((1, hw, hw)).log_prob(z) + log_det)
