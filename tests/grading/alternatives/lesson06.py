"""Lesson 06 (FFJORD): correct answers in styles other than the solution's (see ``__init__``).

ODE functions with a time embedding added to every layer or built as a ``Sequential`` of
time-concatenating layers; the exact divergence through ``autograd.functional.jacobian``
or one batched backward over the basis vectors; Hutchinson with Gaussian noise and a
vector-Jacobian product from ``autograd.functional.vjp``; a CNF that integrates one
concatenated state tensor, or draws its noise in a helper and returns ``log_prob`` through
``torch.distributions``.
"""

from __future__ import annotations

from alternatives import Alternative

LESSON = "06_ffjord_gifs"
# demos, pictures, self-checks and GIFs: no test needs them (the trainings stay)
SKIP = ("def rotation", "# Self-check", "def estimates", "class Counted",
        "from torchdiffeq import odeint_adjoint", "def validate", "fig,", "torch.manual_seed(2)",
        "with torch.no_grad(), checks.tight_solver", "def flow_path", "labels =", "MY_IMAGE")

# ---------------------------------------------------------------------------- ODEFunc
ODEFUNC_TIME_EMBEDDING = '''\
class ODEFunc(nn.Module):
    """Explicit loop over the layers; the time enters every layer through its own learned
    projection, added to the layer's output (a bias that depends on t)."""

    def __init__(self, dim=2, hidden=64, layers=3):
        super().__init__()
        widths = [dim] + [hidden] * layers + [dim]
        self.maps = nn.ModuleList()
        self.times = nn.ModuleList()
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            self.maps.append(nn.Linear(n_in, n_out))
            self.times.append(nn.Linear(1, n_out, bias=False))

    def forward(self, t, z):
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(1, 1)
        h = z
        last = len(self.maps) - 1
        for i in range(len(self.maps)):
            h = self.maps[i](h) + self.times[i](t)
            if i != last:
                h = torch.tanh(h)
        return h
'''

ODEFUNC_SEQUENTIAL = '''\
class ConcatT(nn.Module):
    """A linear layer that reads [t, h]."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.linear = nn.Linear(n_in + 1, n_out)

    def forward(self, t, h):
        return self.linear(torch.cat([t.expand(h.shape[0], 1), h], dim=1))


class ODEFunc(nn.Module):
    """Functional style: the layers in a list, the activation a function, the forward a
    reduction over the list."""

    def __init__(self, dim=2, hidden=64, layers=3):
        super().__init__()
        sizes = [dim, *([hidden] * layers), dim]
        self.layers = nn.ModuleList(ConcatT(a, b) for a, b in zip(sizes, sizes[1:]))
        self.act = torch.tanh

    def forward(self, t, z):
        t = torch.full((1, 1), float(t), dtype=z.dtype, device=z.device)
        *hidden, out = self.layers
        h = z
        for layer in hidden:
            h = self.act(layer(t, h))
        return out(t, h)
'''

# ------------------------------------------------------------------------- divergence
DIVERGENCE_JACOBIAN = '''\
def exact_divergence(f, z, t):
    """The whole Jacobian at once: rows of the batch are independent, so the Jacobian of
    sum_b f(t, z)_b with respect to z holds every sample's (D x D) block."""
    with torch.enable_grad():
        z = z if z.requires_grad else z.detach().requires_grad_(True)
        dz = f(t, z)
        jac = torch.autograd.functional.jacobian(lambda v: f(t, v).sum(dim=0), z,
                                                 create_graph=True)       # (D, B, D)
        div = torch.diagonal(jac, dim1=0, dim2=2).sum(dim=-1)            # (B,)
    return dz, div
'''

