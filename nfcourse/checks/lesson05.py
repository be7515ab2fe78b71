"""Self-checks of lesson 05, "Glow: ActNorm and invertible 1x1 convolution".

Each ``check_<exercise>`` prints what is right and what is wrong in plain words and returns
``True`` when everything passed; the matching ``<exercise>_problems`` returns the list of
problems (empty when all is well) and is what the hidden tests assert on. None of them
raises because of a student's mistake: an exception in the answer becomes a problem.

Conventions the lesson asks for (and these checks hold answers to):

* ``ActNorm(num_channels)``: images ``(B, C, H, W)``; one learnable scale and shift per
  channel; the first ``forward`` sets them from its batch (zero mean, unit variance per
  channel) and remembers that in ``state_dict``; ``log_det = H * W * sum(log|scale|)``.
* ``InvConv1x1(num_channels)``: ``self.weight``, a learnable ``(C, C)`` ``nn.Parameter``
  starting as a rotation (orthogonal); ``log_det = H * W * log|det W|``.
* ``InvConv1x1LU(num_channels)``: ``self.log_s``, the learnable ``(C,)`` vector ``log|s|``, and
  ``self.weight``, the assembled ``(C, C)`` matrix ``P L (U + diag(s))`` (a property);
  starts as a rotation; ``log_det = H * W * sum(log_s)``.
* ``GlowStep(num_channels, hidden=..., num_layers=..., mixing="lu")``: ActNorm, then the
  channel mixing (``"lu"``, ``"plain"``, ``"reverse"`` or ``"random"``), then an affine
  coupling that starts as the identity.
* ``build_glow(shape, num_scales, steps_per_scale, hidden, num_layers, mixing)``: a
  :class:`~nfcourse.flows.FlowModel`: dequantization, then per scale a squeeze and
  ``steps_per_scale`` steps, with a split between scales.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from nfcourse.checks.core import check_flow, reference_advice
from nfcourse.checks.reporting import attempt as _try
from nfcourse.checks.reporting import report_problems as _report

__all__ = [
    "actnorm_problems",
    "actnorm_init_problems",
    "invconv_problems",
    "invconv_lu_problems",
    "glow_step_problems",
    "glow_problems",
    "check_actnorm",
    "check_actnorm_init",
    "check_invconv",
    "check_invconv_lu",
    "check_glow_step",
    "check_glow",
]


# --------------------------------------------------------------------------------- helpers
#: the package's reference of each exercise (dotted names): while this lesson is graded they
#: are not in the package, so an answer built on one fails on its own; the self-checks say so
REFERENCES = {
    "ActNorm": ("nfcourse.flows.ActNorm",),
    "InvConv1x1": ("nfcourse.flows.InvConv1x1", "nfcourse.flows.InvConv1x1LU"),
    "InvConv1x1LU": ("nfcourse.flows.InvConv1x1LU", "nfcourse.flows.InvConv1x1"),
    "GlowStep": ("nfcourse.flows.GlowStep",),
    "build_glow": ("nfcourse.flows.glow",),
}


def _advice(answer: Any, exercise: str) -> list[str]:
    """:func:`reference_advice` for ``answer`` as a one-line list (empty when none): advice
    printed by a self-check, never a problem of the hidden tests.

    Example:
        >>> _advice(object, "ActNorm")
        []
    """
    advice = reference_advice(answer, *REFERENCES[exercise])
    return [] if advice is None else [advice]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _shifted_batch(b: int, c: int, h: int, w: int, seed: int) -> Tensor:
    """Images whose channels have very different means and spreads (as raw activations do)."""
    gen = _gen(seed)
    scale = torch.linspace(0.5, 6.0, c).view(1, c, 1, 1)
    loc = torch.linspace(-4.0, 9.0, c).view(1, c, 1, 1)
    return torch.randn(b, c, h, w, generator=gen) * scale + loc


@torch.no_grad()
def _perturb(module: nn.Module, scale: float, seed: int) -> None:
    """Add noise to every parameter, so that zero-initialised parts are not the identity."""
    gen = _gen(seed)
    for p in module.parameters():
        if p.requires_grad:  # a frozen parameter (a flag, a fixed permutation) is not learned
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p))


_LOG_DET_CHECKS = ("log_det", "inverse_log_det")


def _flow_report(layer: Any, x: Tensor, label: str, problems: list[str],
                 log_det_hint: str) -> None:
    """Append :func:`check_flow`'s failures; log-det failures get this layer's own hint (the
    generic one speaks of couplings)."""
    report = check_flow(layer, x, name=label)
    for r in report.failed:
        hint = log_det_hint if r.name in _LOG_DET_CHECKS else r.hint
        problems.append(f"{label}: {r.title}: {r.message}" + (f" (hint: {hint})" if hint
                                                               else ""))


_ACTNORM_HINT = ("every one of the H * W pixels of channel c is scaled by exp(log_scale_c), so "
                 "log_det = H * W * sum_c log_scale_c; the inverse returns minus that")
_INVCONV_HINT = ("the same W acts on each of the H * W pixels, so log_det = H * W * "
                 "log|det W| (torch.linalg.slogdet(W)[1]); the inverse returns minus that")
_LU_HINT = ("det P = +-1 and det L = 1, so log|det W| = sum(log|s|) and log_det = H * W * "
            "sum(log_s); the inverse returns minus that")
_STEP_HINT = ("the step's log_det is ActNorm's + the mixing's + the coupling's (the sum of the "
              "log-scales applied to the changed half); the inverse runs the three inverses in "
              "reverse order and adds their log-dets")


def _pair(out: Any, what: str, problems: list[str]) -> tuple[Tensor, Tensor] | None:
    if (not isinstance(out, (tuple, list)) or len(out) != 2
            or not all(isinstance(o, Tensor) for o in out)):
        problems.append(f"{what} must return a tuple (output, log_det) of two tensors")
        return None
    return out[0], out[1]


def _log_det_of(layer: Any, x: Tensor, what: str, problems: list[str]) -> Tensor | None:
    with torch.no_grad():
        out = _try(what, lambda: layer(x), problems)
    pair = None if out is None else _pair(out, what, problems)
    if pair is None:
        return None
    ld = pair[1]
    if ld.shape != (x.shape[0],):
        problems.append(f"{what}: log_det must have shape ({x.shape[0]},), got {tuple(ld.shape)}")
        return None
    return ld.detach().double()


def _weight_of(layer: Any, c: int, what: str, problems: list[str]) -> Tensor | None:
    w = _try(f"{what}.weight", lambda: layer.weight, problems)
    if w is None:
        if not problems:
            problems.append(f"{what} has no `weight`: keep the (C, C) matrix as `self.weight`")
        return None
    if not isinstance(w, Tensor) or tuple(w.shape) != (c, c):
        problems.append(f"{what}.weight must be a ({c}, {c}) tensor, got "
                        f"{tuple(getattr(w, 'shape', ())) or type(w).__name__}")
        return None
    return w.detach().double()


def _orthogonality_problem(w: Tensor, what: str) -> list[str]:
    err = (w @ w.T - torch.eye(w.shape[0], dtype=w.dtype)).abs().max().item()
    if not math.isfinite(err) or err > 1e-4:
        return [f"{what}.weight should start as a rotation (W W^T = I, so log|det W| = 0 and "
                f"nothing is amplified at the start), but W W^T differs from I by {err:.3g}: "
                "initialise it with the Q of a QR decomposition of a random matrix"]
    return []


# --------------------------------------------------------------------------------- ActNorm
def actnorm_problems(actnorm_cls: type) -> list[str]:
    """What is wrong with an ``ActNorm`` class as a flow layer (once initialised):
    invertible, log-det equal to the autograd Jacobian's (float64), gradients."""
    problems: list[str] = []
    c = 3
    layer = _try(f"ActNorm({c})", lambda: actnorm_cls(c), problems)
    if layer is None:
        return problems
    if not isinstance(layer, nn.Module) or not list(layer.parameters()):
        return [f"ActNorm({c}) must be an nn.Module with learnable scale and shift parameters"]
    x_init = _shifted_batch(16, c, 4, 4, seed=0)
    out = _try(f"ActNorm({c}).forward on a (16, {c}, 4, 4) batch", lambda: layer(x_init),
               problems)
    if out is None or _pair(out, "ActNorm.forward", problems) is None:
        return problems
    # a 3x2 image: H * W = 6, so a log-det without the H * W factor cannot pass
    x = _shifted_batch(3, c, 3, 2, seed=1)
    _flow_report(layer, x, "ActNorm (initialised)", problems, _ACTNORM_HINT)
    if problems:
        return problems
    ld = _log_det_of(layer, _shifted_batch(2, c, 5, 2, seed=2), "ActNorm on a (2, 3, 5, 2) batch",
                     problems)
    if ld is not None and (ld[0] - ld[1]).abs().item() > 1e-5 * (1 + ld.abs().max().item()):
        problems.append("ActNorm's log_det must be the same for every sample "
                        "(H * W * sum of the log-scales)")
    return problems


