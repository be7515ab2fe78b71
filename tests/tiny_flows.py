"""Tiny flows for the tests of nfcourse.train, nfcourse.viz and the CLI: small enough to train
in a second on a CPU, and independent of the reference layers in nfcourse.flows."""

from __future__ import annotations

import math

import torch
from torch import nn

from nfcourse.flows.base import Compose, Flow


class Coupling(Flow):
    """Affine coupling on 2-D points: one coordinate scales and shifts the other."""

    def __init__(self, flip: bool, hidden: int = 16):
        super().__init__()
        self.flip = flip
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def _split(self, x):
        a, b = x[:, :1], x[:, 1:]
        return (b, a) if self.flip else (a, b)

    def _join(self, a, b):
        return torch.cat([b, a] if self.flip else [a, b], dim=1)

    def forward(self, x, context=None):
        a, b = self._split(x)
        s, t = self.net(a).chunk(2, dim=1)
        s = torch.tanh(s)
        return self._join(a, b * s.exp() + t), s.sum(1)

    def inverse(self, z, context=None):
        a, b = self._split(z)
        s, t = self.net(a).chunk(2, dim=1)
        s = torch.tanh(s)
        return self._join(a, (b - t) * (-s).exp()), -s.sum(1)


class BlowUp(Flow):
    """Identity that returns inf after ``after`` forward calls: a planted bad layer."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after
        self.calls = 0

    def forward(self, x, context=None):
        self.calls += 1
        if self.calls > self.after:
            x = x * float("inf")
        return x, x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        return z, z.new_zeros(z.shape[0])


class TinyModel(nn.Module):
    """FlowModel-like: ``log_prob``, ``loss``, ``loss_unit``, ``sample``, ``flow``, ``prior``."""

    loss_unit = "nats"

    def __init__(self, flow: nn.Module, dim: int = 2):
        super().__init__()
        self.flow = flow
        self.dim = dim

    def log_prob(self, x, context=None):
        z, log_det = self.flow(x)
        return -0.5 * (z**2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi) + log_det

    def loss(self, x):
        return -self.log_prob(x).mean()

    @torch.no_grad()
    def sample(self, n, temperature=1.0):
        z = torch.randn(n, self.dim) * temperature
        return self.flow.inverse(z)[0]


def tiny_realnvp(layers: int = 4, hidden: int = 16, seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(Compose([Coupling(flip=i % 2 == 1, hidden=hidden) for i in range(layers)]))


def moons(n: int = 512, seed: int = 0) -> torch.Tensor:
    """Standardised two moons (noise 0.05)."""
    from nfcourse.data import two_moons

    return two_moons(n, seed=seed)[0]
