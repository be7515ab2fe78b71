"""Self-checks of lesson 06, "Continuous flows (FFJORD) and GIFs".

Each ``check_<exercise>(...)`` prints what is right and what is wrong in plain words and returns
``True`` when everything passed; the matching ``<exercise>_problems(...)`` returns the list of
problems (empty when all is well) and is what the hidden tests assert on. An exception raised by
the answer becomes a problem that says where it happened; nothing here raises because of a
student's mistake.

The contract the lesson asks for (and these checks hold answers to):

* ``ODEFunc(dim=2, hidden=64, layers=3)``: an ``nn.Module`` called as ``f(t, z)`` (torchdiffeq's
  order) with ``t`` a float or 0-d tensor and ``z`` of shape ``(B, dim)``; returns ``dz/dt`` of
  shape ``(B, dim)`` and depends on ``t``.
* ``exact_divergence(f, z, t) -> (dz, div)``: ``dz = f(t, z)`` and ``div = tr(df/dz)`` per sample,
  shape ``(B,)``, differentiable with respect to the parameters of ``f``; works under
  ``torch.no_grad()``.
* ``sample_noise(z)``: noise shaped like ``z`` with ``E[eps] = 0`` and ``E[eps eps^T] = I``;
  ``hutchinson_divergence(f, z, t, noise) -> (dz, eps^T (df/dz) eps)``.
* ``CNF(odefunc, T=1.0, method="rk4", steps=8, rtol=1e-5, atol=1e-5, divergence="exact")``: a
  flow with data at ``t = 0`` and noise at ``t = T``; ``transform(x, t0, t1) -> (x(t1),
  log|det dx(t1)/dx(t0)|)``, ``forward(x) = transform(x, 0, T)``, ``inverse(z) = transform(z,
  T, 0)``, ``log_prob(x) = log N(z(T); 0, I) + log|det dz(T)/dx|``. Its attributes ``method``,
  ``rtol``, ``atol`` choose the solver of every solve (the checks set them to a tight ``dopri5``
  to compare with exact answers).

Training is judged with that tight adaptive solver on fresh samples: a model trained with a few
fixed RK4 steps is only credited with the density of the continuous ODE it stands for.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from nfcourse.checks.core import _describe_exception, reference_advice
from nfcourse.removed import ExerciseRemoved

__all__ = [
    "LinearField",
    "MLPField",
    "THRESHOLDS",
    "threshold",
    "tight_solver",
    "odefunc_problems",
    "exact_divergence_problems",
    "hutchinson_problems",
    "cnf_problems",
    "cnf_jacobian_problems",
    "moons_problems",
    "image_problems",
    "check_odefunc",
    "check_exact_divergence",
    "check_hutchinson",
    "check_cnf",
    "check_moons",
    "check_image",
    "references",
    "held_out_moons",
    "moons_log_prob",
    "logo_density",
    "tight_kl",
]

_LOG_2PI = math.log(2 * math.pi)

#: KL (nats) to the exact density, measured with a tight dopri5 solve on fresh samples, that a
#: trained model must beat: fast mode (a few hundred RK4 steps of training) and full mode.
THRESHOLDS = {
    "fast": {"moons": 0.6, "image": 0.5},
    "full": {"moons": 0.3, "image": 0.35},
}


def threshold(which: str) -> float:
    """The KL bar (nats) of training exercise ``which`` (``"moons"`` or ``"image"``) now."""
    from nfcourse.config import fast_mode

    return THRESHOLDS["fast" if fast_mode() else "full"][which]


def references(exercise: str) -> tuple[str, ...]:
    """The package's reference implementations of ``exercise`` (dotted names): while this
    lesson is graded they are not in the package, so an answer built on one fails there;
    the self-checks say so in advance (:func:`reference_advice`)."""
    refs = {
        "odefunc": ("nfcourse.cnf.ODENet",),
        "exact_divergence": ("nfcourse.cnf.exact_divergence", "nfcourse.cnf.hutchinson_divergence"),
        "hutchinson": ("nfcourse.cnf.hutchinson_divergence", "nfcourse.cnf.sample_noise",
                       "nfcourse.cnf.exact_divergence"),
        "cnf": ("nfcourse.cnf.CNF", "nfcourse.cnf.cnf_2d", "nfcourse.cnf.ODENet"),
    }
    return refs[exercise]


# ------------------------------------------------------------------------------- plumbing
@contextlib.contextmanager
def _quiet_rng(seed: int) -> Iterator[None]:
    """Seed torch for the block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # tiny tensors: one thread is fastest (threads only contend on a busy machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stop(Exception):
    """The answer failed in a way that makes the remaining checks meaningless."""


def _run(what: str, fn: Callable[[], Any], problems: list[str]) -> Any:
    """``fn()``; an exception becomes a problem (and stops the checks of this answer)."""
    try:
        return fn()
    except NotImplementedError as exc:
        if not str(exc):
            problems.append(f"{what}: not implemented yet (replace the `raise "
                            "NotImplementedError()` with your code)")
        else:
            problems.append(_describe_exception(what, exc))
        raise _Stop from exc
    except Exception as exc:  # the answer may raise anything: report it, don't crash
        problems.append(_describe_exception(what, exc))
        raise _Stop from exc


def _advice(answer: Any, exercise: str) -> list[str]:
    """:func:`reference_advice` as a one-line list (empty when none): printed by the
    self-checks, never a problem of the hidden tests.

    Example:
        >>> _advice(object, "odefunc")
        []
    """
    advice = reference_advice(answer, *references(exercise))
    return [] if advice is None else [advice]


