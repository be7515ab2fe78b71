"""Ready-made models, each a :class:`FlowModel` built with no required arguments.

* :func:`realnvp_2d`: RealNVP for 2-D data (lesson 01);
* :func:`simple_image_flow`: dequantization + checkerboard couplings at one scale (lesson 03);
* :func:`multiscale_flow`: three scales with squeeze and split (lesson 04);
* :func:`glow`: multi-scale Glow (lesson 05).

Image builders take ``shape=(C, H, W)`` (default MNIST's ``(1, 28, 28)``); small shapes such
as ``(1, 8, 8)`` and small ``hidden`` sizes make fast tests.
"""

from __future__ import annotations

from collections.abc import Sequence

from nfcourse.flows.base import Compose
from nfcourse.flows.coupling import AffineCoupling, MaskedAffineCoupling
from nfcourse.flows.dequantization import Dequantization, VariationalDequantization
from nfcourse.flows.glow import GlowStep
from nfcourse.flows.masks import alternating_mask
from nfcourse.flows.model import FlowModel
from nfcourse.flows.multiscale import Split, Squeeze
from nfcourse.flows.priors import StandardNormal

__all__ = ["realnvp_2d", "simple_image_flow", "multiscale_flow", "glow"]


def _shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ValueError(f"image shape must be (C, H, W) with positive sizes, got {shape}")
    return shape  # type: ignore[return-value]


def _dequantizer(vardeq: bool, channels: int, levels: int, alpha: float, vardeq_hidden: int,
                 vardeq_layers: int, vardeq_couplings: int) -> Dequantization:
    if vardeq:
        return VariationalDequantization(
            levels, channels=channels, c_hidden=vardeq_hidden, num_layers=vardeq_layers,
            num_couplings=vardeq_couplings, alpha=alpha,
        )
    return Dequantization(levels, alpha)


def realnvp_2d(
    num_layers: int = 6,
    hidden: int = 256,
    num_hidden: int = 3,
    dim: int = 2,
    context_dim: int = 0,
    bound: float = 2.0,
) -> FlowModel:
    """RealNVP on ``dim``-D vectors: ``num_layers`` masked affine couplings, alternating masks.

    Each coupling has an MLP with ``num_hidden`` hidden layers of ``hidden`` units (last layer
    zero, so the model starts as ``N(0, I)``). ``context_dim > 0`` makes it conditional.

    Example:
        >>> model = realnvp_2d(num_layers=4, hidden=32)
        >>> model.log_prob(torch.randn(10, 2)).shape        # doctest: +SKIP
        torch.Size([10])
    """
    layers = [
        MaskedAffineCoupling(
            alternating_mask(dim, invert=bool(i % 2)), hidden=hidden, num_hidden=num_hidden,
            context_dim=context_dim, bound=bound,
        )
        for i in range(num_layers)
    ]
    return FlowModel(Compose(layers), StandardNormal(dim), data_shape=(dim,))


def simple_image_flow(
    shape: Sequence[int] = (1, 28, 28),
    num_couplings: int = 8,
    hidden: int = 32,
    num_layers: int = 3,
    vardeq: bool = False,
    levels: int = 256,
    alpha: float = 1e-5,
    vardeq_hidden: int = 16,
    vardeq_layers: int = 2,
    vardeq_couplings: int = 4,
) -> FlowModel:
    """Single-scale image flow: (variational) dequantization + ``num_couplings`` couplings.

    Couplings alternate the checkerboard mask and its inverse, so any ``(C, H, W)`` works.
    ``vardeq=True`` uses :class:`VariationalDequantization` (sizes ``vardeq_*``).
    """
    c, h, w = _shape(shape)
    layers = [_dequantizer(vardeq, c, levels, alpha, vardeq_hidden, vardeq_layers,
                           vardeq_couplings)]
    layers += [
        AffineCoupling(c, "checkerboard_inv" if i % 2 else "checkerboard", c_hidden=hidden,
                       num_layers=num_layers)
        for i in range(num_couplings)
    ]
    return FlowModel(Compose(layers), StandardNormal((c, h, w)), data_shape=(c, h, w))