def actnorm_init_problems(actnorm_cls: type) -> list[str]:
    """The data-dependent initialisation: zero mean and unit variance per channel on the first
    batch, one scale and shift per channel, no re-initialisation on later batches, and the
    initialisation survives ``state_dict`` save/load."""
    problems: list[str] = []
    c = 3
    layer = _try(f"ActNorm({c})", lambda: actnorm_cls(c), problems)
    if layer is None:
        return problems
    x = _shifted_batch(16, c, 5, 5, seed=10)
    out = _try("ActNorm.forward on its first batch", lambda: layer(x), problems)
    pair = None if out is None else _pair(out, "ActNorm.forward", problems)
    if pair is None:
        return problems
    z = pair[0].detach()
    if z.shape != x.shape:
        return [f"ActNorm.forward changed the shape {tuple(x.shape)} to {tuple(z.shape)}"]
    mean = z.mean(dim=(0, 2, 3))
    std = z.std(dim=(0, 2, 3))
    if not bool(torch.isfinite(z).all()):
        return ["ActNorm's output on its first batch is not finite"]
    if mean.abs().max().item() > 1e-3 or (std - 1).abs().max().item() > 1e-2:
        problems.append(
            "after the first forward, the output on that same batch must have mean 0 and "
            f"standard deviation 1 in every channel; got means {_fmt_list(mean)} and standard "
            f"deviations {_fmt_list(std)}: set shift and scale from the batch's per-channel "
            "statistics (over batch, height and width) before transforming it")
        return problems
    # one affine map per channel: a constant image stays constant within each channel
    const = torch.ones(2, c, 5, 5) * torch.tensor([0.3, -1.0, 4.0]).view(1, c, 1, 1)
    out = _try("ActNorm.forward on a constant image", lambda: layer(const), problems)
    pair = None if out is None else _pair(out, "ActNorm.forward", problems)
    if pair is None:
        return problems
    zc = pair[0].detach().flatten(2)
    spread = (zc.max(dim=2).values - zc.min(dim=2).values).max().item()
    if spread > 1e-4:
        problems.append(
            "ActNorm must have one scale and one shift per channel, shared by every pixel: an "
            f"image that is constant in each channel came out varying by up to {spread:.3g} "
            "within a channel (statistics per pixel instead of per channel?)")
        return problems
    small = _shifted_batch(2, c, 2, 3, seed=11)
    if _try("ActNorm.forward on a 2x3 image after initialising on 5x5", lambda: layer(small),
            problems) is None:
        problems.append("ActNorm must work at any height and width: one scale and shift per "
                        "channel, not per pixel")
        return problems
    # no re-initialisation on later batches: a batch with other statistics must not come out
    # standardised
    other = _shifted_batch(16, c, 5, 5, seed=12) * 3 + 2
    with torch.no_grad():
        later = _try("ActNorm.forward on a second batch", lambda: layer(other), problems)
    if later is None or problems:
        return problems
    z_other = later[0].detach()
    if (z_other.mean(dim=(0, 2, 3)).abs().max().item() < 1e-3
            and (z_other.std(dim=(0, 2, 3)) - 1).abs().max().item() < 1e-2):
        problems.append(
            "ActNorm initialised itself again on a later batch (whose statistics differ from "
            "the first one's, yet it came out with mean 0 and standard deviation 1): only the "
            "very first forward may set the parameters; keep a flag that says it is done")
        return problems
    # the initialisation survives state_dict save / load
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = _try(f"ActNorm({c})", lambda: actnorm_cls(c), problems)
    if fresh is None:
        return problems
    if _try("ActNorm.load_state_dict", lambda: fresh.load_state_dict(state), problems) is None \
            and problems:
        return problems
    with torch.no_grad():
        expected = layer(other)[0]
        got = _try("a loaded ActNorm's first forward", lambda: fresh(other), problems)
    if got is None:
        return problems
    if not torch.allclose(got[0].detach(), expected, atol=1e-5, rtol=1e-5):
        problems.append(
            "the initialisation does not survive save and load: a new ActNorm that loads the "
            "state_dict of an initialised one initialises itself again on its first batch. "
            "Keep the 'initialised' flag in a buffer (self.register_buffer) so that it is "
            "part of the state_dict")
    return problems