def _pair(out: Any, what: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(o, Tensor) for o in out)):
        kind = type(out).__name__
        raise AssertionError(f"{what} must return a tuple of two tensors, got a {kind}")
    return out[0], out[1]


def _report(title: str, problems: list[str]) -> bool:
    if problems:
        print(f"✗ {title}: {len(problems)} problem{'s' * (len(problems) != 1)}")
        for p in problems:
            print("  - " + p.replace("\n", "\n    "))
        return False
    print(f"✓ {title}: all checks passed")
    return True


def _trace_ref(f: Callable, z: Tensor, t: Any, create_graph: bool = False) -> Tensor:
    """``tr(df/dz)`` per sample from the full autograd Jacobian (a loop over samples)."""
    out = []
    for b in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda v, b=b: f(t, v.reshape(1, -1)).reshape(-1), z[b], create_graph=create_graph)
        out.append(torch.diagonal(jac).sum())
    return torch.stack(out)


def _quad_ref(f: Callable, z: Tensor, t: Any, eps: Tensor) -> Tensor:
    """``eps^T (df/dz) eps`` per sample from the full autograd Jacobian."""
    out = []
    for b in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda v, b=b: f(t, v.reshape(1, -1)).reshape(-1), z[b])
        out.append(eps[b] @ jac @ eps[b])
    return torch.stack(out)


# ------------------------------------------------------------------------------ test fields
class LinearField(nn.Module):
    """``f(t, z) = t^power A z``: the flow is ``exp(A (t1^(p+1) - t0^(p+1)) / (p+1))``, exactly.

    Its divergence is ``t^power tr A`` everywhere, so the log-det of any solve is known in
    closed form (:meth:`exact`).
    """

    def __init__(self, A: Tensor, power: int = 0):
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.power = int(power)
        self.calls = 0

    def forward(self, t: Any, z: Tensor) -> Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        return t**self.power * (z @ self.A.t())

    @torch.no_grad()
    def exact(self, x: Tensor, t0: float, t1: float) -> tuple[Tensor, Tensor]:
        """``(x(t1), log|det dx(t1)/dx(t0)|)`` for states ``x`` at ``t0``, in closed form."""
        p = self.power + 1
        s = (t1**p - t0**p) / p
        M = torch.linalg.matrix_exp(self.A.detach() * s)
        log_det = torch.full((x.shape[0],), float(torch.trace(self.A.detach())) * s,
                             dtype=x.dtype)
        return x @ M.t(), log_det


