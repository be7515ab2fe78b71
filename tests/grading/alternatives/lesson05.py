"""Lesson 05 (Glow): correct answers in styles other than the solution's (see ``__init__``).

ActNorm with a plain scale or a log-std and its flag as a frozen parameter; the 1x1
convolution by ``einsum`` or a matrix product over flattened pixels, its log-det by
``slogdet`` or an LU factorisation; the LU layer with its triangles stored as vectors;
steps whose classes sit in a table filled when the cell runs, or come from a factory;
builders that nest one ``Compose`` per scale or use list comprehensions.
"""

from __future__ import annotations

from alternatives import Alternative

LESSON = "05_glow"
# self-checks, pictures, the timing table and the ablation trainings: no test needs them
SKIP = ("# Self-check", "def show", "def time_call", "from nfcourse.data", "results, models",
        'if "lu" in models')

# ------------------------------------------------------------------------------- ActNorm
ACTNORM_SCALE = '''\
class ActNorm(Flow):
    """z = x * scale + bias with the scale itself learned (log|scale| in the log-det); the
    "initialised" flag is a frozen nn.Parameter, so it is in the state_dict."""

    def __init__(self, num_channels):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.done = nn.Parameter(torch.zeros(()), requires_grad=False)

    def _view(self, v):
        return v.view(1, -1, 1, 1)

    def forward(self, x, context=None):
        if self.done.item() == 0:
            with torch.no_grad():
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)
                mean, std = flat.mean(dim=1), flat.std(dim=1, unbiased=False)
                self.scale.copy_(1 / (std + 1e-6))
                self.bias.copy_(-mean / (std + 1e-6))
                self.done.fill_(1)
        z = x * self._view(self.scale) + self._view(self.bias)
        ld = x.shape[2] * x.shape[3] * torch.log(self.scale.abs()).sum()
        return z, ld * x.new_ones(x.shape[0])

    def inverse(self, z, context=None):
        x = (z - self._view(self.bias)) / self._view(self.scale)
        ld = -z.shape[2] * z.shape[3] * torch.log(self.scale.abs()).sum()
        return x, ld * z.new_ones(z.shape[0])
'''

ACTNORM_LOGSTD = '''\
class ActNorm(Flow):
    """z = (x - loc) / exp(log_std), the data-dependent initialisation in a separate method
    called by a forward pre-hook-like check, the flag a bool buffer."""

    def __init__(self, num_channels):
        super().__init__()
        shape = (1, num_channels, 1, 1)
        self.loc = nn.Parameter(torch.zeros(shape))
        self.log_std = nn.Parameter(torch.zeros(shape))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _initialise(self, x):
        self.loc.copy_(x.mean(dim=(0, 2, 3), keepdim=True))
        self.log_std.copy_(torch.log(x.std(dim=(0, 2, 3), keepdim=True) + 1e-6))
        self.ready.fill_(True)

    def _log_det(self, x):
        return -(x[0, 0].numel() * self.log_std.sum()).expand(x.shape[0])

    def forward(self, x, context=None):
        if not bool(self.ready):
            self._initialise(x)
        return (x - self.loc) * torch.exp(-self.log_std), self._log_det(x)

    def inverse(self, z, context=None):
        return z * torch.exp(self.log_std) + self.loc, -self._log_det(z)
'''

# ----------------------------------------------------------------------- 1x1 convolutions
INVCONV_EINSUM = '''\
class InvConv1x1(Flow):
    """einsum over the channel axis; the inverse by solving, not inverting; the log-det from
    torch.linalg.slogdet."""

    def __init__(self, num_channels):
        super().__init__()
        w = torch.linalg.qr(torch.randn(num_channels, num_channels))[0]
        self.weight = nn.Parameter(w)

    def _log_det(self, x):
        return (x.shape[-2] * x.shape[-1] * torch.linalg.slogdet(self.weight).logabsdet
                ).repeat(x.shape[0])

    def forward(self, x, context=None):
        return torch.einsum("oc,bchw->bohw", self.weight, x), self._log_det(x)

    def inverse(self, z, context=None):
        b, c, h, w = z.shape
        cols = z.permute(1, 0, 2, 3).reshape(c, -1)
        x = torch.linalg.solve(self.weight, cols).reshape(c, b, h, w).permute(1, 0, 2, 3)
        return x, -self._log_det(z)
'''

INVCONV_MATMUL_LU = '''\
class InvConv1x1(Flow):
    """A matrix product over flattened pixels; log|det W| from the diagonal of an LU
    factorisation."""

    def __init__(self, num_channels):
        super().__init__()
        q, r = torch.linalg.qr(torch.randn(num_channels, num_channels))
        self.weight = nn.Parameter(q * torch.sign(torch.diagonal(r)))

    def _logabsdet(self):
        lu, _ = torch.linalg.lu_factor(self.weight)
        return torch.log(torch.diagonal(lu).abs()).sum()

    @staticmethod
    def _mix(matrix, x):
        b, c, h, w = x.shape
        return (matrix @ x.reshape(b, c, h * w)).reshape(b, -1, h, w)

    def forward(self, x, context=None):
        hw = x.shape[2] * x.shape[3]
        return self._mix(self.weight, x), torch.full(
            (x.shape[0],), 1.0, dtype=x.dtype, device=x.device) * hw * self._logabsdet()

    def inverse(self, z, context=None):
        hw = z.shape[2] * z.shape[3]
        return self._mix(torch.linalg.inv(self.weight), z), torch.full(
            (z.shape[0],), -1.0, dtype=z.dtype, device=z.device) * hw * self._logabsdet()
'''