def _fmt_list(t: Tensor) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in t.tolist()) + "]"


def check_actnorm(actnorm_cls: type) -> bool:
    """Print what is right or wrong with ``ActNorm`` as a flow layer; True when all is well."""
    return _report("ActNorm", _advice(actnorm_cls, "ActNorm") + actnorm_problems(actnorm_cls))


def check_actnorm_init(actnorm_cls: type) -> bool:
    """Print what is right or wrong with ``ActNorm``'s initialisation; True when all is well."""
    return _report("ActNorm initialisation",
                   _advice(actnorm_cls, "ActNorm") + actnorm_init_problems(actnorm_cls))


# --------------------------------------------------------------------------- 1x1 convolutions
def _hw_hint(ld: float, expected: float, hw: int) -> str:
    if abs(expected) > 1e-3 and abs(ld * hw - expected) < 1e-3 * (1 + abs(expected)):
        return (f" (it is exactly H * W = {hw} times too small: the same matrix acts on every "
                "pixel, so its log-determinant counts once per pixel)")
    return ""


def invconv_problems(invconv_cls: type) -> list[str]:
    """What is wrong with a plain ``InvConv1x1`` class."""
    problems: list[str] = []
    c = 4
    layer = _try(f"InvConv1x1({c})", lambda: invconv_cls(c), problems)
    if layer is None:
        return problems
    if not isinstance(getattr(layer, "weight", None), nn.Parameter):
        return [f"InvConv1x1({c}) must keep its matrix as a learnable nn.Parameter `self.weight` "
                f"of shape ({c}, {c})"]
    w0 = _weight_of(layer, c, "InvConv1x1", problems)
    if w0 is None:
        return problems
    problems += _orthogonality_problem(w0, "InvConv1x1")
    # a general (not orthogonal) matrix, so that log|det W| != 0
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(c, c, generator=_gen(20)))
        w = q @ torch.diag(torch.tensor([1.8, 0.7, 1.3, 0.5])) + 0.1 * torch.randn(
            c, c, generator=_gen(21))
        layer.weight.copy_(w.to(layer.weight))
    _flow_report(layer, torch.randn(3, c, 3, 2, generator=_gen(22)), "InvConv1x1", problems,
                 _INVCONV_HINT)
    x = torch.randn(2, c, 5, 3, generator=_gen(23))
    ld = _log_det_of(layer, x, "InvConv1x1 on a (2, 4, 5, 3) batch", problems)
    if ld is not None:
        expected = 15 * torch.linalg.slogdet(layer.weight.detach().double())[1].item()
        got = ld[0].item()
        if abs(got - expected) > 1e-4 * (1 + abs(expected)):
            problems.append(f"log_det on a 5x3 image is {got:.5g}; expected H * W * log|det W| "
                            f"= {expected:.5g}" + _hw_hint(got, expected, 15))
    return problems


