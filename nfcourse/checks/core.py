"""Self-checks for flow layers, shared by students (before grading) and graders (hidden tests).

:func:`check_flow` runs a layer that follows the flow contract (see :mod:`nfcourse.flows.base`)
and reports, in plain words and with numbers, every property a correct layer has:

=====================  ====================================================================
``returns``            ``forward``/``inverse`` run and return a 2-tuple of tensors
``log_det_shape``      ``log_det`` has shape ``(batch,)`` and the input's dtype
``shapes``             ``inverse`` gives back the input's shape and dtype; ``z`` keeps the batch
``finite``             no NaN or inf in ``z``, ``x`` or either ``log_det``
``inverse``            ``inverse(forward(x)) == x`` (max abs error)
``mask``               (layers with a ``mask`` attribute) one half passes through unchanged
``log_det``            ``log_det`` equals ``log|det J|`` of the autograd Jacobian (float64)
``inverse_log_det``    the inverse's ``log_det`` is minus the forward one
``batch_independent``  changing one sample leaves every other sample's output unchanged
``gradients``          a loss on ``z`` and ``log_det`` sends a gradient to every parameter
=====================  ====================================================================

:func:`assert_flow` raises on the first report with a failure. :func:`reference_advice` tells
a student, as advice, that an answer which is the package's reference will fail when graded
(the grading kernel's edition of the package does not have that lesson's references).
"""

from __future__ import annotations

import contextlib
import copy
import html
import importlib
import inspect
import math
import os
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CheckResult",
    "FlowReport",
    "assert_flow",
    "check_flow",
    "reference_advice",
]

PASS, FAIL, SKIP = "✓", "✗", "–"

# Default tolerances (``atol``): a difference passes when it is at most ``atol * (1 + scale)``
# where ``scale`` is the size of the quantity compared.
_DEFAULT_ATOL = {
    torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2,
}
# log-dets compared with the autograd Jacobian are computed in float64 when the layer allows it.
_JACOBIAN_ATOL64 = 1e-6
_MAX_JACOBIAN_DIM = 4096  # above this many numbers per sample the Jacobian is skipped
_SEED = 1234


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    """The outcome of one property check.

    ``passed`` is ``True``, ``False``, or ``None`` when the check was skipped (``message`` says
    why). ``hint`` names the usual cause of a failure. ``value`` is the number measured (an error
    or a difference) where there is one, ``tolerance`` the bound it was held to.
    """

    name: str
    title: str
    passed: bool | None
    message: str
    hint: str = ""
    value: float | None = None
    tolerance: float | None = None

    @property
    def skipped(self) -> bool:
        return self.passed is None

    @property
    def symbol(self) -> str:
        return SKIP if self.passed is None else PASS if self.passed else FAIL

    def __str__(self) -> str:
        text = f"{self.symbol} {self.title}: {self.message}"
        if self.passed is False and self.hint:
            text += f"\n    hint: {self.hint}"
        return text


@dataclass
class FlowReport:
    """Everything :func:`check_flow` found out about one layer.

    Example:
        >>> report = check_flow(layer, x)          # doctest: +SKIP
        >>> report.ok, [r.name for r in report.failed]  # doctest: +SKIP
        >>> print(report)                          # doctest: +SKIP
    """

    name: str
    results: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not count as failures)."""
        return all(r.passed is not False for r in self.results)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.passed is False]

    def __getitem__(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no check named {name!r}; checks: {[r.name for r in self.results]}")

    def __contains__(self, name: object) -> bool:
        return any(r.name == name for r in self.results)

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        n_fail = len(self.failed)
        n_pass = sum(r.passed is True for r in self.results)
        if n_fail == 0:
            return f"{self.name}: all {n_pass} checks passed"
        return f"{self.name}: {n_fail} check{'s' * (n_fail != 1)} failed, {n_pass} passed"

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += [f"  {line}" for r in self.results for line in str(r).splitlines()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<FlowReport {self.summary()}>"

    def _repr_html_(self) -> str:
        colour = {PASS: "#1a7f37", FAIL: "#cf222e", SKIP: "#6e7781"}
        rows = []
        for r in self.results:
            hint = html.escape(r.hint) if r.passed is False and r.hint else ""
            rows.append(
                f"<tr><td style='color:{colour[r.symbol]};font-weight:bold;text-align:center'>"
                f"{r.symbol}</td><td style='text-align:left'>{html.escape(r.title)}</td>"
                f"<td style='text-align:left'>{html.escape(r.message)}</td>"
                f"<td style='text-align:left'><i>{hint}</i></td></tr>"
            )
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        head_colour = colour[PASS] if self.ok else colour[FAIL]
        return (
            f"<div><b style='color:{head_colour}'>{html.escape(self.summary())}</b>"
            "<table><thead><tr><th></th><th style='text-align:left'>check</th>"
            "<th style='text-align:left'>result</th><th style='text-align:left'>hint</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            + (f"<ul>{notes}</ul>" if notes else "")
            + "</div>"
        )

    def failure_message(self) -> str:
        """The failed checks in words, each with its numbers and hint."""
        parts = [f"{self.name} fails {len(self.failed)} check(s):"]
        for r in self.failed:
            parts.append(f"- {r.title} [{r.name}]: {r.message}")
            if r.hint:
                parts.append(f"  hint: {r.hint}")
        return "\n".join(parts)

    def raise_if_failed(self) -> FlowReport:
        """Raise ``AssertionError`` naming every failed check; return the report otherwise."""
        if not self.ok:
            raise AssertionError(self.failure_message())
        return self


# --------------------------------------------------------------------------------------------
# Running the layer safely
# --------------------------------------------------------------------------------------------
class _LayerError(Exception):
    """The layer raised; ``text`` says what and where, in one line."""

    def __init__(self, text: str, original: BaseException):
        super().__init__(text)
        self.text = text
        self.original = original


_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _where(exc: BaseException) -> str:
    """``file:line in function: `code``` of the innermost frame outside torch and this module."""
    frames = traceback.extract_tb(exc.__traceback__)
    chosen = None
    for frame in frames:
        path = os.path.abspath(frame.filename)
        if path == _HERE or path.startswith(_TORCH_DIR):
            continue
        chosen = frame
    if chosen is None:
        return ""
    code = f": `{chosen.line.strip()}`" if chosen.line else ""
    return f" (at {os.path.basename(chosen.filename)}:{chosen.lineno} in {chosen.name}{code})"


def _describe_exception(what: str, exc: BaseException) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{what} raised {type(exc).__name__}{': ' + message if message else ''}{_where(exc)}"


@contextlib.contextmanager
def _seeded(device: torch.device) -> Iterator[None]:
    """Fix the random state so a stochastic layer (dequantization) draws the same noise each call,
    without disturbing the caller's random state."""
    devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_SEED)
        yield


