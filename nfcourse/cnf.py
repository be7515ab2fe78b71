"""Continuous normalizing flows (Chen et al. 2018 "Neural ODEs"; Grathwohl et al. 2019 "FFJORD").

A :class:`CNF` moves points with an ordinary differential equation ``dz/dt = f(t, z)``: data
sit at ``t = 0`` and noise at ``t = T``. Along the way the log-density changes by the
instantaneous change of variables

.. math::  \\frac{d \\log p(z(t))}{dt} = -\\operatorname{tr} \\frac{\\partial f}{\\partial z},

so one call to :func:`torchdiffeq.odeint` on the augmented state ``[z, delta_logp]`` with
``d[z, delta_logp]/dt = [f, -div f]`` gives both the end point and
``log|det dz(T)/dz(0)| = -delta_logp``. A ``CNF`` keeps the package's flow contract
(``forward``: data to noise, ``inverse``: noise to data, each returning ``(output, log_det)``),
so :class:`nfcourse.flows.FlowModel`, :func:`nfcourse.train.fit` and the pictures work
unchanged.

What is here:

* :class:`ODENet`: a time-conditioned MLP ``f(t, z)``.
* :func:`exact_divergence` (a sum of ``D`` autograd diagonal entries; cheap in 2-D) and
  :func:`hutchinson_divergence` (Hutchinson 1989: ``E[eps^T J eps] = tr J`` for noise with
  ``E[eps eps^T] = I``; FFJORD draws the noise once per solve).
* :class:`CNF`: solver choice (adaptive ``dopri5`` with ``rtol``/``atol``, fixed-step ``rk4``,
  ``euler``...), the adjoint method, a function-evaluation counter, the kinetic-energy and
  Jacobian-Frobenius regularisers of Finlay et al. 2020 ("How to train your neural ODE"),
  and evaluation at any time in ``[0, T]`` (:meth:`CNF.transform`, :meth:`CNF.sample_path`).
* :func:`cnf_2d` (fast defaults for 2-D densities), :func:`ffjord_2d_defaults` (the settings of
  FFJORD's 2-D experiments) and :func:`validate_log_density` (re-evaluate a model trained
  with a coarse fixed-step solver with a tight adaptive one and report the gap).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchdiffeq import odeint, odeint_adjoint

from nfcourse.flows import Flow, FlowModel, StandardNormal

__all__ = [
    "ODENet",
    "exact_divergence",
    "hutchinson_divergence",
    "sample_noise",
    "CNF",
    "FIXED_STEP_METHODS",
    "cnf_2d",
    "ffjord_2d_defaults",
    "validate_log_density",
    "regularized_loss",
    "find_cnf",
    "CNF_2D_TRAINING",
    "FFJORD_2D_OPTIMIZER",
]

#: torchdiffeq methods that walk a fixed grid (``steps``/``step_size`` apply to these).
FIXED_STEP_METHODS = frozenset(
    {"euler", "midpoint", "rk4", "heun3", "explicit_adams", "implicit_adams", "fixed_adams"}
)

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "elu": F.elu,
    "swish": F.silu,
    "silu": F.silu,
}


def _tanh_and_slope(x: Tensor) -> tuple[Tensor, Tensor]:
    y = torch.tanh(x)
    return y, 1 - y * y


def _softplus_and_slope(x: Tensor) -> tuple[Tensor, Tensor]:
    return F.softplus(x), torch.sigmoid(x)


def _elu_and_slope(x: Tensor) -> tuple[Tensor, Tensor]:
    y = F.elu(x)
    return y, torch.where(x > 0, torch.ones_like(x), y + 1)


def _silu_and_slope(x: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(x)
    return x * s, s * (1 + x * (1 - s))


# activation -> (value, derivative), for ODENet.forward_with_jacobian
_DERIVATIVES = {
    "tanh": _tanh_and_slope,
    "softplus": _softplus_and_slope,
    "elu": _elu_and_slope,
    "swish": _silu_and_slope,
    "silu": _silu_and_slope,
}

TIME_EMBEDDINGS = ("concat", "fourier", "concatsquash")


# --------------------------------------------------------------------------------------------
# The ODE function
# --------------------------------------------------------------------------------------------
class ODENet(nn.Module):
    """A time-conditioned MLP ``f(t, z) -> dz/dt`` (called as ``net(t, z)``, torchdiffeq's order).

    Every layer sees the time, in one of three ways (``time_embedding``):

    * ``"concat"``: ``W [h, t] + b`` (FFJORD's ``concat`` layer), i.e. ``t`` appended to each
      layer's input;
    * ``"fourier"``: like ``concat`` with features ``[t, sin(k pi t / T), cos(k pi t / T)]``,
      ``k = 1..frequencies`` (``period`` is ``T``), so ``f`` can bend more over time;
    * ``"concatsquash"``: ``(W h + b) * sigmoid(a t + c) + d t`` (FFJORD's default layer).

    Args:
        dim: dimension ``D`` of ``z``.
        hidden: width of the hidden layers (an int, or a sequence of widths).
        layers: number of hidden layers when ``hidden`` is an int.
        time_embedding: ``"concat"``, ``"fourier"`` or ``"concatsquash"``.
        activation: ``"tanh"`` (FFJORD's choice in 2-D), ``"softplus"``, ``"elu"``, ``"swish"``.
        frequencies: number of Fourier frequencies for ``"fourier"``.
        period: the time scale of the Fourier features (usually the CNF's ``T``).
        zero_init: start the last layer at zero, so the flow starts as the identity.

    Example:
        >>> net = ODENet(2, hidden=64, layers=3)
        >>> net(torch.tensor(0.5), torch.randn(10, 2)).shape
        torch.Size([10, 2])
    """

    def __init__(
        self,
        dim: int,
        hidden: int | Sequence[int] = 64,
        layers: int = 3,
        time_embedding: str = "concat",
        activation: str = "tanh",
        frequencies: int = 4,
        period: float = 1.0,
        zero_init: bool = False,
    ):
        super().__init__()
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(
                f"time_embedding must be one of {TIME_EMBEDDINGS}, got {time_embedding!r}"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        widths = [hidden] * layers if isinstance(hidden, int) else list(hidden)
        self.dim = dim
        self.time_embedding = time_embedding
        self.activation = activation
        self.frequencies = frequencies if time_embedding == "fourier" else 0
        self.period = float(period)
        n_time = 1 + 2 * self.frequencies
        sizes = [dim, *widths, dim]
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)
        if time_embedding == "concatsquash":
            self.gates = nn.ModuleList(nn.Linear(n_time, b) for b in sizes[1:])
            self.time_shifts = nn.ModuleList(nn.Linear(n_time, b, bias=False) for b in sizes[1:])
        else:
            # W [h, tf] + b == W_h h + (W_t tf + b): the time part is computed once per call.
            self.time_shifts = nn.ModuleList(nn.Linear(n_time, b, bias=False) for b in sizes[1:])
        if zero_init:
            last = self.linears[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            nn.init.zeros_(self.time_shifts[-1].weight)

    def time_features(self, t: Tensor, like: Tensor) -> Tensor:
        """``(1, n_time)`` features of the scalar time ``t``."""
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(1, 1)
        if not self.frequencies:
            return t
        k = torch.arange(1, self.frequencies + 1, dtype=like.dtype, device=like.device)
        angle = math.pi * t * k / self.period
        return torch.cat([t, torch.sin(angle), torch.cos(angle)], dim=1)

    def forward_with_jacobian(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(t, z), J)`` with ``J[b, j, i] = d f_i / d z_j`` (shape ``(B, D, D)``).

        Forward-mode chain rule through the layers: ``D + 1`` matrix products per layer and
        only first-order autograd afterwards, cheaper than ``D`` double-backward passes for
        small ``D``. Used by :class:`CNF` for the exact trace when available.
        """
        tf = self.time_features(t, z)
        deriv = _DERIVATIVES[self.activation]
        h = z
        jac = torch.eye(self.dim, dtype=z.dtype, device=z.device).expand(z.shape[0], -1, -1)
        last = len(self.linears) - 1
        for i, linear in enumerate(self.linears):
            pre = linear(h)
            jac = jac @ linear.weight.t()
            if self.time_embedding == "concatsquash":
                gate = torch.sigmoid(self.gates[i](tf))
                pre = pre * gate + self.time_shifts[i](tf)
                jac = jac * gate.unsqueeze(1)
            else:
                pre = pre + self.time_shifts[i](tf)
            if i < last:
                h, slope = deriv(pre)
                jac = jac * slope.unsqueeze(1)
            else:
                h = pre
        return h, jac

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        tf = self.time_features(t, z)
        act = _ACTIVATIONS[self.activation]
        h = z
        last = len(self.linears) - 1
        for i, linear in enumerate(self.linears):
            if self.time_embedding == "concatsquash":
                h = linear(h) * torch.sigmoid(self.gates[i](tf)) + self.time_shifts[i](tf)
            else:
                h = linear(h) + self.time_shifts[i](tf)
            if i < last:
                h = act(h)
        return h


# --------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------
def _with_grad_input(z: Tensor, create_graph: bool) -> Tensor:
    # Without a graph to build, differentiate a detached copy: this also avoids views that
    # torchdiffeq makes in no-grad mode (the adjoint's backward), which autograd cannot use.
    if create_graph and z.requires_grad:
        return z
    return z.detach().requires_grad_(True)


def _exact(f, z, t, create_graph: bool, frobenius: bool):
    with torch.enable_grad():
        z = _with_grad_input(z, create_graph)
        dz = f(t, z)
        div = dz.new_zeros(dz.shape[0])
        frob = dz.new_zeros(dz.shape[0]) if frobenius else None
        flat_dz = dz.reshape(dz.shape[0], -1)
        for i in range(flat_dz.shape[1]):
            # row i of the Jacobian, for every sample at once (samples do not interact)
            (row,) = torch.autograd.grad(
                flat_dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True
            )
            row = row.reshape(z.shape[0], -1)
            div = div + row[:, i]
            if frobenius:
                frob = frob + row.pow(2).sum(1)
    return dz, div, frob


def _hutchinson(f, z, t, noise, create_graph: bool):
    with torch.enable_grad():
        z = _with_grad_input(z, create_graph)
        dz = f(t, z)
        (e_jac,) = torch.autograd.grad(dz, z, grad_outputs=noise, create_graph=create_graph)
        div = (e_jac * noise).reshape(z.shape[0], -1).sum(1)
        frob = e_jac.pow(2).reshape(z.shape[0], -1).sum(1)
    return dz, div, frob


def exact_divergence(
    f: Callable[[Tensor, Tensor], Tensor],
    z: Tensor,
    t: Tensor | float,
    create_graph: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """``(f(t, z), tr df/dz)`` with the trace summed from ``D`` autograd diagonal entries.

    One backward pass per dimension: fine in 2-D, ``O(D)`` passes in general. ``create_graph``
    (default: whether grad mode is on) keeps the graph so the trace can be differentiated.

    Example:
        >>> f = lambda t, z: 3 * z
        >>> dz, div = exact_divergence(f, torch.randn(4, 2), 0.0)
        >>> div
        tensor([6., 6., 6., 6.])
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    dz, div, _ = _exact(f, z, t, create_graph, frobenius=False)
    return dz, div


def hutchinson_divergence(
    f: Callable[[Tensor, Tensor], Tensor],
    z: Tensor,
    t: Tensor | float,
    noise: Tensor,
    create_graph: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """``(f(t, z), eps^T (df/dz) eps)``: Hutchinson's unbiased estimate of the trace.

    ``noise`` (``eps``, shape of ``z``) must satisfy ``E[eps eps^T] = I`` (Rademacher or standard
    Gaussian, see :func:`sample_noise`); one vector-Jacobian product per call, whatever ``D``.

    Example:
        >>> f = lambda t, z: 3 * z
        >>> z = torch.randn(4, 2)
        >>> dz, div = hutchinson_divergence(f, z, 0.0, sample_noise(z))
        >>> div                                   # exact for f = a z with Rademacher noise
        tensor([6., 6., 6., 6.])
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    dz, div, _ = _hutchinson(f, z, t, noise, create_graph)
    return dz, div


def sample_noise(like: Tensor, kind: str = "rademacher") -> Tensor:
    """Noise shaped like ``like`` with ``E[eps eps^T] = I``: ``"rademacher"`` or ``"gaussian"``."""
    if kind == "rademacher":
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn_like(like)
    raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {kind!r}")


# --------------------------------------------------------------------------------------------
# The augmented dynamics
# --------------------------------------------------------------------------------------------
class _Dynamics(nn.Module):
    """``d/dt [z, delta_logp, (kinetic, jacobian)] = [f, -div f, (||f||^2, ||df/dz||_F^2)]``."""

    def __init__(self, odefunc: nn.Module):
        super().__init__()
        self.odefunc = odefunc
        self.divergence = "exact"
        self.analytic = False
        self.noise: Tensor | None = None
        self.regularize = False
        self.nfe = 0

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.nfe += 1
        z = state[0]
        create_graph = torch.is_grad_enabled()
        if self.divergence == "exact" and self.analytic:
            dz, jac = self.odefunc.forward_with_jacobian(t, z)
            div = torch.diagonal(jac, dim1=1, dim2=2).sum(1)
            frob = jac.pow(2).sum((1, 2)) if self.regularize else None
        elif self.divergence == "exact":
            dz, div, frob = _exact(self.odefunc, z, t, create_graph, frobenius=self.regularize)
        else:
            dz, div, frob = _hutchinson(self.odefunc, z, t, self.noise, create_graph)
        if not create_graph:
            dz, div = dz.detach(), div.detach()
        out = (dz, -div)
        if self.regularize:
            kinetic = dz.pow(2).reshape(z.shape[0], -1).sum(1)
            if not create_graph:
                kinetic, frob = kinetic.detach(), frob.detach()
            out = out + (kinetic, frob)
        return out


# --------------------------------------------------------------------------------------------
# The continuous flow
# --------------------------------------------------------------------------------------------
class CNF(Flow):
    """A continuous normalizing flow ``dz/dt = f(t, z)``: data at ``t = 0``, noise at ``t = T``.

    ``forward(x) -> (z, log|det dz/dx|)`` integrates from ``0`` to ``T`` and
    ``inverse(z) -> (x, log|det dx/dz|)`` from ``T`` back to ``0``; both solve the augmented ODE
    ``d[z, delta_logp]/dt = [f, -div f]`` with torchdiffeq.

    Args:
        odefunc: the ODE function, called as ``odefunc(t, z)`` (e.g. :class:`ODENet`).
        T: end time.
        train_T: learn ``T`` (FFJORD's ``train_T``); kept positive as ``T = s^2``.
        method: a torchdiffeq solver: ``"dopri5"`` (adaptive), ``"rk4"``, ``"euler"``,
            ``"midpoint"``, ... (``solver=`` is accepted as an alias).
        rtol, atol: tolerances of adaptive solvers.
        steps: number of steps over ``[0, T]`` for fixed-step solvers (default 8); a part
            ``[t0, t1]`` gets ``ceil(|t1 - t0| / (T / steps))`` equal steps.
        step_size: alternatively, the step size of fixed-step solvers.
        divergence: ``"exact"`` (:func:`exact_divergence`) or ``"hutchinson"``
            (:func:`hutchinson_divergence`, noise drawn once per solve).
        noise: ``"rademacher"`` or ``"gaussian"`` (for ``"hutchinson"``).
        adjoint: backpropagate with the adjoint method (:func:`torchdiffeq.odeint_adjoint`,
            memory independent of the number of steps) instead of through the solver.
        kinetic_energy, jacobian_norm: coefficients of the regularisers of Finlay et al. 2020,
            ``int ||f||^2 dt`` and ``int ||df/dz||_F^2 dt`` (exact with ``divergence="exact"``,
            Hutchinson's estimate ``||eps^T J||^2`` otherwise). When either is non-zero every
            solve accumulates both as extra states; :attr:`last_regularization` holds them per
            sample and :meth:`regularization_loss` the weighted batch mean to add to the loss.
        track_regularization: accumulate the two integrals even with zero coefficients.
        exact_trace: how ``divergence="exact"`` gets the diagonal: ``"autograd"`` (``D``
            backward passes, :func:`exact_divergence`), ``"analytic"`` (the odefunc's
            ``forward_with_jacobian``, e.g. :meth:`ODENet.forward_with_jacobian`) or
            ``"auto"`` (analytic when the odefunc has it).

    Attributes:
        nfe: function evaluations of the last solve (the counter is reset per solve).
        nfe_backward: evaluations made since then by the adjoint backward pass.
        last_regularization: ``{"kinetic": (B,), "jacobian": (B,)}`` of the last solve, or ``{}``.

    Example:
        >>> cnf = CNF(ODENet(2), T=1.0, method="rk4", steps=8)
        >>> z, log_det = cnf(torch.randn(16, 2))
        >>> x, inv_log_det = cnf.inverse(z)       # x close to the input, inv_log_det ~ -log_det
        >>> cnf.nfe                                # 8 steps of 4 evaluations
        32
    """

    def __init__(
        self,
        odefunc: nn.Module,
        T: float = 1.0,
        train_T: bool = False,
        method: str | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        steps: int | None = None,
        step_size: float | None = None,
        divergence: str = "exact",
        noise: str = "rademacher",
        adjoint: bool = False,
        kinetic_energy: float = 0.0,
        jacobian_norm: float = 0.0,
        track_regularization: bool = False,
        exact_trace: str = "auto",
        solver: str | None = None,
    ):
        super().__init__()
        if method is not None and solver is not None and method != solver:
            raise ValueError("give either method= or solver=, not both")
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
        if T <= 0:
            raise ValueError(f"T must be positive, got {T}")
        self.odefunc = odefunc
        self.dynamics = _Dynamics(odefunc)
        self.train_T = train_T
        if train_T:
            self.sqrt_T = nn.Parameter(torch.tensor(math.sqrt(T)))
        else:
            # float64 so that T survives exactly in float64 solves (1.3 in float32 is 1.29999995,
            # a 5e-8 relative error in every state); solves cast it to the state's dtype.
            self.register_buffer("_T", torch.tensor(float(T), dtype=torch.float64))
        self.method = method or solver or "dopri5"
        self.rtol = rtol
        self.atol = atol
        self.steps = steps
        self.step_size = step_size
        self.divergence = divergence
        self.noise = noise
        self.adjoint = adjoint
        self.kinetic_energy = kinetic_energy
        self.jacobian_norm = jacobian_norm
        self.track_regularization = track_regularization
        self.exact_trace = exact_trace
        self.nfe = 0
        self.last_regularization: dict[str, Tensor] = {}

    # -- settings ------------------------------------------------------------------------------
    @property
    def T(self) -> Tensor:
        """The end time, a 0-d tensor (a parameter when ``train_T``)."""
        return self.sqrt_T**2 if self.train_T else self._T

    @property
    def solver(self) -> str:
        """Alias of :attr:`method`."""
        return self.method

    @solver.setter
    def solver(self, value: str) -> None:
        self.method = value

    @property
    def regularized(self) -> bool:
        """Whether solves accumulate the kinetic-energy and Jacobian integrals."""
        return bool(self.kinetic_energy or self.jacobian_norm or self.track_regularization)

    @property
    def nfe_backward(self) -> int:
        """Evaluations by the adjoint backward pass since the last solve (0 without adjoint)."""
        return self.dynamics.nfe - self.nfe

    @contextlib.contextmanager
    def settings(self, **overrides) -> Iterator[CNF]:
        """Change solver settings for a while: ``with cnf.settings(rtol=1e-7):``."""
        if "solver" in overrides:
            overrides["method"] = overrides.pop("solver")
        unknown = set(overrides) - {
            "method", "rtol", "atol", "steps", "step_size", "divergence", "noise", "adjoint",
            "track_regularization", "exact_trace",
        }
        if unknown:
            raise ValueError(f"unknown CNF settings: {sorted(unknown)}")
        saved = {name: getattr(self, name) for name in overrides}
        try:
            for name, value in overrides.items():
                setattr(self, name, value)
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def _fixed_grid(self, t: Tensor) -> Tensor:
        """Each interval of ``t`` cut into equal steps no longer than the step size; ends exact."""
        if self.step_size is not None:
            h = float(self.step_size)
        else:
            h = float(self.T.detach()) / (self.steps or 8)
        pieces = [t[:1]]
        for a, b in zip(t[:-1], t[1:], strict=True):
            n = max(1, math.ceil(abs(float(b - a)) / h - 1e-6))
            frac = torch.arange(1, n, dtype=t.dtype, device=t.device) / n
            pieces.extend([a + (b - a) * frac, b.reshape(1)])
        return torch.cat(pieces)

    # -- solving -------------------------------------------------------------------------------
    def _times(self, times: Sequence[float] | Tensor, like: Tensor) -> Tensor:
        if isinstance(times, Tensor):
            return times.to(dtype=like.dtype, device=like.device)
        parts = [torch.as_tensor(s, dtype=like.dtype, device=like.device).reshape(1) for s in times]
        return torch.cat(parts)

    def solve(self, x: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
        """Integrate from ``times[0]`` through every later entry of ``times`` (monotone).

        Returns ``(states, log_det)``: ``states`` of shape ``(len(times), *x.shape)`` and
        ``log_det`` of shape ``(len(times), B)`` with ``log|det dz(times[k]) / dz(times[0])|``.
        Resets :attr:`nfe` and sets :attr:`last_regularization` (integrals over the whole span).
        """
        dyn = self.dynamics
        dyn.divergence = self.divergence
        if self.exact_trace not in ("auto", "autograd", "analytic"):
            raise ValueError(
                f"exact_trace must be 'auto', 'autograd' or 'analytic', got {self.exact_trace!r}"
            )
        has_jacobian = hasattr(self.odefunc, "forward_with_jacobian") and x.dim() == 2
        if self.exact_trace == "analytic" and not has_jacobian:
            raise ValueError(
                "exact_trace='analytic' needs an odefunc with forward_with_jacobian(t, z)"
            )
        dyn.analytic = self.exact_trace != "autograd" and has_jacobian
        dyn.regularize = self.regularized
        dyn.noise = sample_noise(x, self.noise) if self.divergence == "hutchinson" else None
        dyn.nfe = 0
        zeros = x.new_zeros(x.shape[0])
        state: tuple[Tensor, ...] = (x, zeros)
        if dyn.regularize:
            state = state + (zeros, zeros)
        options = None
        if self.method in FIXED_STEP_METHODS:
            options = {"grid_constructor": lambda func, y0, t: self._fixed_grid(t)}
        kwargs = dict(rtol=self.rtol, atol=self.atol, method=self.method, options=options)
        if self.adjoint:
            params = tuple(p for p in self.odefunc.parameters() if p.requires_grad)
            out = odeint_adjoint(dyn, state, times, adjoint_params=params, **kwargs)
        else:
            out = odeint(dyn, state, times, **kwargs)
        self.nfe = dyn.nfe
        if dyn.regularize:
            # integrals run with the sign of the time direction; report |int_t0^t1 ...|
            sign = 1.0 if float(times[-1]) >= float(times[0]) else -1.0
            self.last_regularization = {
                "kinetic": sign * out[2][-1],
                "jacobian": sign * out[3][-1],
            }
        else:
            self.last_regularization = {}
        return out[0], -out[1]

    def transform(
        self, x: Tensor, t0: float | Tensor, t1: float | Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Move ``x`` (the state at time ``t0``) to ``t1``: ``(x(t1), log|det dx(t1)/dx(t0)|)``.

        Any times in ``[0, T]`` work in either direction: ``transform(x, 0, T)`` is
        :meth:`forward`, ``transform(z, T, 0)`` is :meth:`inverse`, and
        ``transform(z, T, T / 2)`` is the flow halfway ("layer 1.5").
        """
        states, log_det = self.solve(x, self._times([t0, t1], x))
        return states[-1], log_det[-1]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(x, 0.0, self.T)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(z, self.T, 0.0)

    def sample_path(
        self, z: Tensor, times: Sequence[float] | Tensor | None = None, n: int = 50
    ) -> Tensor:
        """States from noise to data: ``(len(times), B, D)``, the state at each of ``times``.

        ``z`` is the state at ``t = T``; ``times`` (default ``n`` points from ``T`` down to ``0``)
        must be monotone, so ``sample_path(z)[-1]`` equals ``inverse(z)[0]``. Made for the GIF
        of noise flowing into data (:func:`nfcourse.viz.ode_morph_gif`) and sliders over ``t``.
        """
        T = self.T.detach()
        if times is None:
            times = torch.linspace(float(T), 0.0, n, dtype=z.dtype, device=z.device)
        times = self._times(times, z)
        prepend = not torch.isclose(times[0], T.to(times))
        grid = torch.cat([T.to(times).reshape(1), times]) if prepend else times
        states, _ = self.solve(z, grid)
        return states[1:] if prepend else states

    # -- regularisation ------------------------------------------------------------------------
    def regularization_loss(self) -> Tensor:
        """``kinetic_energy * mean(K) + jacobian_norm * mean(J)`` of the last solve (0 if off).

        Add it to the likelihood loss: ``loss = model.loss(x) + cnf.regularization_loss()``.
        """
        reg = self.last_regularization
        if not reg:
            return self.T.new_zeros(())
        kinetic, jacobian = reg["kinetic"].mean(), reg["jacobian"].mean()
        return self.kinetic_energy * kinetic + self.jacobian_norm * jacobian

    def extra_repr(self) -> str:
        if self.method in FIXED_STEP_METHODS and self.step_size:
            step = f", step_size={self.step_size}"
        elif self.method in FIXED_STEP_METHODS:
            step = f", steps={self.steps or 8}"
        else:
            step = f", rtol={self.rtol}, atol={self.atol}"
        return (
            f"T={self.T.item():.3g}{', train_T' if self.train_T else ''}, "
            f"method={self.method!r}{step}, divergence={self.divergence!r}, adjoint={self.adjoint}"
        )


# --------------------------------------------------------------------------------------------
# Builders and checks
# --------------------------------------------------------------------------------------------
def ffjord_2d_defaults() -> dict:
    """The settings of FFJORD's 2-D experiments (``train_toy.py`` of Grathwohl et al. 2019).

    A 64-64-64 ``concatsquash`` tanh network, one CNF block with ``T = 0.5`` learned,
    ``dopri5`` at ``rtol = atol = 1e-5``, the adjoint method, the exact ("brute force")
    divergence computed as FFJORD does, one autograd pass per dimension; Adam with
    ``lr = 1e-3`` and weight decay ``1e-5``. Pass it to :func:`cnf_2d`:
    ``cnf_2d(**ffjord_2d_defaults())``.
    """
    return dict(
        hidden=64,
        layers=3,
        time_embedding="concatsquash",
        activation="tanh",
        T=0.5,
        train_T=True,
        method="dopri5",
        rtol=1e-5,
        atol=1e-5,
        adjoint=True,
        divergence="exact",
        exact_trace="autograd",
    )


#: Optimiser settings that go with :func:`ffjord_2d_defaults`. ``train_toy.py`` trains with
#: batch 100 and evaluates with 1000; ``benchmarks/cnf_gif.py`` trains with 1000.
FFJORD_2D_OPTIMIZER = dict(lr=1e-3, weight_decay=1e-5, batch_size=1000)


#: Training settings that go with :func:`cnf_2d` on 2-D densities (Adam, cosine schedule):
#: ``steps`` in fast mode (``NFCOURSE_FAST=1``), ``steps_full`` otherwise; ``n_points``
#: training points to draw from an image density.
CNF_2D_TRAINING = dict(lr=1e-2, batch_size=256, steps=300, steps_full=2000, n_points=20_000)


def cnf_2d(
    hidden: int | Sequence[int] = 64,
    layers: int = 3,
    time_embedding: str = "concat",
    activation: str = "tanh",
    T: float = 1.0,
    method: str = "rk4",
    steps: int = 8,
    dim: int = 2,
    **cnf_kwargs,
):
    """``FlowModel(CNF(ODENet(...)), StandardNormal((dim,)))`` with fast defaults for 2-D densities.

    Defaults: a 3x64 tanh MLP with the time concatenated to every layer, ``T = 1``, exact trace,
    direct backpropagation, fixed-step RK4 with 8 steps (32 function evaluations per solve).
    Other keyword arguments go to :class:`CNF` (``rtol``, ``atol``, ``adjoint``, ``divergence``,
    ``kinetic_energy``, ...). The CNF is ``model.flow``. Train it with
    :data:`CNF_2D_TRAINING` (Adam lr 1e-2, batch 256, cosine schedule; 300 steps in fast mode
    reach KL ~0.2 nats on the logo density, see ``benchmarks/cnf_gif.py``).

    Example:
        >>> model = cnf_2d()
        >>> model.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
        >>> model.flow.transform(torch.randn(5, 2), 1.0, 0.5)[0].shape   # halfway back to data
        torch.Size([5, 2])
    """
    net = ODENet(dim, hidden=hidden, layers=layers, time_embedding=time_embedding,
                 activation=activation, period=T)
    if method not in FIXED_STEP_METHODS:
        steps = None
    cnf = CNF(net, T=T, method=method, steps=steps, **cnf_kwargs)
    return FlowModel(cnf, StandardNormal((dim,)))


def find_cnf(model: nn.Module) -> CNF:
    """The (first) :class:`CNF` inside ``model``."""
    for module in model.modules():
        if isinstance(module, CNF):
            return module
    raise ValueError("no CNF inside this model")


def regularized_loss(model: nn.Module, x: Tensor) -> Tensor:
    """``model.loss(x)`` plus the regularisation of every CNF inside (see :class:`CNF`).

    Fits :func:`nfcourse.train.fit`'s ``loss_fn``: ``fit(model, data, loss_fn=regularized_loss)``.
    """
    loss = model.loss(x)
    for module in model.modules():
        if isinstance(module, CNF):
            loss = loss + module.regularization_loss()
    return loss


@torch.no_grad()
def validate_log_density(
    model: nn.Module,
    x: Tensor,
    method: str = "dopri5",
    rtol: float = 1e-7,
    atol: float = 1e-7,
    batch_size: int = 2000,
) -> dict[str, float]:
    """Re-evaluate ``model.log_prob(x)`` with a tight adaptive solve and report the gap.

    A CNF trained with a coarse fixed-step solver defines, strictly, the density of that
    discrete map; the continuous model it approximates is what a tight adaptive solver
    computes. If the two disagree the training solver was too coarse and the reported
    likelihood is not the ODE's. Returns the mean log-density under the model's own settings
    (``"train"``) and the tight solve (``"tight"``), ``"gap" = train - tight`` (mean) and
    ``"max_abs_gap"`` per sample, and the function evaluations of each (``"nfe_train"``,
    ``"nfe_tight"``).

    Example:
        >>> report = validate_log_density(model, fresh_samples)      # doctest: +SKIP
        >>> abs(report["gap"]) < 0.05                                 # doctest: +SKIP
    """
    cnf = find_cnf(model)

    def evaluate():
        parts, nfe = [], 0
        for chunk in x.split(batch_size):
            parts.append(model.log_prob(chunk))
            nfe = max(nfe, cnf.nfe)
        return torch.cat(parts), nfe

    train, nfe_train = evaluate()
    with cnf.settings(method=method, rtol=rtol, atol=atol, adjoint=False):
        tight, nfe_tight = evaluate()
    diff = train - tight
    return {
        "train": train.mean().item(),
        "tight": tight.mean().item(),
        "gap": diff.mean().item(),
        "max_abs_gap": diff.abs().max().item(),
        "nfe_train": nfe_train,
        "nfe_tight": nfe_tight,
    }