def invconv_lu_problems(lu_cls: type) -> list[str]:
    """What is wrong with an ``InvConv1x1LU`` class: a correct flow, log-det equal to
    ``H * W * sum(log_s)`` and to ``H * W * log|det W|`` of the assembled weight."""
    problems: list[str] = []
    c = 5
    layer = _try(f"InvConv1x1LU({c})", lambda: lu_cls(c), problems)
    if layer is None:
        return problems
    log_s = getattr(layer, "log_s", None)
    if not isinstance(log_s, nn.Parameter) or tuple(log_s.shape) != (c,):
        return [f"InvConv1x1LU({c}) must keep log|s| as a learnable nn.Parameter `self.log_s` of "
                f"shape ({c},)"]
    w0 = _weight_of(layer, c, "InvConv1x1LU", problems)
    if w0 is None:
        return problems
    problems += _orthogonality_problem(w0, "InvConv1x1LU")
    # move every parameter away from the initial rotation
    _perturb(layer, 0.2, seed=30)
    _flow_report(layer, torch.randn(3, c, 3, 2, generator=_gen(31)), "InvConv1x1LU", problems,
                 _LU_HINT)
    x = torch.randn(2, c, 4, 3, generator=_gen(32))
    ld = _log_det_of(layer, x, "InvConv1x1LU on a (2, 5, 4, 3) batch", problems)
    w = _weight_of(layer, c, "InvConv1x1LU", problems)
    if ld is None or w is None:
        return problems
    got = ld[0].item()
    from_s = 12 * layer.log_s.detach().double().sum().item()
    from_w = 12 * torch.linalg.slogdet(w)[1].item()
    if abs(from_s - from_w) > 1e-4 * (1 + abs(from_w)):
        problems.append(
            f"the assembled weight does not match log_s: H * W * log|det W| = {from_w:.5g} but "
            f"H * W * sum(log_s) = {from_s:.5g}; the diagonal of U + diag(s) must be "
            "sign(s) * exp(log_s), and L must have ones on its diagonal")
    if abs(got - from_s) > 1e-4 * (1 + abs(from_s)):
        hint = _hw_hint(got, from_s, 12)
        s_abs = layer.log_s.detach().double().exp()
        if not hint and abs(got - 12 * s_abs.sum().item()) < 1e-3 * (1 + abs(got)):
            hint = " (it equals H * W * sum(|s|): sum the logarithms log|s|, not s itself)"
        problems.append(f"log_det on a 4x3 image is {got:.5g}; expected H * W * sum(log|s|) = "
                        f"{from_s:.5g}" + hint)
    return problems


