"""Lesson 04: correct answers in styles other than the solution's (see ``__init__``).

Squeezes by ``pixel_unshuffle``, ``F.unfold`` and strided slices; splits by ``torch.split``,
indexing and ``torch.distributions``; builders from a table of scales, from a factory of
couplings and from list comprehensions.
"""

from __future__ import annotations

from alternatives import Alternative

LESSON = "04_multiscale"
# self-checks, the picture of a squeeze, the comparison table (two more trainings) and the
# samples: no test needs them (the training of ``model`` stays: train_test grades it)
SKIP = ("# Self-check", "def show_squeeze", "if FAST:\n    simple_config", "torch.manual_seed(3)")

# ------------------------------------------------------------------------------ squeezes
SQUEEZE_PIXEL_UNSHUFFLE = '''\
import torch.nn.functional as F


class Squeeze(Flow):
    """PyTorch's pixel_unshuffle puts x[c, 2h + i, 2w + j] at channel 4c + 2i + j: the
    lesson's order exactly, so the squeeze is one library call each way."""

    def forward(self, x, context=None):
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        return F.pixel_shuffle(z, 2), z.new_zeros(z.shape[0])
'''

SQUEEZE_UNFOLD = '''\
import torch.nn.functional as F


class Squeeze(Flow):
    """Non-overlapping 2x2 patches with F.unfold (channel-major, then row, then column inside
    the patch: 4c + 2i + j), folded back with F.fold."""

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        patches = F.unfold(x, kernel_size=2, stride=2)          # (B, 4C, H/2 * W/2)
        return patches.view(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, z, context=None):
        b, c4, h, w = z.shape
        x = F.fold(z.reshape(b, c4, h * w), output_size=(2 * h, 2 * w), kernel_size=2,
                   stride=2)
        return x, z.new_zeros(b)
'''

SQUEEZE_SLICES = '''\
class Squeeze(Flow):
    """The four corners of every block as strided slices, interleaved per channel with
    torch.stack; the inverse writes them back into an empty image."""

    CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))

    def forward(self, x, context=None):
        parts = [x[:, :, i::2, j::2] for i, j in self.CORNERS]   # each (B, C, H/2, W/2)
        z = torch.stack(parts, dim=2)                            # (B, C, 4, H/2, W/2)
        return z.flatten(1, 2), x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        b, c4, h, w = z.shape
        parts = z.view(b, c4 // 4, 4, h, w)
        x = z.new_empty(b, c4 // 4, 2 * h, 2 * w)
        for k, (i, j) in enumerate(self.CORNERS):
            x[:, :, i::2, j::2] = parts[:, :, k]
        return x, z.new_zeros(b)
'''

SQUEEZE_MOVEDIM = '''\
class Squeeze(Flow):
    """unflatten + movedim instead of view + permute."""

    def forward(self, x, context=None):
        z = x.unflatten(2, (-1, 2)).unflatten(4, (-1, 2))       # (B, C, H/2, 2, W/2, 2)
        z = z.movedim(3, 2).movedim(5, 3)                        # (B, C, 2, 2, H/2, W/2)
        return z.flatten(1, 3), x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        x = z.unflatten(1, (-1, 2, 2))                           # (B, C, 2, 2, H, W)
        x = x.movedim(2, 4).movedim(2, 5)                        # (B, C, H, 2, W, 2)
        return x.flatten(2, 3).flatten(3, 4), z.new_zeros(z.shape[0])
'''

# -------------------------------------------------------------------------------- splits
SPLIT_TORCH_SPLIT = '''\
def log_normal(z):
    """Through torch.distributions: the standard normal's log-density, summed per sample."""
    normal = torch.distributions.Normal(torch.zeros((), dtype=z.dtype),
                                        torch.ones((), dtype=z.dtype))
    return normal.log_prob(z).reshape(z.shape[0], -1).sum(dim=1)


class Split(Flow):
    def __init__(self, temperature=1.0):
        super().__init__()
        self.temperature = temperature
        self.z2 = None

    def forward(self, x, context=None):
        kept, dropped = torch.split(x, x.shape[1] // 2, dim=1)
        return kept, log_normal(dropped)

    def inverse(self, z, context=None, z2=None):
        for candidate in (z2, self.z2):
            if candidate is not None:
                half = candidate
                break
        else:
            half = torch.normal(torch.zeros_like(z), std=1.0) * self.temperature
        return torch.cat((z, half), dim=1), -log_normal(half)
'''

