"""Self-checks of lesson 02 (dequantization), one ``check_<exercise>`` per exercise.

Each ``check_<exercise>(answer)`` runs the answer on small inputs, prints a report (one line
per property, with numbers and a hint for each failure) and raises ``AssertionError`` when a
property fails. The ``*_report`` functions return the :class:`~nfcourse.checks.FlowReport`
without printing; the graders' hidden tests call them with other sizes and seeds and
:func:`require` the properties their exercise is graded on.

The layers are checked against the lesson's specification:

* ``Dequantization(levels=256, alpha=1e-5)``: ``forward(x, context=None, noise=None)`` maps
  integer pixels ``x`` to ``z = logit(alpha + (1 - 2 alpha) (x + u) / levels)`` with
  ``u = noise`` or ``u ~ U[0, 1)``; ``log_det = log|det dz/du|``; ``inverse`` floors back to
  integers in ``[0, levels - 1]``; pixels outside that range or not integers raise
  ``ValueError``.
* ``bits_per_dim(log_prob, x) = -log_prob / (D ln 2)`` with ``D = x[0].numel()``.
* ``importance_bpd(log_prob, x, k)``: ``-(logsumexp_k log w_k - log k) / (D ln 2)`` over ``k``
  fresh calls of ``log_prob``.
* ``VariationalDequantization(noise_flow=..., levels=256, alpha=1e-5)``: ``u`` comes from
  ``noise_flow(eps, context)`` with ``eps = noise`` or ``eps ~ N(0, I)``; the log-det is the
  uniform layer's minus ``log q(u | x)``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfcourse.checks.core import CheckResult, FlowReport, _describe_exception, _exception_hint

__all__ = [
    "check_dequantization",
    "check_bits_per_dim",
    "check_importance_bpd",
    "check_variational_dequantization",
    "dequantization_report",
    "bits_per_dim_report",
    "importance_bpd_report",
    "variational_dequantization_report",
    "vardeq_training_report",
    "require",
    "recover_noise",
    "NoiseFlowForTests",
]

LN2 = math.log(2)
_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------- plumbing
class _Failed(Exception):
    """Stop the current check; the message is already in the report."""


class _Report:
    """Collects :class:`CheckResult` s under fixed titles into a :class:`FlowReport`."""

    def __init__(self, name: str, titles: dict[str, str]):
        self.report = FlowReport(name)
        self.titles = titles

    def add(self, key: str, passed: bool | None, message: str, hint: str = "") -> None:
        self.report.results.append(CheckResult(key, self.titles[key], passed, message, hint))

    @contextlib.contextmanager
    def check(self, key: str) -> Iterator[None]:
        """Run one check: an exception from the answer becomes a failed result with its place."""
        try:
            yield
        except _Failed:
            pass
        except AssertionError as exc:
            self.add(key, False, str(exc))
        except Exception as exc:  # the answer may raise anything: report it, don't crash
            self.add(key, False, _describe_exception("the answer", exc),
                     _exception_hint(exc, "the method"))

    def fail(self, key: str, message: str, hint: str = "") -> None:
        self.add(key, False, message, hint)
        raise _Failed

    def skip_missing(self, keys: Iterable[str], why: str) -> None:
        done = {r.name for r in self.report.results}
        for key in keys:
            if key not in done:
                self.add(key, None, f"not run: {why}")


def _single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _one_thread():
            return fn(*args, **kwargs)

    return wrapper


def require(report: FlowReport, *names: str) -> FlowReport:
    """Raise ``AssertionError`` unless every named check of ``report`` ran and passed.

    Example:
        >>> require(dequantization_report(Dequantization), "round_trip")   # doctest: +SKIP
    """
    problems = []
    for name in names:
        if name not in report:
            problems.append(f"- {name}: no such check in the report")
            continue
        r = report[name]
        if r.passed is not True:
            line = f"- {r.title} [{r.name}]: {r.message}"
            if r.passed is False and r.hint:
                line += f"\n  hint: {r.hint}"
            problems.append(line)
    if problems:
        raise AssertionError(f"{report.name}:\n" + "\n".join(problems))
    return report


def _print_and_raise(report: FlowReport) -> None:
    print(report)
    if not report.ok:
        raise AssertionError(report.failure_message())
    print("All checks passed.")


def _pair(out: Any, what: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(t, Tensor) for t in out)):
        raise AssertionError(f"{what} must return a tuple (tensor, log_det), "
                             f"got {type(out).__name__}")
    return out[0], out[1]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread (many threads contend on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pixels(levels: int, shape: tuple[int, ...], seed: int, dtype=torch.float64) -> Tensor:
    """Every value 0..levels-1 at least once (when there is room), the rest random."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    values = torch.randint(0, levels, (n,), generator=g)
    values[: min(n, levels)] = torch.arange(min(n, levels))
    values = values[torch.randperm(n, generator=g)]
    return values.reshape(shape).to(dtype)


def recover_noise(z: Tensor, x: Tensor, levels: int = 256, alpha: float = 1e-5) -> Tensor:
    """The noise ``u`` a dequantization layer added: undo ``z = logit(alpha + (1-2alpha)(x+u)/L)``.

    Example:
        >>> z, _ = layer(x)                              # doctest: +SKIP
        >>> u = recover_noise(z, x, layer.levels, layer.alpha)  # doctest: +SKIP
    """
    v = torch.sigmoid(z.detach().double())
    return (v - alpha) / (1 - 2 * alpha) * levels - x.double()


