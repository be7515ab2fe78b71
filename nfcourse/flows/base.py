"""The one contract every flow layer follows, and the composition of layers.

A flow maps data ``x`` to noise ``z``. Every layer is an :class:`torch.nn.Module` with

* ``forward(x, context=None) -> (z, log_det)`` where ``log_det = log|det dz/dx|``, and
* ``inverse(z, context=None) -> (x, log_det)`` where ``log_det = log|det dx/dz|``,

``log_det`` having shape ``(batch,)``. For an exact inverse the two log-dets are negatives
of each other, so ``Compose`` can add them in either direction.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["Flow", "Compose", "Inverse"]


class Flow(nn.Module):
    """Base class of every flow layer: data -> noise in ``forward``, noise -> data in ``inverse``.

    Subclasses implement both directions and return ``(output, log_det)`` with ``log_det`` of
    shape ``(batch,)``.

    Example:
        >>> class Shift(Flow):
        ...     def forward(self, x, context=None):
        ...         return x + 1, x.new_zeros(x.shape[0])
        ...     def inverse(self, z, context=None):
        ...         return z - 1, z.new_zeros(z.shape[0])
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not implement inverse")


class Compose(Flow):
    """A sequence of flows: ``z = f_K(...f_1(x))``, ``log_det = sum_k log|det J_k|``.

    The inverse runs the layers in reverse order.

    Example:
        >>> flow = Compose([layer_a, layer_b])          # doctest: +SKIP
        >>> z, log_det = flow(x)                        # doctest: +SKIP
    """

    def __init__(self, layers: Iterable[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> nn.Module:
        return self.layers[index]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, log_det = layer(x, context)
            total = total + log_det
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[0])
        for layer in reversed(self.layers):
            z, log_det = layer.inverse(z, context)
            total = total + log_det
        return z, total

    def trajectory(self, x: Tensor, context: Tensor | None = None) -> list[Tensor]:
        """The input followed by every layer's output, for pictures: ``[x, f_1(x), ...]``."""
        outputs = [x]
        for layer in self.layers:
            x, _ = layer(x, context)
            outputs.append(x)
        return outputs

    def inverse_trajectory(self, z: Tensor, context: Tensor | None = None) -> list[Tensor]:
        """``[z, f_K^{-1}(z), ...]`` down to the data, for layer-by-layer sampling pictures."""
        outputs = [z]
        for layer in reversed(self.layers):
            z, _ = layer.inverse(z, context)
            outputs.append(z)
        return outputs


class Inverse(Flow):
    """Swap a flow's directions: ``Inverse(f).forward = f.inverse``."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow(z, context)


def batch_zeros(x: Tensor) -> Tensor:
    """A ``(batch,)`` zero log-det on ``x``'s device and dtype."""
    return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