SPLIT_INDEXING = '''\
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def log_normal(z):
    flat = z.flatten(1)
    return -(flat * flat).sum(1) / 2 - flat.shape[1] * LOG_SQRT_2PI


class Split(Flow):
    """Indexing for the halves, an explicit precedence for the second one, and the
    temperature applied to fresh standard-normal numbers."""

    def __init__(self, temperature=1.0):
        super().__init__()
        self.temperature = temperature
        self.z2 = None

    def forward(self, x, context=None):
        half = x.shape[1] // 2
        return x[:, :half], log_normal(x[:, half:])

    def _second_half(self, z, z2):
        if z2 is not None:
            return z2
        if self.z2 is not None:
            return self.z2
        return torch.randn(z.shape, dtype=z.dtype, device=z.device) * self.temperature

    def inverse(self, z, context=None, z2=None):
        z2 = self._second_half(z, z2)
        return torch.cat([z, z2], 1), -log_normal(z2)
'''

SPLIT_NARROW = '''\
def log_normal(z):
    return torch.sum(-0.5 * z**2 - 0.5 * math.log(2 * math.pi), dim=tuple(range(1, z.dim())))


class Split(Flow):
    """Tensor.narrow for the halves; the sampled half drawn with randn_like."""

    def __init__(self, temperature=1.0):
        super().__init__()
        self.temperature = temperature
        self.z2 = None

    def forward(self, x, context=None):
        c = x.size(1) // 2
        return x.narrow(1, 0, c), log_normal(x.narrow(1, c, x.size(1) - c))

    def inverse(self, z, context=None, z2=None):
        z2 = z2 if z2 is not None else self.z2
        if z2 is None:
            z2 = self.temperature * torch.randn_like(z)
        return torch.cat([z, z2], dim=1), -log_normal(z2)
'''

# ------------------------------------------------------------------------------ builders
BUILD_TABLE = '''\
#: one row per scale: (channels as a multiple of C, spatial divisor, mask kind), filled
#: when the cell runs; the builder only reads it
SCALES = (
    (1, 1, "checkerboard"),
    (4, 2, "channel"),
    (8, 4, "channel"),
)


def _mask(kind, channels, h, w, invert):
    if kind == "checkerboard":
        return checkerboard_mask(h, w, invert=invert)
    return channel_mask(channels, invert=invert)


def build_multiscale_flow(shape=(1, 28, 28), c_hidden=(32, 48, 64), num_couplings=(2, 2, 4),
                          num_layers=2, vardeq=False):
    c, h, w = shape
    first = (VariationalDequantization(channels=c, c_hidden=16, num_layers=1) if vardeq
             else Dequantization())
    layers = [first]
    for scale, (mult, div, kind) in enumerate(SCALES):
        if scale == 1:
            layers.append(Squeeze())
        if scale == 2:
            layers += [Split(), Squeeze()]
        channels = mult * c
        for k in range(num_couplings[scale]):
            layers.append(AffineCoupling(
                channels, _mask(kind, channels, h // div, w // div, invert=k % 2 == 1),
                c_hidden=c_hidden[scale], num_layers=num_layers))
    return FlowModel(Compose(layers), StandardNormal((8 * c, h // 4, w // 4)),
                     data_shape=shape)
'''