LU_VECTORS = '''\
class InvConv1x1LU(Flow):
    """The strict triangles of L and U stored as vectors (tril/triu indices) and scattered
    into matrices when the weight is assembled; the conv through F.conv2d."""

    def __init__(self, num_channels):
        super().__init__()
        c = num_channels
        w = torch.linalg.qr(torch.randn(c, c))[0]
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lo_idx", torch.tril_indices(c, c, offset=-1))
        self.register_buffer("up_idx", torch.triu_indices(c, c, offset=1))
        self.l_vec = nn.Parameter(lower[self.lo_idx[0], self.lo_idx[1]].clone())
        self.u_vec = nn.Parameter(upper[self.up_idx[0], self.up_idx[1]].clone())
        self.log_s = nn.Parameter(torch.log(s.abs()))

    @property
    def weight(self):
        c = self.log_s.shape[0]
        eye = torch.eye(c, dtype=self.log_s.dtype, device=self.log_s.device)
        lower = eye.index_put((self.lo_idx[0], self.lo_idx[1]), self.l_vec)
        upper = torch.diag(self.sign_s * self.log_s.exp()).index_put(
            (self.up_idx[0], self.up_idx[1]), self.u_vec)
        return self.p.to(lower) @ lower @ upper

    def forward(self, x, context=None):
        c = self.log_s.shape[0]
        ld = x.shape[2] * x.shape[3] * self.log_s.sum()
        return F.conv2d(x, self.weight.reshape(c, c, 1, 1)), ld.expand(x.shape[0])

    def inverse(self, z, context=None):
        c = self.log_s.shape[0]
        ld = z.shape[2] * z.shape[3] * self.log_s.sum()
        return F.conv2d(z, torch.inverse(self.weight).reshape(c, c, 1, 1)), -ld.expand(z.shape[0])
'''

# ---------------------------------------------------------------------------- Glow steps
STEP_TABLE = '''\
#: the mixings by name, filled when this cell runs (a registry, as libraries keep them):
#: the step looks its classes up here, not by their global names
MIXERS = {}


def mixer(name):
    def register(make):
        MIXERS[name] = make
        return make
    return register


mixer("lu")(InvConv1x1LU)
mixer("plain")(InvConv1x1)
mixer("reverse")(ReversePermutation)
mixer("random")(RandomPermutation)
NORM = ActNorm


class GlowStep(Flow):
    def __init__(self, num_channels, hidden=32, num_layers=1, mixing="lu"):
        super().__init__()
        if mixing not in MIXERS:
            raise ValueError(f"mixing must be one of {sorted(MIXERS)}, got {mixing!r}")
        self.parts = nn.ModuleList([NORM(num_channels), MIXERS[mixing](num_channels)])
        self.k = num_channels // 2
        rest = num_channels - self.k
        self.net = GatedConvNet(self.k, hidden, 2 * rest, num_layers)
        self.bound = nn.Parameter(torch.ones(1, rest, 1, 1))

    def _st(self, kept):
        raw, t = self.net(kept).chunk(2, dim=1)
        return self.bound * torch.tanh(raw / self.bound), t

    def forward(self, x, context=None):
        total = 0
        for part in self.parts:
            x, ld = part(x)
            total = total + ld
        kept, free = x.split([self.k, x.shape[1] - self.k], dim=1)
        s, t = self._st(kept)
        return torch.cat([kept, free * s.exp() + t], dim=1), total + s.sum(dim=(1, 2, 3))

    def inverse(self, z, context=None):
        kept, free = z.split([self.k, z.shape[1] - self.k], dim=1)
        s, t = self._st(kept)
        x = torch.cat([kept, (free - t) * (-s).exp()], dim=1)
        total = -s.sum(dim=(1, 2, 3))
        for part in reversed(self.parts):
            x, ld = part.inverse(x)
            total = total + ld
        return x, total
'''

