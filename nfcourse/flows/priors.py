"""Base distributions for flow models."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["StandardNormal"]

_LOG_2PI = math.log(2 * math.pi)


def _as_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"StandardNormal needs a non-empty shape of positive sizes, got {shape}")
    return shape


class StandardNormal(nn.Module):
    """The standard normal ``N(0, I)`` over tensors of shape ``shape`` (batch excluded).

    ``log_prob(z)`` sums the log-density over every non-batch dimension and returns ``(B,)``.
    ``sample(n, temperature)`` draws ``temperature * N(0, I)``: a temperature below 1 narrows
    the distribution (Glow's "reduced temperature" sampling). Samples follow the module's
    device and dtype (``.to(...)``/``.double()``) unless ``device``/``dtype`` are given.

    Example:
        >>> prior = StandardNormal((1, 28, 28))
        >>> z = prior.sample(4, temperature=0.7)
        >>> prior.log_prob(z).shape
        torch.Size([4])
    """

    def __init__(self, shape: int | Sequence[int]):
        super().__init__()
        self.shape = _as_shape(shape)
        # An empty buffer only to follow the module's device and dtype.
        self.register_buffer("_ref", torch.zeros(()), persistent=False)

    @property
    def event_dim(self) -> int:
        """Number of dimensions of one sample, ``prod(shape)``."""
        return math.prod(self.shape)

    def log_prob(self, z: Tensor) -> Tensor:
        if not isinstance(z, Tensor):
            raise TypeError(f"StandardNormal.log_prob expects a tensor, got {type(z).__name__}")
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(
                f"StandardNormal{self.shape}.log_prob: expected shape (B, "
                f"{', '.join(map(str, self.shape))}), got {tuple(z.shape)}"
            )
        return -0.5 * (z.pow(2) + _LOG_2PI).flatten(1).sum(1)

    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        device = self._ref.device if device is None else device
        dtype = self._ref.dtype if dtype is None else dtype
        return torch.randn(int(n), *self.shape, device=device, dtype=dtype) * temperature

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