DIVERGENCE_BATCHED = '''\
def exact_divergence(f, z, t):
    """One batched backward: the basis vectors e_1 .. e_D as D sets of grad_outputs."""
    with torch.enable_grad():
        z = z if z.requires_grad else z.detach().requires_grad_(True)
        dz = f(t, z)
        d = z.shape[1]
        basis = torch.eye(d, dtype=z.dtype, device=z.device)[:, None, :].expand(d, *z.shape)
        (rows,) = torch.autograd.grad(dz, z, grad_outputs=basis, is_grads_batched=True,
                                      create_graph=True)                 # (D, B, D)
        div = torch.einsum("ibi->b", rows)
    return dz, div
'''

# ------------------------------------------------------------------------- Hutchinson
HUTCHINSON_GAUSSIAN_VJP = '''\
def sample_noise(z):
    """Standard normal noise (E[eps eps^T] = I as well as Rademacher's)."""
    return torch.randn_like(z)


def hutchinson_divergence(f, z, t, noise):
    """eps^T J eps from a vector-Jacobian product of torch.autograd.functional."""
    with torch.enable_grad():
        z = z if z.requires_grad else z.detach().requires_grad_(True)
        dz, vjp = torch.autograd.functional.vjp(lambda v: f(t, v), z, noise,
                                                create_graph=True)
    return dz, torch.einsum("bi,bi->b", vjp, noise)
'''

HUTCHINSON_SIGNS = '''\
def sample_noise(z):
    """Rademacher signs from a Bernoulli draw."""
    return torch.bernoulli(torch.full_like(z, 0.5)) * 2 - 1


def hutchinson_divergence(f, z, t, noise):
    with torch.enable_grad():
        if not z.requires_grad:
            z = z.detach().requires_grad_()
        dz = f(t, z)
        (g,) = torch.autograd.grad((dz * noise).sum(), z, create_graph=True)
    return dz, (g * noise).sum(-1)
'''

# -------------------------------------------------------------------------------- CNF
CNF_CONCATENATED = '''\
FIXED_STEP = ("euler", "midpoint", "rk4")


class CNF(Flow):
    """One state tensor [z, delta] (D + 1 columns) instead of a tuple; the noise drawn once
    in transform and kept on the module for the solve."""

    def __init__(self, odefunc, T=1.0, method="rk4", steps=8, rtol=1e-5, atol=1e-5,
                 divergence="exact"):
        super().__init__()
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
        self.odefunc = odefunc
        self.T = float(T)
        self.method, self.steps, self.rtol, self.atol = method, steps, rtol, atol
        self.divergence = divergence
        self.noise = None

    def dynamics(self, t, state):
        z = state[:, :-1]
        if self.divergence == "hutchinson":
            dz, div = hutchinson_divergence(self.odefunc, z, t, self.noise)
        else:
            dz, div = exact_divergence(self.odefunc, z, t)
        return torch.cat([dz, -div[:, None]], dim=1)

    def transform(self, x, t0, t1):
        self.noise = sample_noise(x) if self.divergence == "hutchinson" else None
        start = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)
        times = torch.as_tensor([float(t0), float(t1)], dtype=x.dtype, device=x.device)
        kwargs = dict(method=self.method, rtol=self.rtol, atol=self.atol)
        if self.method in FIXED_STEP:
            kwargs["options"] = {"step_size": self.T / self.steps}
        end = odeint(self.dynamics, start, times, **kwargs)[-1]
        return end[:, :-1], -end[:, -1]

    def forward(self, x, context=None):
        return self.transform(x, 0.0, self.T)

    def inverse(self, z, context=None):
        return self.transform(z, self.T, 0.0)

    def log_prob(self, x):
        z, log_det = self.forward(x)
        return -0.5 * (z * z).sum(1) - z.shape[1] * 0.5 * math.log(2 * math.pi) + log_det

    @torch.no_grad()
    def sample(self, n, dim=2):
        return self.inverse(torch.randn(n, dim))[0]
'''