def check_invconv(invconv_cls: type) -> bool:
    """Print what is right or wrong with ``InvConv1x1``; True when all is well."""
    return _report("InvConv1x1", _advice(invconv_cls, "InvConv1x1") + invconv_problems(invconv_cls))


def check_invconv_lu(lu_cls: type) -> bool:
    """Print what is right or wrong with ``InvConv1x1LU``; True when all is well."""
    return _report("InvConv1x1LU", _advice(lu_cls, "InvConv1x1LU") + invconv_lu_problems(lu_cls))


# ---------------------------------------------------------------------------------- the step
def glow_step_problems(step_cls: type, actnorm_cls: type, invconv_cls: type,
                       lu_cls: type) -> list[str]:
    """What is wrong with a ``GlowStep`` class built from the student's own layers: every
    ``mixing`` builds the right parts and a fresh step centres each channel; with
    ``mixing="lu"`` and ``"reverse"`` and every parameter moved, the step is a correct flow."""
    problems: list[str] = []
    for c in STEP_CHANNELS:
        problems += _step_problems(step_cls, actnorm_cls, invconv_cls, lu_cls, c)
        if problems:
            return problems
    return problems


#: channel counts the step is built with: even and odd (the coupling's halves differ)
STEP_CHANNELS = (4, 3)


