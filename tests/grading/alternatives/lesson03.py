"""Lesson 03: correct answers in styles other than the solution's (see ``__init__``)."""

from __future__ import annotations

from alternatives import Alternative

LESSON = "03_coupling_layers"
# self-checks and pictures: not needed to answer the tests
SKIP = ("# Self-check", "def show_masks", "viz.", "torch.manual_seed(2)", "k = 4 if FAST")

# ----------------------------------------------------------------------------- masks
BOARD_BROADCAST = '''\
def checkerboard_mask(h, w, invert=False):
    parity = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2
    kept = parity == (1 if invert else 0)
    return kept.to(torch.float32)[None, None]
'''

BOARD_SLICES = '''\
def checkerboard_mask(h, w, invert=False):
    """Set the two sub-lattices of even i + j by slicing."""
    mask = torch.zeros(h, w)
    mask[0::2, 0::2] = 1.0
    mask[1::2, 1::2] = 1.0
    if invert:
        mask = torch.ones_like(mask) - mask
    return mask.reshape(1, 1, h, w)
'''

BOARD_NUMPY = '''\
import numpy as np


def checkerboard_mask(h, w, invert=False):
    even = np.indices((h, w)).sum(axis=0) % 2 == 0
    mask = np.logical_xor(even, invert).astype(np.float32)
    return torch.from_numpy(mask).unsqueeze(0).unsqueeze(0)
'''

CHANNEL_CAT = '''\
def channel_mask(c, invert=False):
    kept = c // 2
    first, second = torch.ones(kept), torch.zeros(c - kept)
    if invert:
        first, second = 1 - first, 1 - second
    return torch.cat([first, second]).view(1, -1, 1, 1)
'''

CHANNEL_ARANGE = '''\
def channel_mask(c, invert=False):
    kept = torch.arange(c) < c // 2
    return (kept != invert).float().reshape(1, c, 1, 1)
'''

CHANNEL_NUMPY = '''\
def channel_mask(c, invert=False):
    values = np.repeat([1.0, 0.0], [c // 2, c - c // 2])
    if invert:
        values = values[::-1].copy() if c % 2 == 0 else 1.0 - values
    return torch.tensor(values, dtype=torch.float32).view(1, c, 1, 1)
'''

# ------------------------------------------------------------------------- couplings
FROZEN_PARAMETER_MASK = '''\
class ImageAffineCoupling(Flow):
    """The mask is a frozen nn.Parameter; the network's output split by indexing."""

    def __init__(self, c_in, mask, net=None, c_hidden=32, num_layers=2):
        super().__init__()
        self.mask = nn.Parameter(torch.as_tensor(mask).float().clone(), requires_grad=False)
        self.net = GatedConvNet(c_in, c_hidden, 2 * c_in, num_layers) if net is None else net
        self.log_scale = nn.Parameter(torch.zeros(1, c_in, 1, 1))
        self.c_in = c_in

    def _st(self, v):
        out = self.net(v * self.mask)
        raw, t = out[:, : self.c_in], out[:, self.c_in:]
        b = torch.exp(self.log_scale)
        free = 1.0 - self.mask
        return free * b * torch.tanh(raw / b), free * t

    def forward(self, x, context=None):
        s, t = self._st(x)
        return x * s.exp() + t, s.sum(dim=(1, 2, 3))

    def inverse(self, z, context=None):
        s, t = self._st(z)
        return (z - t) * (-s).exp(), -s.sum(dim=(1, 2, 3))
'''

BOOL_BUFFER_WHERE = '''\
class ImageAffineCoupling(Flow):
    """A boolean mask buffer and torch.where; the tanh bound written with the inverse
    scale multiplied in."""

    def __init__(self, c_in, mask, net=None, c_hidden=32, num_layers=2):
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(mask) > 0.5)
        self.net = net if net is not None else GatedConvNet(c_in, c_hidden, 2 * c_in,
                                                            num_layers=num_layers)
        self.log_scale = nn.Parameter(torch.zeros(1, c_in, 1, 1))

    def _st(self, v):
        kept = torch.where(self.mask, v, torch.zeros_like(v))
        raw, t = torch.chunk(self.net(kept), 2, dim=1)
        s = torch.tanh(raw * torch.exp(-self.log_scale)) * torch.exp(self.log_scale)
        zero = torch.zeros_like(s)
        return torch.where(self.mask, zero, s), torch.where(self.mask, zero, t)

    def forward(self, x, context=None):
        s, t = self._st(x)
        return torch.where(self.mask, x, x * torch.exp(s) + t), s.reshape(len(x), -1).sum(-1)

    def inverse(self, z, context=None):
        s, t = self._st(z)
        x = torch.where(self.mask, z, (z - t) * torch.exp(-s))
        return x, -s.reshape(len(z), -1).sum(-1)
'''

BASE_CLASS_HELPER = '''\
class _MaskedImageFlow(Flow):
    """Forward and inverse through one helper; subclasses give log-scale and shift."""

    def scale_shift(self, kept):
        raise NotImplementedError

    def _run(self, v, sign):
        m = self.mask.to(v.dtype)
        s, t = self.scale_shift(v * m)
        s, t = s * (1 - m), t * (1 - m)
        out = v * torch.exp(s) + t if sign > 0 else (v - t) * torch.exp(-s)
        return out, sign * torch.flatten(s, start_dim=1).sum(dim=1)

    def forward(self, x, context=None):
        return self._run(x, +1)

    def inverse(self, z, context=None):
        return self._run(z, -1)


class ImageAffineCoupling(_MaskedImageFlow):
    def __init__(self, c_in, mask, net=None, c_hidden=32, num_layers=2):
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.float32).clone())
        self.net = net or GatedConvNet(c_in, c_hidden, 2 * c_in, num_layers)
        self.log_scale = nn.Parameter(torch.zeros(c_in).view(1, c_in, 1, 1))

    def scale_shift(self, kept):
        h = self.net(kept)
        c = h.shape[1] // 2
        bound = self.log_scale.exp()
        return bound * torch.tanh(h[:, :c] / bound), h[:, c:]
'''

