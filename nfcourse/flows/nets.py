"""The networks inside coupling layers: an MLP for vectors, a gated residual CNN for images.

Both can start with a zero last layer, so that a freshly built coupling outputs ``s = t = 0``
and is the identity map: a deep flow then starts as the identity and trains stably.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "ConcatELU", "ChannelLayerNorm", "GatedResidualBlock", "GatedConvNet"]


class MLP(nn.Module):
    """A fully connected network ``in_features -> hidden x num_hidden -> out_features``.

    Args:
        in_features, out_features: input and output sizes.
        hidden: width of each hidden layer.
        num_hidden: number of hidden layers (``>= 1``).
        activation: a module class used between layers (default ``nn.ReLU``).
        zero_init: zero the last layer's weight and bias so the output starts at 0.

    Example:
        >>> net = MLP(2, 4, hidden=64, num_hidden=2, zero_init=True)
        >>> net(torch.randn(5, 2)).abs().max().item()
        0.0
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 256,
        num_hidden: int = 2,
        activation: type[nn.Module] = nn.ReLU,
        zero_init: bool = False,
    ):
        super().__init__()
        if num_hidden < 1:
            raise ValueError(f"MLP needs at least one hidden layer, got num_hidden={num_hidden}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_hidden):
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        last = nn.Linear(width, out_features)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = out_features

    @property
    def last(self) -> nn.Linear:
        return self.net[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConcatELU(nn.Module):
    """``[elu(x), elu(-x)]`` along channels: keeps the information of both signs (doubles C)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.elu(x), F.elu(-x)], dim=1)


class ChannelLayerNorm(nn.Module):
    """Layer normalisation over the channels of each pixel of a ``(B, C, H, W)`` tensor."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class GatedResidualBlock(nn.Module):
    """``x + a * sigmoid(g)`` with ``[a, g]`` from a 3x3 then 1x1 convolution of concat-ELUs."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            ConcatELU(),
            nn.Conv2d(2 * channels, hidden, kernel_size=3, padding=1),
            ConcatELU(),
            nn.Conv2d(2 * hidden, 2 * channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.body(x).chunk(2, dim=1)
        return x + value * torch.sigmoid(gate)


class GatedConvNet(nn.Module):
    """A gated residual CNN mapping ``(B, c_in, H, W)`` to ``(B, c_out, H, W)``.

    A 3x3 convolution lifts the input to ``c_hidden`` channels, ``num_layers`` gated residual
    blocks (each followed by a layer norm over channels) process it, and a final concat-ELU +
    3x3 convolution produces the output. That last convolution starts at zero
    (``zero_init=True``) so the coupling that owns the network starts as the identity.

    Example:
        >>> net = GatedConvNet(1, 16, 2, num_layers=2)
        >>> net(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 2, 8, 8])
    """

    def __init__(
        self, c_in: int, c_hidden: int = 32, c_out: int = -1, num_layers: int = 3,
        zero_init: bool = True,
    ):
        super().__init__()
        c_out = 2 * c_in if c_out < 0 else c_out
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_hidden, kernel_size=3, padding=1)]
        for _ in range(num_layers):
            layers += [GatedResidualBlock(c_hidden, c_hidden), ChannelLayerNorm(c_hidden)]
        layers += [ConcatELU(), nn.Conv2d(2 * c_hidden, c_out, kernel_size=3, padding=1)]
        if zero_init:
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
        self.net = nn.Sequential(*layers)
        self.c_in, self.c_hidden, self.c_out = c_in, c_hidden, c_out

    @property
    def last(self) -> nn.Conv2d:
        return self.net[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
