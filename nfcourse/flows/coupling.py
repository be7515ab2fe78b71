"""Affine coupling layers (Dinh et al. 2017, "Density estimation using Real NVP").

A binary mask ``m`` splits the input in two: the masked part (``m = 1``) passes through
unchanged and feeds a network that outputs a log-scale ``s`` and a shift ``t`` for the rest:

    z = x * m + (1 - m) * (x * exp(s) + t),      s, t = net(x * m [, context])

The Jacobian is triangular, so ``log|det dz/dx| = sum((1 - m) * s)``. The raw log-scale is
bounded smoothly, ``s = bound * tanh(s_raw / bound)``, which is close to ``s_raw`` for small
values and can never exceed ``bound`` (a learnable parameter by default).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nfcourse.flows.base import Flow
from nfcourse.flows.masks import channel_mask, checkerboard_mask
from nfcourse.flows.nets import MLP, GatedConvNet

__all__ = ["MaskedAffineCoupling", "AffineCoupling"]


def _check_input(layer: nn.Module, x: Tensor, ndim: int, what: str) -> None:
    name = type(layer).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating point tensor, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} expects {what}, got shape {tuple(x.shape)}")


class MaskedAffineCoupling(Flow):
    """Affine coupling for vectors ``(B, D)`` with a fixed binary mask of shape ``(D,)``.

    Args:
        mask: ``(D,)`` tensor of 0/1; ones are kept, zeros are transformed.
        net: a module mapping ``(B, D + context_dim)`` to ``(B, 2 D)`` (log-scale, then shift),
            or an ``int`` hidden width, or ``None``: an :class:`MLP` with ``hidden`` units per
            layer whose last layer starts at zero (the coupling starts as the identity).
        hidden, num_hidden: size of the default MLP.
        context_dim: size of an optional context vector concatenated to the network input.
        bound: initial bound of the log-scale, ``s = bound * tanh(s_raw / bound)``.
        learn_bound: learn one bound per dimension (stored as its log) or keep it fixed.

    Example:
        >>> layer = MaskedAffineCoupling(torch.tensor([1.0, 0.0]), hidden=64)
        >>> z, log_det = layer(torch.randn(8, 2))
    """

    def __init__(
        self,
        mask: Tensor,
        net: nn.Module | int | None = None,
        *,
        hidden: int = 256,
        num_hidden: int = 2,
        context_dim: int = 0,
        bound: float = 2.0,
        learn_bound: bool = True,
    ):
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.get_default_dtype()).flatten()
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("MaskedAffineCoupling: the mask must hold only 0 and 1")
        if bound <= 0:
            raise ValueError(f"MaskedAffineCoupling: bound must be positive, got {bound}")
        dim = mask.numel()
        self.dim, self.context_dim = dim, int(context_dim)
        self.register_buffer("mask", mask)
        if isinstance(net, int) and not isinstance(net, bool):
            hidden, net = net, None
        if net is None:
            net = MLP(dim + self.context_dim, 2 * dim, hidden=hidden, num_hidden=num_hidden,
                      zero_init=True)
        self.net = net
        log_bound = torch.full((dim,), math.log(bound))
        if learn_bound:
            self.log_bound = nn.Parameter(log_bound)
        else:
            self.register_buffer("log_bound", log_bound)

    def _scale_shift(self, x_masked: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        h = x_masked
        if self.context_dim:
            if context is None:
                raise ValueError(
                    f"MaskedAffineCoupling was built with context_dim={self.context_dim} "
                    "but got no context"
                )
            if context.dim() != 2 or context.shape != (x_masked.shape[0], self.context_dim):
                raise ValueError(
                    f"MaskedAffineCoupling: context must have shape (B={x_masked.shape[0]}, "
                    f"{self.context_dim}), got {tuple(context.shape)}"
                )
            h = torch.cat([h, context.to(h.dtype)], dim=1)
        out = self.net(h)
        if out.shape != (x_masked.shape[0], 2 * self.dim):
            raise ValueError(
                f"MaskedAffineCoupling: the network must return (B, {2 * self.dim}), "
                f"got {tuple(out.shape)}"
            )
        s_raw, t = out.chunk(2, dim=1)
        bound = self.log_bound.exp()
        s = torch.tanh(s_raw / bound) * bound
        inv = 1 - self.mask
        return s * inv, t * inv

    def _check(self, x: Tensor) -> None:
        _check_input(self, x, 2, f"a batch of vectors (B, {self.dim})")
        if x.shape[1] != self.dim:
            raise ValueError(
                f"MaskedAffineCoupling: expected (B, {self.dim}), got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        s, t = self._scale_shift(x * self.mask, context)
        z = x * self.mask + (1 - self.mask) * (x * torch.exp(s) + t)
        return z, s.sum(dim=1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z)
        s, t = self._scale_shift(z * self.mask, context)
        x = z * self.mask + (1 - self.mask) * ((z - t) * torch.exp(-s))
        return x, -s.sum(dim=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}"


_MASK_NAMES = ("checkerboard", "checkerboard_inv", "channel", "channel_inv")


class AffineCoupling(Flow):
    """Affine coupling for images ``(B, C, H, W)``.

    Args:
        c_in: number of input channels ``C``.
        mask: a ``(1, 1, H, W)`` or ``(1, C, 1, 1)`` float 0/1 tensor (see
            :func:`checkerboard_mask`, :func:`channel_mask`), or one of the names
            ``"checkerboard"``, ``"checkerboard_inv"``, ``"channel"``, ``"channel_inv"``:
            a named mask is built for each input's size, so the layer works at any H x W.
        net: a module mapping ``(B, C + context_channels, H, W)`` to ``(B, 2C, H, W)``
            (log-scale channels first, then shift); default :class:`GatedConvNet` whose last
            convolution starts at zero, so the coupling starts as the identity.
        c_hidden, num_layers: size of the default network.
        context_channels: channels of an optional conditioning image ``context`` of the same
            H x W, concatenated to the network input.

    The log-scale is bounded per channel: ``s = scale * tanh(s_raw / scale)`` with
    ``scale = exp(log_scale)`` a learned ``(1, C, 1, 1)`` parameter starting at 1.

    Example:
        >>> layer = AffineCoupling(1, checkerboard_mask(8, 8), c_hidden=16)
        >>> z, log_det = layer(torch.randn(4, 1, 8, 8))
    """

    def __init__(
        self,
        c_in: int,
        mask: Tensor | str,
        net: nn.Module | None = None,
        *,
        c_hidden: int = 32,
        num_layers: int = 3,
        context_channels: int = 0,
    ):
        super().__init__()
        self.c_in, self.context_channels = int(c_in), int(context_channels)
        if isinstance(mask, str):
            if mask not in _MASK_NAMES:
                raise ValueError(f"AffineCoupling: unknown mask {mask!r}; use one of {_MASK_NAMES}")
            if mask.startswith("channel") and c_in < 2:
                raise ValueError("AffineCoupling: a channel mask needs at least 2 channels")
            self.mask_name: str | None = mask
            self.register_buffer("mask", None)
        else:
            mask = torch.as_tensor(mask, dtype=torch.get_default_dtype())
            if mask.dim() != 4 or mask.shape[0] != 1 or not (
                (mask.shape[1] == 1 and mask.shape[2:] != (1, 1))
                or (mask.shape[1] == c_in and mask.shape[2:] == (1, 1))
            ):
                raise ValueError(
                    "AffineCoupling: mask must have shape (1, 1, H, W) or "
                    f"(1, {c_in}, 1, 1), got {tuple(mask.shape)}"
                )
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("AffineCoupling: the mask must hold only 0 and 1")
            self.mask_name = None
            self.register_buffer("mask", mask)
        if net is None:
            net = GatedConvNet(c_in + self.context_channels, c_hidden, 2 * c_in, num_layers)
        self.net = net
        self.log_scale = nn.Parameter(torch.zeros(1, c_in, 1, 1))

    def get_mask(self, x: Tensor) -> Tensor:
        """The mask to use for ``x`` (built for its size when the mask is named)."""
        if self.mask_name is None:
            return self.mask.to(x.dtype)
        invert = self.mask_name.endswith("_inv")
        if self.mask_name.startswith("checkerboard"):
            return checkerboard_mask(x.shape[2], x.shape[3], invert, device=x.device,
                                     dtype=x.dtype)
        return channel_mask(x.shape[1], invert, device=x.device, dtype=x.dtype)

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        _check_input(self, x, 4, f"images (B, {self.c_in}, H, W)")
        if x.shape[1] != self.c_in:
            raise ValueError(
                f"AffineCoupling: expected {self.c_in} channels, got shape {tuple(x.shape)}"
            )
        if self.mask is not None and self.mask.shape[2:] != (1, 1) and (
            self.mask.shape[2:] != x.shape[2:]
        ):
            raise ValueError(
                f"AffineCoupling: the mask is {tuple(self.mask.shape[2:])} but the input is "
                f"{tuple(x.shape[2:])} (H, W)"
            )
        if self.context_channels:
            if context is None:
                raise ValueError(
                    f"AffineCoupling was built with context_channels={self.context_channels} "
                    "but got no context"
                )
            expected = (x.shape[0], self.context_channels, *x.shape[2:])
            if tuple(context.shape) != expected:
                raise ValueError(
                    f"AffineCoupling: context must have shape {expected}, "
                    f"got {tuple(context.shape)}"
                )

    def _scale_shift(self, x_masked: Tensor, mask: Tensor, context: Tensor | None):
        h = x_masked
        if self.context_channels:
            h = torch.cat([h, context.to(h.dtype)], dim=1)
        out = self.net(h)
        s_raw, t = out.chunk(2, dim=1)
        scale = self.log_scale.exp()
        s = torch.tanh(s_raw / scale) * scale
        inv = 1 - mask
        return s * inv, t * inv

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        mask = self.get_mask(x)
        s, t = self._scale_shift(x * mask, mask, context)
        z = x * mask + (1 - mask) * (x * torch.exp(s) + t)
        return z, s.flatten(1).sum(1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        mask = self.get_mask(z)
        s, t = self._scale_shift(z * mask, mask, context)
        x = z * mask + (1 - mask) * ((z - t) * torch.exp(-s))
        return x, -s.flatten(1).sum(1)

    def extra_repr(self) -> str:
        mask = self.mask_name or f"tensor{tuple(self.mask.shape)}"
        return f"c_in={self.c_in}, mask={mask}, context_channels={self.context_channels}"