def _noise_slogdet(layer: Any, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """``slogdet`` of the autograd Jacobian of ``noise -> z = layer(x, noise=noise)[0]`` for one
    image ``x`` (a batch of 1): the layer is a deterministic function of the noise it is given."""

    def z_of(v: Tensor) -> Tensor:
        return layer(x, noise=v.reshape(x.shape))[0].reshape(-1)

    return torch.linalg.slogdet(torch.autograd.functional.jacobian(z_of, noise.reshape(-1)))


def _std_normal_log_prob(eps: Tensor) -> Tensor:
    return -0.5 * (eps.pow(2) + _LOG_2PI).flatten(1).sum(1)


def _logdet_hint(diff: float, d: int, levels: int) -> str:
    if abs(abs(diff) - d * math.log(levels)) < 1e-3 * (1 + d * math.log(levels)):
        return (f"the difference is D log(levels) = {d} x log({levels}): the log-det misses the "
                "-log(levels) of dividing by levels (or counts it with the wrong sign)")
    return ("per dimension, d z/d u = (1 - 2 alpha) / (levels v (1 - v)) with "
            "v = alpha + (1 - 2 alpha)(x + u)/levels; sum the logs over every non-batch "
            "dimension, one number per image")


# --------------------------------------------------------------------------------- Dequantization
_DEQ_TITLES = {
    "returns": "forward/inverse return (tensor, log_det)",
    "shapes": "shapes and dtypes",
    "noise": "z = logit(alpha + (1 - 2 alpha)(x + u)/levels), u in [0, 1)",
    "round_trip": "inverse(forward(x)) == x exactly (float64)",
    "inverse_range": "inverse gives integers in [0, levels - 1]",
    "range_error": "ValueError for pixels outside [0, levels - 1] or not integers",
    "log_det": "log_det == log|det dz/du| (autograd, float64)",
    "inverse_log_det": "inverse log_det == -forward log_det",
    "uniform_8bpd": "a uniform density gives log2(levels) bits/dim",
}


@_single_threaded
def dequantization_report(cls: Callable[..., Any], levels: int = 256, alpha: float = 1e-5,
                          seed: int = 0, draws: int = 8) -> FlowReport:
    """Check a uniform ``Dequantization`` class (see the module docstring for the contract).

    Builds ``cls(levels=levels, alpha=alpha)`` and checks, on every pixel value in float64:
    the shapes, ``noise=`` handling, the exact round trip over ``draws`` noise draws, the
    range of ``inverse`` for extreme ``z``, ``ValueError`` for bad pixels, the log-det
    against the autograd Jacobian of ``u -> z``, the inverse's log-det, and that a uniform
    density on the pixel cube costs ``log2(levels)`` bits per dimension.
    """
    rep = _Report(f"{getattr(cls, '__name__', 'Dequantization')}(levels={levels})", _DEQ_TITLES)
    g = torch.Generator().manual_seed(seed)
    try:
        layer = cls(levels=levels, alpha=alpha)
    except Exception as exc:
        rep.add("returns", False, _describe_exception(f"{getattr(cls, '__name__', cls)}"
                                                      f"(levels={levels}, alpha={alpha})", exc),
                "the constructor must accept levels= and alpha=")
        rep.skip_missing(_DEQ_TITLES, "the layer could not be built")
        return rep.report
    x = _pixels(levels, (4, 1, 8, max(2, levels // 16)), seed)
    d = x[0].numel()

    z = ld = None
    with rep.check("returns"):
        u = torch.rand(x.shape, generator=g, dtype=torch.float64)
        z, ld = _pair(layer(x, noise=u), "forward(x, noise=u)")
        x_back, ld_inv = _pair(layer.inverse(z), "inverse(z)")
        rep.add("returns", True, "both directions return (tensor, log_det)")
    if z is None:
        rep.skip_missing(_DEQ_TITLES, "forward or inverse does not run")
        return rep.report

    with rep.check("shapes"):
        problems = []
        if z.shape != x.shape:
            problems.append(f"z has shape {tuple(z.shape)}, x has {tuple(x.shape)}")
        if z.dtype != torch.float64:
            problems.append(f"float64 pixels gave z of dtype {z.dtype} (keep the dtype of a "
                            "float input)")
        for what, t in (("forward", ld), ("inverse", ld_inv)):
            if tuple(t.shape) != (x.shape[0],):
                problems.append(f"{what} log_det has shape {tuple(t.shape)}, expected "
                                f"({x.shape[0]},): one number per image")
        if x_back.shape != x.shape:
            problems.append(f"inverse returns shape {tuple(x_back.shape)}, x has {tuple(x.shape)}")
        z8, _ = _pair(layer(x[:2].to(torch.uint8 if levels <= 256 else torch.int64)),
                      "forward(uint8 pixels)")
        if not z8.is_floating_point():
            problems.append(f"uint8 pixels gave z of dtype {z8.dtype}; convert integer input to "
                            "a float dtype (torch.get_default_dtype())")
        if problems:
            rep.fail("shapes", "; ".join(problems),
                     "z has the shape of x; log_det sums over every non-batch dimension "
                     "(log_det.flatten(1).sum(1))")
        rep.add("shapes", True, f"z {tuple(z.shape)} float64, log_det ({x.shape[0]},); uint8 "
                "input works")

    with rep.check("noise"):
        z2, _ = _pair(layer(x, noise=u), "forward(x, noise=u)")
        if not torch.equal(z, z2):
            rep.fail("noise", "two calls with the same noise= gave different z",
                     "when noise is given, use it instead of drawing u")
        if not bool(torch.isfinite(z).all()):
            rep.fail("noise", f"z has {int((~torch.isfinite(z)).sum())} NaN/inf values",
                     "the logit needs a value strictly inside (0, 1): divide x + u by levels "
                     "and squeeze with alpha + (1 - 2 alpha) * ...")
        err = float((recover_noise(z, x, levels, alpha) - u).abs().max())
        if err > 1e-6:
            rep.fail("noise", f"undoing the logit does not give back x + u (max error "
                     f"{err:.3g} pixel levels)",
                     "add the noise to the integer pixels first, then divide by levels: "
                     "v = alpha + (1 - 2 alpha) * (x + u) / levels, z = log(v) - log(1 - v)")
        zr, _ = _pair(layer(x), "forward(x)")
        ur = recover_noise(zr, x, levels, alpha)
        lo, hi, mean = float(ur.min()), float(ur.max()), float(ur.mean())
        if lo < -1e-6 or hi > 1 + 1e-6 or abs(mean - 0.5) > 0.1 or float(ur.std()) < 0.15:
            rep.fail("noise", f"without noise=, the noise added ranges over [{lo:.3g}, {hi:.3g}] "
                     f"with mean {mean:.3g}; uniform noise on [0, 1) has mean 0.5, std 0.29",
                     "draw u with torch.rand_like(x) (uniform on [0, 1), same shape as x)")
        rep.add("noise", True, f"noise= is used as given (error {err:.2g}); drawn noise in "
                f"[{lo:.3f}, {hi:.3f}], mean {mean:.3f}")

    with rep.check("round_trip"):
        for k in range(draws):
            if k == 0:
                uk = torch.full_like(x, 1 - 1e-7)
            elif k == 1:
                uk = torch.full_like(x, 1e-7)
            else:
                uk = torch.rand(x.shape, generator=g, dtype=torch.float64)
            zk, _ = _pair(layer(x, noise=uk), "forward")
            xk, _ = _pair(layer.inverse(zk), "inverse")
            if xk.shape != x.shape:
                rep.fail("round_trip", f"inverse returns shape {tuple(xk.shape)}")
            wrong = xk.double() != x
            if bool(wrong.any()):
                i = wrong.nonzero()[0].tolist()
                rep.fail("round_trip",
                         f"{int(wrong.sum())} of {x.numel()} pixels came back wrong (noise draw "
                         f"{k}); e.g. pixel {x[tuple(i)].item():.0f} with u = "
                         f"{uk[tuple(i)].item():.7f} came back as {xk[tuple(i)].item():.6g}",
                         "inverse: v = sigmoid(z), y = (v - alpha) / (1 - 2 alpha) * levels, "
                         "then floor and clamp to [0, levels - 1]")
        rep.add("round_trip", True, f"all {x.numel()} pixels exact over {draws} noise draws, "
                "u = 1e-7 and u = 1 - 1e-7 included")

    with rep.check("inverse_range"):
        extreme = torch.tensor([-1e4, -60.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 60.0, 1e4],
                               dtype=torch.float64).reshape(1, 1, 1, 9)
        xe, _ = _pair(layer.inverse(extreme), "inverse")
        xe = xe.double()
        if not bool(torch.isfinite(xe).all()) or bool((xe != torch.floor(xe)).any()) or bool(
                (xe < 0).any()) or bool((xe > levels - 1).any()):
            rep.fail("inverse_range", f"inverse of z = {extreme.flatten().tolist()} gave "
                     f"{xe.flatten().tolist()}",
                     f"floor to integers and clamp to [0, {levels - 1}]: a sigmoid of a large z "
                     "rounds to 1 and would give levels itself")
        rep.add("inverse_range", True, f"extreme z give integers in [0, {levels - 1}]")

    with rep.check("range_error"):
        bad_inputs = [("a pixel equal to levels", float(levels)), ("a negative pixel", -1.0),
                      ("a non-integer pixel", 2.5)]
        for what, value in bad_inputs:
            xb = x[:1].clone()
            xb.view(-1)[3] = value
            try:
                layer(xb)
            except ValueError:
                continue
            except Exception as exc:
                rep.fail("range_error", f"{what} ({value}) raised {type(exc).__name__}, not "
                         "ValueError", "raise ValueError('...') yourself, before computing")
            rep.fail("range_error", f"{what} ({value}) was accepted",
                     f"check that every pixel is an integer in [0, {levels - 1}] and raise "
                     "ValueError with a message saying what is wrong")
        rep.add("range_error", True, f"ValueError for {levels}, -1 and 2.5")

    with rep.check("log_det"):
        xs = x[:2, :, :2, :3].contiguous()
        us = torch.rand(xs.shape, generator=g, dtype=torch.float64)
        _, lds = _pair(layer(xs, noise=us), "forward")
        worst_diff = 0.0
        for i in range(xs.shape[0]):
            sign, logabs = _noise_slogdet(layer, xs[i:i + 1], us[i:i + 1])
            if float(sign) == 0:
                rep.fail("log_det", "z does not depend on the noise (zero Jacobian)",
                         "compute z from x + u, without detaching or rounding")
            diff = float(lds[i]) - float(logabs)
            if abs(diff) > 1e-6 * (1 + abs(float(logabs))):
                rep.fail("log_det", f"image {i}: log_det {float(lds[i]):.6g} but log|det dz/du| "
                         f"= {float(logabs):.6g} (difference {diff:.4g})",
                         _logdet_hint(diff, xs[0].numel(), levels))
            worst_diff = max(worst_diff, abs(diff))
        rep.add("log_det", True, f"matches the Jacobian within {worst_diff:.2g}")

    with rep.check("inverse_log_det"):
        _, ld_back = _pair(layer.inverse(z), "inverse")
        err = float((ld_back.double() + ld.double()).abs().max())
        tol = 1e-6 * (1 + float(ld.abs().max()))
        if err > tol:
            rep.fail("inverse_log_det", f"forward log_det {float(ld[0]):.6g} but inverse "
                     f"log_det {float(ld_back[0]):.6g} at the same z (max |sum| {err:.3g})",
                     "inverse returns log|det dy/dz| of the continuous part, minus the forward "
                     "log-det: log(levels) - log(1 - 2 alpha) + log s + log(1 - s), "
                     "s = sigmoid(z)")
        rep.add("inverse_log_det", True, f"max |forward + inverse| {err:.2g}")

    with rep.check("uniform_8bpd"):
        # z = logit(v') is standard logistic when v' is uniform: that density is uniform on y
        zz, ldz = _pair(layer(x), "forward")
        log_p = (F.logsigmoid(zz) + F.logsigmoid(-zz)).flatten(1).sum(1) + ldz
        bpd = float((-log_p / (d * LN2)).mean())
        expected = math.log2(levels) - math.log2(1 - 2 * alpha)
        if abs(bpd - expected) > 1e-4:
            rep.fail("uniform_8bpd", f"a uniform density on [0, {levels})^D through your layer "
                     f"gives {bpd:.5f} bits/dim, expected log2({levels}) = {expected:.5f}",
                     _logdet_hint((expected - bpd) * d * LN2, d, levels))
        rep.add("uniform_8bpd", True, f"{bpd:.5f} bits/dim (log2({levels}) = "
                f"{math.log2(levels):.0f})")
    return rep.report


def check_dequantization(cls: Callable[..., Any]) -> None:
    """Print the self-check report of a ``Dequantization`` class; raise if a check fails."""
    _print_and_raise(dequantization_report(cls))


# --------------------------------------------------------------------------------- bits per dim
_BPD_TITLES = {
    "returns": "returns a tensor of shape (B,)",
    "uniform": "a uniform model of 8-bit pixels costs 8 bits/dim",
    "formula": "bpd = -log_prob / (D ln 2)",
    "gradient": "differentiable (usable as a loss)",
}


@_single_threaded
def bits_per_dim_report(fn: Callable[[Tensor, Tensor], Tensor],
                        shapes: Iterable[tuple[int, ...]] = ((1, 28, 28), (3, 8, 8), (5,)),
                        seed: int = 0) -> FlowReport:
    """Check ``bits_per_dim(log_prob, x)`` on batches of the given per-image ``shapes``."""
    rep = _Report(getattr(fn, "__name__", "bits_per_dim"), _BPD_TITLES)
    g = torch.Generator().manual_seed(seed)
    shapes = [tuple(s) for s in shapes]
    with rep.check("returns"):
        x = torch.zeros(3, *shapes[0])
        out = fn(torch.zeros(3, dtype=torch.float64), x)
        if not isinstance(out, Tensor) or tuple(out.shape) != (3,):
            rep.fail("returns", f"for log_prob of shape (3,) it returned "
                     f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}",
                     "return one number per image, a tensor of shape (B,); no .mean(), no .item()")
        rep.add("returns", True, "shape (B,)")
    with rep.check("uniform"):
        for shape in shapes:
            d = math.prod(shape)
            x = torch.randint(0, 256, (2, *shape), generator=g).float()
            log_prob = torch.full((2,), -d * math.log(256), dtype=torch.float64)
            bpd = fn(log_prob, x)
            if not bool(torch.allclose(bpd.double(), torch.full_like(bpd.double(), 8.0),
                                       atol=1e-9)):
                rep.fail("uniform", f"images of shape {shape} (D = {d}) with log p = -D ln 256 "
                         f"= {-d * math.log(256):.2f} nats gave {bpd.tolist()} bits/dim, "
                         "expected 8",
                         "divide by D (the number of values per image, x[0].numel()) and by "
                         "ln 2 (nats to bits), and flip the sign")
        rep.add("uniform", True, "8.000 bits/dim for every shape")
    with rep.check("formula"):
        for shape in shapes:
            d = math.prod(shape)
            x = torch.zeros(4, *shape)
            log_prob = -torch.rand(4, generator=g, dtype=torch.float64) * 3 * d
            bpd = fn(log_prob, x).double()
            expected = -log_prob / (d * LN2)
            err = float((bpd - expected).abs().max())
            if err > 1e-9 * (1 + float(expected.abs().max())):
                rep.fail("formula", f"shape {shape}: log_prob {log_prob[0].item():.4g} gave "
                         f"{bpd[0].item():.6g}, expected {expected[0].item():.6g}",
                         "bpd = -log_prob / (D * math.log(2)) with D = x[0].numel()")
        rep.add("formula", True, "matches for every shape")
    with rep.check("gradient"):
        log_prob = torch.tensor([-100.0, -200.0], requires_grad=True)
        bpd = fn(log_prob, torch.zeros(2, 1, 2, 2))
        if not isinstance(bpd, Tensor) or not bpd.requires_grad:
            rep.fail("gradient", "the result does not carry a gradient back to log_prob",
                     "compute with torch operations on log_prob (no .item(), .detach(), numpy)")
        bpd.sum().backward()
        rep.add("gradient", True, "gradients flow back to log_prob")
    return rep.report


def check_bits_per_dim(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Print the self-check report of ``bits_per_dim``; raise if a check fails."""
    _print_and_raise(bits_per_dim_report(fn))


# --------------------------------------------------------------------------------- importance bpd
_IW_TITLES = {
    "returns": "returns a tensor of shape (B,)",
    "constant": "k equal weights give the one-sample bpd (the -log k term)",
    "stable": "stable for log-weights around -5000 (logsumexp)",
    "lognormal": "log of the mean weight, not the mean of the log-weights",
    "tighter": "more samples give a lower bpd on average",
}


def _fake_log_prob(mu: float, sigma: float, g: torch.Generator) -> Callable[[Tensor], Tensor]:
    """A random 'log-weight' per row, whatever the batch size: ``mu + sigma * N(0, 1)``."""

    def log_prob(x: Tensor) -> Tensor:
        return mu + sigma * torch.randn(x.shape[0], generator=g, dtype=torch.float64)

    return log_prob


@_single_threaded
def importance_bpd_report(fn: Callable[..., Tensor], seed: int = 0) -> FlowReport:
    """Check ``importance_bpd(log_prob, x, k)`` with log-weight functions of known behaviour.

    ``log_prob`` may be called ``k`` times on ``x`` or once on a batch repeating ``x``: the
    fake functions return fresh random values for every row they are given.
    """
    rep = _Report(getattr(fn, "__name__", "importance_bpd"), _IW_TITLES)
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(3, 1, 2, 2)
    d = x[0].numel()
    with rep.check("returns"):
        out = fn(_fake_log_prob(-5.0, 1.0, g), x, k=4)
        if not isinstance(out, Tensor) or tuple(out.shape) != (3,):
            rep.fail("returns", f"for 3 images it returned "
                     f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}",
                     "return one bpd per image: shape (B,)")
        rep.add("returns", True, "shape (B,)")
    with rep.check("constant"):
        for k in (1, 4, 16):
            out = fn(lambda xb: torch.full((xb.shape[0],), -7.0, dtype=torch.float64), x, k=k)
            expected = 7.0 / (d * LN2)
            err = float((out.double() - expected).abs().max())
            if err > 1e-6:
                off = (float(out.double().mean()) - expected) * d * LN2
                hint = ("with k equal log-weights c, logsumexp gives c + log k: subtract log k "
                        f"(your result is off by {-off:.4g} nats, log k = {math.log(k):.4g})"
                        if abs(abs(off) - math.log(k)) < 1e-3 else
                        "bpd = -(logsumexp over the k samples - log k) / (D ln 2)")
                rep.fail("constant", f"k = {k} identical log-weights -7 gave {out.tolist()} "
                         f"bits/dim, expected {expected:.6g}", hint)
        rep.add("constant", True, "k = 1, 4, 16 equal weights give the one-sample bpd")
    with rep.check("stable"):
        out = fn(_fake_log_prob(-5000.0, 2.0, g), x, k=8).double()
        if not bool(torch.isfinite(out).all()):
            rep.fail("stable", f"log-weights around -5000 gave {out.tolist()}",
                     "exp(-5000) is 0 in floating point: use torch.logsumexp over the samples "
                     "instead of log(mean(exp(...)))")
        rep.add("stable", True, f"finite ({float(out.mean()):.1f} bits/dim)")
    with rep.check("lognormal"):
        mu, sigma, k = -3.0, 1.0, 4000
        out = fn(_fake_log_prob(mu, sigma, g), x, k=k).double()
        expected = -(mu + sigma ** 2 / 2) / (d * LN2)  # log E[w] for log-normal weights
        wrong = -mu / (d * LN2)                          # the mean of the log-weights
        err = float((out - expected).abs().max())
        if err > 0.05:
            near_wrong = float((out - wrong).abs().max()) < 0.05
            rep.fail("lognormal", f"log-weights ~ N({mu}, {sigma}^2), k = {k}: got "
                     f"{float(out.mean()):.4f} bits/dim, expected about {expected:.4f}",
                     "you averaged the log-weights; average the weights themselves in log "
                     "space: logsumexp(log_w, dim=0) - log k" if near_wrong else
                     "call log_prob k times (each call draws new noise), stack the k results "
                     "and take logsumexp over them, minus log k")
        rep.add("lognormal", True, f"{float(out.mean()):.4f} bits/dim (expected "
                f"{expected:.4f}; the mean of log-weights would give {wrong:.4f})")
    with rep.check("tighter"):
        one = torch.stack([fn(_fake_log_prob(mu, sigma, g), x, k=1) for _ in range(200)]).double()
        many = torch.stack([fn(_fake_log_prob(mu, sigma, g), x, k=16) for _ in range(200)]).double()
        if not float(many.mean()) < float(one.mean()) - 0.02:
            rep.fail("tighter", f"average bpd with k = 1: {float(one.mean()):.4f}, with k = 16: "
                     f"{float(many.mean()):.4f}; the bound should tighten (bpd go down)",
                     "use logsumexp of the k log-weights minus log k")
        rep.add("tighter", True, f"k = 1: {float(one.mean()):.3f}, k = 16: "
                f"{float(many.mean()):.3f} bits/dim on average")
    return rep.report


def check_importance_bpd(fn: Callable[..., Tensor]) -> None:
    """Print the self-check report of ``importance_bpd``; raise if a check fails."""
    _print_and_raise(importance_bpd_report(fn))


# --------------------------------------------------------------------------------- variational
class NoiseFlowForTests(nn.Module):
    """A tiny conditional noise flow: ``u = sigmoid(eps * exp(a) + b)``, ``a, b`` affine in the
    context, per pixel. ``forward(eps, context) -> (u, log|det du/deps|)``.

    It records the last context and ``u`` it saw (``last_context``, ``last_u``), so tests can
    check what a variational dequantization layer did with them.
    """

    def __init__(self, a=(0.3, -0.4), b=(0.2, 0.8)):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))
        self.last_context: Tensor | None = None
        self.last_u: Tensor | None = None

    def forward(self, eps: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if context is None:
            raise ValueError("the noise flow needs the image as context: noise_flow(eps, context)")
        if context.shape != eps.shape:
            raise ValueError(f"the context must have eps's shape {tuple(eps.shape)}, got "
                             f"{tuple(context.shape)}")
        c = context.to(eps.dtype)
        log_scale = self.a[0] + self.a[1] * c
        v = eps * log_scale.exp() + self.b[0] + self.b[1] * c
        u = torch.sigmoid(v)
        log_det = log_scale + F.logsigmoid(v) + F.logsigmoid(-v)
        self.last_context, self.last_u = context.detach(), u.detach()
        return u, log_det.flatten(1).sum(1)

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c = context.to(u.dtype)
        log_scale = self.a[0] + self.a[1] * c
        v = torch.log(u) - torch.log1p(-u)
        eps = (v - self.b[0] - self.b[1] * c) * (-log_scale).exp()
        log_det = -(log_scale + F.logsigmoid(v) + F.logsigmoid(-v))
        return eps, log_det.flatten(1).sum(1)


_VD_TITLES = {
    "returns": "forward/inverse return (tensor, log_det)",
    "shapes": "shapes and dtypes",
    "noise": "u comes from noise_flow(eps, context), in (0, 1)",
    "context": "the noise flow is conditioned on the image",
    "round_trip": "inverse(forward(x)) == x exactly (float64)",
    "log_det": "log_det == log|det dz/deps| - log N(eps) (autograd, float64)",
    "gradients": "the noise flow's parameters get gradients",
}


def _build_vardeq(cls, noise_flow, levels, alpha):
    return cls(noise_flow=noise_flow, levels=levels, alpha=alpha)


@_single_threaded
def variational_dequantization_report(cls: Callable[..., Any], levels: int = 256,
                                      alpha: float = 1e-5, seed: int = 0) -> FlowReport:
    """Check a ``VariationalDequantization`` class built with :class:`NoiseFlowForTests`.

    The defining property: with ``eps`` given as ``noise=``, the forward log-det equals
    ``log|det dz/deps|`` (autograd) minus ``log N(eps; 0, I)``, which is the uniform log-det
    ``log|det dz/du|`` minus ``log q(u | x)``.
    """
    rep = _Report(f"{getattr(cls, '__name__', 'VariationalDequantization')}(levels={levels})",
                  _VD_TITLES)
    g = torch.Generator().manual_seed(seed)
    flow = NoiseFlowForTests()
    try:
        layer = _build_vardeq(cls, flow, levels, alpha)
    except Exception as exc:
        rep.add("returns", False, _describe_exception(
            f"{getattr(cls, '__name__', cls)}(noise_flow=..., levels={levels}, alpha={alpha})",
            exc), "the constructor must accept noise_flow=, levels= and alpha=")
        rep.skip_missing(_VD_TITLES, "the layer could not be built")
        return rep.report
    x = _pixels(levels, (4, 1, 8, max(2, levels // 16)), seed)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)

    z = None
    with rep.check("returns"):
        z, ld = _pair(layer(x, noise=eps), "forward(x, noise=eps)")
        x_back, ld_inv = _pair(layer.inverse(z), "inverse(z)")
        rep.add("returns", True, "both directions return (tensor, log_det)")
    if z is None:
        rep.skip_missing(_VD_TITLES, "forward or inverse does not run")
        return rep.report
    with rep.check("shapes"):
        problems = []
        if z.shape != x.shape or z.dtype != torch.float64:
            problems.append(f"z has shape {tuple(z.shape)} and dtype {z.dtype} for float64 x "
                            f"of shape {tuple(x.shape)}")
        if tuple(ld.shape) != (x.shape[0],):
            problems.append(f"log_det has shape {tuple(ld.shape)}, expected ({x.shape[0]},)")
        if problems:
            rep.fail("shapes", "; ".join(problems), "keep x's shape and dtype; one log_det "
                     "per image")
        rep.add("shapes", True, "z like x, log_det (B,)")
    with rep.check("noise"):
        if flow.last_u is None:
            rep.fail("noise", "forward never called noise_flow", "u, log_det_u = "
                     "self.noise_flow(eps, context)")
        u = recover_noise(z, x, levels, alpha)
        err = float((u - flow.last_u).abs().max())
        if err > 1e-6:
            rep.fail("noise", f"the noise added to x differs from the noise flow's output by up "
                     f"to {err:.3g} (recovered u in [{float(u.min()):.3g}, {float(u.max()):.3g}])",
                     "pass noise= on as eps (eps = noise when given, else torch.randn_like(x)); "
                     "the noise flow already ends in a sigmoid: add its output u to x as it is")
        if float(u.min()) <= -1e-9 or float(u.max()) >= 1 + 1e-9:
            rep.fail("noise", f"u outside (0, 1): [{float(u.min()):.3g}, {float(u.max()):.3g}]")
        z2, _ = _pair(layer(x, noise=eps), "forward")
        if not torch.equal(z, z2):
            rep.fail("noise", "the same noise= gave different z", "use noise= as eps")
        rep.add("noise", True, f"u = noise_flow(eps, context) in [{float(u.min()):.3f}, "
                f"{float(u.max()):.3f}]")
    with rep.check("context"):
        layer(x, noise=eps)
        c1 = flow.last_context
        x2 = (x + 1).clamp(max=levels - 1)
        layer(x2, noise=eps)
        c2 = flow.last_context
        if c1 is None or c1.shape != x.shape or torch.equal(c1, c2):
            rep.fail("context", "the context given to the noise flow does not follow the image",
                     "pass the image (rescaled, e.g. x / (levels - 1) * 2 - 1) as the context")
        rep.add("context", True, f"context of shape {tuple(c1.shape)} that follows x")
    with rep.check("round_trip"):
        for k in range(4):
            ek = eps if k == 0 else torch.randn(x.shape, generator=g, dtype=torch.float64) * 3
            zk, _ = _pair(layer(x, noise=ek), "forward")
            xk, _ = _pair(layer.inverse(zk), "inverse")
            wrong = xk.double() != x
            if bool(wrong.any()):
                rep.fail("round_trip", f"{int(wrong.sum())} of {x.numel()} pixels came back "
                         "wrong", "inverse is the uniform layer's: sigmoid, unsquash, times "
                         "levels, floor, clamp")
        rep.add("round_trip", True, "exact over 4 noise draws")
    with rep.check("log_det"):
        xs = x[:2, :, :2, :3].contiguous()
        es = torch.randn(xs.shape, generator=g, dtype=torch.float64)
        _, lds = _pair(layer(xs, noise=es), "forward")
        lds = lds.detach()
        worst = 0.0
        for i in range(xs.shape[0]):
            sign, logabs = _noise_slogdet(layer, xs[i:i + 1], es[i:i + 1])
            expected = float(logabs) - float(_std_normal_log_prob(es[i:i + 1])[0])
            diff = float(lds[i]) - expected
            if float(sign) == 0 or abs(diff) > 1e-6 * (1 + abs(expected)):
                with torch.no_grad():
                    _, log_du = flow(es[i:i + 1], flow_context(xs[i:i + 1], levels))
                log_q = float(_std_normal_log_prob(es[i:i + 1])[0]) - float(log_du[0])
                hint = ("the difference is log q(u|x): subtract log q(u|x) = log N(eps) - "
                        "log|det du/deps| from the uniform log-det"
                        if abs(diff - log_q) < 1e-3 * (1 + abs(log_q)) else
                        "log_det = (uniform log-det at x + u) - log q(u|x), with log q(u|x) = "
                        "log N(eps; 0, I) - (the noise flow's log-det)")
                rep.fail("log_det", f"image {i}: log_det {float(lds[i]):.6g}, expected "
                         f"{expected:.6g} (difference {diff:.4g})", hint)
            worst = max(worst, abs(diff))
        rep.add("log_det", True, f"matches within {worst:.2g}")
    with rep.check("gradients"):
        for p in flow.parameters():
            p.grad = None
        zz, ldz = _pair(layer(x), "forward")
        (ldz.sum() + zz.sum()).backward()
        missing = [n for n, p in flow.named_parameters()
                   if p.grad is None or not bool(p.grad.ne(0).any())]
        if missing:
            rep.fail("gradients", f"no gradient reaches the noise flow's {', '.join(missing)}",
                     "sample u through the noise flow (reparameterisation): no torch.no_grad(), "
                     ".detach() or .item() on the way")
        rep.add("gradients", True, "every noise-flow parameter gets a gradient")
    return rep.report


def flow_context(x: Tensor, levels: int = 256) -> Tensor:
    """The context the lesson passes to noise flows: the image rescaled to ``[-1, 1]``."""
    return x / (levels - 1) * 2 - 1


def check_variational_dequantization(cls: Callable[..., Any]) -> None:
    """Print the self-check reports of a ``VariationalDequantization`` class (its properties,
    then a short training run against a fixed density); raise if a check fails."""
    report = variational_dequantization_report(cls)
    print(report)
    training = vardeq_training_report(cls) if report.ok else None
    if training is not None:
        print(training)
    for r in (report, training):
        if r is not None and not r.ok:
            raise AssertionError(r.failure_message())
    print("All checks passed.")


_TRAIN_TITLES = {
    "trains": "trains without errors",
    "beats_uniform": "learned noise beats uniform noise",
    "valid_bound": "the bound stays below the true log-likelihood",
}


@_single_threaded
def vardeq_training_report(cls: Callable[..., Any], steps: int = 100, seed: int = 0,
                           pixel: int = 128, width: float = 0.15) -> FlowReport:
    """Train only the noise flow of ``cls`` against a fixed, peaked pixel density.

    The density puts each pixel near ``pixel + 0.5`` with a standard deviation of ``width``
    levels (a normal in logit space). Uniform noise wastes most of its samples where that
    density is small; a learned ``q(u|x)`` can follow it. After ``steps`` Adam steps the
    variational bound must beat the uniform one by at least 0.5 bits/dim, and stay at or
    above the true ``-log2 P(x)`` per dimension (a lower bound on ``log P`` cannot exceed it).
    """
    levels, alpha = 256, 1e-5
    rep = _Report(f"{getattr(cls, '__name__', 'VariationalDequantization')} training",
                  _TRAIN_TITLES)
    shape = (1, 2, 2)
    d = math.prod(shape)
    y0 = torch.tensor(pixel + 0.5, dtype=torch.float64)
    v0 = alpha + (1 - 2 * alpha) * y0 / levels
    mu = torch.log(v0) - torch.log1p(-v0)
    sd = width * (1 - 2 * alpha) / (levels * v0 * (1 - v0))  # width levels, in logit units

    def log_density(z: Tensor) -> Tensor:
        return (-0.5 * ((z - mu) / sd) ** 2 - torch.log(sd) - 0.5 * _LOG_2PI).flatten(1).sum(1)

    def logit(y: Tensor) -> Tensor:
        v = alpha + (1 - 2 * alpha) * y / levels
        return torch.log(v) - torch.log1p(-v)

    # the exact discrete log-likelihood per pixel, and uniform dequantization's bound
    normal = torch.distributions.Normal(mu, sd)
    true_bpd = float(-torch.log(normal.cdf(logit(y0 + 0.5)) - normal.cdf(logit(y0 - 0.5)))
                     / LN2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u = torch.rand(10000, *shape, dtype=torch.float64)
        y = pixel + u
        v = alpha + (1 - 2 * alpha) * y / levels
        z = torch.log(v) - torch.log1p(-v)
        ld = (math.log(1 - 2 * alpha) - math.log(levels) - torch.log(v) - torch.log1p(-v))
        uniform_bpd = float(-(log_density(z) + ld.flatten(1).sum(1)).mean() / (d * LN2))

        x = torch.full((64, *shape), float(pixel), dtype=torch.float64)
        flow = NoiseFlowForTests(a=(0.0, 0.0), b=(0.0, 0.0))
        with rep.check("trains"):
            layer = _build_vardeq(cls, flow, levels, alpha)
            opt = torch.optim.Adam(flow.parameters(), lr=0.05)
            for _ in range(steps):
                zz, ldz = _pair(layer(x), "forward")
                loss = -(log_density(zz) + ldz).mean() / (d * LN2)
                opt.zero_grad()
                loss.backward()
                opt.step()
            loss = float(loss.detach())
            if not math.isfinite(loss):
                rep.fail("trains", f"the loss became {loss}")
            rep.add("trains", True, f"{steps} steps, last loss {loss:.3f} bits/dim")
        if "trains" not in rep.report or not rep.report["trains"].passed:
            rep.skip_missing(_TRAIN_TITLES, "training failed")
            return rep.report
        with torch.no_grad():
            xe = torch.full((2000, *shape), float(pixel), dtype=torch.float64)
            zz, ldz = layer(xe)
            vardeq_bpd = float(-(log_density(zz) + ldz).mean() / (d * LN2))
    with rep.check("beats_uniform"):
        if not vardeq_bpd < uniform_bpd - 0.5:
            rep.fail("beats_uniform", f"after training: {vardeq_bpd:.3f} bits/dim with learned "
                     f"noise, {uniform_bpd:.3f} with uniform noise (true value "
                     f"{true_bpd:.4f}); expected at least 0.5 lower",
                     "the log-det must be the uniform one minus log q(u|x), and u must come "
                     "from the noise flow with gradients")
        rep.add("beats_uniform", True, f"{vardeq_bpd:.3f} bits/dim learned vs {uniform_bpd:.3f} "
                "uniform")
    with rep.check("valid_bound"):
        if vardeq_bpd < true_bpd - 0.02:
            rep.fail("valid_bound", f"the trained bound says {vardeq_bpd:.3f} bits/dim but the "
                     f"true value is {true_bpd:.4f}: a lower bound on log P(x) cannot be above "
                     "it", "subtract log q(u|x) in the log-det; without it, q collapses onto "
                     "the density's peak and the 'bound' is no bound")
        rep.add("valid_bound", True, f"{vardeq_bpd:.3f} >= true {true_bpd:.4f} bits/dim")
    return rep.report
