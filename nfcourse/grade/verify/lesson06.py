"""Lesson 06's independent check: continuous flows, verified from numbers.

Each check draws fresh inputs, asks the kernel for outputs and decides in float64 here. The
vector fields the answers are run on are chosen here, so their Jacobians, flows and
log-determinants are known to the grader:

* ``odefunc_test``: with random weights, ``ODEFunc(dim, hidden, layers)`` for dims 1, 2, 3
  and several ``(hidden, layers)`` returns ``(B, dim)`` in float64, changes with ``t`` (a float
  or a 0-d tensor, same answer), depends on ``z``, treats rows independently, sends gradients
  to every parameter; more ``layers`` and more ``hidden`` mean more trainable weights.
* ``divergence_test``: ``exact_divergence`` on ``f(t, z) = z A^T + t z B^T + c tanh(z)``
  (2-, 3- and 5-D) returns ``f`` and ``tr(df/dz) = tr A + t tr B + sum c (1 - tanh^2 z)``, also
  under ``torch.no_grad()``, and its gradient with respect to ``A``, ``B``, ``c`` is the
  grader's analytic one.
* ``hutchinson_test``: with noise sent from here, ``eps^T J eps`` exactly (and its gradient);
  with the student's ``sample_noise`` on 4000 copies of a point, every estimate is
  ``eps^T J eps`` for the noise drawn and their mean is the trace (no bias).
* ``hutchinson_test_noise``: ``sample_noise`` has ``z``'s shape and dtype, mean 0 and
  ``E[eps eps^T] = I`` over 40 000 draws, fresh on every call.
* ``cnf_test``: on linear fields ``f = t^p A z`` (tight ``dopri5``) ``forward``, ``inverse``,
  ``transform`` to an intermediate time and ``log_prob`` are the grader's ``expm`` and
  ``T tr A``; with fixed-step RK4 the end point is RK4's own polynomial of ``h A`` applied
  ``steps`` times; on a nonlinear field ``log_prob`` agrees with the grader's own fine RK4
  integration of the augmented ODE.
* ``cnf_test_jacobian``: on nonlinear time-dependent fields (2-D, 3-D) ``forward``'s log-det
  equals log|det| of the grader's finite-difference Jacobian of the solve, the end point is
  the grader's; with ``divergence="hutchinson"`` the log-dets of 3000 copies of one point
  vary and average to the exact one, and on a linear field with a zero diagonal their mean
  square shows one noise draw per solve (fresh for every solve).
* ``train_moons_test`` / ``train_image_test``: ``log_prob`` at a few fresh points must be
  ``log N(z) + log|det dz/dx|`` of the model's own solve (finite differences), forward or
  inverse (which end the data sit at is ``cnf_test``'s business). Then the grader makes the
  model's density itself from the end points of that solve on fresh samples of the exact
  density and of a Gaussian (one shuffled batch, tight ``dopri5``, central differences, with
  tolerances from the grader's own two-step error estimate): the
  KL to the exact density is below the lesson's bar and not negative, and the density
  integrates to about 1 (importance sampling).
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

from nfcourse.grade.verify.base import Oracle, OracleError, Verifier, check_array, draw_seed
from nfcourse.grade.verify.maths import fd_points, gaussian_log_prob, logabsdet_fd

__all__ = ["VERIFIER", "expm", "rk4_augmented", "two_step_points", "two_step_logabsdet"]

EXACT = 1e-9       # float64 agreement of closed-form quantities
TIGHT = 1e-10      # rtol = atol of the "exact" adaptive solves asked of the kernel
SOLVE_TOL = 1e-7   # agreement of a TIGHT solve with the closed-form / grader's solution
H = 1e-5           # finite-difference step through a TIGHT solve (float64)
FD_TOL = 3e-5      # log-det against finite differences of a TIGHT solve
H_TRAINED = 1e-4   # finite-difference step through a trained model's solve (rtol 1e-9)
AUDIT_TOL = 1e-3   # log_prob against log N(z) + log|det| (finite differences) of that solve
H_DENSITY = 1e-5   # central-difference step of a trained model's density batch (rtol 1e-6)
N_FRESH = 600      # fresh samples for a trained model's KL (standard error about 0.015)
SPREAD = 1.5       # std of the Gaussian half of the proposal that measures its mass

#: Vector fields whose maths the grader knows, defined in the kernel by the queries.
_FIELDS = '''
class _Known(_nfv_torch.nn.Module):
    """f(t, z) = z A^T + t z B^T + c * tanh(z)."""
    def __init__(self, a, b, c):
        super().__init__()
        P, T = _nfv_torch.nn.Parameter, _nfv_torch.as_tensor
        self.a, self.b, self.c = P(T(a)), P(T(b)), P(T(c))
    def forward(self, t, z):
        t = _nfv_torch.as_tensor(t, dtype=z.dtype)
        return z @ self.a.T + t * (z @ self.b.T) + self.c * _nfv_torch.tanh(z)

class _Linear(_nfv_torch.nn.Module):
    """f(t, z) = t^p z A^T."""
    def __init__(self, a, p):
        super().__init__()
        self.a = _nfv_torch.nn.Parameter(_nfv_torch.as_tensor(a))
        self.p = int(p)
    def forward(self, t, z):
        t = _nfv_torch.as_tensor(t, dtype=z.dtype)
        return t ** self.p * (z @ self.a.T)

class _Mlp(_nfv_torch.nn.Module):
    """f(t, z) = tanh(z W1^T + b1 + t c) W2^T + b2 + z L^T."""
    def __init__(self, w1, b1, c, w2, b2, l):
        super().__init__()
        P, T = _nfv_torch.nn.Parameter, _nfv_torch.as_tensor
        self.w1, self.b1, self.c = P(T(w1)), P(T(b1)), P(T(c))
        self.w2, self.b2, self.l = P(T(w2)), P(T(b2)), P(T(l))
    def forward(self, t, z):
        t = _nfv_torch.as_tensor(t, dtype=z.dtype)
        h = _nfv_torch.tanh(z @ self.w1.T + self.b1 + t * self.c)
        return h @ self.w2.T + self.b2 + z @ self.l.T
'''


def _with_fields(body: str) -> str:
    """A query body that can use the kernel-side fields ``_Known``, ``_Linear``, ``_Mlp``."""
    return _FIELDS + textwrap.dedent(body)


def _ask(oracle: Oracle, where: str, code: str, timeout: float | None = None,
         **inputs) -> dict[str, np.ndarray]:
    """``oracle.query``, with a failure's message saying which call failed."""
    try:
        return oracle.query(code, timeout=timeout, **inputs)
    except OracleError as error:
        raise OracleError(f"{where}: {error}") from None


