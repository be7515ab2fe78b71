"""Glow (Kingma & Dhariwal 2018): ActNorm, invertible 1x1 convolutions, the Glow step.

All channel-mixing layers here accept images ``(B, C, H, W)`` and also vectors ``(B, C)``
(then ``H * W = 1``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nfcourse.flows.base import Compose, Flow
from nfcourse.flows.coupling import AffineCoupling

__all__ = [
    "ActNorm",
    "InvConv1x1",
    "InvConv1x1LU",
    "ReversePermutation",
    "RandomPermutation",
    "GlowStep",
]


def _check_channels(layer: Flow, x: Tensor, c: int) -> int:
    """Validate ``(B, C)`` or ``(B, C, H, W)`` input and return ``H * W`` (1 for vectors)."""
    name = type(layer).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating point tensor, got dtype {x.dtype}")
    if x.dim() not in (2, 4) or x.shape[1] != c:
        raise ValueError(
            f"{name} expects (B, {c}, H, W) or (B, {c}), got shape {tuple(x.shape)}"
        )
    return x.shape[2] * x.shape[3] if x.dim() == 4 else 1


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1) if x.dim() == 4 else v.view(1, -1)


def _mix(weight: Tensor, x: Tensor) -> Tensor:
    """Apply a ``(C, C)`` matrix to the channels of every pixel."""
    if x.dim() == 2:
        return x @ weight.T
    return torch.einsum("ij,bjhw->bihw", weight, x)


def _random_orthogonal(c: int) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.get_default_dtype())


class ActNorm(Flow):
    """Per-channel affine map ``z = (x + loc) * exp(log_scale)`` with data-dependent init.

    The first ``forward`` call (in any mode) sets ``loc`` and ``log_scale`` so that that batch
    has zero mean and unit variance per channel, then flips the ``initialized`` buffer; the
    buffer is part of ``state_dict``, so a loaded model is not initialised again. ``inverse``
    never initialises. ``log_det = H * W * sum(log_scale)``.

    Example:
        >>> norm = ActNorm(3)
        >>> z, _ = norm(torch.randn(16, 3, 4, 4) * 5 + 2)
        >>> bool(norm.initialized)
        True
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_channels = int(num_channels)
        self.eps = eps
        self.loc = nn.Parameter(torch.zeros(num_channels))
        self.log_scale = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the parameters from a batch: zero mean, unit variance per channel."""
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False) if x[:, 0].numel() > 1 else torch.ones_like(mean)
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hw = _check_channels(self, x, self.num_channels)
        if not bool(self.initialized):
            self.initialize(x)
        z = (x + _per_channel(self.loc, x)) * _per_channel(self.log_scale, x).exp()
        return z, (hw * self.log_scale.sum()).expand(x.shape[0]).to(x.dtype)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hw = _check_channels(self, z, self.num_channels)
        x = z * torch.exp(-_per_channel(self.log_scale, z)) - _per_channel(self.loc, z)
        return x, (-hw * self.log_scale.sum()).expand(z.shape[0]).to(z.dtype)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"


class InvConv1x1(Flow):
    """Invertible 1x1 convolution with a plain ``(C, C)`` weight (random orthogonal init).

    ``z[:, :, h, w] = W x[:, :, h, w]``; ``log_det = H * W * log|det W|`` (an O(C^3)
    ``slogdet`` per call); the inverse uses ``W^{-1}``.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = int(num_channels)
        self.weight = nn.Parameter(_random_orthogonal(num_channels))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hw = _check_channels(self, x, self.num_channels)
        log_det = hw * torch.linalg.slogdet(self.weight)[1]
        return _mix(self.weight, x), log_det.expand(x.shape[0]).to(x.dtype)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hw = _check_channels(self, z, self.num_channels)
        log_det = -hw * torch.linalg.slogdet(self.weight)[1]
        return _mix(torch.linalg.inv(self.weight), z), log_det.expand(z.shape[0]).to(z.dtype)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"