def _step_problems(step_cls: type, actnorm_cls: type, invconv_cls: type, lu_cls: type,
                   c: int) -> list[str]:
    """:func:`glow_step_problems` for ``c`` channels."""
    problems: list[str] = []
    for mixing, wanted in (("lu", lu_cls), ("plain", invconv_cls), ("reverse", None),
                           ("random", None)):
        what = f"GlowStep({c}, hidden=8, num_layers=1, mixing={mixing!r})"
        step = _try(what, lambda mixing=mixing: step_cls(c, hidden=8, num_layers=1,
                                                         mixing=mixing), problems)
        if step is None:
            return problems
        if not isinstance(step, nn.Module):
            return [f"{what} must be an nn.Module"]
        mods = list(step.modules())
        if not any(isinstance(m, actnorm_cls) for m in mods):
            problems.append(f"{what} holds no ActNorm of yours: a step starts with your ActNorm")
        if wanted is not None and not any(isinstance(m, wanted) for m in mods):
            problems.append(f"{what} holds no {wanted.__name__} of yours")
        if mixing in ("reverse", "random") and any(isinstance(m, (invconv_cls, lu_cls))
                                                   for m in mods):
            problems.append(f"{what} must mix channels with a fixed permutation, not a 1x1 "
                            "convolution")
        if problems:
            return problems
        x = _shifted_batch(8, c, 4, 4, seed=40)
        out = _try(f"{what}.forward", lambda step=step, x=x: step(x), problems)
        pair = None if out is None else _pair(out, f"{what}.forward", problems)
        if pair is None:
            return problems
        z = pair[0].detach()
        mean = z.mean(dim=(0, 2, 3)) if z.shape == x.shape else None
        if mean is None:
            return problems + [f"{what}.forward changed the shape {tuple(x.shape)} to "
                               f"{tuple(z.shape)}"]
        if mean.abs().max().item() > 1e-3:
            problems.append(
                f"{what}: on its first batch a fresh step should be ActNorm (which centres every "
                "channel) followed by a linear channel mixing and a coupling that starts as the "
                f"identity, so its output has mean 0 per channel; got {_fmt_list(mean)}. Is "
                "ActNorm first, and does the coupling's network start at zero?")
            return problems
        if mixing not in ("lu", "reverse"):
            # the plain 1x1 convolution and the shuffle are checked by their own exercises
            # (or are the package's): the step as a flow is checked with the learned mixing
            # and with a permutation
            continue
        _perturb(step, 0.05, seed=41)
        _flow_report(step, _shifted_batch(3, c, 4, 4, seed=42),
                     f"GlowStep({c}, mixing={mixing!r})", problems, _STEP_HINT)
        if problems:
            return problems
    return problems


def check_glow_step(step_cls: type, actnorm_cls: type, invconv_cls: type, lu_cls: type) -> bool:
    """Print what is right or wrong with ``GlowStep``; True when all is well."""
    return _report("GlowStep", _advice(step_cls, "GlowStep")
                   + glow_step_problems(step_cls, actnorm_cls, invconv_cls, lu_cls))


# ------------------------------------------------------------------------------ multi-scale
def _structure(model: nn.Module, step_cls: type) -> list[str]:
    from nfcourse.flows import Split, Squeeze

    names = []
    for m in model.modules():
        if isinstance(m, Squeeze):
            names.append("squeeze")
        elif isinstance(m, Split):
            names.append("split")
        elif isinstance(m, step_cls):
            names.append("step")
    return names


def _expected_structure(num_scales: int, steps: int) -> list[str]:
    names: list[str] = []
    for scale in range(num_scales):
        names += ["squeeze"] + ["step"] * steps
        if scale < num_scales - 1:
            names.append("split")
    return names


