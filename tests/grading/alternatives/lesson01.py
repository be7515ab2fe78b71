"""Lesson 01: correct answers in styles other than the solution's (see ``__init__``)."""

from __future__ import annotations

from alternatives import Alternative

LESSON = "01_two_moons_realnvp"
# pictures, GIFs and self-checks: not needed to answer the tests
SKIP = ("fig", "gif", "states", "history", "viz.", "checks.")

# --------------------------------------------------------------------------- warm-up
WARMUP_MATRIX = '''\
# the Jacobian of z(x) is a diagonal matrix: take its determinant numerically
jacobian = np.array([[1 / 3, 0.0], [0.0, 1 / 2]])
jacobian_det = abs(float(np.linalg.det(jacobian)))


def p_z(z1, z2):
    z1, z2 = np.asarray(z1, dtype=float), np.asarray(z2, dtype=float)
    inside = (z1 >= 0) & (z1 <= 1) & (z2 >= 0) & (z2 <= 1)
    return np.where(inside, p_x(3 * z1 + 1, 2 * z2) * (1 / jacobian_det), 0.0)
'''

WARMUP_CLOSED_FORM = '''\
jacobian_det = (1 / 3) * (1 / 2)

# p_x(1 + 3 z1, 2 z2) * 6 = (3 z1)(2 z2) / 9 * 6 = 4 z1 z2
p_z = lambda z1, z2: 4.0 * z1 * z2
'''

# ------------------------------------------------------------------------- couplings
FROZEN_PARAMETER_MASK = '''\
class MaskedAffineCoupling(nn.Module):
    """The mask is a frozen nn.Parameter; two separate networks for s and t; torch.where
    picks the kept coordinate instead of multiplying by the mask."""

    def __init__(self, mask, hidden=64):
        super().__init__()
        self.mask = nn.Parameter(torch.as_tensor(mask, dtype=torch.float32).clone(),
                                 requires_grad=False)
        d = self.mask.numel()

        def mlp():
            net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                nn.Tanh(), nn.Linear(hidden, d))
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
            return net

        self.s_net, self.t_net = mlp(), mlp()
        self.bound = nn.Parameter(torch.full((d,), 2.0))

    def _kept(self):
        return self.mask > 0.5

    def _scale_shift(self, x):
        kept = self._kept()
        inp = torch.where(kept, x, torch.zeros_like(x))
        s = self.bound * torch.tanh(self.s_net(inp) / self.bound)
        t = self.t_net(inp)
        zero = torch.zeros_like(s)
        return torch.where(kept, zero, s), torch.where(kept, zero, t)

    def forward(self, x):
        s, t = self._scale_shift(x)
        return torch.where(self._kept(), x, x * s.exp() + t), s.sum(-1)

    def inverse(self, z):
        s, t = self._scale_shift(z)
        return torch.where(self._kept(), z, (z - t) * (-s).exp()), -s.sum(-1)
'''

INDEXING = '''\
class MaskedAffineCoupling(nn.Module):
    """Indexing instead of masks: the kept coordinate is read out by its index, the
    network sees only it (a 1-input MLP), the free one is rebuilt with torch.stack."""

    def __init__(self, mask, hidden=64):
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(mask).float())
        self.kept = int(torch.as_tensor(mask).argmax())
        self.free = 1 - self.kept
        layers = [nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()]
        last = nn.Linear(hidden, 2)
        last.weight.data.zero_()
        last.bias.data.zero_()
        self.net = nn.Sequential(*layers, last)

    def _st(self, kept_column):
        raw = self.net(kept_column.unsqueeze(1))
        return torch.tanh(raw[:, 0]), raw[:, 1]  # scale bound 1

    def _assemble(self, kept_column, free_column):
        columns = [None, None]
        columns[self.kept], columns[self.free] = kept_column, free_column
        return torch.stack(columns, dim=1)

    def forward(self, x):
        a, b = x[:, self.kept], x[:, self.free]
        s, t = self._st(a)
        return self._assemble(a, b * torch.exp(s) + t), s

    def inverse(self, z):
        a, b = z[:, self.kept], z[:, self.free]
        s, t = self._st(a)
        return self._assemble(a, (b - t) * torch.exp(-s)), -s
'''