def _call(layer: Any, direction: str, x: Tensor, context: Any) -> Any:
    """Run ``layer.forward`` (through ``__call__`` for modules) or ``layer.inverse`` seeded, turning
    an exception from the layer into a :class:`_LayerError`."""
    if direction == "forward":
        fn = layer if isinstance(layer, nn.Module) else layer.forward
    else:
        fn = layer.inverse
    args = (x,) if context is None else (x, context)
    try:
        with _seeded(x.device):
            return fn(*args)
    except Exception as exc:  # the student's code may raise anything: report it, don't crash
        raise _LayerError(_describe_exception(f"{direction}", exc), exc) from exc


def _type_name(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        kind = type(obj).__name__
        return f"a {kind} of {len(obj)} ({', '.join(type(o).__name__ for o in obj)})"
    return f"a {type(obj).__name__}"


def _contract_problem(out: Any, direction: str) -> str | None:
    """Why ``out`` is not a 2-tuple of tensors, or ``None`` when it is."""
    name = "z" if direction == "forward" else "x"
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(o, Tensor) for o in out):
        return None
    return (f"{direction} returned {_type_name(out)}; it must return a tuple ({name}, log_det) "
            "of two tensors")


def _finite_count(t: Tensor) -> tuple[int, list[int]]:
    """Number of non-finite entries and the samples (first dim) holding them."""
    if not t.is_floating_point():
        return 0, []
    bad = ~torch.isfinite(t)
    n = int(bad.sum())
    if n == 0:
        return 0, []
    per_sample = bad.reshape(bad.shape[0], -1).any(dim=1) if bad.dim() > 0 else bad.reshape(1)
    return n, per_sample.nonzero().flatten().tolist()