def multiscale_flow(
    shape: Sequence[int] = (1, 28, 28),
    hidden: Sequence[int] = (32, 48, 64),
    num_couplings: Sequence[int] = (2, 2, 4),
    num_layers: int = 3,
    vardeq: bool = True,
    levels: int = 256,
    alpha: float = 1e-5,
    vardeq_hidden: int = 16,
    vardeq_layers: int = 2,
    vardeq_couplings: int = 4,
) -> FlowModel:
    """Three-scale flow, e.g. 1x28x28 -> 4x14x14 -> (split) 8x7x7.

    Scale 1: ``num_couplings[0]`` checkerboard couplings at full resolution; squeeze;
    scale 2: ``num_couplings[1]`` channel couplings; split half the channels off; squeeze;
    scale 3: ``num_couplings[2]`` channel couplings. ``hidden[k]`` is scale k's width.
    H and W must be divisible by 4. The prior is over the final ``(8C, H/4, W/4)`` latent.
    """
    c, h, w = _shape(shape)
    if h % 4 or w % 4:
        raise ValueError(f"multiscale_flow needs H and W divisible by 4, got {h}x{w}")
    if len(hidden) != 3 or len(num_couplings) != 3:
        raise ValueError("multiscale_flow: hidden and num_couplings need one entry per scale (3)")
    layers = [_dequantizer(vardeq, c, levels, alpha, vardeq_hidden, vardeq_layers,
                           vardeq_couplings)]
    layers += [
        AffineCoupling(c, "checkerboard_inv" if i % 2 else "checkerboard", c_hidden=hidden[0],
                       num_layers=num_layers)
        for i in range(num_couplings[0])
    ]
    layers.append(Squeeze())
    layers += [
        AffineCoupling(4 * c, "channel_inv" if i % 2 else "channel", c_hidden=hidden[1],
                       num_layers=num_layers)
        for i in range(num_couplings[1])
    ]
    layers += [Split(), Squeeze()]
    layers += [
        AffineCoupling(8 * c, "channel_inv" if i % 2 else "channel", c_hidden=hidden[2],
                       num_layers=num_layers)
        for i in range(num_couplings[2])
    ]
    return FlowModel(Compose(layers), StandardNormal((8 * c, h // 4, w // 4)),
                     data_shape=(c, h, w))


def glow(
    shape: Sequence[int] = (1, 28, 28),
    num_scales: int = 2,
    steps_per_scale: int = 4,
    hidden: int = 64,
    num_layers: int = 2,
    mixing: str = "lu",
    vardeq: bool = False,
    levels: int = 256,
    alpha: float = 1e-5,
    vardeq_hidden: int = 16,
    vardeq_layers: int = 2,
    vardeq_couplings: int = 4,
) -> FlowModel:
    """Multi-scale Glow: dequantization, then per scale squeeze + ``steps_per_scale``
    :class:`GlowStep` s, with a split between scales.

    1x28x28 with 2 scales: squeeze 4x14x14, K steps, split 2x14x14, squeeze 8x7x7, K steps.
    ``mixing`` picks the channel mixing of every step (``"lu"``, ``"plain"``, ``"reverse"``,
    ``"random"``). H and W must be divisible by ``2 ** num_scales``.
    """
    c, h, w = _shape(shape)
    if num_scales < 1:
        raise ValueError(f"glow needs at least one scale, got {num_scales}")
    if h % 2**num_scales or w % 2**num_scales:
        raise ValueError(
            f"glow with {num_scales} scales needs H and W divisible by {2**num_scales}, "
            f"got {h}x{w}"
        )
    layers = [_dequantizer(vardeq, c, levels, alpha, vardeq_hidden, vardeq_layers,
                           vardeq_couplings)]
    for scale in range(num_scales):
        layers.append(Squeeze())
        c, h, w = 4 * c, h // 2, w // 2
        layers += [GlowStep(c, hidden, num_layers, mixing) for _ in range(steps_per_scale)]
        if scale < num_scales - 1:
            layers.append(Split())
            c //= 2
    return FlowModel(Compose(layers), StandardNormal((c, h, w)), data_shape=_shape(shape))