class MLPField(nn.Module):
    """A small smooth time-dependent field ``f(t, z) = W2 tanh(W1 z + c t + b1) + b2`` (float64)."""

    def __init__(self, dim: int = 2, hidden: int = 8, seed: int = 0, scale: float = 0.8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape):
            return nn.Parameter(scale * torch.randn(*shape, generator=g, dtype=torch.float64))

        self.W1, self.b1, self.c = rnd(hidden, dim), rnd(hidden), rnd(hidden)
        self.W2, self.b2 = rnd(dim, hidden), rnd(dim)

    def forward(self, t: Any, z: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        return torch.tanh(z @ self.W1.t() + self.b1 + t * self.c) @ self.W2.t() + self.b2


def _random_matrix(dim: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.6 * torch.randn(dim, dim, generator=g, dtype=torch.float64)


def _points(n: int, dim: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------- Exercise 1
def odefunc_problems(cls: Callable[..., nn.Module], seed: int = 0) -> list[str]:
    """Problems of an ``ODEFunc`` class: builds, shapes, float64, depends on ``t``, samples
    independent, gradients reach every parameter, and ``layers`` / ``hidden`` set depth and
    width, for every dimension of :data:`ODE_DIMS`."""
    problems: list[str] = []
    try:
        with _one_thread(), _quiet_rng(seed):
            _odefunc_checks(cls, problems)
    except _Stop:
        pass
    return problems


#: dimensions every ODEFunc check builds: one and several, odd and even
ODE_DIMS = (1, 2, 3)


def _trainable_size(f: nn.Module) -> int:
    return sum(p.numel() for p in f.parameters() if p.requires_grad)


def _odefunc_size_checks(cls, problems: list[str]) -> None:
    """``layers`` sets the depth and ``hidden`` the width: more of either, more weights."""
    for dim in ODE_DIMS:
        sizes = {}
        for hidden, layers in ((16, 1), (16, 2), (16, 3), (5, 2)):
            f = _run(f"ODEFunc(dim={dim}, hidden={hidden}, layers={layers})",
                     lambda d=dim, h=hidden, n=layers: cls(dim=d, hidden=h, layers=n), problems)
            sizes[hidden, layers] = _trainable_size(f) if isinstance(f, nn.Module) else 0
        if not sizes[16, 1] < sizes[16, 2] < sizes[16, 3]:
            problems.append(f"ODEFunc(dim={dim}, hidden=16, layers=1, 2, 3) have "
                            f"{sizes[16, 1]}, {sizes[16, 2]} and {sizes[16, 3]} trainable "
                            "numbers: `layers` must set the network's depth")
            raise _Stop
        if not sizes[5, 2] < sizes[16, 2]:
            problems.append(f"ODEFunc(dim={dim}, hidden=5, layers=2) has {sizes[5, 2]} trainable "
                            f"numbers, hidden=16 {sizes[16, 2]}: `hidden` must set the width")
            raise _Stop


def _odefunc_checks(cls, problems: list[str]) -> None:
    _odefunc_size_checks(cls, problems)
    for dim in ODE_DIMS:
        f = _run(f"ODEFunc(dim={dim}, hidden=16, layers=2)",
                 lambda dim=dim: cls(dim=dim, hidden=16, layers=2), problems)
        if not isinstance(f, nn.Module):
            problems.append(f"ODEFunc(...) built a {type(f).__name__}, not an nn.Module")
            raise _Stop
        # nudge every parameter: a zero-initialised last layer would hide the time dependence
        with torch.no_grad():
            for p in f.parameters():
                if p.requires_grad:  # a frozen parameter is a constant of the answer
                    p.add_(0.3 * torch.randn_like(p))
        z = torch.randn(5, dim)
        for t in (0.3, torch.tensor(0.3)):
            out = _run(f"f(t, z) with t = {t!r} and z of shape (5, {dim})",
                       lambda t=t, f=f, z=z: f(t, z), problems)
            if not isinstance(out, Tensor) or tuple(out.shape) != (5, dim):
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                problems.append(f"f(t, z) for z of shape (5, {dim}) returned {shape}; it must "
                                f"return dz/dt of shape (5, {dim})")
                raise _Stop
        f64 = copy.deepcopy(f).double()
        out64 = _run("f(t, z) in float64", lambda f64=f64, z=z: f64(0.5, z.double()), problems)
        if out64.dtype != torch.float64:
            problems.append(f"after .double(), float64 input gave {out64.dtype} output: build "
                            "the time input from z (torch.full_like, z.new_full, t.to(z))")
        with torch.no_grad():
            outs = [f(t, z) for t in (0.0, 0.5, 1.0)]
        change = max(float((o - outs[0]).abs().max()) for o in outs[1:])
        if change < 1e-6:
            problems.append("f(t, z) does not change with t (f(0, z), f(0.5, z) and f(1, z) are "
                            "equal for random weights): feed the time to the network, e.g. "
                            "concatenate a column of t to the input of every layer")
            raise _Stop
        with torch.no_grad():
            z2 = z.clone()
            z2[0] += 1.0
            moved = float((f(0.5, z2)[1:] - f(0.5, z)[1:]).abs().max())
        if moved > 1e-6:
            problems.append("changing one sample changed the output for other samples: each "
                            "row of z must be processed on its own (no batch statistics)")
        f.zero_grad()
        _run("backward through f", lambda f=f, z=z: f(0.5, z).pow(2).sum().backward(), problems)
        missing = [n for n, p in f.named_parameters() if p.grad is None or not p.grad.any()]
        if missing:
            problems.append(f"no gradient reaches the parameters {missing}")
        if not list(f.parameters()):
            problems.append("ODEFunc has no parameters: build its layers in __init__")


def check_odefunc(cls: Callable[..., nn.Module]) -> bool:
    """Print the self-check of exercise 1 (``ODEFunc``)."""
    return _report("ODEFunc", _advice(cls, "odefunc") + odefunc_problems(cls))


# ---------------------------------------------------------------------------- Exercise 2
def _div_fields(seed: int) -> list[tuple[str, nn.Module, int]]:
    fields: list[tuple[str, nn.Module, int]] = []
    for k, dim in enumerate((2, 3, 5)):
        fields.append((f"the linear field f = A z in {dim}-D", LinearField(
            _random_matrix(dim, seed + k)), dim))
    fields.append(("the field f = t A z (depends on t)",
                   LinearField(_random_matrix(3, seed + 7), power=1), 3))
    fields.append(("a small tanh network field in 2-D", MLPField(2, seed=seed), 2))
    fields.append(("a small tanh network field in 4-D", MLPField(4, seed=seed + 1), 4))
    return fields


def exact_divergence_problems(fn: Callable, seed: int = 0) -> list[str]:
    """Problems of ``exact_divergence(f, z, t) -> (dz, div)`` against the autograd Jacobian's
    trace in float64 (several fields and dimensions), its gradient with respect to the field's
    parameters, and a call under ``torch.no_grad()``."""
    problems: list[str] = []
    try:
        with _one_thread(), _quiet_rng(seed):
            _divergence_checks(fn, problems, seed, "exact_divergence(f, z, t)",
                               lambda f, z, t: fn(f, z, t), _trace_ref, "tr(df/dz)")
    except _Stop:
        pass
    return problems


def _divergence_checks(fn, problems, seed, name, call, reference, what) -> None:
    t = 0.7
    for label, field, dim in _div_fields(seed):
        z = _points(6, dim, seed + dim)
        dz, div = _pair(_run(f"{name} on {label}", lambda field=field, z=z: call(field, z, t),
                             problems), name)
        if tuple(dz.shape) != (6, dim) or tuple(div.shape) != (6,):
            problems.append(f"on {label} with z of shape (6, {dim}): dz has shape "
                            f"{tuple(dz.shape)} (expected (6, {dim})), the divergence "
                            f"{tuple(div.shape)} (expected (6,): one number per sample)")
            raise _Stop
        with torch.no_grad():
            expected_dz = field(t, z)
        if not torch.allclose(dz.detach(), expected_dz, atol=1e-9, rtol=1e-9):
            problems.append(f"on {label}: dz is not f(t, z) (max difference "
                            f"{float((dz.detach() - expected_dz).abs().max()):.3g})")
            raise _Stop
        ref = reference(field, z, t).detach()
        got = div.detach()
        if got.dtype != torch.float64:
            problems.append(f"float64 input gave a {got.dtype} divergence: create the running "
                            "sum from z (z.new_zeros, torch.zeros(..., dtype=z.dtype))")
            raise _Stop
        err = float((got - ref).abs().max())
        if err > 1e-7 * (1 + float(ref.abs().max())):
            if torch.allclose(got, -ref, atol=1e-7, rtol=1e-7) and float(ref.abs().max()) > 1e-6:
                hint = ("it is minus the expected value: return +tr(df/dz); the minus sign "
                        "belongs in the log-density's ODE, not here")
            elif "t A z" in label:
                hint = "pass the time t to f: f(t, z)"
            else:
                hint = "sum the diagonal of the Jacobian, d f_i / d z_i, for every i"
            problems.append(f"on {label}: got {got[:3].tolist()}, expected {what} = "
                            f"{ref[:3].tolist()} (max error {err:.3g}); {hint}")
            raise _Stop
    # differentiable with respect to the field's parameters (needed to train)
    field = MLPField(3, seed=seed + 3)
    z = _points(4, 3, seed + 11)
    _, div = _pair(_run(f"{name} on a tanh network field", lambda: call(field, z, t), problems),
                   name)
    if not div.requires_grad:
        problems.append("the divergence carries no gradient: keep the graph with "
                        "torch.autograd.grad(..., create_graph=True) so training can "
                        "differentiate it")
        raise _Stop
    params = list(field.parameters())
    got_g = torch.autograd.grad(div.sum(), params, allow_unused=True)
    ref_g = torch.autograd.grad(reference(field, z, t, create_graph=True).sum(), params,
                                allow_unused=True)
    for (pname, _), a, b in zip(field.named_parameters(), got_g, ref_g, strict=True):
        a = torch.zeros_like(_) if a is None else a
        b = torch.zeros_like(_) if b is None else b
        if not torch.allclose(a, b, atol=1e-7, rtol=1e-6):
            problems.append(f"the gradient of the divergence with respect to the field's "
                            f"parameter {pname} is wrong (max error "
                            f"{float((a - b).abs().max()):.3g}): use create_graph=True and no "
                            ".detach() on the way")
            raise _Stop
    # evaluation code calls it without gradients (under torch.no_grad)
    with torch.no_grad():
        out = _run(f"{name} under torch.no_grad()", lambda: call(field, z, t), problems)
    _, div_ng = _pair(out, name)
    if not torch.allclose(div_ng.detach(), div.detach(), atol=1e-9, rtol=1e-9):
        problems.append("under torch.no_grad() the divergence changes: wrap the autograd part in "
                        "`with torch.enable_grad():` and make z require grad inside")


def check_exact_divergence(fn: Callable) -> bool:
    """Print the self-check of exercise 2 (``exact_divergence``)."""
    return _report("exact_divergence",
                   _advice(fn, "exact_divergence") + exact_divergence_problems(fn))


# ---------------------------------------------------------------------------- Exercise 3
def noise_problems(sample_noise: Callable, seed: int = 0, n: int = 40_000) -> list[str]:
    """Problems of ``sample_noise(z)``: shape and dtype of ``z``, ``E[eps] = 0`` and
    ``E[eps eps^T] = I`` (estimated from ``n`` draws), fresh noise on every call."""
    problems: list[str] = []
    try:
        with _one_thread(), _quiet_rng(seed):
            z = torch.randn(n, 3, dtype=torch.float64)
            eps = _run("sample_noise(z)", lambda: sample_noise(z), problems)
            if not isinstance(eps, Tensor) or eps.shape != z.shape:
                shape = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
                problems.append(f"sample_noise(z) for z of shape {tuple(z.shape)} returned "
                                f"{shape}; it must have z's shape")
                raise _Stop
            if eps.dtype != z.dtype:
                problems.append(f"sample_noise(z) returned {eps.dtype} for {z.dtype} z: use z's "
                                "dtype (torch.randn_like(z), or .to(z.dtype))")
            e = eps.double()
            mean = e.mean(0)
            second = e.t() @ e / n
            err_mean = float(mean.abs().max())
            err_second = float((second - torch.eye(3, dtype=torch.float64)).abs().max())
            if err_mean > 0.05 or err_second > 0.05:
                problems.append(
                    f"the noise does not have E[eps] = 0 and E[eps eps^T] = I: over {n} draws "
                    f"the mean is {[round(v, 3) for v in mean.tolist()]} and E[eps eps^T] is "
                    f"{[[round(v, 3) for v in row] for row in second.tolist()]}; Hutchinson's "
                    "estimator is only unbiased with such noise: use Rademacher signs +-1 or "
                    "standard normal noise (torch.randn_like)")
            again = sample_noise(z[:100])
            if torch.equal(again.double(), e[:100]) or float(e[:100].std()) == 0:
                problems.append("sample_noise returned the same numbers twice: draw fresh noise "
                                "on every call")
    except _Stop:
        pass
    return problems


def hutchinson_problems(fn: Callable, sample_noise: Callable, seed: int = 0,
                        draws: int = 4000) -> list[str]:
    """Problems of ``hutchinson_divergence(f, z, t, noise)``: with given noise it equals
    ``eps^T (df/dz) eps`` (float64, autograd Jacobian) with the right gradients; with
    ``sample_noise`` its mean over ``draws`` draws matches the exact trace (unbiased)."""
    problems: list[str] = []
    found = len(problems)
    try:
        with _one_thread(), _quiet_rng(seed):
            g = torch.Generator().manual_seed(seed + 5)
            holder: dict[str, Tensor] = {}

            def call(f, z, t):
                if holder.get("z") is not z:
                    holder["z"] = z
                    holder["eps"] = torch.randn(z.shape, generator=g, dtype=z.dtype)
                return fn(f, z, t, holder["eps"])

            def reference(f, z, t, create_graph=False):
                eps = holder["eps"] if holder.get("z") is z else None
                if eps is None:
                    raise RuntimeError("internal: no noise for this z")
                if not create_graph:
                    return _quad_ref(f, z, t, eps)
                with torch.enable_grad():
                    zz = z.detach().requires_grad_(True)
                    (vjp,) = torch.autograd.grad(f(t, zz), zz, eps, create_graph=True)
                    return (vjp * eps).sum(1)

            _divergence_checks(fn, problems, seed, "hutchinson_divergence(f, z, t, noise)",
                               call, reference, "eps^T (df/dz) eps")
            if len(problems) > found:
                return problems
            # unbiased with the student's own noise: the mean over many draws is the trace
            for label, field, dim in (("a small tanh network field in 2-D",
                                       MLPField(2, seed=seed + 2), 2),
                                      ("the linear field f = A z in 3-D",
                                       LinearField(_random_matrix(3, seed + 9)), 3)):
                z0 = _points(2, dim, seed + 13)
                for b in range(z0.shape[0]):
                    z = z0[b:b + 1].expand(draws, dim).clone()
                    eps = _run("sample_noise(z)", lambda z=z: sample_noise(z), problems)
                    with torch.no_grad():
                        _, est = _pair(_run("hutchinson_divergence with sample_noise(z)",
                                            lambda z=z, eps=eps, field=field:
                                            fn(field, z, 0.4, eps), problems),
                                       "hutchinson_divergence")
                    exact = float(_trace_ref(field, z0[b:b + 1], 0.4)[0])
                    est = est.detach().double()
                    mean, se = float(est.mean()), float(est.std()) / math.sqrt(draws)
                    if abs(mean - exact) > max(6 * se, 1e-3 * (1 + abs(exact))):
                        problems.append(
                            f"on {label}: the mean of {draws} Hutchinson estimates with "
                            f"sample_noise is {mean:.4f} (standard error {se:.4f}) but the exact "
                            f"trace is {exact:.4f}: the estimate is biased; check that the noise "
                            "has E[eps eps^T] = I and that you compute eps^T (df/dz) eps")
                        raise _Stop
    except _Stop:
        pass
    return problems


def check_hutchinson(fn: Callable, sample_noise: Callable) -> bool:
    """Print the self-check of exercise 3 (``sample_noise`` and ``hutchinson_divergence``)."""
    ok = _report("sample_noise", noise_problems(sample_noise))
    return _report("hutchinson_divergence",
                   _advice(fn, "hutchinson") + hutchinson_problems(fn, sample_noise)) and ok


# ---------------------------------------------------------------------------- Exercise 4
@contextlib.contextmanager
def tight_solver(model: Any, method: str = "dopri5", rtol: float = 1e-7,
                 atol: float = 1e-7) -> Iterator[Any]:
    """Within the block, every module of ``model`` with a ``method`` attribute (a CNF) solves
    with ``method`` at ``rtol``/``atol``; the settings are put back afterwards."""
    mods = [m for m in (model.modules() if isinstance(model, nn.Module) else [model])
            if hasattr(m, "method") and hasattr(m, "rtol") and hasattr(m, "atol")]
    saved = [(m, m.method, m.rtol, m.atol) for m in mods]
    try:
        for m in mods:
            m.method, m.rtol, m.atol = method, rtol, atol
        yield model
    finally:
        for m, a, b, c in saved:
            m.method, m.rtol, m.atol = a, b, c


def _std_normal(z: Tensor) -> Tensor:
    return -0.5 * (z.pow(2).sum(1) + z.shape[1] * _LOG_2PI)


def _build_cnf(cls, field, problems, **kwargs):
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return _run(f"CNF(odefunc, {args})", lambda: cls(field, **kwargs), problems)


def cnf_problems(cls: Callable[..., Any], seed: int = 0) -> list[str]:
    """Problems of a ``CNF`` class on linear fields, where every answer is known in closed form
    (float64, tight ``dopri5``): ``forward``, ``inverse``, ``transform`` to an intermediate time,
    ``log_prob`` (data at ``t = 0``), a time-dependent field, and agreement with the reference
    :class:`nfcourse.cnf.CNF` on a nonlinear field."""
    problems: list[str] = []
    try:
        with _one_thread(), _quiet_rng(seed):
            _cnf_linear_checks(cls, problems, seed)
    except _Stop:
        pass
    return problems


def _close(a: Tensor, b: Tensor, tol: float) -> bool:
    return a.shape == b.shape and bool(((a - b).abs() <= tol * (1 + b.abs())).all())


def _cnf_linear_checks(cls, problems: list[str], seed: int) -> None:
    tight = dict(method="dopri5", rtol=1e-9, atol=1e-9)
    tol = 1e-6
    for power, T in ((0, 1.0), (0, 0.6), (1, 1.3)):
        field = LinearField(_random_matrix(2, seed + 20 + power), power=power)
        label = "f = A z" if power == 0 else "f = t A z"
        cnf = _build_cnf(cls, field, problems, T=T, **tight)
        x = _points(5, 2, seed + 30)
        z, ld = _pair(_run(f"forward(x) on {label}", lambda cnf=cnf, x=x: cnf(x), problems),
                      "forward")
        z_ex, ld_ex = field.exact(x, 0.0, T)
        if tuple(ld.shape) != (5,):
            problems.append(f"forward's log_det has shape {tuple(ld.shape)}; expected (5,)")
            raise _Stop
        if not _close(z.detach(), z_ex, tol):
            back, _ = field.exact(x, T, 0.0)
            hint = ("that is the state at t = 0 reached from t = T: forward integrates from 0 "
                    "to T" if _close(z.detach(), back, 1e-4) else
                    "pass the solver's time t to the ODE function" if power else
                    "integrate dz/dt = f(t, z) with odeint from t0 to t1 and keep the last state")
            problems.append(f"forward(x) on the linear field {label} (T = {T}): the end point "
                            f"is off by {float((z.detach() - z_ex).abs().max()):.3g}; {hint}")
            raise _Stop
        if not _close(ld.detach(), ld_ex, tol):
            hint = ("it has the wrong sign: log|det dz(T)/dx| = +integral of tr(df/dz) dt, and "
                    "d(log p)/dt = -tr(df/dz)" if _close(-ld.detach(), ld_ex, tol) else
                    "integrate -tr(df/dz) alongside z and return minus its change")
            problems.append(f"forward(x) on {label} (T = {T}): log_det is "
                            f"{ld[0].item():.6f}, the exact value is T tr A = "
                            f"{ld_ex[0].item():.6f}; {hint}")
            raise _Stop
        x_back, ld_inv = _pair(_run("inverse(z)", lambda cnf=cnf, z=z: cnf.inverse(z.detach()),
                                    problems), "inverse")
        if not _close(x_back.detach(), x, tol) or not _close(ld_inv.detach(), -ld_ex, tol):
            problems.append(f"inverse(forward(x)) on {label}: x comes back with error "
                            f"{float((x_back.detach() - x).abs().max()):.3g} and log_det "
                            f"{ld_inv[0].item():.6f} (expected {-ld_ex[0].item():.6f}); inverse "
                            "integrates from T back to 0")
            raise _Stop
        # "layer 1.5": any pair of times
        half = T / 2
        zd = z.detach()
        xh, ldh = _pair(_run(f"transform(z, {T}, {half})",
                             lambda cnf=cnf, zd=zd, T=T, half=half: cnf.transform(zd, T, half),
                             problems), "transform")
        xh_ex, ldh_ex = field.exact(z.detach(), T, half)
        if not _close(xh.detach(), xh_ex, tol) or not _close(ldh.detach(), ldh_ex, tol):
            problems.append(f"transform(z, T, T/2) on {label}: the state at t = T/2 is off by "
                            f"{float((xh.detach() - xh_ex).abs().max()):.3g} and the log_det by "
                            f"{float((ldh.detach() - ldh_ex).abs().max()):.3g}; transform(x, t0, "
                            "t1) solves from t0 to t1, whatever they are")
            raise _Stop
        lp = _run("log_prob(x)", lambda cnf=cnf, x=x: cnf.log_prob(x), problems)
        if not isinstance(lp, Tensor) or tuple(lp.shape) != (5,):
            problems.append("log_prob(x) must return a tensor of shape (B,)")
            raise _Stop
        lp_ex = _std_normal(z_ex) + ld_ex
        if not _close(lp.detach(), lp_ex, tol):
            xr, ldr = field.exact(x, T, 0.0)
            if _close(lp.detach(), _std_normal(xr) + ldr, 1e-4):
                hint = ("that is the density of a flow run backwards: the data sit at t = 0 "
                        "and the noise at t = T, so integrate from 0 to T")
            elif _close(lp.detach(), _std_normal(z_ex) - ld_ex, 1e-4):
                hint = "add the log-det, do not subtract it: log p(x) = log N(z) + log|dz/dx|"
            else:
                hint = "log p(x) = log N(z(T); 0, I) + log|det dz(T)/dx| with z(T) = forward(x)"
            problems.append(f"log_prob(x) on {label} (T = {T}): got {lp[0].item():.6f}, the "
                            f"exact value is {lp_ex[0].item():.6f}; {hint}")
            raise _Stop
    # a nonlinear field against the reference implementation, fixed-step RK4 too; while the
    # lesson is graded the reference is not in the package: that comparison is skipped
    try:
        from nfcourse.cnf import CNF as Reference
    except ExerciseRemoved:
        print("note: the comparison with nfcourse.cnf.CNF is skipped (not in the package "
              "while this lesson is graded)")
        Reference = None
    for kwargs in (tight, dict(method="rk4", steps=6)) if Reference is not None else ():
        field = MLPField(2, seed=seed + 40)
        cnf = _build_cnf(cls, field, problems, T=0.8, **kwargs)
        ref = Reference(field, T=0.8, **kwargs)
        x = _points(6, 2, seed + 41)
        lp = _run("log_prob(x)", lambda cnf=cnf, x=x: cnf.log_prob(x), problems)
        with torch.no_grad():
            z_ref, ld_ref = ref(x)
        expected = _std_normal(z_ref) + ld_ref
        err = float((lp.detach() - expected).abs().max())
        if err > (1e-6 if kwargs is tight else 1e-4):
            what = ("a tight dopri5 solve" if kwargs is tight else
                    "fixed-step RK4 with steps=6 over [0, T]")
            problems.append(f"log_prob on a nonlinear field with {what}: max difference "
                            f"{err:.3g} from nfcourse.cnf.CNF; pass method, rtol, atol and, for "
                            "fixed-step methods, options=dict(step_size=T / steps) to odeint")
            raise _Stop
    # trainable: gradients reach the field's parameters through the solve
    field = MLPField(2, seed=seed + 50)
    cnf = _build_cnf(cls, field, problems, T=1.0, method="rk4", steps=4)
    loss = -_run("log_prob(x)", lambda: cnf.log_prob(_points(8, 2, seed + 51)), problems).mean()
    _run("backward through log_prob", loss.backward, problems)
    missing = [n for n, p in field.named_parameters() if p.grad is None or not p.grad.any()]
    if missing:
        problems.append(f"-log_prob(x).mean().backward() sends no gradient to the field's "
                        f"{missing}: no .detach() or torch.no_grad() in the solve")
    with torch.no_grad():
        _run("log_prob(x) under torch.no_grad()", lambda: cnf.log_prob(_points(4, 2, 1)),
             problems)


def cnf_jacobian_problems(cls: Callable[..., Any], seed: int = 0) -> list[str]:
    """The change of variables of the solve itself: for a nonlinear time-dependent field in
    2-D and 3-D (float64, tight ``dopri5``), ``forward``'s log-det equals
    ``log|det|`` of the autograd Jacobian of the end point with respect to the start, and the
    Hutchinson setting (``divergence="hutchinson"``) averages to the same log-det."""
    problems: list[str] = []
    try:
        with _one_thread(), _quiet_rng(seed):
            for dim in (2, 3):
                field = MLPField(dim, seed=seed + 60 + dim, scale=1.0)
                cnf = _build_cnf(cls, field, problems, T=1.0, method="dopri5", rtol=1e-8,
                                 atol=1e-8)
                x = _points(2, dim, seed + 61)
                _, ld = _pair(_run("forward(x)", lambda cnf=cnf, x=x: cnf(x), problems),
                              "forward")
                for b in range(2):
                    jac = _run("the Jacobian of forward's end point", lambda cnf=cnf, x=x, b=b:
                               torch.autograd.functional.jacobian(
                                   lambda v: cnf(v.reshape(1, -1))[0].reshape(-1), x[b]),
                               problems)
                    expected = float(torch.linalg.slogdet(jac)[1])
                    got = float(ld[b].detach())
                    if abs(got - expected) > 1e-4 * (1 + abs(expected)):
                        hint = ("the sign is wrong" if abs(got + expected) < 1e-4 *
                                (1 + abs(expected)) else "integrate -tr(df/dz) with z in one "
                                "augmented ODE and return minus its change")
                        problems.append(f"{dim}-D nonlinear field, sample {b}: forward's log_det "
                                        f"{got:.6f} but log|det dz(T)/dx| of the solve's "
                                        f"Jacobian is {expected:.6f}; {hint}")
                        raise _Stop
            # the Hutchinson setting: one noise draw per solve, unbiased
            field = MLPField(2, seed=seed + 70)
            cnf = _build_cnf(cls, field, problems, T=0.5, method="rk4", steps=4,
                             divergence="hutchinson")
            exact = _build_cnf(cls, field, problems, T=0.5, method="rk4", steps=4)
            x = _points(1, 2, seed + 71).expand(3000, 2).clone()
            with torch.no_grad():
                _, ld_h = _pair(_run('forward with divergence="hutchinson"',
                                     lambda: cnf(x), problems), "forward")
                _, ld_e = _pair(exact(x[:1]), "forward")
            mean, se = float(ld_h.mean()), float(ld_h.std()) / math.sqrt(len(ld_h))
            if float(ld_h.std()) == 0.0 or abs(mean - float(ld_e[0])) > max(6 * se, 1e-4):
                problems.append(
                    f'with divergence="hutchinson" the log-dets of 3000 copies of one point '
                    f"average {mean:.4f} (std {float(ld_h.std()):.3g}) but the exact log-det is "
                    f"{float(ld_e[0]):.4f}: draw the noise once per solve with sample_noise, "
                    "one row per sample, and use hutchinson_divergence in the dynamics")
                raise _Stop
            _one_draw_per_solve(cls, problems)
    except _Stop:
        pass
    return problems


def _one_draw_per_solve(cls: Callable[..., Any], problems: list[str]) -> None:
    """The rule "one Hutchinson noise draw per solve", seen in the log-dets: on ``f = A z``
    with a zero diagonal, ``eps^T A eps = (a12 + a21) e1 e2`` at every evaluation, so one draw
    per solve gives log-dets of mean square ``(T (a12 + a21))^2`` (any noise with independent
    unit-variance components); noise drawn at every evaluation averages it away."""
    a = torch.tensor([[0.0, 0.8], [0.5, 0.0]], dtype=torch.float64)
    cnf = _build_cnf(cls, LinearField(a), problems, T=0.5, method="rk4", steps=4,
                     divergence="hutchinson")
    x = torch.zeros(3000, 2, dtype=torch.float64)
    with torch.no_grad():
        _, ld = _pair(_run('forward with divergence="hutchinson" on f = A z',
                           lambda: cnf(x), problems), "forward")
        _, again = _pair(_run("a second forward", lambda: cnf(x), problems), "forward")
    ratio = float(ld.pow(2).mean()) / (0.5 * 1.3) ** 2
    if ratio < 0.6:
        problems.append(
            'with divergence="hutchinson" on f = A z (A with a zero diagonal) the log-dets '
            f"have {ratio:.2f} times the mean square one noise draw per solve gives: draw the "
            "noise once per solve (in transform, before odeint) and keep it for every "
            "evaluation of the dynamics")
    elif torch.equal(ld, again):
        problems.append('with divergence="hutchinson" two solves give the same log-dets: draw '
                        "fresh noise for every solve")


def check_cnf(cls: Callable[..., Any]) -> bool:
    """Print the self-check of exercise 4 (``CNF``)."""
    ok = _report("CNF on linear fields", _advice(cls, "cnf") + cnf_problems(cls))
    return _report("CNF: log-det of the solve", cnf_jacobian_problems(cls)) and ok


# ---------------------------------------------------------------------------- Exercise 5
def held_out_moons(n: int = 2000, seed: int = 20_260) -> Tensor:
    """Fresh two moons (noise 0.05) that no training run has seen, standardised with the
    distribution's exact mean and std (:func:`nfcourse.data.two_moons_population_standardization`)
    so that :func:`moons_log_prob` is their exact log-density."""
    from nfcourse.data import two_moons, two_moons_population_standardization

    raw, _ = two_moons(n, seed=seed, standardize=False)
    return two_moons_population_standardization().apply(raw)


def moons_log_prob(x: Tensor) -> Tensor:
    """Exact log-density (float64) of two moons standardised as :func:`held_out_moons`."""
    from nfcourse.data import two_moons_log_prob, two_moons_population_standardization

    return two_moons_log_prob(x, standardization=two_moons_population_standardization())


def logo_density():
    """The exact density of nfcourse's logo as the lesson uses it (32 pixels across)."""
    from nfcourse.data import image_density, logo_path

    return image_density(logo_path(), 1, seed=0, size=32)[1]


def tight_kl(log_prob: Callable[[Tensor], Tensor], x: Tensor, log_p: Tensor,
             model: Any = None) -> tuple[float, float]:
    """``(mean, standard error)`` of ``log p(x) - log q(x)`` over the samples ``x`` of ``p``,
    with ``q``'s solves made tight (see :func:`tight_solver`): a Monte Carlo estimate of
    ``KL(p || q)``."""
    with torch.no_grad(), tight_solver(model if model is not None else log_prob, rtol=1e-6,
                                       atol=1e-6):
        log_q = torch.cat([log_prob(xb) for xb in x.split(1000)]).double()
    diff = log_p.double() - log_q
    return float(diff.mean()), float(diff.std()) / math.sqrt(len(diff))


def _kl_problems(kl: tuple[float, float], limit: float, what: str, n: int) -> list[str]:
    mean, se = kl
    if not math.isfinite(mean):
        return [f"the model's log-density on {n} fresh {what} is not finite (KL = {mean}); "
                "did training diverge?"]
    if mean < -0.02 - 4 * se:
        # KL(p || q) >= 0 for every normalised q: a clearly negative estimate means q is not
        # a density (its log-det has the wrong sign or size)
        return [f"KL({what} || model) comes out negative ({mean:.3f} nats, standard error "
                f"{se:.3f}): the model's log_prob does not integrate to 1; check the sign of the "
                "log-det in the CNF"]
    if not mean < limit:
        return [f"KL({what} || model) = {mean:.3f} nats on {n} fresh points (tight dopri5 "
                f"solve); it must be below {limit}: train longer, or check the learning rate"]
    return []


def _trained(model: Any, name: str, cls: Any, problems: list[str]) -> bool:
    if model is None or not hasattr(model, "log_prob"):
        problems.append(f"{name} is not a trained model with log_prob (run the training cell)")
        return False
    if cls is not None:
        found = [m for m in model.modules()] if isinstance(model, nn.Module) else [model]
        if not any(isinstance(m, cls) for m in found):
            problems.append(f"{name} does not contain your CNF class: train your own CNF")
            return False
    return True


def moons_problems(model: Any, cls: Any = None, limit: float | None = None,
                   n: int = 2000, seed: int = 20_260) -> list[str]:
    """Problems of a model trained on two moons: its KL to the exact two-moons density, with a
    tight solve on ``n`` fresh points, must be below ``limit`` (default :func:`threshold`)."""
    problems: list[str] = []
    limit = threshold("moons") if limit is None else limit
    if not _trained(model, "moons_model", cls, problems):
        return problems
    x = held_out_moons(n, seed)
    try:
        with _one_thread():
            kl = _run("KL on fresh moons", lambda: tight_kl(model.log_prob, x,
                                                            moons_log_prob(x), model),
                      problems)
    except _Stop:
        return problems
    return problems + _kl_problems(kl, limit, "two moons", n)


def image_problems(model: Any, density: Any = None, cls: Any = None, limit: float | None = None,
                   n: int = 2000, seed: int = 20_261) -> list[str]:
    """Problems of a model trained on an image density (default: the logo as the lesson uses
    it): KL with a tight solve on ``n`` fresh samples below ``limit``."""
    problems: list[str] = []
    limit = threshold("image") if limit is None else limit
    if not _trained(model, "image_model", cls, problems):
        return problems
    density = logo_density() if density is None else density
    x = density.sample(n, seed=seed)
    try:
        with _one_thread():
            kl = _run("KL on fresh image samples", lambda: tight_kl(
                model.log_prob, x, density.log_prob(x), model), problems)
    except _Stop:
        return problems
    return problems + _kl_problems(kl, limit, "image samples", n)


def check_moons(model: Any, cls: Any = None) -> bool:
    """Print the self-check of the two-moons training."""
    return _report("two moons training", moons_problems(model, cls))


def check_image(model: Any, density: Any = None, cls: Any = None) -> bool:
    """Print the self-check of the image training."""
    return _report("image training", image_problems(model, density, cls))