MASK_ON_THE_FLY = '''\
class ImageAffineCoupling(Flow):
    """The mask is a plain attribute (no buffer), brought to the input's dtype and device on
    every call; log-det with einsum."""

    def __init__(self, c_in, mask, net=None, c_hidden=32, num_layers=2):
        super().__init__()
        self.mask = torch.as_tensor(mask).detach().clone().float()
        self.net = net if net is not None else GatedConvNet(
            c_in=c_in, c_hidden=c_hidden, c_out=2 * c_in, num_layers=num_layers)
        self.log_scale = nn.Parameter(torch.zeros(1, c_in, 1, 1))

    def _parts(self, v):
        m = self.mask.to(device=v.device, dtype=v.dtype)
        raw, t = self.net(m * v).chunk(2, 1)
        limit = self.log_scale.exp()
        s = limit * torch.tanh(raw / limit)
        return m, s * (1 - m), t * (1 - m)

    def forward(self, x, context=None):
        m, s, t = self._parts(x)
        return m * x + (1 - m) * (x * s.exp() + t), torch.einsum("bchw->b", s)

    def inverse(self, z, context=None):
        m, s, t = self._parts(z)
        return m * z + (1 - m) * ((z - t) * (-s).exp()), -torch.einsum("bchw->b", s)
'''

# --------------------------------------------------------------------------- builders
BUILDER_CYCLE = '''\
import itertools


def build_simple_flow(shape=(1, 28, 28), num_couplings=8, c_hidden=32, num_layers=2,
                      vardeq=False):
    c, h, w = shape

    def noise_coupling(i):  # the variational noise flow is built from my couplings too
        return ImageAffineCoupling(c, checkerboard_mask(h, w, invert=bool(i % 2)),
                                   c_hidden=16, num_layers=1)

    deq = (VariationalDequantization(channels=c, coupling=noise_coupling) if vardeq
           else Dequantization())
    boards = itertools.cycle([checkerboard_mask(h, w), checkerboard_mask(h, w, invert=True)])
    couplings = [ImageAffineCoupling(c, next(boards), c_hidden=c_hidden, num_layers=num_layers)
                 for _ in range(num_couplings)]
    return FlowModel(Compose([deq, *couplings]), StandardNormal(shape), data_shape=shape)
'''

BUILDER_PARITY = '''\
def build_simple_flow(shape=(1, 28, 28), num_couplings=8, c_hidden=32, num_layers=2,
                      vardeq=False):
    c, h, w = shape
    board = checkerboard_mask(h, w)
    if vardeq:
        couplings = [ImageAffineCoupling(c, board if i % 2 == 0 else 1 - board, c_hidden=16,
                                         num_layers=1) for i in range(4)]
        layers = [VariationalDequantization(channels=c, coupling=couplings.__getitem__)]
    else:
        layers = [Dequantization()]
    for k in range(num_couplings):
        mask = board if k % 2 == 0 else 1 - board
        net = GatedConvNet(c, c_hidden, 2 * c, num_layers)
        layers.append(ImageAffineCoupling(c, mask, net=net))
    return FlowModel(Compose(layers), StandardNormal(tuple(shape)))
'''

ALTERNATIVES = [
    Alternative("frozen_mask", "coupling mask as a frozen nn.Parameter, output split by "
                "indexing, sum(dim=(1, 2, 3)); masks by broadcasting and torch.cat",
                {"checkerboard_mask_answer": BOARD_BROADCAST, "channel_mask_answer": CHANNEL_CAT,
                 "coupling_answer": FROZEN_PARAMETER_MASK}),
    Alternative("bool_buffer_where", "boolean mask buffer with torch.where, tanh bound "
                "written with exp(-log_scale); masks by slicing and arange comparison",
                {"checkerboard_mask_answer": BOARD_SLICES, "channel_mask_answer": CHANNEL_ARANGE,
                 "coupling_answer": BOOL_BUFFER_WHERE}),
    Alternative("numpy_masks_base_class", "masks built in NumPy, a coupling base class with "
                "one helper for both directions",
                {"checkerboard_mask_answer": BOARD_NUMPY, "channel_mask_answer": CHANNEL_NUMPY,
                 "coupling_answer": BASE_CLASS_HELPER}),
    Alternative("mask_on_the_fly", "coupling mask kept as a plain attribute and moved to the "
                "input on every call, einsum log-det; builder with itertools.cycle",
                {"coupling_answer": MASK_ON_THE_FLY, "simple_flow_answer": BUILDER_CYCLE}),
    Alternative("builder_nets_given", "builder makes each network itself and passes net=, "
                "inverted mask as 1 - board, no data_shape",
                {"simple_flow_answer": BUILDER_PARITY, "coupling_answer": BASE_CLASS_HELPER}),
    Alternative("all_different", "every answer cell in a style of its own at once",
                {"checkerboard_mask_answer": BOARD_NUMPY, "channel_mask_answer": CHANNEL_ARANGE,
                 "coupling_answer": BOOL_BUFFER_WHERE, "simple_flow_answer": BUILDER_CYCLE}),
]