CNF_HELPERS = '''\
FIXED_STEP = ("euler", "midpoint", "rk4")


class CNF(Flow):
    """The solver call in a helper, the noise drawn by a helper, log_prob through
    torch.distributions."""

    def __init__(self, odefunc, T=1.0, method="rk4", steps=8, rtol=1e-5, atol=1e-5,
                 divergence="exact"):
        super().__init__()
        if divergence not in {"exact", "hutchinson"}:
            raise ValueError(f"unknown divergence {divergence!r}")
        self.odefunc, self.T = odefunc, float(T)
        self.method, self.steps, self.rtol, self.atol = method, steps, rtol, atol
        self.divergence = divergence
        self.noise = None

    def _divergence(self, z, t):
        if self.divergence == "exact":
            return exact_divergence(self.odefunc, z, t)
        return hutchinson_divergence(self.odefunc, z, t, self.noise)

    def dynamics(self, t, state):
        dz, div = self._divergence(state[0], t)
        return dz, -div

    def _new_noise(self, x):
        self.noise = None if self.divergence == "exact" else sample_noise(x)

    def _solve(self, x, times):
        options = {"step_size": self.T / self.steps} if self.method in FIXED_STEP else None
        return odeint(self.dynamics, (x, torch.zeros_like(x[:, 0])), times, method=self.method,
                      rtol=self.rtol, atol=self.atol, options=options)

    def transform(self, x, t0, t1):
        self._new_noise(x)
        zs, deltas = self._solve(x, x.new_tensor([float(t0), float(t1)]))
        return zs[-1], -deltas[-1]

    def forward(self, x, context=None):
        return self.transform(x, 0.0, self.T)

    def inverse(self, z, context=None):
        return self.transform(z, self.T, 0.0)

    def log_prob(self, x):
        z, log_det = self.transform(x, 0.0, self.T)
        base = torch.distributions.Normal(torch.zeros((), dtype=z.dtype),
                                          torch.ones((), dtype=z.dtype))
        return base.log_prob(z).sum(dim=1) + log_det

    @torch.no_grad()
    def sample(self, n, dim=2):
        return self.inverse(torch.randn(n, dim))[0]
'''

ALTERNATIVES = [
    Alternative("embedding_jacobian", "time embedding added per layer, the full Jacobian, "
                "Gaussian noise with functional vjp, one concatenated state",
                {"odefunc_answer": ODEFUNC_TIME_EMBEDDING, "divergence_answer": DIVERGENCE_JACOBIAN,
                 "hutchinson_answer": HUTCHINSON_GAUSSIAN_VJP, "cnf_answer": CNF_CONCATENATED}),
    Alternative("sequential_batched", "ConcatT layers in a ModuleList, one batched backward, "
                "Bernoulli signs, a CNF of helpers",
                {"odefunc_answer": ODEFUNC_SEQUENTIAL, "divergence_answer": DIVERGENCE_BATCHED,
                 "hutchinson_answer": HUTCHINSON_SIGNS, "cnf_answer": CNF_HELPERS}),
    Alternative("jacobian_only", "the full Jacobian for the exact divergence",
                {"divergence_answer": DIVERGENCE_JACOBIAN}),
    Alternative("gaussian_concat", "Gaussian noise with vjp, one concatenated state",
                {"hutchinson_answer": HUTCHINSON_GAUSSIAN_VJP, "cnf_answer": CNF_CONCATENATED}),
    Alternative("embedding_helpers", "time embedding per layer, a CNF of helpers",
                {"odefunc_answer": ODEFUNC_TIME_EMBEDDING, "cnf_answer": CNF_HELPERS}),
    Alternative("sequential_signs", "ConcatT layers, batched backward, Bernoulli signs",
                {"odefunc_answer": ODEFUNC_SEQUENTIAL, "divergence_answer": DIVERGENCE_BATCHED,
                 "hutchinson_answer": HUTCHINSON_SIGNS}),
]

#: graded for real by test_alternatives_autograded: the two that between them replace every
#: answer cell (a class of all six takes too long for CI on 2 cores; all six are graded in
#: process)
AUTOGRADED = ('embedding_jacobian', 'sequential_batched')