BUILD_FACTORY = '''\
def _coupling_factory(channels, hidden, num_layers, mask_of):
    """A function k -> the k-th coupling of one scale (masks alternate with k)."""
    def make(k):
        return AffineCoupling(channels, mask_of(k % 2 == 1), c_hidden=hidden,
                              num_layers=num_layers)
    return make


def build_multiscale_flow(shape=(1, 28, 28), c_hidden=(32, 48, 64), num_couplings=(2, 2, 4),
                          num_layers=2, vardeq=False):
    c, h, w = shape
    full = _coupling_factory(c, c_hidden[0], num_layers,
                             lambda inv: checkerboard_mask(h, w, invert=inv))
    half = _coupling_factory(4 * c, c_hidden[1], num_layers,
                             lambda inv: channel_mask(4 * c, invert=inv))
    quarter = _coupling_factory(8 * c, c_hidden[2], num_layers,
                                lambda inv: channel_mask(8 * c, invert=inv))
    deq = VariationalDequantization(channels=c, c_hidden=16, num_layers=1) if vardeq \\
        else Dequantization()
    layers = ([deq] + [full(k) for k in range(num_couplings[0])] + [Squeeze()]
              + [half(k) for k in range(num_couplings[1])] + [Split(), Squeeze()]
              + [quarter(k) for k in range(num_couplings[2])])
    return FlowModel(flow=Compose(layers), prior=StandardNormal((8 * c, h // 4, w // 4)),
                     data_shape=tuple(shape))
'''

BUILD_SHAPES = '''\
from torch import nn


def build_multiscale_flow(shape=(1, 28, 28), c_hidden=(32, 48, 64), num_couplings=(2, 2, 4),
                          num_layers=2, vardeq=False):
    """Tracks the current (C, H, W) as the layers are added, the way one would for any
    number of scales."""
    c, h, w = shape
    layers = nn.ModuleList()
    layers.append(VariationalDequantization(channels=c, c_hidden=16, num_layers=1)
                  if vardeq else Dequantization())
    cur = [c, h, w]
    for scale, (n, hidden) in enumerate(zip(num_couplings, c_hidden)):
        if scale > 0:
            if scale == 2:
                layers.append(Split())
                cur[0] //= 2
            layers.append(Squeeze())
            cur = [cur[0] * 4, cur[1] // 2, cur[2] // 2]
        for k in range(n):
            inv = bool(k & 1)
            mask = (checkerboard_mask(cur[1], cur[2], invert=inv) if scale == 0
                    else channel_mask(cur[0], invert=inv))
            layers.append(AffineCoupling(cur[0], mask, c_hidden=hidden, num_layers=num_layers))
    return FlowModel(Compose(list(layers)), StandardNormal(tuple(cur)), data_shape=shape)
'''

ALTERNATIVES = [
    Alternative("pixel_unshuffle_table", "pixel_unshuffle squeeze, torch.split + "
                "torch.distributions split, a table of scales",
                {"squeeze_answer": SQUEEZE_PIXEL_UNSHUFFLE, "split_answer": SPLIT_TORCH_SPLIT,
                 "multiscale_answer": BUILD_TABLE}),
    Alternative("unfold_factory", "F.unfold / F.fold squeeze, indexing split, a coupling "
                "factory", {"squeeze_answer": SQUEEZE_UNFOLD, "split_answer": SPLIT_INDEXING,
                            "multiscale_answer": BUILD_FACTORY}),
    Alternative("slices_shapes", "strided slices + stack squeeze, narrow split, shapes tracked "
                "in an nn.ModuleList", {"squeeze_answer": SQUEEZE_SLICES,
                                        "split_answer": SPLIT_NARROW,
                                        "multiscale_answer": BUILD_SHAPES}),
    Alternative("movedim", "unflatten + movedim squeeze, the solution's split and builder",
                {"squeeze_answer": SQUEEZE_MOVEDIM}),
    Alternative("distributions_split", "the solution's squeeze, a torch.split split, a "
                "factory builder", {"split_answer": SPLIT_TORCH_SPLIT,
                                    "multiscale_answer": BUILD_FACTORY}),
    Alternative("unshuffle_shapes", "pixel_unshuffle squeeze, narrow split, shapes tracked",
                {"squeeze_answer": SQUEEZE_PIXEL_UNSHUFFLE, "split_answer": SPLIT_NARROW,
                 "multiscale_answer": BUILD_SHAPES}),
]

#: graded for real by test_alternatives_autograded: the two that between them replace every
#: answer cell (a class of all six takes too long for CI on 2 cores; all six are graded in
#: process)
AUTOGRADED = ('pixel_unshuffle_table', 'slices_shapes')
