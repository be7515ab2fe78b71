"""The same layers and models on CUDA (``make test-gpu``); skipped cleanly without CUDA."""

from __future__ import annotations

import io

import pytest
import torch

from nfcourse.flows import (
    ActNorm,
    AffineCoupling,
    Dequantization,
    GlowStep,
    InvConv1x1LU,
    MaskedAffineCoupling,
    Split,
    Squeeze,
    VariationalDequantization,
    alternating_mask,
    checkerboard_mask,
    glow,
    multiscale_flow,
    realnvp_2d,
    simple_image_flow,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = "cuda"
F64 = torch.float64


def cuda_pixels(shape, seed=0):
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randint(0, 256, shape, generator=gen, device=CUDA, dtype=torch.uint8)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: MaskedAffineCoupling(alternating_mask(3), hidden=16), (4, 3)),
        (lambda: AffineCoupling(2, checkerboard_mask(4, 4), c_hidden=8, num_layers=1),
         (2, 2, 4, 4)),
        (lambda: AffineCoupling(4, "channel", c_hidden=8, num_layers=1, context_channels=1),
         (2, 4, 4, 4)),
        (lambda: InvConv1x1LU(4), (2, 4, 3, 3)),
        (lambda: GlowStep(4, hidden=8, num_layers=1), (2, 4, 4, 4)),
        (lambda: Squeeze(), (2, 2, 4, 4)),
    ],
)
def test_layers_on_cuda_match_cpu(flowcheck, make, shape):
    torch.manual_seed(0)
    layer = flowcheck.perturb_(make(), 0.2).double()
    x = torch.randn(shape, dtype=F64)
    ctx = None
    if isinstance(layer, AffineCoupling) and layer.context_channels:
        ctx = torch.randn(shape[0], 1, *shape[2:], dtype=F64)
    if isinstance(layer, GlowStep):
        layer(x)  # ActNorm init on CPU first
    z_cpu, ld_cpu = layer(x, ctx)
    layer.to(CUDA)
    xc, cc = x.to(CUDA), None if ctx is None else ctx.to(CUDA)
    z, log_det = layer(xc, cc)
    assert z.device.type == "cuda" and log_det.device.type == "cuda"
    torch.testing.assert_close(z.cpu(), z_cpu)
    torch.testing.assert_close(log_det.cpu(), ld_cpu)
    back, ld_inv = layer.inverse(z, cc)
    torch.testing.assert_close(back, xc)
    torch.testing.assert_close(ld_inv, -log_det)
    flowcheck.check_flow(layer, xc[:1], None if cc is None else cc[:1])


def test_dequantization_on_cuda():
    deq = Dequantization().to(CUDA).double()
    x = cuda_pixels((8, 1, 28, 28))
    z, log_det = deq(x)
    assert z.device.type == "cuda" and z.dtype == F64
    assert torch.equal(deq.inverse(z)[0], x.double())
    deq32 = Dequantization().to(CUDA)
    back, _ = deq32.inverse(deq32(x)[0])
    diff = (back - x.float()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        deq(x.float() + 256)
    vdeq = VariationalDequantization(c_hidden=8, num_layers=1, num_couplings=2).to(CUDA)
    z, log_det = vdeq(x)
    assert torch.isfinite(log_det).all() and log_det.device.type == "cuda"


def test_split_and_actnorm_on_cuda():
    split = Split(temperature=0.5)
    z = torch.zeros(2, 2, 4, 4, device=CUDA)
    assert split.inverse(z)[0].device.type == "cuda"
    norm = ActNorm(3).to(CUDA)
    norm(torch.randn(16, 3, 4, 4, device=CUDA) * 3 + 1)
    buffer = io.BytesIO()
    torch.save(norm.state_dict(), buffer)
    buffer.seek(0)
    loaded = ActNorm(3)
    loaded.load_state_dict(torch.load(buffer, map_location="cpu"))
    assert bool(loaded.initialized)
    torch.testing.assert_close(loaded.loc, norm.loc.cpu())


@pytest.mark.parametrize(
    "build",
    [
        lambda: simple_image_flow((1, 8, 8), num_couplings=2, hidden=8, num_layers=1),
        lambda: multiscale_flow((1, 8, 8), hidden=(8, 8, 8), num_couplings=(1, 1, 1)),
        lambda: glow((1, 8, 8), steps_per_scale=1, hidden=8),
        lambda: simple_image_flow(),
        lambda: multiscale_flow(),
        lambda: glow(),
    ],
)
def test_image_models_on_cuda(build):
    torch.manual_seed(0)
    model = build().to(CUDA)
    x = cuda_pixels((4, *model.data_shape))
    bpd = model.bits_per_dim(x)
    assert bpd.device.type == "cuda" and torch.isfinite(bpd).all()
    model.loss(x).backward()
    assert model.importance_bpd(x, k=2).shape == (4,)
    samples = model.sample(3, temperature=0.7)
    assert samples.device.type == "cuda" and samples.shape == (3, *model.data_shape)
    assert torch.equal(samples, samples.round()) and samples.min() >= 0 and samples.max() <= 255


def test_realnvp_2d_on_cuda():
    model = realnvp_2d(num_layers=2, hidden=16).to(CUDA)
    x = torch.randn(8, 2, device=CUDA)
    assert model.log_prob(x).device.type == "cuda"
    assert model.sample(5).device.type == "cuda"
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(torch.randn(8, 3, device=CUDA))