def _seeded(fn: Callable[[], Any], seed: int = 3) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def glow_problems(build: Callable[..., Any], step_cls: type, lu_cls: type) -> list[str]:
    """What is wrong with ``build_glow`` (run on small 1x8x8 images)."""
    from nfcourse.flows import Dequantization, FlowModel, Split

    problems: list[str] = []
    shape = (1, 8, 8)
    cases = [(2, 2, "lu", (8, 2, 2)), (3, 1, "reverse", (16, 1, 1))]
    model = None
    for num_scales, steps, mixing, prior_shape in cases:
        what = (f"build_glow(shape=(1, 8, 8), num_scales={num_scales}, steps_per_scale={steps}, "
                f"hidden=8, num_layers=1, mixing={mixing!r})")
        m = _try(what, lambda n=num_scales, k=steps, mx=mixing: build(
            shape=shape, num_scales=n, steps_per_scale=k, hidden=8, num_layers=1, mixing=mx),
            problems)
        if m is None:
            return problems
        if not isinstance(m, FlowModel):
            return [f"{what} returned {type(m).__name__}; return a nfcourse.flows.FlowModel"]
        layers = list(m.flow.layers) if hasattr(m.flow, "layers") else list(m.flow.children())
        if not layers or not isinstance(layers[0], Dequantization):
            problems.append("the flow must start with a dequantization layer "
                            "(nfcourse.flows.Dequantization)")
        got, want = _structure(m, step_cls), _expected_structure(num_scales, steps)
        if got != want:
            problems.append(f"{what}: the squeezes, your GlowSteps and the splits come in the "
                            f"order {got}; expected {want}")
        n_lu = sum(isinstance(x, lu_cls) for x in m.modules())
        if mixing == "lu" and n_lu != num_scales * steps:
            problems.append(f"{what}: expected one InvConv1x1LU of yours per step "
                            f"({num_scales * steps}), found {n_lu}: pass `mixing` to the steps")
        if mixing == "reverse" and n_lu:
            problems.append(f"{what}: with mixing='reverse' no step may hold an InvConv1x1LU: "
                            "pass `mixing` to the steps")
        got_prior = tuple(getattr(m.prior, "shape", ()))
        if got_prior != prior_shape:
            problems.append(f"{what}: the prior must be StandardNormal({prior_shape}) (the last "
                            f"scale's latent), got shape {got_prior}")
        if tuple(m.data_shape) != shape:
            problems.append(f"{what}: data_shape must be {shape}, got {tuple(m.data_shape)}")
        if problems:
            return problems
        model = model or m

    # several input channels: a builder sized for one channel fails here
    multi = (3, 4, 4)
    what = f"build_glow(shape={multi}, num_scales=2, steps_per_scale=1, hidden=8, num_layers=1)"
    m = _try(what, lambda: build(shape=multi, num_scales=2, steps_per_scale=1, hidden=8,
                                 num_layers=1, mixing="lu"), problems)
    if m is None:
        return problems
    if tuple(getattr(getattr(m, "prior", None), "shape", ())) != (24, 1, 1):
        return [f"{what}: the prior must be StandardNormal((24, 1, 1)), the last scale's latent"]
    with torch.no_grad():
        lp = _try(f"{what}.log_prob(x)", lambda: _seeded(lambda: m.log_prob(
            torch.randint(0, 256, (2, *multi), generator=_gen(49)))), problems)
    if lp is None:
        return problems
    if not isinstance(lp, Tensor) or lp.shape != (2,) or not bool(torch.isfinite(lp).all()):
        return problems + [f"{what}: log_prob of 2 images must be 2 finite numbers"]

    x = torch.randint(0, 256, (6, *shape), generator=_gen(50))
    with torch.no_grad():
        lp = _try("model.log_prob(x)", lambda: _seeded(lambda: model.log_prob(x)), problems)
        if lp is None:
            return problems
        if not isinstance(lp, Tensor) or lp.shape != (6,) or not bool(torch.isfinite(lp).all()):
            return problems + ["model.log_prob(x) for 6 images must be 6 finite numbers"]
        _perturb(model.flow, 0.05, seed=51)
        # round trip: give every Split back the half it factored out
        splits = [s for s in model.modules() if isinstance(s, Split)]
        hooks = [s.register_forward_hook(lambda mod, inp, out: setattr(
            mod, "z2", inp[0].chunk(2, dim=1)[1].detach())) for s in splits]
        try:
            out = _try("model.flow(x)", lambda: _seeded(lambda: model.flow(x.float())), problems)
            back = None if out is None else _try("model.flow.inverse(z)",
                                                 lambda: model.flow.inverse(out[0]), problems)
        finally:
            for h in hooks:
                h.remove()
            for s in splits:
                s.z2 = None
        if back is None:
            return problems
        if back[0].shape != x.shape or not torch.equal(back[0].round(), x.float()):
            wrong = ((back[0].round() != x.float()).float().mean().item()
                     if back[0].shape == x.shape else 1.0)
            problems.append(f"running the flow backwards from f(x) (with the split-off halves "
                            f"given back) does not give back the pixels ({wrong:.1%} differ): "
                            "is every step invertible?")
        samples = _try("model.sample(3)", lambda: model.sample(3), problems)
        if samples is not None and (
            tuple(samples.shape) != (3, *shape) or bool((samples != samples.round()).any())
            or bool((samples < 0).any()) or bool((samples > 255).any())
        ):
            problems.append("model.sample(3) must give 3 images of integers in [0, 255]")
    return problems


def check_glow(build: Callable[..., Any], step_cls: type, lu_cls: type) -> bool:
    """Print what is right or wrong with ``build_glow``; True when all is well."""
    return _report("build_glow",
                   _advice(build, "build_glow") + glow_problems(build, step_cls, lu_cls))