STEP_FACTORY = '''\
def _mixing_factory(mixing):
    """A function channels -> the mixing layer; the choice made once, by a match."""
    match mixing:
        case "lu":
            return lambda c: InvConv1x1LU(c)
        case "plain":
            return lambda c: InvConv1x1(c)
        case "reverse":
            return ReversePermutation
        case "random":
            return RandomPermutation
    raise ValueError(f"unknown mixing {mixing!r}")


class _Coupling(nn.Module):
    """The affine coupling over channels as its own module (the second half changes)."""

    def __init__(self, channels, hidden, num_layers):
        super().__init__()
        self.k = channels // 2
        self.net = GatedConvNet(self.k, hidden, 2 * (channels - self.k), num_layers)

    def forward(self, x, reverse=False):
        a, b = x[:, :self.k], x[:, self.k:]
        h = self.net(a)
        log_s, t = torch.tanh(h[:, 0::2]), h[:, 1::2]
        b = (b - t) * torch.exp(-log_s) if reverse else b * torch.exp(log_s) + t
        ld = log_s.flatten(1).sum(1)
        return torch.cat([a, b], dim=1), -ld if reverse else ld


class GlowStep(Flow):
    def __init__(self, num_channels, hidden=32, num_layers=1, mixing="lu"):
        super().__init__()
        make_mix = _mixing_factory(mixing)
        self.norm = ActNorm(num_channels)
        self.mix = make_mix(num_channels)
        self.coupling = _Coupling(num_channels, hidden, num_layers)

    def forward(self, x, context=None):
        x, a = self.norm(x)
        x, b = self.mix(x)
        z, c = self.coupling(x)
        return z, a + b + c

    def inverse(self, z, context=None):
        x, c = self.coupling(z, reverse=True)
        x, b = self.mix.inverse(x)
        x, a = self.norm.inverse(x)
        return x, a + b + c
'''

# ---------------------------------------------------------------------------- build_glow
GLOW_NESTED = '''\
def build_glow(shape=(1, 28, 28), num_scales=2, steps_per_scale=4, hidden=32, num_layers=1,
               mixing="lu"):
    """One Compose per scale (squeeze, steps, split), nested in the model's Compose."""
    c, h, w = shape
    blocks = [Dequantization()]
    for scale in range(num_scales):
        c, h, w = c * 4, h // 2, w // 2
        block = [Squeeze()] + [GlowStep(c, hidden=hidden, num_layers=num_layers, mixing=mixing)
                               for _ in range(steps_per_scale)]
        if scale != num_scales - 1:
            block.append(Split())
            c //= 2
        blocks.append(Compose(block))
    return FlowModel(Compose(blocks), StandardNormal((c, h, w)), data_shape=shape)
'''

GLOW_COMPREHENSION = '''\
import itertools


def build_glow(shape=(1, 28, 28), num_scales=2, steps_per_scale=4, hidden=32, num_layers=1,
               mixing="lu"):
    """Channels per scale worked out first, then the layers in one chain."""
    c0, h0, w0 = shape
    channels = [c0 * 4 * 2**s for s in range(num_scales)]  # 4C, 8C, 16C, ...
    step = dict(hidden=hidden, num_layers=num_layers, mixing=mixing)
    scales = [[Squeeze()] + [GlowStep(ch, **step) for _ in range(steps_per_scale)]
              + ([Split()] if s < num_scales - 1 else [])
              for s, ch in enumerate(channels)]
    last = (channels[-1], h0 // 2**num_scales, w0 // 2**num_scales)
    flow = Compose([Dequantization(), *itertools.chain.from_iterable(scales)])
    return FlowModel(flow, StandardNormal(last), data_shape=tuple(shape))
'''

ALTERNATIVES = [
    Alternative("scale_table", "ActNorm with a plain scale and a frozen-parameter flag, einsum "
                "1x1, LU triangles as vectors, a registry of mixings, nested scales",
                {"actnorm_answer": ACTNORM_SCALE, "invconv_answer": INVCONV_EINSUM,
                 "invconv_lu_answer": LU_VECTORS, "glow_step_answer": STEP_TABLE,
                 "glow_answer": GLOW_NESTED}),
    Alternative("logstd_factory", "ActNorm with a log-std, matmul 1x1 with an LU log-det, a "
                "factory of mixings and a coupling module, a comprehension builder",
                {"actnorm_answer": ACTNORM_LOGSTD, "invconv_answer": INVCONV_MATMUL_LU,
                 "glow_step_answer": STEP_FACTORY, "glow_answer": GLOW_COMPREHENSION}),
    Alternative("registry_only", "the solution's layers, a step with a registry of mixings",
                {"glow_step_answer": STEP_TABLE}),
    Alternative("vectors_nested", "LU triangles as vectors, nested per-scale Compose",
                {"invconv_lu_answer": LU_VECTORS, "glow_answer": GLOW_NESTED}),
    Alternative("einsum_factory", "einsum 1x1, plain-scale ActNorm, factory step",
                {"invconv_answer": INVCONV_EINSUM, "actnorm_answer": ACTNORM_SCALE,
                 "glow_step_answer": STEP_FACTORY}),
    Alternative("logstd_registry", "log-std ActNorm, LU triangles as vectors, a registry "
                "step, a comprehension builder",
                {"actnorm_answer": ACTNORM_LOGSTD, "invconv_lu_answer": LU_VECTORS,
                 "glow_step_answer": STEP_TABLE, "glow_answer": GLOW_COMPREHENSION}),
]