MODULE_LIST_BASE_CLASS = '''\
class _AffineCouplingBase(nn.Module):
    """Forward and inverse share one helper; subclasses say how s and t are computed."""

    def params(self, x_kept):
        raise NotImplementedError

    def _affine(self, v, direction):
        m = self.mask
        s, t = self.params(v * m)
        s, t = s * (1 - m), t * (1 - m)
        if direction > 0:
            out = m * v + (1 - m) * (v * torch.exp(s) + t)
        else:
            out = m * v + (1 - m) * ((v - t) * torch.exp(-s))
        return out, direction * s.flatten(1).sum(1)


class MaskedAffineCoupling(_AffineCouplingBase):
    """An MLP kept in an nn.ModuleList and run by hand, a fixed tanh bound of 1.5."""

    def __init__(self, mask, hidden=64):
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.get_default_dtype()))
        d = self.mask.numel()
        sizes = [d, hidden, hidden, 2 * d]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        nn.init.zeros_(self.linears[-1].weight)
        nn.init.zeros_(self.linears[-1].bias)

    def params(self, x_kept):
        h = x_kept
        for k, linear in enumerate(self.linears):
            h = linear(h)
            if k < len(self.linears) - 1:
                h = torch.relu(h)
        d = self.mask.numel()
        return 1.5 * torch.tanh(h[:, :d] / 1.5), h[:, d:]

    def forward(self, x):
        return self._affine(x, +1)

    def inverse(self, z):
        return self._affine(z, -1)
'''

MASK_ON_THE_FLY = '''\
from dataclasses import dataclass


@dataclass
class CouplingConfig:
    hidden: int = 64
    depth: int = 2
    scale_bound: float = 3.0


class MaskedAffineCoupling(nn.Module):
    """The mask is recomputed from a stored index on every call (nothing to move with
    .double()); a config dataclass; log-det with torch.einsum."""

    def __init__(self, mask, hidden=64, config=None):
        super().__init__()
        self.config = config or CouplingConfig(hidden=hidden)
        self.kept_index = int(torch.as_tensor(mask).argmax())
        blocks, width = [], 2
        for _ in range(self.config.depth):
            blocks += [nn.Linear(width, self.config.hidden), nn.SiLU()]
            width = self.config.hidden
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, 4)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _mask_like(self, x):
        m = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        m[self.kept_index] = 1
        return m

    def _st(self, x):
        m = self._mask_like(x)
        raw = self.head(self.body(x * m))
        c = self.config.scale_bound
        s = c * torch.tanh(raw[:, :2] / c) * (1 - m)
        return s, raw[:, 2:] * (1 - m), m

    def forward(self, x):
        s, t, m = self._st(x)
        z = x * m + (x * torch.exp(s) + t) * (1 - m)
        return z, torch.einsum("bd->b", s)

    def inverse(self, z):
        s, t, m = self._st(z)
        x = z * m + (z - t) * torch.exp(-s) * (1 - m)
        return x, -torch.einsum("bd->b", s)
'''

# ---------------------------------------------------------------------------- stacks
REALNVP_FUNCTOOLS = '''\
import functools


class RealNVP(nn.Module):
    """Masks from rows of the identity, the passes written with functools.reduce."""

    def __init__(self, n_layers=6, hidden=64, coupling=None):
        super().__init__()
        make = coupling if coupling is not None else MaskedAffineCoupling
        eye = torch.eye(2)
        self.layers = nn.ModuleList(make(eye[k % 2].clone(), hidden) for k in range(n_layers))

    @staticmethod
    def _step(direction):
        def step(state, layer):
            h, total = state
            h, ld = layer(h) if direction > 0 else layer.inverse(h)
            return h, total + ld
        return step

    def forward(self, x):
        return functools.reduce(self._step(+1), self.layers, (x, torch.zeros_like(x[:, 0])))

    def inverse(self, z):
        return functools.reduce(self._step(-1), list(self.layers)[::-1],
                                (z, torch.zeros_like(z[:, 0])))
'''