def _worst(a: np.ndarray, b: np.ndarray) -> float:
    """Largest error relative to ``1 + |b|``."""
    return float(np.max(np.abs(a - b) / (1 + np.abs(b))))


# ------------------------------------------------------------------ the grader's own maths
def expm(m: np.ndarray) -> np.ndarray:
    """``e^M`` by scaling and squaring a Taylor series (float64, for small matrices).

    Example:
        >>> bool(np.allclose(expm(np.diag([1.0, 2.0])), np.diag(np.exp([1.0, 2.0]))))
        True
    """
    norm = float(np.max(np.sum(np.abs(m), axis=1))) if m.size else 0.0
    squarings = max(0, math.ceil(math.log2(norm / 0.25))) if norm > 0.25 else 0
    a = m / 2.0**squarings
    term, total = np.eye(len(m)), np.eye(len(m))
    for k in range(1, 20):  # ||a|| <= 1/4: the tail after 20 terms is below 1e-25
        term = term @ a / k
        total = total + term
    for _ in range(squarings):
        total = total @ total
    return total


def _known_field(z: np.ndarray, t: float, a, b, c) -> tuple[np.ndarray, np.ndarray]:
    """``f`` and the Jacobians ``(B, D, D)`` of ``f(t, z) = z A^T + t z B^T + c tanh(z)``."""
    f = z @ a.T + t * (z @ b.T) + c * np.tanh(z)
    jac = (a + t * b)[None] + np.einsum("bi,ij->bij", c * (1 - np.tanh(z) ** 2), np.eye(len(c)))
    return f, jac


def _mlp_params(rng: np.random.Generator, dim: int, hidden: int = 8, scale: float = 1.0,
                linear: float = 0.8) -> dict[str, np.ndarray]:
    return {"w1": scale * rng.normal(size=(hidden, dim)), "b1": scale * rng.normal(size=hidden),
            "c": scale * rng.normal(size=hidden), "w2": scale * rng.normal(size=(dim, hidden)),
            "b2": scale * rng.normal(size=dim),
            "l": linear * np.eye(dim) + 0.3 * rng.normal(size=(dim, dim))}


