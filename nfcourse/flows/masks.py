"""Binary masks for coupling layers: 1 marks the dimensions a coupling leaves unchanged."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["checkerboard_mask", "channel_mask", "alternating_mask"]


def checkerboard_mask(
    h: int,
    w: int,
    invert: bool = False,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """A ``(1, 1, h, w)`` float checkerboard: ``mask[..., i, j] = (i + j + 1) % 2``.

    The top-left pixel is 1 (kept) unless ``invert=True``.

    Example:
        >>> checkerboard_mask(2, 3)[0, 0]
        tensor([[1., 0., 1.],
                [0., 1., 0.]])
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"checkerboard_mask needs positive sizes, got h={h}, w={w}")
    i = torch.arange(h, device=device).view(-1, 1)
    j = torch.arange(w, device=device).view(1, -1)
    mask = ((i + j) % 2 == 0).to(dtype or torch.get_default_dtype())
    if invert:
        mask = 1 - mask
    return mask.view(1, 1, h, w)


def channel_mask(
    c: int,
    invert: bool = False,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """A ``(1, c, 1, 1)`` float mask: the first ``c // 2`` channels are 1, the rest 0.

    ``invert=True`` swaps the two groups.

    Example:
        >>> channel_mask(4).flatten()
        tensor([1., 1., 0., 0.])
    """
    if c < 2:
        raise ValueError(f"channel_mask needs at least 2 channels, got {c}")
    mask = torch.zeros(c, device=device, dtype=dtype or torch.get_default_dtype())
    mask[: c // 2] = 1
    if invert:
        mask = 1 - mask
    return mask.view(1, c, 1, 1)


def alternating_mask(d: int, invert: bool = False) -> Tensor:
    """A ``(d,)`` vector mask ``[1, 0, 1, 0, ...]`` (``[0, 1, ...]`` when inverted).

    Example:
        >>> alternating_mask(2), alternating_mask(2, invert=True)
        (tensor([1., 0.]), tensor([0., 1.]))
    """
    if d < 2:
        raise ValueError(f"alternating_mask needs at least 2 dimensions, got {d}")
    mask = (torch.arange(d) % 2 == 0).to(torch.get_default_dtype())
    return 1 - mask if invert else mask
