"""Multi-scale building blocks (Dinh et al. 2017): ``Squeeze`` and ``Split``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nfcourse.flows.base import Flow

__all__ = ["Squeeze", "Split"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _check_image(layer: Flow, x: Tensor) -> None:
    name = type(layer).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} expects images (B, C, H, W), got shape {tuple(x.shape)}")


class Squeeze(Flow):
    """Space to depth: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``, each 2x2 block to 4 channels.

    Exact ordering: ``out[b, 4*c + 2*i + j, h, w] = x[b, c, 2*h + i, 2*w + j]`` for
    ``i, j in {0, 1}``: the four pixels of a block, read row by row (top-left, top-right,
    bottom-left, bottom-right), become four consecutive channels, input channel by input
    channel. It only moves numbers, so both log-dets are 0. H and W must be even.

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> Squeeze()(x)[0].flatten()
        tensor([0., 1., 2., 3.])
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(self, x)
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got H={h}, W={w}")
        z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        z = z.reshape(b, 4 * c, h // 2, w // 2)
        return z, x.new_zeros(b)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(self, z)
        b, c4, h, w = z.shape
        if c4 % 4:
            raise ValueError(f"Squeeze.inverse needs a multiple of 4 channels, got {c4}")
        x = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        x = x.reshape(b, c4 // 4, 2 * h, 2 * w)
        return x, z.new_zeros(b)


class Split(Flow):
    """Factor out half of the channels to the standard normal prior.

    ``forward(x)`` keeps the first ``C/2`` channels and returns them; the log-density of the
    other half under ``N(0, I)`` goes into ``log_det`` (the usual "log_det" of the model then
    carries it to ``log_prob``). ``C`` must be even.

    ``inverse(z, context=None, z2=None)`` puts the second half back: ``z2`` if given, else
    ``self.z2`` if set (an attribute, handy for pictures that fix the factored-out latents;
    it must have the right shape), else a fresh sample ``self.temperature * N(0, I)``
    (``temperature`` defaults to 1.0; ``FlowModel.sample`` sets it). The inverse log-det is
    ``-log N(z2; 0, I)``, minus the forward one.

    Example:
        >>> split = Split()
        >>> z1, log_det = split(torch.randn(3, 4, 2, 2))
        >>> z1.shape
        torch.Size([3, 2, 2, 2])
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = float(temperature)
        self.z2: Tensor | None = None

    @staticmethod
    def log_normal(z: Tensor) -> Tensor:
        """``log N(z; 0, I)`` summed over all but the batch dimension."""
        return (-0.5 * z.pow(2) - _HALF_LOG_2PI).flatten(1).sum(1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(self, x)
        if x.shape[1] % 2:
            raise ValueError(f"Split needs an even number of channels, got {x.shape[1]}")
        z1, z2 = x.chunk(2, dim=1)
        return z1, self.log_normal(z2)

    def inverse(
        self, z: Tensor, context: Tensor | None = None, z2: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        _check_image(self, z)
        if z2 is None:
            z2 = self.z2
        if z2 is None:
            z2 = torch.randn_like(z) * self.temperature
        elif z2.shape != z.shape:
            raise ValueError(
                f"Split.inverse: the second half must have shape {tuple(z.shape)}, "
                f"got {tuple(z2.shape)}"
            )
        z2 = z2.to(device=z.device, dtype=z.dtype)
        return torch.cat([z, z2], dim=1), -self.log_normal(z2)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