def _mlp_field(p: dict, t: float, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``f`` and ``tr(df/dz)`` of the kernel's ``_Mlp`` field."""
    h = np.tanh(z @ p["w1"].T + p["b1"] + t * p["c"])
    f = h @ p["w2"].T + p["b2"] + z @ p["l"].T
    # tr(W2 diag(1 - h^2) W1) = sum_k (1 - h_k^2) (W1 W2)_kk
    trace = (1 - h**2) @ np.einsum("ki,ik->k", p["w1"], p["w2"]) + np.trace(p["l"])
    return f, trace


def _linear_flow(a: np.ndarray, power: int, x: np.ndarray, t0: float, t1: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(x(t1), log|det|)`` of ``dz/dt = t^p A z`` from states ``x`` at ``t0``: the flow is
    ``expm(A s)`` with ``s = (t1^(p+1) - t0^(p+1)) / (p+1)``, its log-det ``s tr A``."""
    k = power + 1
    s = (t1**k - t0**k) / k
    return x @ expm(a * s).T, np.full(len(x), s * np.trace(a))


def rk4_augmented(field, x: np.ndarray, t0: float, t1: float, steps: int = 400
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(x(t1), integral of tr(df/dz) dt)`` for ``field(t, z) -> (f, trace)`` by classic
    RK4 with ``steps`` steps: the grader's own solve of the augmented ODE."""
    h = (t1 - t0) / steps
    z, ld = x.astype(float).copy(), np.zeros(len(x))
    for k in range(steps):
        t = t0 + k * h
        f1, g1 = field(t, z)
        f2, g2 = field(t + h / 2, z + h / 2 * f1)
        f3, g3 = field(t + h / 2, z + h / 2 * f2)
        f4, g4 = field(t + h, z + h * f3)
        z = z + h / 6 * (f1 + 2 * f2 + 2 * f3 + f4)
        ld = ld + h / 6 * (g1 + 2 * g2 + 2 * g3 + g4)
    return z, ld


# ------------------------------------------------------------------------- exercise 1
#: sizes every ODEFunc check builds: one and several dimensions, odd and even
ODE_DIMS = (1, 2, 3)
#: (hidden, layers) the architecture is built with: depth and width each varied alone
ODE_SIZES = ((16, 2), (16, 1), (16, 3), (5, 2))


def check_odefunc(oracle: Oracle, rng: np.random.Generator) -> str:
    b = 6
    for dim in ODE_DIMS:
        z = rng.normal(size=(b, dim))
        moved = z.copy()
        moved[0] += rng.normal(size=dim)
        for hidden, layers in ODE_SIZES:
            what = f"ODEFunc(dim={dim}, hidden={hidden}, layers={layers})"
            out = _ask(oracle, what, """
                f = ODEFunc(dim=int(inp['dim'][0]), hidden=int(inp['hidden'][0]),
                            layers=int(inp['layers'][0])).double()
                trainable = [p for p in f.parameters() if p.requires_grad]
                out['size'] = [sum(p.numel() for p in trainable)]
                gen = _nfv_torch.Generator().manual_seed(int(inp['seed'][0]))
                for p in trainable:  # random weights: a zero-initialised layer shows nothing
                    p.copy_(_nfv_torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
                z = _nfv_torch.as_tensor(inp['z'])
                y = f(0.5, z)
                out['y'], out['f64'] = y, [float(y.dtype == _nfv_torch.float64)]
                out['y_tensor_t'] = f(_nfv_torch.tensor(0.5, dtype=_nfv_torch.float64), z)
                out['y0'], out['y1'] = f(0.0, z), f(1.0, z)
                out['moved'] = f(0.5, _nfv_torch.as_tensor(inp['moved']))
                with _nfv_torch.enable_grad():
                    out['n_params'] = [len(trainable)]
                    loss = f(0.5, z).pow(2).sum()
                    grads = _nfv_torch.autograd.grad(loss, trainable, allow_unused=True)
                    out['grad_ok'] = [float(g is not None and bool((g != 0).any()))
                                      for g in grads] or _nfv_np.zeros(0)
            """, dim=[dim], hidden=[hidden], layers=[layers], seed=[draw_seed(rng)], z=z,
                       moved=moved)
            y = out["y"]
            check_array(f"{what}(t, z) for z of shape ({b}, {dim})", y, (b, dim))
            assert out["f64"].reshape(-1)[0] == 1.0, (
                f"after .double(), {what}(t, z) for float64 z is not float64: build the time "
                "column from z's dtype")
            assert _worst(out["y_tensor_t"], y) < EXACT, (
                f"{what}(t, z) gives different results for t = 0.5 as a float and as a 0-d "
                "tensor")
            change = max(float(np.max(np.abs(out["y0"] - y))),
                         float(np.max(np.abs(out["y1"] - y))))
            assert change > 1e-6, (
                f"with random weights, {what}: f(0, z), f(0.5, z) and f(1, z) are equal: the "
                "network must get the time as an input to every layer")
            moved_out = out["moved"]
            check_array(f"{what}(t, z)", moved_out, (b, dim))
            assert float(np.max(np.abs(moved_out[0] - y[0]))) > 1e-6, (
                f"with random weights, {what}(t, z) does not change when z does")
            assert float(np.max(np.abs(moved_out[1:] - y[1:]))) < EXACT, (
                f"{what}: changing one row of z changed the output of other rows: each sample "
                "must be processed on its own")
            assert out["n_params"].reshape(-1)[0] >= 1, f"{what} has no trainable parameters"
            missing = int(np.sum(out["grad_ok"] == 0))
            assert missing == 0, (
                f"{missing} of {what}'s parameters get no gradient from f(t, z): every layer "
                "must be used")
            size = int(out["size"].reshape(-1)[0])
            if (hidden, layers) == ODE_SIZES[0]:
                base = size
            elif layers != ODE_SIZES[0][1]:
                deeper = layers > ODE_SIZES[0][1]
                assert (size > base) if deeper else (size < base), (
                    f"{what} has {size} trainable numbers and ODEFunc(dim={dim}, hidden=16, "
                    f"layers=2) {base}: `layers` must set the depth (more layers, more weights)")
            else:
                assert size < base, (
                    f"{what} has {size} trainable numbers and ODEFunc(dim={dim}, hidden=16, "
                    f"layers=2) {base}: `hidden` must set the width of the hidden layers")
    return (f"dims {', '.join(map(str, ODE_DIMS))}, (hidden, layers) in {list(ODE_SIZES)}, "
            "random weights: shape (B, dim), float64, depends on t (float or tensor) and on z, "
            "rows independent, gradients reach every parameter; layers and hidden set depth "
            "and width")


# ------------------------------------------------------------------------- exercise 2
_DIVERGENCE_QUERY = _FIELDS + """
field = _Known(inp['a'], inp['b'], inp['c'])
z, t = _nfv_torch.as_tensor(inp['z']), float(inp['t'][0])
dz, div = {call}
out['dz'], out['div'] = dz, div
with _nfv_torch.enable_grad():
    dz, div = {call}
    out['requires_grad'] = [float(div.requires_grad)]
    if div.requires_grad:
        grads = _nfv_torch.autograd.grad(div.sum(), [field.a, field.b, field.c],
                                         allow_unused=True)
        for name, p, g in zip(('ga', 'gb', 'gc'), (field.a, field.b, field.c), grads):
            out[name] = _nfv_torch.zeros_like(p) if g is None else g
"""


def _known_params(rng: np.random.Generator, dim: int) -> dict[str, np.ndarray]:
    # a diagonal-heavy A: the trace is far from what biased noise would average to
    return {"a": 0.6 * rng.normal(size=(dim, dim)) + 1.5 * np.eye(dim),
            "b": 0.6 * rng.normal(size=(dim, dim)), "c": rng.normal(size=dim)}


def _divergence_case(oracle: Oracle, rng: np.random.Generator, dim: int, noise: bool,
                     name: str, what: str) -> None:
    b = 7
    p = _known_params(rng, dim)
    z = rng.normal(size=(b, dim))
    t = float(rng.uniform(0.2, 1.5))
    eps = rng.normal(size=(b, dim))
    call = ("hutchinson_divergence(field, z, t, _nfv_torch.as_tensor(inp['eps']))" if noise
            else "exact_divergence(field, z, t)")
    out = _ask(oracle, name, _DIVERGENCE_QUERY.format(call=call), z=z, t=[t], eps=eps, **p)
    f, jac = _known_field(z, t, **p)
    if noise:
        expected = np.einsum("bi,bij,bj->b", eps, jac, eps)
    else:
        expected = np.trace(jac, axis1=1, axis2=2)
    where = f"on f(t, z) = z A^T + t z B^T + c tanh(z) in {dim}-D"
    check_array(f"{name}'s dz", out["dz"], (b, dim))
    check_array(f"{name}'s {what.split(' =')[0]}", out["div"], (b,))
    assert _worst(out["dz"], f) < EXACT, f"{name} {where}: dz is not f(t, z)"
    got = out["div"]
    if _worst(got, expected) >= EXACT:
        hint = ("it is minus the right value" if _worst(-got, expected) < EXACT else
                "it is computed in float32, not in z's dtype" if _worst(got, expected) < 1e-5
                else f"expected {what}")
        raise AssertionError(f"{name} {where}: off by up to "
                             f"{float(np.max(np.abs(got - expected))):.3g}; {hint}")
    assert out["requires_grad"].reshape(-1)[0] == 1.0, (
        f"{name}: the result carries no gradient with respect to the field's parameters "
        "(use create_graph=True)")
    sech2 = 1 - np.tanh(z) ** 2
    if noise:
        outer = np.einsum("bi,bj->ij", eps, eps)
        grads = {"ga": outer, "gb": t * outer, "gc": np.sum(sech2 * eps**2, axis=0)}
    else:
        grads = {"ga": b * np.eye(dim), "gb": t * b * np.eye(dim), "gc": sech2.sum(axis=0)}
    for key, param in (("ga", "A"), ("gb", "B"), ("gc", "c")):
        check_array(f"the gradient for {param}", out[key], grads[key].shape)
        assert _worst(out[key], grads[key]) < 1e-8, (
            f"{name} {where}: the gradient of the result with respect to {param} is wrong "
            "(keep the graph: create_graph=True, no .detach())")


def check_divergence(oracle: Oracle, rng: np.random.Generator) -> str:
    for dim in (2, 3, 5):
        _divergence_case(oracle, rng, dim, False, "exact_divergence(f, z, t)", "tr(df/dz)")
    return ("2-, 3-, 5-D time-dependent fields: f and tr(df/dz) exact in float64 under "
            "no_grad, gradients with respect to the field's parameters exact")


# ------------------------------------------------------------------------- exercise 3
def check_hutchinson(oracle: Oracle, rng: np.random.Generator) -> str:
    name = "hutchinson_divergence(f, z, t, noise)"
    for dim in (2, 3, 5):
        _divergence_case(oracle, rng, dim, True, name, "eps^T (df/dz) eps")
    draws = 4000
    for dim in (2, 3):
        p = _known_params(rng, dim)
        z0 = rng.normal(size=(1, dim))
        t = float(rng.uniform(0.2, 1.5))
        out = _ask(oracle, "hutchinson_divergence with noise from sample_noise", _with_fields("""
            field = _Known(inp['a'], inp['b'], inp['c'])
            z = _nfv_torch.as_tensor(inp['z0']).expand(int(inp['n'][0]), -1).clone()
            eps = sample_noise(z)
            out['eps'] = eps
            out['est'] = hutchinson_divergence(field, z, float(inp['t'][0]), eps)[1]
        """), z0=z0, n=[draws], t=[t], **p)
        check_array("sample_noise(z)", out["eps"], (draws, dim))
        check_array(f"{name} with sample_noise", out["est"], (draws,))
        eps, est = out["eps"], out["est"]
        _, jac = _known_field(z0, t, **p)
        jac = jac[0]
        assert _worst(est, np.einsum("bi,ij,bj->b", eps, jac, eps)) < 1e-6, (
            f"{name} with the noise sample_noise drew is not eps^T (df/dz) eps")
        exact = float(np.trace(jac))
        mean, se = float(est.mean()), float(est.std()) / math.sqrt(draws)
        assert abs(mean - exact) <= max(6 * se, 1e-3 * (1 + abs(exact))), (
            f"{dim}-D: {draws} Hutchinson estimates with sample_noise average {mean:.4f} "
            f"(standard error {se:.4f}) but the trace is {exact:.4f}: the estimator is biased; "
            "the noise needs E[eps eps^T] = I")
    return ("eps^T J eps exact for given noise (2-, 3-, 5-D) with exact gradients; with "
            "sample_noise the mean of 4000 estimates is the trace")


def check_noise(oracle: Oracle, rng: np.random.Generator) -> str:
    n, dim = 40_000, 3
    out = _ask(oracle, "sample_noise(z)", """
        gen = _nfv_torch.Generator().manual_seed(int(inp['seed'][0]))
        z = _nfv_torch.randn(int(inp['n'][0]), 3, generator=gen, dtype=_nfv_torch.float64)
        eps = sample_noise(z)
        out['eps'], out['f64'] = eps, [float(eps.dtype == _nfv_torch.float64)]
        again = sample_noise(z[:200])
        out['again'] = again
        small = sample_noise(_nfv_torch.zeros(5, 4, dtype=_nfv_torch.float32))
        out['small'] = small
        out['f32'] = [float(small.dtype == _nfv_torch.float32)]
    """, seed=[draw_seed(rng)], n=[n])
    check_array("sample_noise(z) for z of shape (40000, 3)", out["eps"], (n, dim))
    check_array("sample_noise(z) for z of shape (200, 3)", out["again"], (200, dim))
    check_array("sample_noise(z) for z of shape (5, 4)", out["small"], (5, 4))
    assert out["f64"].reshape(-1)[0] == 1.0 and out["f32"].reshape(-1)[0] == 1.0, (
        "sample_noise(z) must return noise in z's dtype (float64 for float64 z, float32 for "
        "float32 z)")
    eps = out["eps"]
    mean = eps.mean(axis=0)
    second = eps.T @ eps / n
    err_mean = float(np.max(np.abs(mean)))
    err_second = float(np.max(np.abs(second - np.eye(dim))))
    assert err_mean < 0.05 and err_second < 0.05, (
        f"over {n} draws the noise has mean {np.round(mean, 3).tolist()} and E[eps eps^T] = "
        f"{np.round(second, 3).tolist()}; it needs mean 0 and E[eps eps^T] = I (Rademacher "
        "signs or standard normal noise)")
    assert not np.array_equal(out["again"], eps[:200]), (
        "sample_noise returned the same numbers on two calls: draw fresh noise every time")
    return f"shape and dtype of z; over {n} draws mean 0 and E[eps eps^T] = I; fresh each call"


# ------------------------------------------------------------------------- exercise 4
def check_cnf(oracle: Oracle, rng: np.random.Generator) -> str:
    b = 5
    for power in (0, 1):
        a = 0.6 * rng.normal(size=(2, 2))
        big_t = float(rng.uniform(0.6, 1.4))
        mid = big_t * float(rng.uniform(0.2, 0.8))
        x = rng.normal(size=(b, 2))
        out = _ask(oracle, "CNF on a linear field (dopri5)", _with_fields("""
            T, mid = float(inp['T'][0]), float(inp['mid'][0])
            cnf = CNF(_Linear(inp['a'], inp['p'][0]), T=T, method='dopri5',
                      rtol=inp['tol'][0], atol=inp['tol'][0])
            x = _nfv_torch.as_tensor(inp['x'])
            z, ld = cnf(x)
            out['z'], out['ld'] = z, ld
            out['back'], out['ld_back'] = cnf.inverse(z)
            out['mid'], out['ld_mid'] = cnf.transform(z, T, mid)
            out['lp'] = cnf.log_prob(x)
        """), a=a, p=[power], T=[big_t], mid=[mid], x=x, tol=[TIGHT])
        label = "f = A z" if power == 0 else "f = t A z"

        def exact(x0, t0, t1, a=a, power=power):
            return _linear_flow(a, power, x0, t0, t1)

        z_ex, ld_ex = exact(x, 0.0, big_t)
        check_array("forward's z", out["z"], (b, 2))
        check_array("forward's log_det", out["ld"], (b,))
        assert _worst(out["z"], z_ex) < SOLVE_TOL, (
            f"forward(x) on the linear field {label} (T = {big_t:.3f}): z(T) is not "
            f"expm(A ...) x (off by {float(np.max(np.abs(out['z'] - z_ex))):.3g})")
        assert _worst(out["ld"], ld_ex) < SOLVE_TOL, (
            f"forward(x) on the linear field {label}: log_det is {out['ld'][0]:.6f}, the exact "
            f"log|det| is {ld_ex[0]:.6f}" + (" (minus it)" if _worst(-out["ld"], ld_ex)
                                             < SOLVE_TOL else ""))
        check_array("inverse's x", out["back"], (b, 2))
        check_array("inverse's log_det", out["ld_back"], (b,))
        assert _worst(out["back"], x) < SOLVE_TOL and _worst(out["ld_back"], -ld_ex) < SOLVE_TOL, (
            f"inverse(forward(x)) on {label}: x or the log_det does not come back")
        mid_ex, ld_mid_ex = exact(z_ex, big_t, mid)
        check_array("transform's output", out["mid"], (b, 2))
        check_array("transform's log_det", out["ld_mid"], (b,))
        assert _worst(out["mid"], mid_ex) < SOLVE_TOL and \
            _worst(out["ld_mid"], ld_mid_ex) < SOLVE_TOL, (
                f"transform(z, T, t) on {label} with t = {mid:.3f}: the state or log_det at "
                "the intermediate time is not the exact one")
        check_array("log_prob(x)", out["lp"], (b,))
        lp_ex = gaussian_log_prob(z_ex) + ld_ex
        if _worst(out["lp"], lp_ex) >= SOLVE_TOL:
            x_back, ld_back = exact(x, big_t, 0.0)
            hint = (": that is the density with the data at t = T; they sit at t = 0"
                    if _worst(out["lp"], gaussian_log_prob(x_back) + ld_back) < 1e-5 else "")
            raise AssertionError(
                f"log_prob(x) on {label}: off from log N(z(T)) + log|det dz(T)/dx| by up to "
                f"{float(np.max(np.abs(out['lp'] - lp_ex))):.3g}{hint}")
    # fixed-step RK4 on A z: every 4-stage order-4 Runge-Kutta step is the polynomial
    # I + hA + (hA)^2/2 + (hA)^3/6 + (hA)^4/24; the trace is constant, integrated exactly
    a = 0.8 * rng.normal(size=(2, 2))
    steps = int(rng.integers(2, 6))
    big_t = float(rng.uniform(0.8, 1.5))
    x = rng.normal(size=(b, 2))
    out = _ask(oracle, "CNF(..., method='rk4', steps=...)", _with_fields("""
        cnf = CNF(_Linear(inp['a'], 0), T=float(inp['T'][0]), method='rk4',
                  steps=int(inp['steps'][0]))
        out['z'], out['ld'] = cnf(_nfv_torch.as_tensor(inp['x']))
    """), a=a, T=[big_t], steps=[steps], x=x)
    m = a * big_t / steps
    step = np.eye(2) + m + m @ m / 2 + m @ m @ m / 6 + m @ m @ m @ m / 24
    z_ex = x @ np.linalg.matrix_power(step, steps).T
    check_array("forward's z", out["z"], (b, 2))
    assert _worst(out["z"], z_ex) < 1e-9 and _worst(out["ld"], np.full(b, big_t * np.trace(a))) \
        < 1e-9, (f"CNF(..., method='rk4', steps={steps}) does not take {steps} RK4 steps over "
                 "[0, T]: pass options=dict(step_size=T / steps) to odeint")
    # a nonlinear time-dependent field against the grader's own RK4 solve
    p = _mlp_params(rng, 2)
    big_t = float(rng.uniform(0.5, 1.0))
    x = rng.normal(size=(6, 2))
    out = _ask(oracle, "CNF.log_prob on a nonlinear field", _with_fields("""
        cnf = CNF(_Mlp(inp['w1'], inp['b1'], inp['c'], inp['w2'], inp['b2'], inp['l']),
                  T=float(inp['T'][0]), method='dopri5', rtol=inp['tol'][0], atol=inp['tol'][0])
        out['lp'] = cnf.log_prob(_nfv_torch.as_tensor(inp['x']))
    """), T=[big_t], x=x, tol=[TIGHT], **p)
    z_ex, ld_ex = rk4_augmented(lambda t, z: _mlp_field(p, t, z), x, 0.0, big_t)
    check_array("log_prob(x)", out["lp"], (6,))
    lp_ex = gaussian_log_prob(z_ex) + ld_ex
    assert _worst(out["lp"], lp_ex) < 1e-6, (
        "log_prob(x) on a nonlinear time-dependent field is off from the grader's own solve "
        f"of the augmented ODE by up to {float(np.max(np.abs(out['lp'] - lp_ex))):.3g}")
    return ("linear fields A z and t A z: forward, inverse, transform to a middle time and "
            f"log_prob exact; RK4 with {steps} steps exact; log_prob on a nonlinear field "
            "agrees with the grader's own solve")


def check_cnf_jacobian(oracle: Oracle, rng: np.random.Generator) -> str:
    b = 2
    for dim in (2, 3):
        p = _mlp_params(rng, dim)
        x = rng.normal(size=(b, dim))
        probes = fd_points(x, H)
        out = _ask(oracle, f"CNF.forward on a nonlinear {dim}-D field", _with_fields("""
            cnf = CNF(_Mlp(inp['w1'], inp['b1'], inp['c'], inp['w2'], inp['b2'], inp['l']),
                      T=1.0, method='dopri5', rtol=inp['tol'][0], atol=inp['tol'][0])
            out['z'], out['ld'] = cnf(_nfv_torch.as_tensor(inp['x']))
        """), x=probes, tol=[TIGHT], **p)
        n = len(probes)
        check_array("forward's z", out["z"], (n, dim))
        check_array("forward's log_det", out["ld"], (n,))
        z_ex, _ = rk4_augmented(lambda t, z, p=p: _mlp_field(p, t, z), x, 0.0, 1.0)
        assert _worst(out["z"][:b], z_ex) < 1e-6, (
            f"forward(x) on a nonlinear {dim}-D field: z(T) is off from the grader's own solve "
            f"by up to {float(np.max(np.abs(out['z'][:b] - z_ex))):.3g}")
        fd = logabsdet_fd(out["z"], b, dim, H)
        got = out["ld"][:b]
        if _worst(got, fd) >= FD_TOL:
            hint = " (it has the wrong sign)" if _worst(-got, fd) < FD_TOL else ""
            raise AssertionError(
                f"forward(x) on a nonlinear {dim}-D field: log_det {np.round(got, 6).tolist()} "
                f"but log|det dz(T)/dx| of the solve (finite differences) is "
                f"{np.round(fd, 6).tolist()}{hint}")
    # Hutchinson mode: one noise draw per solve and sample, unbiased for the exact log-det
    draws = 3000
    p = _mlp_params(rng, 2)
    p["l"] = p["l"] + 0.5 * (1 - np.eye(2))  # off-diagonal terms: Hutchinson's estimate varies
    x0 = rng.normal(size=(1, 2))
    out = _ask(oracle, 'CNF(..., divergence="hutchinson")', _with_fields("""
        cnf = CNF(_Mlp(inp['w1'], inp['b1'], inp['c'], inp['w2'], inp['b2'], inp['l']),
                  T=0.5, method='rk4', steps=4, divergence='hutchinson')
        x = _nfv_torch.as_tensor(inp['x0']).expand(int(inp['n'][0]), -1).clone()
        out['z'], out['ld'] = cnf(x)
    """), x0=x0, n=[draws], **p)
    check_array('forward\'s log_det with divergence="hutchinson"', out["ld"], (draws,))
    check_array('forward\'s z with divergence="hutchinson"', out["z"], (draws, 2))
    _, exact = rk4_augmented(lambda t, z: _mlp_field(p, t, z), x0, 0.0, 0.5)
    ld = out["ld"]
    mean, std = float(ld.mean()), float(ld.std())
    assert std > 1e-8, ('with divergence="hutchinson" the log-dets of copies of one point are all '
                     "equal: draw the noise with sample_noise, one row per sample, and use "
                     "hutchinson_divergence in the dynamics")
    assert abs(mean - float(exact[0])) <= max(6 * std / math.sqrt(draws), 1e-3), (
        f'with divergence="hutchinson" the log-dets of {draws} copies of one point average '
        f"{mean:.4f} (std {std:.3g}) but the exact log-det is {float(exact[0]):.4f}: the "
        "estimate is biased")
    ratio = _one_draw_per_solve(oracle, rng, draws)
    return ("nonlinear fields in 2-D and 3-D: z(T) is the grader's solve, log_det = log|det J| "
            "(finite differences); Hutchinson mode unbiased, one noise draw per solve (mean "
            f"square ratio {ratio:.2f}), fresh on every solve")


def _one_draw_per_solve(oracle: Oracle, rng: np.random.Generator, draws: int) -> float:
    """The lesson's rule "one Hutchinson noise draw per solve", seen in the log-dets.

    On ``f = A z`` with a zero diagonal, ``eps^T A eps = (a12 + a21) e1 e2`` at every function
    evaluation. Drawn once per solve, the noise makes the log-det ``T (a12 + a21) e1 e2``,
    whose mean square is ``(T (a12 + a21))^2`` for any noise with independent unit-variance
    components (Rademacher: exactly; Gaussian: with a standard error of sqrt(8 / n)). Fresh
    noise at every evaluation averages the products away (fixed-step RK4 with 4 steps keeps
    about 7 % of the mean square, one draw per step 25 %). Two solves must draw anew.
    """
    p, q = float(rng.uniform(0.6, 1.0)), float(rng.uniform(0.3, 0.6))
    a = np.array([[0.0, p], [q, 0.0]])
    big_t = 0.5
    x0 = rng.normal(size=(1, 2))
    out = _ask(oracle, 'CNF(..., divergence="hutchinson") on a linear field', _with_fields("""
        cnf = CNF(_Linear(inp['a'], 0), T=float(inp['T'][0]), method='rk4', steps=4,
                  divergence='hutchinson')
        x = _nfv_torch.as_tensor(inp['x0']).expand(int(inp['n'][0]), -1).clone()
        out['ld'] = cnf(x)[1]
        out['again'] = cnf(x)[1]
    """), a=a, T=[big_t], x0=x0, n=[draws])
    check_array('forward\'s log_det with divergence="hutchinson"', out["ld"], (draws,))
    check_array('a second forward\'s log_det', out["again"], (draws,))
    single = (big_t * (p + q)) ** 2
    ratio = float(np.mean(out["ld"] ** 2)) / single
    assert ratio > 0.6, (
        'with divergence="hutchinson" on f = A z (A with a zero diagonal) the log-dets of '
        f"{draws} copies of one point have a mean square {ratio:.2f} times what one noise draw "
        "per solve gives: the noise must be drawn once per solve (in transform, before "
        "odeint) and kept for every evaluation of the dynamics, not drawn anew at each one")
    assert ratio < 1.5, (
        f'with divergence="hutchinson" on f = A z the log-dets have a mean square {ratio:.2f} '
        "times that of eps^T A eps integrated over [0, T]: is the noise scaled?")
    assert not np.array_equal(out["ld"], out["again"]), (
        'with divergence="hutchinson" two solves of the same points give the same log-dets: '
        "draw fresh noise for every solve")
    return ratio


# ------------------------------------------------------------------------ exercises 5, 6
#: Shared by the training queries: the model in float64, its CNF, its solver settings.
_TRAINED_PRELUDE = """
import os
out['fast'] = [float(os.environ.get('NFCOURSE_FAST', '').strip().lower()
                     in ('1', 'true', 'yes', 'on'))]
m = {model}
found = [mod for mod in m.modules()] if isinstance(m, _nfv_torch.nn.Module) else [m]
flows = [mod for mod in found if isinstance(mod, CNF)]
if not flows:
    raise TypeError('{model} does not contain your CNF class: train your own CNF')
m = m.double()
solvers = [mod for mod in found
           if hasattr(mod, 'method') and hasattr(mod, 'rtol') and hasattr(mod, 'atol')]
saved = [(mod, mod.method, mod.rtol, mod.atol) for mod in solvers]
def tight(tol):
    for mod in solvers:
        mod.method, mod.rtol, mod.atol = 'dopri5', tol, tol
"""

#: Which way does log_prob run the flow? log_prob at a few points, and both solves of
#: their finite-difference probes.
_DIRECTION_QUERY = _TRAINED_PRELUDE + """
try:
    tight(1e-6)
    out['lp'] = m.log_prob(_nfv_torch.as_tensor(inp['x']))
    tight(1e-9)
    probes = _nfv_torch.as_tensor(inp['probes'])
    out['zf'], out['ldf'] = flows[0](probes)
    out['zi'], out['ldi'] = flows[0].inverse(probes)
finally:
    for mod, method, rtol, atol in saved:
        mod.method, mod.rtol, mod.atol = method, rtol, atol
"""

#: The flow's end points only (no claimed log-det): the grader makes the density itself.
_DENSITY_QUERY = _TRAINED_PRELUDE + """
try:
    tight(1e-6)
    probes = _nfv_torch.as_tensor(inp['probes'])
    solve = flows[0] if inp['forward'][0] == 1 else flows[0].inverse
    out['z'] = solve(probes)[0]   # one batch: every probe sees the same solver steps
finally:
    for mod, method, rtol, atol in saved:
        mod.method, mod.rtol, mod.atol = method, rtol, atol
"""


def two_step_points(x: np.ndarray, h: float) -> np.ndarray:
    """:func:`fd_points` at steps ``h`` and ``2 h``, as one ``(2 B (2D + 1), D)`` batch (one
    solve: every probe sees the same solver steps)."""
    return np.concatenate([fd_points(x, h), fd_points(x, 2 * h)])


def two_step_logabsdet(values: np.ndarray, b: int, d: int, h: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """log|det J| of each of the B points from a :func:`two_step_points` batch's outputs,
    with the grader's estimate of its error.

    Central differences err by ``c h^2 + O(h^4)``, so the two steps differ by about
    ``3 c h^2``: the Richardson value ``ld_h + (ld_h - ld_2h) / 3`` removes that term and
    ``|ld_h - ld_2h|`` bounds what is left, wherever the model is smooth or not (a kink
    within ``2 h`` of a point shows up as a large difference, not as a wrong density).

    Example:
        >>> x = np.array([[0.3, -0.2]])
        >>> ld, err = two_step_logabsdet(np.tanh(two_step_points(x, 1e-4)), 1, 2, 1e-4)
        >>> bool(abs(ld[0] - np.log(1 - np.tanh(x) ** 2).sum()) < 1e-9 and err[0] < 1e-7)
        True
    """
    n = (2 * d + 1) * b
    if values.shape != (2 * n, d):
        raise AssertionError(f"expected outputs of shape {(2 * n, d)}, got "
                             f"{tuple(values.shape)}")
    fine = logabsdet_fd(values[:n], b, d, h)
    coarse = logabsdet_fd(values[n:], b, d, 2 * h)
    with np.errstate(invalid="ignore"):
        return fine + (fine - coarse) / 3, np.abs(fine - coarse)


def _check_trained(oracle: Oracle, rng: np.random.Generator, name: str, fresh: np.ndarray,
                   exact_log_prob, which: str, what: str) -> str:
    """The density of the trained model, made here from its flow's end points.

    1. ``log_prob`` at a few fresh points must be ``log N(z) + log|det dz/dx|`` of the
       model's own solve (finite differences) run forward or inverse: that fixes which way
       the model's density runs the flow (where the data sit is ``cnf_test``'s business).
    2. Fresh samples of the exact density ``p`` and as many of ``g = N(0, SPREAD^2 I)`` go
       to the kernel in one shuffled batch with their finite-difference probes; it returns
       the end points only. The grader computes ``log q = log N(z) + log|det J|`` itself,
       the KL from ``p`` on ``p``'s samples (below the lesson's bar, not negative) and the
       mass of ``q`` by importance sampling from ``(p + g) / 2`` over all of them (about
       1: a map that folds space cannot fake a high density).

    The KL bar is the lesson's for the mode the kernel trained in (a kernel that claims fast
    mode gets the laxer bar, which is also what its hidden test asks).
    """
    from nfcourse.checks.lesson06 import THRESHOLDS

    k = 8
    audited = rng.choice(len(fresh), size=k, replace=False)
    audit = fresh[audited]
    out = _ask(oracle, f"{name}.log_prob and its CNF's solves",
               _DIRECTION_QUERY.format(model=name), x=audit,
               probes=two_step_points(audit, H_TRAINED), timeout=300)
    check_array(f"{name}.log_prob(x)", out["lp"], (k,))
    mismatch = {}
    for key, direction in (("f", "forward"), ("i", "inverse")):
        z = out["z" + key]
        check_array(f"{name}'s {direction} solve", z, (10 * k, 2))
        ld, err = two_step_logabsdet(z, k, 2, H_TRAINED)
        # what the claimed log-density misses by, beyond the grader's own error estimate
        with np.errstate(invalid="ignore"):
            gap = np.abs(out["lp"] - gaussian_log_prob(z[:k]) - ld) - 10 * err
        mismatch[direction] = float(np.max(np.where(np.isnan(gap), np.inf, gap)))
    direction = min(mismatch, key=mismatch.get)
    assert mismatch[direction] < AUDIT_TOL, (
        f"{name}.log_prob(x) is not log N(z) + log|det dz/dx| of the model's own ODE solve "
        f"(finite differences at fresh points, off by {mismatch[direction]:.3g} nats more "
        "than the grader's estimate of its own error): the log-density must come from the "
        "flow's change of variables")
    limit = THRESHOLDS["fast" if out["fast"].reshape(-1)[0] == 1.0 else "full"][which]
    claimed = out["lp"]

    n = len(fresh)
    points = np.concatenate([fresh, SPREAD * rng.normal(size=(n, 2))])
    order = rng.permutation(len(points))
    b = len(points)
    # central differences for every point, and the audited ones again at twice the step:
    # their two log-dets give the grader's error estimate, and so its tolerance
    probes = np.concatenate([fd_points(points[order], H_DENSITY),
                             two_step_points(audit, H_DENSITY)])
    out = _ask(oracle, f"{name}'s CNF solve", _DENSITY_QUERY.format(model=name),
               probes=probes, forward=[float(direction == "forward")], timeout=300)
    n_main = 5 * b
    check_array(f"{name}'s {direction} solve", out["z"], (n_main + 10 * k, 2))
    log_q = np.empty(b)
    log_q[order] = (gaussian_log_prob(out["z"][:b])
                    + logabsdet_fd(out["z"][:n_main], b, 2, H_DENSITY))
    ld_audit, err = two_step_logabsdet(out["z"][n_main:], k, 2, H_DENSITY)
    # the audited points are among the fresh ones: the same density both times, up to the
    # solves' tolerance (rtol 1e-6 both times) and the grader's finite-difference error
    tolerance = 5e-3 + 10 * err
    off = np.abs(log_q[audited] - claimed)
    again = np.abs(gaussian_log_prob(out["z"][n_main:n_main + k]) + ld_audit - claimed)
    assert np.all(np.minimum(off, again) < tolerance), (
        f"{name}'s solve gives a density that differs from its log_prob by "
        f"{float(np.max(np.minimum(off, again))):.3g} nats at the same points (the grader's "
        f"finite differences err by at most {float(np.max(err)):.1g} there)")
    log_p = exact_log_prob(points)
    diff = log_p[:n] - log_q[:n]
    kl, se = float(diff.mean()), float(diff.std()) / math.sqrt(n)
    assert np.isfinite(kl), f"{name}'s density is not finite at fresh points"
    assert kl > -0.02 - 4 * se, (
        f"KL({what} || {name}) computed by the grader comes out negative ({kl:.3f} nats, "
        f"standard error {se:.3f}): the model's density is not normalised")
    assert kl < limit, (
        f"KL({what} || {name}) = {kl:.3f} nats on {n} fresh points (computed by the grader "
        f"from a tight dopri5 solve) is not below {limit}")
    log_g = gaussian_log_prob(points / SPREAD) - 2 * math.log(SPREAD)
    mass = float(np.mean(np.exp(log_q - (np.logaddexp(log_p, log_g) - math.log(2)))))
    assert 0.85 < mass < 1.15, (
        f"{name}'s density integrates to {mass:.3f} (importance sampling), not about 1: it is "
        "not a valid change of variables")
    return (f"log_prob is the change of variables of the model's {direction} solve; the "
            f"grader's KL to the exact density {kl:.3f} < {limit} nats on {n} fresh points, "
            f"total mass {mass:.2f}")


def check_train_moons(oracle: Oracle, rng: np.random.Generator) -> str:
    import torch

    from nfcourse.checks.lesson06 import held_out_moons, moons_log_prob

    fresh = held_out_moons(N_FRESH, seed=draw_seed(rng)).double().numpy()
    return _check_trained(oracle, rng, "moons_model", fresh, lambda x: moons_log_prob(
        torch.as_tensor(x)).double().numpy(), "moons", "two moons")


def check_train_image(oracle: Oracle, rng: np.random.Generator) -> str:
    import torch

    from nfcourse.checks.lesson06 import logo_density

    density = logo_density()
    fresh = density.sample(N_FRESH, seed=draw_seed(rng)).double().numpy()
    return _check_trained(oracle, rng, "image_model", fresh, lambda x: density.log_prob(
        torch.as_tensor(x)).double().numpy(), "image", "the logo's density")


VERIFIER = Verifier(
    lesson="06_ffjord_gifs",
    checks={
        "odefunc_test": check_odefunc,
        "divergence_test": check_divergence,
        "hutchinson_test": check_hutchinson,
        "hutchinson_test_noise": check_noise,
        "cnf_test": check_cnf,
        "cnf_test_jacobian": check_cnf_jacobian,
        "train_moons_test": check_train_moons,
        "train_image_test": check_train_image,
    },
)