REALNVP_KEYWORDS = '''\
class RealNVP(nn.Module):
    """The mask flips with 1 - mask; log-dets stacked and summed at the end; the inverse
    walks the indices backwards."""

    def __init__(self, n_layers=6, hidden=64, coupling=None):
        super().__init__()
        coupling = coupling or MaskedAffineCoupling
        layers, mask = [], torch.tensor([1.0, 0.0])
        for _ in range(n_layers):
            layers.append(coupling(mask, hidden=hidden))
            mask = 1 - mask
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        log_dets = []
        for layer in self.layers:
            x, ld = layer(x)
            log_dets.append(ld)
        return x, torch.stack(log_dets).sum(0)

    def inverse(self, z):
        log_dets = []
        for k in range(len(self.layers) - 1, -1, -1):
            z, ld = self.layers[k].inverse(z)
            log_dets.append(ld)
        return z, torch.stack(log_dets).sum(0)
'''

# ------------------------------------------------------------------------- densities
DENSITY_DISTRIBUTIONS = '''\
class FlowDensity(nn.Module):
    """torch.distributions for the base density, noise drawn in the flow's dtype."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def log_prob(self, x):
        z, log_det = self.flow(x)
        base = torch.distributions.Normal(torch.zeros((), dtype=z.dtype, device=z.device),
                                          torch.ones((), dtype=z.dtype, device=z.device))
        return base.log_prob(z).sum(dim=-1) + log_det

    def sample(self, n):
        ref = next(self.flow.parameters())
        z = torch.randn((n, 2), dtype=ref.dtype, device=ref.device)
        return self.flow.inverse(z)[0]
'''

DENSITY_MANUAL = '''\
LOG_2PI = math.log(2 * math.pi)


class FlowDensity(nn.Module):
    """The Gaussian written with torch.square and a mean over dims; sample from a buffer-free
    empty_like().normal_()."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def log_prob(self, x):
        z, log_det = self.flow(x)
        return log_det - 0.5 * (torch.square(z).mean(1) + LOG_2PI) * z.shape[1]

    def sample(self, n):
        like = next(iter(self.flow.parameters()))
        z = like.new_empty((n, 2)).normal_()
        x, _ = self.flow.inverse(z)
        return x
'''

TRAIN_OTHER_RECIPE = '''\
torch.manual_seed(1)
model = FlowDensity(RealNVP(n_layers=8 if FAST else 10, hidden=48 if FAST else 128))
history = fit(model, x_train, steps=fast_steps(2000, 400), batch_size=256,
              lr=4e-3 if FAST else 2e-3, schedule="cosine", device="cpu")
'''

ALTERNATIVES = [
    Alternative("frozen_mask", "frozen nn.Parameter mask, torch.where, separate s and t "
                "networks, learnable per-coordinate tanh bound; warm-up via np.linalg.det",
                {"warmup_answer": WARMUP_MATRIX, "coupling_answer": FROZEN_PARAMETER_MASK}),
    Alternative("indexing", "kept coordinate by index and torch.stack instead of a mask "
                "product, a 1-input MLP; RealNVP with functools.reduce",
                {"coupling_answer": INDEXING, "realnvp_answer": REALNVP_FUNCTOOLS}),
    Alternative("base_class_modulelist", "a base class with one helper for both directions, "
                "an nn.ModuleList MLP run by hand, fixed tanh bound 1.5, flatten(1).sum(1); "
                "torch.distributions density",
                {"coupling_answer": MODULE_LIST_BASE_CLASS,
                 "density_answer": DENSITY_DISTRIBUTIONS}),
    Alternative("mask_on_the_fly", "mask recomputed from an index on every call, a config "
                "dataclass, einsum log-det; RealNVP flipping 1 - mask, stacked log-dets",
                {"coupling_answer": MASK_ON_THE_FLY, "realnvp_answer": REALNVP_KEYWORDS}),
    Alternative("closed_form", "warm-up in closed form (a lambda), density with torch.square "
                "and new_empty().normal_(), another training recipe",
                {"warmup_answer": WARMUP_CLOSED_FORM, "density_answer": DENSITY_MANUAL,
                 "train_answer": TRAIN_OTHER_RECIPE}),
    Alternative("all_different", "every answer cell in a style of its own at once",
                {"warmup_answer": WARMUP_MATRIX, "coupling_answer": MASK_ON_THE_FLY,
                 "realnvp_answer": REALNVP_FUNCTOOLS, "density_answer": DENSITY_MANUAL,
                 "train_answer": TRAIN_OTHER_RECIPE}),
]