def _max_abs(t: Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def _fmt(v: float) -> str:
    return f"{v:.3g}" if (v == 0 or 1e-3 <= abs(v) < 1e4) else f"{v:.2e}"


def _slice_context(context: Any, i: int, batch: int) -> Any:
    if isinstance(context, Tensor) and context.dim() > 0 and context.shape[0] == batch:
        return context[i : i + 1]
    return context


def _to64(t: Any) -> Any:
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.detach().double()
    return t


def _find_masks(layer: Any, sample_shape: torch.Size) -> list[tuple[str, Tensor]]:
    """Tensors named like ``mask`` on the layer itself (buffers or attributes) holding 0/1 values
    that broadcast to one sample."""
    found: dict[str, Tensor] = {}
    candidates: list[tuple[str, Any]] = []
    if isinstance(layer, nn.Module):
        candidates += list(layer.named_buffers(recurse=False))
        candidates += list(layer.named_parameters(recurse=False))
    candidates += list(getattr(layer, "__dict__", {}).items())
    for name, value in candidates:
        if "mask" not in name.lower() or not isinstance(value, Tensor) or name in found:
            continue
        m = value.detach()
        if m.numel() == 0 or not bool(((m == 0) | (m == 1)).all()):
            continue
        if m.numel() == math.prod(sample_shape):
            found[name] = m.reshape(sample_shape).bool()
            continue
        try:
            if m.dim() > len(sample_shape):  # a leading batch dim of 1, e.g. (1, 1, H, W)
                shaped = torch.broadcast_to(m, (1, *sample_shape))[0]
            else:
                shaped = torch.broadcast_to(m, sample_shape)
        except RuntimeError:
            continue
        found[name] = shaped.bool()
    return list(found.items())


# --------------------------------------------------------------------------------------------
# check_flow
# --------------------------------------------------------------------------------------------
def check_flow(
    layer: Any,
    x: Tensor,
    context: Any = None,
    *,
    atol: float | None = None,
    name: str | None = None,
    skip: Sequence[str] = (),
    jacobian_samples: int = 3,
) -> FlowReport:
    """Check that ``layer`` follows the flow contract and is a correct flow on the batch ``x``.

    The layer itself is never changed: every run uses a copy (a float64 copy for the Jacobian),
    with a fixed random seed so stochastic layers draw the same noise each time.

    Args:
        layer: anything with ``forward(x, context=None) -> (z, log_det)`` and
            ``inverse(z, context=None) -> (x, log_det)``, usually an ``nn.Module``.
        x: a batch of inputs (at least 2 samples to test batch independence).
        context: passed to both directions; sliced per sample when its first dim is the batch.
        atol: tolerance for every comparison, scaled by ``1 + size`` of the quantity compared;
            by default it follows ``x``'s dtype (``1e-4`` for float32; ``1e-6`` for float64
            log-dets against the Jacobian).
        name: what the report calls the layer (default: its class name).
        skip: names of checks not to run (e.g. ``("log_det",)`` for a layer whose log-det is
            not a Jacobian, such as a variational dequantization with its ``-log q(u|x)``).
        jacobian_samples: how many samples get an autograd Jacobian (one when a sample holds
            more than 64 numbers: check images on small inputs, e.g. 8x8, to keep it quick).

    Returns:
        A :class:`FlowReport`; ``print`` it, show it in a notebook, or call ``raise_if_failed()``.

    Example:
        >>> report = check_flow(MyCoupling(mask), torch.randn(16, 2))   # doctest: +SKIP
        >>> print(report)                                               # doctest: +SKIP
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise TypeError(f"check_flow needs a batch of inputs as a tensor (batch, ...), got "
                        f"{_type_name(x)}")
    return _FlowChecker(layer, x, context, atol, name, tuple(skip), jacobian_samples).run()


def assert_flow(layer: Any, x: Tensor, context: Any = None, **kwargs: Any) -> FlowReport:
    """:func:`check_flow`, raising ``AssertionError`` (which check, by how much, the hint) when
    any check fails. Returns the report when all pass."""
    return check_flow(layer, x, context, **kwargs).raise_if_failed()


class _FlowChecker:
    TITLES = {
        "returns": "forward/inverse return (tensor, log_det)",
        "log_det_shape": "log_det has shape (batch,)",
        "shapes": "shapes and dtypes kept",
        "finite": "everything finite",
        "inverse": "inverse(forward(x)) == x",
        "mask": "masked half passes through unchanged",
        "log_det": "log_det == log|det J| of the autograd Jacobian",
        "inverse_log_det": "inverse log_det == -forward log_det",
        "batch_independent": "samples independent of the rest of the batch",
        "gradients": "gradients reach every parameter",
    }

    def __init__(self, layer, x, context, atol, name, skip, jacobian_samples):
        self.layer = layer
        self.x = x.detach()
        self.context = context.detach() if isinstance(context, Tensor) else context
        self.name = name or type(layer).__name__
        self.skip = skip
        self.jacobian_samples = jacobian_samples
        self.user_atol = atol
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        self.atol = atol if atol is not None else _DEFAULT_ATOL.get(dtype, 1e-4)
        self.report = FlowReport(self.name)
        unknown = set(skip) - set(self.TITLES)
        if unknown:
            raise ValueError(
                f"unknown checks in skip: {sorted(unknown)}; known: {list(self.TITLES)}"
            )

    # -- bookkeeping -------------------------------------------------------------------------
    def add(self, name, passed, message, hint="", value=None, tolerance=None) -> CheckResult:
        result = CheckResult(name, self.TITLES[name], passed, message, hint, value, tolerance)
        self.report.results.append(result)
        return result

    def skipped(self, name: str, why: str) -> None:
        self.add(name, None, f"not run: {why}")

    def wants(self, name: str) -> bool:
        if name in self.skip:
            self.skipped(name, "skipped on request")
            return False
        return True

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    # -- copies --------------------------------------------------------------------------------
    def copy_layer(self, layer: Any) -> Any | None:
        try:
            return copy.deepcopy(layer)
        except Exception:
            return None

    @contextlib.contextmanager
    def working_layer(self) -> Iterator[Any]:
        """A private copy of the layer; when the layer cannot be copied, the layer itself with its
        state, modes and gradients put back afterwards."""
        work = self.copy_layer(self.layer)
        if work is not None:
            yield work
            return
        self.note(
            "the layer could not be deep-copied (does it keep tensors computed with gradients as "
            "attributes?); it was checked in place and its state restored afterwards"
        )
        layer = self.layer
        if not isinstance(layer, nn.Module):
            yield layer
            return
        state = {k: v.detach().clone() for k, v in layer.state_dict(keep_vars=True).items()}
        modes = [(m, m.training) for m in layer.modules()]
        grads = [(p, None if p.grad is None else p.grad.clone()) for p in layer.parameters()]
        try:
            yield layer
        finally:
            with torch.no_grad():
                layer.load_state_dict(state)
            for m, mode in modes:
                m.train(mode)
            for p, g in grads:
                p.grad = g

    # -- the checks ------------------------------------------------------------------------
    def run(self) -> FlowReport:
        if not (hasattr(self.layer, "forward") and hasattr(self.layer, "inverse")):
            missing = [m for m in ("forward", "inverse") if not hasattr(self.layer, m)]
            self.add(
                "returns",
                False,
                f"{self.name} has no {' and no '.join(missing)} method",
                "a flow layer needs forward(x, context=None) and inverse(z, context=None)",
            )
            return self.report
        if isinstance(self.layer, nn.Module):
            self.note(f"checked in {'train' if self.layer.training else 'eval'} mode, on a copy")
        with self.working_layer() as work:
            self.run_on(work)
        return self.report

    def run_on(self, work: Any) -> None:
        x, ctx = self.x, self.context
        batch = x.shape[0] if x.dim() > 0 else 0
        # forward: the first call may initialise the layer (ActNorm's data-dependent init)
        try:
            out = _call(work, "forward", x, ctx)
        except _LayerError as e:
            self.add("returns", False, e.text, _exception_hint(e.original, "forward"))
            self.skip_rest("forward raised")
            return
        problem = _contract_problem(out, "forward")
        if problem:
            self.add("returns", False, problem, "end forward with `return z, log_det`")
            self.skip_rest("forward does not return (z, log_det)")
            return
        z, ld = (o.detach() for o in out)
        try:
            inv = _call(work, "inverse", z, ctx)
        except _LayerError as e:
            inv, inv_problem = None, e.text
            inv_hint = _exception_hint(e.original, "inverse")
        else:
            inv_problem = _contract_problem(inv, "inverse")
            inv_hint = "end inverse with `return x, log_det`"
        if inv_problem:
            self.add("returns", False, inv_problem, inv_hint)
            inv = None
        else:
            self.add("returns", True, "both directions return a tuple of two tensors")
        x_rec, ld_inv = (o.detach() for o in inv) if inv is not None else (None, None)
        if z.shape == x.shape and z.dtype == x.dtype and torch.equal(z, x) and not bool(ld.any()):
            self.note("the layer is the identity on this batch (a zero-initialised last layer?): "
                      "a wrong log-det or inverse cannot show; nudge the parameters first")

        ld_ok = self.check_log_det_shape(ld, ld_inv, batch)
        self.check_shapes(z, x_rec)
        self.check_finite(z, ld, x_rec, ld_inv)
        if self.wants("inverse"):
            self.check_inverse(x_rec)
        masks = _find_masks(work, x.shape[1:]) if z.shape == x.shape else []
        masks = [] if "mask" in self.skip else masks
        mask_failed = bool(masks) and self.check_mask(z, masks) is False
        if self.wants("log_det"):
            self.check_jacobian(work, ld_ok, mask_failed)
        if self.wants("inverse_log_det"):
            self.check_inverse_log_det(ld, ld_inv, ld_ok)
        if self.wants("batch_independent"):
            self.check_batch(work, z, ld, ld_ok)
        if self.wants("gradients"):
            self.check_gradients(work)

    def skip_rest(self, why: str) -> None:
        for name in ("log_det_shape", "shapes", "finite", "inverse", "log_det", "inverse_log_det",
                     "batch_independent", "gradients"):
            self.skipped(name, why)

    def check_log_det_shape(self, ld: Tensor, ld_inv: Tensor | None, batch: int) -> bool:
        problems, hint = [], ""
        for direction, t in (("forward", ld), ("inverse", ld_inv)):
            if t is None:
                continue
            if tuple(t.shape) != (batch,):
                problems.append(
                    f"{direction} log_det has shape {tuple(t.shape)}, expected ({batch},)"
                )
                if t.dim() == 0:
                    hint = ("log_det is a single number: sum over the non-batch dimensions only, "
                            "e.g. s.sum(dim=1) or s.flatten(1).sum(1), never s.sum()")
                elif t.dim() > 1 and t.shape[0] == batch:
                    hint = ("log_det still has the per-dimension terms: sum them over every "
                            "non-batch dimension, e.g. s.flatten(1).sum(1)")
                else:
                    hint = "log_det must hold one number per sample: shape (batch,)"
            elif self.x.is_floating_point() and t.dtype != self.x.dtype:
                problems.append(f"{direction} log_det is {t.dtype}, the input is {self.x.dtype}")
                hint = "create log_det from the input (x.new_zeros(x.shape[0])) so dtypes match"
        passed = not problems
        if passed:
            self.add("log_det_shape", True, f"shape ({batch},) in both directions")
        else:
            self.add("log_det_shape", False, "; ".join(problems), hint)
        return tuple(ld.shape) == (batch,)

    def check_shapes(self, z: Tensor, x_rec: Tensor | None) -> None:
        x = self.x
        problems = []
        if z.dim() == 0 or z.shape[0] != x.shape[0]:
            problems.append(
                f"z has shape {tuple(z.shape)}: the batch dimension {x.shape[0]} is lost"
            )
        if x.is_floating_point() and z.dtype != x.dtype:
            problems.append(f"z is {z.dtype} but x is {x.dtype}")
        if x_rec is not None:
            if x_rec.shape != x.shape:
                problems.append(
                    f"inverse returns shape {tuple(x_rec.shape)}, x has {tuple(x.shape)}"
                )
            if x.is_floating_point() and x_rec.dtype != x.dtype:
                problems.append(f"inverse returns {x_rec.dtype}, x is {x.dtype}")
        if problems:
            self.add("shapes", False, "; ".join(problems),
                     "a flow maps each sample to a sample: keep the batch dimension and the dtype, "
                     "and have inverse give back exactly the input's shape")
            return
        same = "z has the shape of x" if z.shape == x.shape else (
            f"z has shape {tuple(z.shape)} (x: {tuple(x.shape)})")
        self.add("shapes", True, f"{same}; inverse gives back shape {tuple(x.shape)}")
        if z[0].numel() != x[0].numel():
            self.note(f"the layer changes the number of values per sample "
                      f"({x[0].numel()} -> {z[0].numel()})")

    def check_finite(self, z, ld, x_rec, ld_inv) -> None:
        bad = []
        for label, t in (("z", z), ("forward log_det", ld), ("inverse(z)", x_rec),
                         ("inverse log_det", ld_inv)):
            if t is None:
                continue
            n, samples = _finite_count(t)
            if n:
                first = ", ".join(map(str, samples[:5])) + (", ..." if len(samples) > 5 else "")
                bad.append(f"{label} has {n} NaN/inf value(s) in sample(s) {first}")
        if bad:
            self.add("finite", False, "; ".join(bad),
                     "look for log of a number <= 0, exp of a large value (bound the scale, e.g. "
                     "with tanh), division by zero, or sqrt of a negative number")
        else:
            self.add("finite", True, "no NaN or inf in z, x or either log_det")

    def tol(self, scale: float) -> float:
        return self.atol * (1.0 + scale)

    def check_inverse(self, x_rec: Tensor | None) -> None:
        if x_rec is None:
            self.skipped("inverse", "inverse did not return (x, log_det)")
            return
        if x_rec.shape != self.x.shape:
            self.skipped("inverse", "inverse returns the wrong shape")
            return
        x = self.x.to(x_rec.dtype) if x_rec.is_floating_point() else self.x
        diff = (x_rec.to(torch.float64) - x.to(torch.float64)).abs()
        if not bool(torch.isfinite(diff).all()):
            self.add("inverse", False, "inverse(forward(x)) is not finite",
                     "see 'everything finite'", float("inf"))
            return
        err = float(diff.max()) if diff.numel() else 0.0
        tol = self.tol(_max_abs(x.to(torch.float64)))
        if err <= tol:
            self.add("inverse", True, f"max abs error {_fmt(err)} (tolerance {_fmt(tol)})", "",
                     err, tol)
            return
        per_sample = diff.reshape(diff.shape[0], -1).amax(dim=1)
        worst = int(per_sample.argmax())
        flat = diff[worst].reshape(-1)
        wrong_dims = int((flat > tol).sum())
        self.add(
            "inverse",
            False,
            f"max abs error {_fmt(err)} (tolerance {_fmt(tol)}); worst sample {worst}, where "
            f"{wrong_dims} of {flat.numel()} values differ",
            "inverse must undo forward exactly: undo its steps in reverse order (for an affine "
            "coupling x2 = (z2 - t) * exp(-s)), computing s and t from the half that forward left "
            "unchanged, with the same mask",
            err,
            tol,
        )

    def check_mask(self, z: Tensor, masks: list[tuple[str, Tensor]]) -> bool:
        x = self.x.to(z.dtype) if z.is_floating_point() else self.x
        diff = (z.to(torch.float64) - x.to(torch.float64)).abs()
        tol = self.tol(_max_abs(x.to(torch.float64)))
        messages = []
        for name, m in masks:
            m = m.to(z.device)
            change_1 = float(diff[:, m].max()) if bool(m.any()) else 0.0
            change_0 = float(diff[:, ~m].max()) if bool((~m).any()) else 0.0
            for value, change in ((1, change_1), (0, change_0)):
                if change <= tol:
                    self.add("mask", True,
                             f"the dims where {name} == {value} pass through unchanged "
                             f"(max change {_fmt(change)})", "", change, tol)
                    return True
            messages.append(f"dims where {name} == 1 changed by up to {_fmt(change_1)} and dims "
                            f"where {name} == 0 by up to {_fmt(change_0)}")
        self.add("mask", False, "masked dimensions changed: " + "; ".join(messages),
                 "the conditioning half must pass through unchanged: multiply the transformed "
                 "values by (1 - mask) (or mask) and add back the masked input, in forward and "
                 "inverse", None, tol)
        return False

    # -- log-det against the Jacobian -----------------------------------------------------------
    def float64_copy(self, work: Any) -> tuple[Any, bool]:
        """A float64 copy of ``work`` (after its first call, so data-dependent init is kept), or
        ``work`` itself when that fails; the flag says whether it is float64."""
        if isinstance(work, nn.Module):
            copy64 = self.copy_layer(work)
            if copy64 is not None:
                try:
                    copy64 = copy64.double()
                    c64 = _to64(_slice_context(self.context, 0, len(self.x)))
                    _call(copy64, "forward", self.x[:1].double(), c64)
                    return copy64, True
                except Exception:
                    pass
        if self.x.dtype == torch.float64:
            return work, True
        self.note("the layer did not run in float64 (after .double()); its log-det was compared "
                  f"with the Jacobian in {self.x.dtype}, with a looser tolerance")
        return work, False

    def check_jacobian(self, work: Any, ld_ok: bool, mask_failed: bool) -> None:
        if not ld_ok:
            self.skipped("log_det", "log_det does not have shape (batch,)")
            return
        x = self.x
        d_in = x[0].numel()
        layer, is64 = self.float64_copy(work)
        dtype = torch.float64 if is64 else (x.dtype if x.is_floating_point() else torch.float32)
        n = min(len(x), self.jacobian_samples if d_in <= 64 else 1)
        if d_in > _MAX_JACOBIAN_DIM:
            self.skipped("log_det", f"a sample holds {d_in} numbers (> {_MAX_JACOBIAN_DIM}); "
                         "check on smaller inputs")
            return
        errors, lds, refs = [], [], []
        for i in range(n):
            xi = x[i : i + 1].to(dtype)
            ci = _slice_context(self.context, i, len(x))
            ci = _to64(ci) if is64 and isinstance(ci, Tensor) and ci.is_floating_point() else ci
            try:
                zi, ldi = _call(layer, "forward", xi, ci)
            except _LayerError as e:
                self.add("log_det", False, f"on a single sample: {e.text}",
                         _exception_hint(e.original, "forward"))
                return
            if zi[0].numel() != d_in:
                self.skipped("log_det", f"the layer maps {d_in} numbers to {zi[0].numel()}: "
                             "no square Jacobian")
                return

            try:
                jac = _jacobian(layer, xi, ci, zi.detach())
            except _LayerError as e:
                self.add("log_det", False, f"computing the Jacobian: {e.text}",
                         _exception_hint(e.original, "forward"))
                return
            sign, logabs = torch.linalg.slogdet(jac.to(torch.float64))
            ref = float(logabs) if float(sign) != 0 else float("-inf")
            got = float(ldi.detach().reshape(-1)[0])
            lds.append(got)
            refs.append(ref)
            errors.append(abs(got - ref) if math.isfinite(ref) else float("inf"))
        err = max(errors)
        scale = max([abs(r) for r in refs if math.isfinite(r)], default=0.0)
        if self.user_atol is not None:
            tol = self.tol(scale)
        else:
            tol = (_JACOBIAN_ATOL64 if is64 else max(self.atol, 1e-3)) * (1.0 + scale)
        pairs = ", ".join(f"{_fmt(g)} vs {_fmt(r)}" for g, r in zip(lds, refs, strict=True))
        where = f"{n} sample(s) in {'float64' if is64 else str(dtype).replace('torch.', '')}"
        if err <= tol:
            self.add("log_det", True,
                     f"max abs difference {_fmt(err)} (tolerance {_fmt(tol)}) over {where}", "",
                     err, tol)
            return
        self.add("log_det", False,
                 f"log_det vs log|det J|: {pairs}; max abs difference {_fmt(err)} (tolerance "
                 f"{_fmt(tol)}) over {where}",
                 _log_det_hint(lds, refs, tol, d_in, mask_failed), err, tol)

    def check_inverse_log_det(self, ld: Tensor, ld_inv: Tensor | None, ld_ok: bool):
        if ld_inv is None:
            self.skipped("inverse_log_det", "inverse did not return (x, log_det)")
            return
        if not ld_ok or ld_inv.shape != ld.shape:
            self.skipped("inverse_log_det", "log_det does not have shape (batch,)")
            return
        err_t = (ld_inv.to(torch.float64) + ld.to(torch.float64)).abs()
        err = float(err_t.max()) if err_t.numel() else 0.0
        scale = _max_abs(ld.to(torch.float64))
        tol = self.tol(scale)
        if err <= tol:
            self.add("inverse_log_det", True, f"max |inverse + forward| {_fmt(err)} (tolerance "
                     f"{_fmt(tol)})", "", err, tol)
            return
        same = float((ld_inv.double() - ld.double()).abs().max())
        if same <= tol and scale > tol:
            hint = ("the inverse returns the same log_det as forward; it must return its negative "
                    "(log|det dx/dz| = -log|det dz/dx|), e.g. -s.sum(...) in inverse")
        else:
            hint = ("inverse must return log|det dx/dz| = minus forward's log_det at the matching "
                    "point: use the same s (computed from the unchanged half) and negate its sum")
        i = int(err_t.argmax())
        self.add("inverse_log_det", False,
                 f"sample {i}: forward log_det {_fmt(float(ld[i]))}, inverse log_det "
                 f"{_fmt(float(ld_inv[i]))}; max |inverse + forward| {_fmt(err)} (tolerance "
                 f"{_fmt(tol)})", hint, err, tol)

    def check_batch(self, work: Any, z: Tensor, ld: Tensor, ld_ok: bool) -> None:
        x, batch = self.x, self.x.shape[0]
        if batch < 2:
            self.skipped("batch_independent", "needs a batch of at least 2 samples")
            return
        k = batch - 1
        x2 = x.clone()
        x2[k] = x[0]
        if torch.equal(x2[k], x[k]):
            if not x.is_floating_point():
                self.skipped("batch_independent", "every sample in the batch is the same")
                return
            with _seeded(x.device):
                x2[k] = x[k] * 0.5 + 0.1 * torch.randn_like(x[k])
        try:
            z2, ld2 = (o.detach() for o in _call(work, "forward", x2, self.context))
        except _LayerError as e:
            self.add("batch_independent", False, f"after changing sample {k}: {e.text}",
                     _exception_hint(e.original, "forward"))
            return
        except (TypeError, ValueError):
            self.skipped("batch_independent", "forward does not return (z, log_det)")
            return
        others = slice(0, k)
        dz = _max_abs(z2[others].double() - z[others].double()) if z2.shape == z.shape else math.inf
        dld, ld_scale = 0.0, 0.0
        if ld_ok and ld2.shape == ld.shape:
            dld = _max_abs(ld2[others].double() - ld[others].double())
            ld_scale = _max_abs(ld[others].double())
        tol = self.tol(max(_max_abs(z[others].double()), ld_scale))
        change = max(dz, dld)
        if change <= tol:
            self.add("batch_independent", True,
                     f"changing sample {k} moved the other samples' z by {_fmt(dz)} and log_det by "
                     f"{_fmt(dld)} (tolerance {_fmt(tol)})", "", change, tol)
            return
        self.add("batch_independent", False,
                 f"changing only sample {k} changed the other samples' z by up to {_fmt(dz)} and "
                 f"their log_det by up to {_fmt(dld)} (tolerance {_fmt(tol)})",
                 "each sample must be transformed on its own: no statistics over the batch "
                 "(x.mean(0), x.std(0)), no reshaping or mixing across the batch dimension; "
                 "reduce over dim=1 (or flatten(1)), never dim=0", change, tol)

    def check_gradients(self, work: Any) -> None:
        if not isinstance(work, nn.Module):
            self.skipped("gradients", "the layer is not an nn.Module")
            return
        params = [(n, p) for n, p in work.named_parameters() if p.requires_grad]
        if not params:
            self.add("gradients", True, "the layer has no trainable parameters")
            return
        none, zero, bad = self._gradients(work, perturb=False)
        if isinstance(none, _LayerError):
            self.add("gradients", False, f"backward failed: {none.text}",
                     _exception_hint(none.original, "forward"))
            return
        if zero:
            # a zero-initialised last layer makes earlier layers' gradients exactly zero at init:
            # look again with every parameter nudged
            again = self._gradients(work, perturb=True)
            if not isinstance(again[0], _LayerError):
                zero = [n for n in zero if n in again[1] or n in again[0]]
        problems, hint = [], []
        if none:
            problems.append(f"no gradient reaches {_names(none)}")
            hint.append("a parameter with no gradient is not used in forward, or is used through "
                        ".data, .detach(), .item(), .numpy() or torch.tensor(...), which cut the "
                        "graph (or sits in a plain Python list instead of nn.ModuleList)")
        if zero:
            problems.append(f"the gradient of {_names(zero)} is exactly zero")
            hint.append("a gradient that stays zero even with the weights nudged means the "
                        "parameter does not affect z or log_det")
        if bad:
            problems.append(f"the gradient of {_names(bad)} is NaN or inf")
            hint.append("non-finite gradients: see 'everything finite' and bound the scale")
        total = len(params)
        if problems:
            self.add("gradients", False, "; ".join(problems) + f" ({total} parameter tensors)",
                     "; ".join(hint))
        else:
            self.add("gradients", True, f"all {total} parameter tensors get a finite, non-zero "
                     "gradient from a loss on z and log_det")

    def _gradients(self, work: nn.Module, perturb: bool):
        model = self.copy_layer(work)
        model = work if model is None else model
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        saved = [(p, p.grad) for _, p in params]
        for _, p in params:
            p.grad = None
        try:
            if perturb:
                with torch.no_grad(), _seeded(self.x.device):
                    for _, p in params:
                        p.add_(1e-2 * (1 + p.abs().mean()) * torch.randn_like(p))
            try:
                z, ld = _call(model, "forward", self.x, self.context)
                with _seeded(self.x.device):
                    wz = torch.randn_like(z)
                loss = (z * wz).sum() + (ld.sum() if ld.dim() else ld)
                if not loss.requires_grad:
                    return [n for n, _ in params], [], []
                loss.backward()
            except _LayerError as e:
                return e, [], []
            except Exception as exc:
                return _LayerError(_describe_exception("backward", exc), exc), [], []
            none = [n for n, p in params if p.grad is None]
            zero = [n for n, p in params if p.grad is not None and not bool(p.grad.ne(0).any())]
            bad = [n for n, p in params
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            return none, zero, bad
        finally:
            if model is work:
                for p, g in saved:
                    p.grad = g


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _jacobian(layer: Any, xi: Tensor, ci: Any, zi: Tensor) -> Tensor:
    """The ``(D, D)`` Jacobian of ``layer.forward`` at the single sample ``xi`` (shape
    ``(1, ...)``), whose output is ``zi``.

    Fast path: run ``xi`` repeated as a batch, one row of the Jacobian per copy, with one backward
    per chunk. It is used only when every copy's output equals ``zi`` (a deterministic layer that
    treats samples independently); otherwise ``torch.autograd.functional.jacobian`` on the single
    sample, one backward per output.
    """

    def f(v: Tensor) -> Tensor:
        return _call(layer, "forward", v.reshape(xi.shape), ci)[0].reshape(-1)

    try:
        jac = _jacobian_by_rows(layer, xi, ci, zi)
        return jac if jac is not None else torch.autograd.functional.jacobian(f, xi.reshape(-1))
    except _LayerError:
        raise
    except Exception as exc:  # autograd failed inside the layer's graph (in-place ops, ...)
        raise _LayerError(_describe_exception("backward through forward", exc), exc) from exc


def _jacobian_by_rows(layer: Any, xi: Tensor, ci: Any, zi: Tensor) -> Tensor | None:
    d = xi[0].numel()
    chunk = max(1, min(d, (1 << 16) // d))
    target = zi.reshape(1, -1)
    tol = 1e-9 if xi.dtype == torch.float64 else 1e-5
    rows = []
    for start in range(0, d, chunk):
        n = min(chunk, d - start)
        xs = xi.detach().expand(n, *xi.shape[1:]).clone().requires_grad_(True)
        cs = ci
        if isinstance(ci, Tensor) and ci.dim() > 0 and ci.shape[0] == 1:
            cs = ci.expand(n, *ci.shape[1:])
        zs = _call(layer, "forward", xs, cs)[0]
        if zs.shape[0] != n or zs[0].numel() != d:
            return None
        zs = zs.reshape(n, d)
        if not torch.allclose(zs.detach(), target.expand(n, d), rtol=tol, atol=tol):
            return None
        picked = zs[torch.arange(n), torch.arange(start, start + n)].sum()
        if not picked.requires_grad:
            return None
        (grad,) = torch.autograd.grad(picked, xs, allow_unused=True)
        if grad is None:  # the output does not depend on the input at all
            grad = torch.zeros(n, d, dtype=xi.dtype, device=xi.device)
        rows.append(grad.reshape(n, d))
    return torch.cat(rows)


def _exception_hint(exc: BaseException, direction: str) -> str:
    text = str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    raised_by_torch = bool(frames) and os.path.abspath(frames[-1].filename).startswith(_TORCH_DIR)
    if isinstance(exc, NotImplementedError) and not raised_by_torch:
        return f"implement {direction} (replace the `raise NotImplementedError`)"
    if isinstance(exc, TypeError) and ("argument" in text or "positional" in text):
        return f"{direction} must accept (x, context=None) and return (output, log_det)"
    if "inplace operation" in text or "in-place operation" in text:
        return ("an in-place operation (+=, *=, x[...] = ..., exp_()) overwrote a tensor autograd "
                "still needs: write y = y + 1 instead of y += 1")
    if "shape" in text or "size" in text or "dimension" in text:
        return ("a shape mismatch: print the shapes going into the line above; remember the "
                "batch dimension comes first")
    if "dtype" in text or "scalar type" in text:
        return "a dtype mismatch: create new tensors from the input (x.new_zeros, torch.zeros_like)"
    return f"the error comes from your {direction}; the location above says where"


def _log_det_hint(lds, refs, tol, d_in, mask_failed) -> str:
    if mask_failed:
        return ("masked dimensions changed: the conditioning half must pass through unchanged, "
                "otherwise the Jacobian is not triangular and sum(s) is not its log-det")
    pairs = [(g, r) for g, r in zip(lds, refs, strict=True)
             if math.isfinite(r) and math.isfinite(g)]
    if pairs and all(abs(g + r) <= tol for g, r in pairs) and any(abs(r) > tol for _, r in pairs):
        return "log-det has the wrong sign: did you return -sum(s) in forward?"
    if pairs and all(abs(g) <= tol for g, _ in pairs) and any(abs(r) > tol for _, r in pairs):
        return ("log_det is zero but the layer changes volume: add the log of the scale "
                "(sum of s over the transformed dimensions)")
    if pairs and d_in > 1 and all(abs(g * d_in - r) <= tol for g, r in pairs):
        return "log_det looks like a mean over dimensions: it must be the sum"
    if pairs and all(abs(g - 2 * r) <= tol for g, r in pairs):
        return "log_det is twice the Jacobian's: is a term counted twice (e.g. both halves)?"
    return ("log_det must be log|det dz/dx|: for a triangular Jacobian the sum over all non-batch "
            "dims of log|dz_i/dx_i|; sum the same s you apply (after tanh and any scaling), only "
            "over the transformed dims, plus the log-det of every other step (scaling, logit)")


# --------------------------------------------------------------------------------------------
# Advice about the reference implementations
# --------------------------------------------------------------------------------------------
def _resolve_reference(name: str) -> Any:
    """The object a dotted name such as ``nfcourse.flows.AffineCoupling`` stands for, or None
    where it is not there (in a lesson's grading edition it raises ``ExerciseRemoved``)."""
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def reference_advice(answer: Any, *references: str) -> str | None:
    """A sentence for a self-check when ``answer`` is, subclasses or is an instance of one of
    the package's ``references`` (dotted names), else None.

    Advice only, never a grade: while a lesson is graded its kernel has an edition of the
    package without that lesson's references, so such an answer fails there on its own.

    Example:
        >>> import nfcourse.flows
        >>> advice = reference_advice(nfcourse.flows.Squeeze, "nfcourse.flows.Squeeze")
        >>> "not in the package" in advice
        True
        >>> reference_advice(object, "nfcourse.flows.Squeeze") is None
        True
    """
    for name in references:
        ref = _resolve_reference(name)
        if ref is None:
            continue
        how = None
        if answer is ref:
            how = "is"
        elif inspect.isclass(answer) and inspect.isclass(ref):
            try:
                how = "subclasses" if issubclass(answer, ref) else None
            except TypeError:
                how = None
        elif inspect.isclass(ref) and isinstance(answer, ref):
            how = "is an instance of"
        if how is not None:
            short = name.rsplit(".", 1)[-1]
            return (f"your answer {how} {name}: it will fail when graded, because while this "
                    f"lesson is graded {short} is not in the package. Write your own.")
    return None