class InvConv1x1LU(Flow):
    """Invertible 1x1 convolution in LU form: ``W = P L (U + diag(sign(s) exp(log|s|)))``.

    ``P`` is a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper
    triangular (both learned), ``sign(s)`` fixed and ``log|s|`` learned, so
    ``log_det = H * W * sum(log|s|)`` costs O(C). Initialised from the LU decomposition of a
    random orthogonal matrix.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        c = self.num_channels = int(num_channels)
        w0 = _random_orthogonal(c).double()
        p, lower, upper = torch.linalg.lu(w0)
        s = torch.diagonal(upper)
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", p.to(dtype))
        self.register_buffer("sign_s", torch.sign(s).to(dtype))
        self.register_buffer("lower_mask", torch.tril(torch.ones(c, c, dtype=dtype), -1))
        self.register_buffer("eye", torch.eye(c, dtype=dtype))
        self.lower = nn.Parameter(lower.to(dtype))
        self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
        self.log_s = nn.Parameter(torch.log(s.abs()).to(dtype))

    @property
    def weight(self) -> Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ lower @ upper

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hw = _check_channels(self, x, self.num_channels)
        log_det = hw * self.log_s.sum()
        return _mix(self.weight, x), log_det.expand(x.shape[0]).to(x.dtype)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hw = _check_channels(self, z, self.num_channels)
        log_det = -hw * self.log_s.sum()
        return _mix(torch.linalg.inv(self.weight), z), log_det.expand(z.shape[0]).to(z.dtype)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"


class _Permutation(Flow):
    def __init__(self, perm: Tensor):
        super().__init__()
        self.num_channels = perm.numel()
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_channels(self, x, self.num_channels)
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_channels(self, z, self.num_channels)
        return z[:, self.inv_perm], z.new_zeros(z.shape[0])

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"


class ReversePermutation(_Permutation):
    """Reverse the channel order (RealNVP's fixed mixing). Log-det 0."""

    def __init__(self, num_channels: int):
        super().__init__(torch.arange(int(num_channels) - 1, -1, -1))


class RandomPermutation(_Permutation):
    """A fixed random channel shuffle, drawn once (``seed`` for reproducibility). Log-det 0."""

    def __init__(self, num_channels: int, seed: int | None = None):
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(int(seed))
        super().__init__(torch.randperm(int(num_channels), generator=gen))


_MIXING = {
    "lu": InvConv1x1LU,
    "plain": InvConv1x1,
    "reverse": ReversePermutation,
    "random": RandomPermutation,
}


class GlowStep(Compose):
    """One Glow step: ActNorm -> channel mixing -> affine coupling with a channel mask.

    Args:
        num_channels: ``C`` (at least 2).
        hidden, num_layers: size of the coupling's :class:`GatedConvNet`.
        mixing: ``"lu"`` (default, :class:`InvConv1x1LU`), ``"plain"`` (:class:`InvConv1x1`),
            ``"reverse"`` or ``"random"`` (fixed permutations, for the ablation).
        context_channels: conditioning image channels for the coupling.
    """

    def __init__(
        self,
        num_channels: int,
        hidden: int = 64,
        num_layers: int = 2,
        mixing: str = "lu",
        context_channels: int = 0,
        lu: bool | None = None,
    ):
        if lu is not None:
            mixing = "lu" if lu else "plain"
        if mixing not in _MIXING:
            raise ValueError(f"GlowStep: unknown mixing {mixing!r}; use one of {list(_MIXING)}")
        if num_channels < 2:
            raise ValueError(f"GlowStep needs at least 2 channels, got {num_channels}")
        super().__init__(
            [
                ActNorm(num_channels),
                _MIXING[mixing](num_channels),
                AffineCoupling(
                    num_channels, "channel", c_hidden=hidden, num_layers=num_layers,
                    context_channels=context_channels,
                ),
            ]
        )
        self.mixing = mixing
