"""Self-checks of lesson 03, "Coupling layers for images".

Each ``check_<exercise>`` prints what is right and what is wrong in plain words and returns
``True`` when everything passed; the matching ``<exercise>_problems`` returns the list of
problems with the answer's behaviour (empty when all is well) and is what the hidden tests
assert on. The self-checks also say, as advice, when an answer is the reference layer it is
asked to write (while the lesson is graded that reference is not in the package). None of
them raises because of
a student's mistake: an exception in the answer becomes a problem.

Conventions the lesson asks for (and these checks hold answers to):

* ``checkerboard_mask(h, w, invert=False)``: float ``(1, 1, h, w)``, 1 where ``i + j`` is
  even (the top-left pixel is kept), ``invert=True`` gives ``1 - mask``.
* ``channel_mask(c, invert=False)``: float ``(1, c, 1, 1)``, the first ``c // 2`` channels
  are 1.
* ``ImageAffineCoupling(c_in, mask, net=None, c_hidden=..., num_layers=...)``: ``self.mask``
  the mask, ``self.net`` a network ``(B, c_in, H, W) -> (B, 2 c_in, H, W)`` (log-scale
  channels first, then shift), ``self.log_scale`` a learnable ``(1, c_in, 1, 1)`` parameter,
  and the log-scale bounded as ``|s| <= exp(log_scale)``.
* ``build_simple_flow(shape, num_couplings, c_hidden, num_layers, vardeq)``: a
  :class:`~nfcourse.flows.FlowModel` whose flow starts with a dequantization layer followed by
  ``num_couplings`` couplings whose masks are checkerboards that alternate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from nfcourse.checks.core import check_flow, reference_advice
from nfcourse.checks.reporting import attempt as _try
from nfcourse.checks.reporting import fast_mode_bar
from nfcourse.checks.reporting import report_problems as _report

__all__ = [
    "checkerboard_mask_problems",
    "channel_mask_problems",
    "coupling_problems",
    "coupling_init_problems",
    "coupling_independence",
    "simple_flow_problems",
    "training_problems",
    "check_checkerboard_mask",
    "check_channel_mask",
    "check_coupling",
    "check_coupling_init",
    "check_simple_flow",
    "check_training",
    "RandomConvNet",
    "bpd_bar",
]

#: test bits/dim a trained single-scale flow must beat: in full mode, and in fast mode per data
#: source (the digits fallback, 8x8 digits upscaled to 28x28, has more grey levels per pixel
#: than MNIST and costs more bits after a few dozen steps)
THRESHOLDS = {"full": 1.3, "mnist": 3.5, "digits": 6.0}


def bpd_bar(source: str = "mnist") -> float:
    """The test-bpd bar of the training exercise: ``source`` is ``lesson_images().source``."""
    return fast_mode_bar(THRESHOLDS, source)


# --------------------------------------------------------------------------------- helpers
# The expected masks are computed here, not with the package's reference masks: a grading
# kernel of this lesson holds no reference answer to compare with (the grading edition).
def _expected_checkerboard(h: int, w: int, invert: bool) -> Tensor:
    """The lesson's checkerboard: ``(1, 1, h, w)``, 1 where ``i + j`` is even.

    Example:
        >>> _expected_checkerboard(2, 2, False).flatten().tolist()
        [1.0, 0.0, 0.0, 1.0]
    """
    even = (torch.arange(h).view(-1, 1) + torch.arange(w).view(1, -1)) % 2 == 0
    return (even != invert).to(torch.float32).view(1, 1, h, w)


def _expected_channel(c: int, invert: bool) -> Tensor:
    """The lesson's channel mask: ``(1, c, 1, 1)``, the first ``c // 2`` channels 1.

    Example:
        >>> _expected_channel(3, False).flatten().tolist()
        [1.0, 0.0, 0.0]
    """
    kept = torch.arange(c) < c // 2
    return (kept != invert).to(torch.float32).view(1, c, 1, 1)


def _mask_problems(name: str, out: Any, expected: Tensor, call: str) -> list[str]:
    if not isinstance(out, Tensor):
        return [f"{call} returned {type(out).__name__}; it must return a tensor"]
    if tuple(out.shape) != tuple(expected.shape):
        return [f"{call} has shape {tuple(out.shape)}; expected {tuple(expected.shape)}"]
    if not out.is_floating_point():
        return [f"{call} has dtype {out.dtype}; use a float tensor (multiply images by it)"]
    if not bool(((out == 0) | (out == 1)).all()):
        return [f"{call} holds values other than 0 and 1"]
    wrong = (out.detach().cpu().float() != expected).nonzero().tolist()
    if wrong:
        idx = tuple(wrong[0])
        return [
            f"{call} is wrong at {len(wrong)} position(s), e.g. index {idx}: got "
            f"{out[idx].item():g}, expected {expected[idx].item():g}"
        ]
    return []


def _independence(answer: Any, *references: str) -> list[str]:
    """Advice (a one-line list, empty when none) when ``answer`` is, subclasses or is an
    instance of one of the package's ``references`` (dotted names): for self-checks only."""
    advice = reference_advice(answer, *references)
    return [] if advice is None else [advice]


# --------------------------------------------------------------------------------- masks
def checkerboard_mask_problems(checkerboard_mask: Callable[..., Tensor]) -> list[str]:
    """What is wrong with a ``checkerboard_mask(h, w, invert=False)`` answer."""
    problems: list[str] = []
    # every parity of height and width, a single row and column, and the lesson's size
    for h, w in [(4, 6), (3, 5), (2, 3), (5, 2), (1, 1), (28, 28)]:
        for invert in (False, True):
            call = f"checkerboard_mask({h}, {w}, invert={invert})"
            out = _try(call, lambda h=h, w=w, invert=invert: checkerboard_mask(h, w, invert=invert),
                       problems)
            if out is None:
                return problems
            found = _mask_problems("checkerboard", out, _expected_checkerboard(h, w, invert), call)
            if found and not invert and out.shape == (1, 1, h, w) and bool(out[0, 0, 0, 0] == 0):
                found.append("the top-left pixel (0, 0) must be 1 (kept) when invert=False")
            problems += found
            if found:
                return problems
    return problems


def channel_mask_problems(channel_mask: Callable[..., Tensor]) -> list[str]:
    """What is wrong with a ``channel_mask(c, invert=False)`` answer."""
    problems: list[str] = []
    # odd counts always: there c // 2 and ceil(c / 2) differ
    for c in (2, 3, 4, 5, 8):
        for invert in (False, True):
            call = f"channel_mask({c}, invert={invert})"
            out = _try(call, lambda c=c, invert=invert: channel_mask(c, invert=invert), problems)
            if out is None:
                return problems
            found = _mask_problems("channel", out, _expected_channel(c, invert), call)
            if found and not invert and out.shape == (1, c, 1, 1) and bool(out[0, 0, 0, 0] == 0):
                found.append("the first half of the channels must be 1 (kept) when invert=False")
            problems += found
            if found:
                return problems
    return problems


def check_checkerboard_mask(checkerboard_mask: Callable[..., Tensor]) -> bool:
    """Print what is right or wrong with ``checkerboard_mask``; True when all is well."""
    return _report("checkerboard_mask",
                   _independence(checkerboard_mask, "nfcourse.flows.checkerboard_mask")
                   + checkerboard_mask_problems(checkerboard_mask))


def check_channel_mask(channel_mask: Callable[..., Tensor]) -> bool:
    """Print what is right or wrong with ``channel_mask``; True when all is well."""
    return _report("channel_mask", _independence(channel_mask, "nfcourse.flows.channel_mask")
                   + channel_mask_problems(channel_mask))


# --------------------------------------------------------------------------------- coupling
class RandomConvNet(nn.Module):
    """A fixed random convolution ``(B, c, H, W) -> (B, 2c, H, W)`` with output of size
    ``gain``: a stand-in for a trained network, so that log-scale and shift are not zero."""

    def __init__(self, c_in: int, gain: float = 1.0, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(c_in, 2 * c_in, kernel_size=3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * gain / 3)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=gen) * gain / 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def _build(cls: type, what: str, problems: list[str], *args: Any, **kwargs: Any) -> Any:
    return _try(what, lambda: cls(*args, **kwargs), problems)


def _masks_for(c: int, h: int, w: int) -> list[tuple[str, Tensor]]:
    """Every mask an image of ``c`` channels allows (a channel mask needs two or more)."""
    masks = [
        ("a checkerboard mask", _expected_checkerboard(h, w, False)),
        ("an inverted checkerboard mask", _expected_checkerboard(h, w, True)),
    ]
    if c > 1:
        masks += [("a channel mask", _expected_channel(c, False)),
                  ("an inverted channel mask", _expected_channel(c, True))]
    return masks


def coupling_problems(coupling_cls: type) -> list[str]:
    """What is wrong with an ``ImageAffineCoupling`` class, checked with a random (non-zero)
    network so that a wrong log-det, inverse or mask cannot hide behind the identity."""
    problems: list[str] = []
    # one channel and several (an odd count, so that a channel mask splits unevenly),
    # square and non-square images of both parities
    for c, h, w in ((2, 4, 4), (1, 5, 4), (3, 3, 5)):
        problems += _coupling_case_problems(coupling_cls, c, h, w)
        if problems:
            return problems
    return problems + _bound_problems(coupling_cls)


def _coupling_case_problems(coupling_cls: type, c: int, h: int, w: int) -> list[str]:
    """:func:`coupling_problems` at one size, for every mask that size allows."""
    problems: list[str] = []
    gen = torch.Generator().manual_seed(c * 100 + h * 10 + w)
    x = torch.randn(3, c, h, w, generator=gen)
    for label, mask in _masks_for(c, h, w):
        what = f"ImageAffineCoupling({c}, <{label}>, net=RandomConvNet({c}))"
        layer = _build(coupling_cls, what, problems, c, mask.clone(), net=RandomConvNet(c))
        if layer is None:
            return problems
        if not isinstance(getattr(layer, "log_scale", None), nn.Parameter):
            return problems + [
                f"{what} has no learnable `log_scale` (an nn.Parameter of shape (1, {c}, 1, 1)): "
                "the bound of the log-scale must be learnable"
            ]
        with torch.no_grad():
            layer.log_scale.fill_(math.log(0.8))
        report = check_flow(layer, x, name=f"ImageAffineCoupling with {label}")
        for r in report.failed:
            problems.append(f"with {label}: {r.title}: {r.message}" + (
                f" (hint: {r.hint})" if r.hint else ""))
        out = _try(f"{what}.forward", lambda layer=layer: layer(x), problems)
        if out is None or problems:
            return problems
        z = out[0].detach()
        if not torch.equal(z * mask, x * mask):
            problems.append(
                f"with {label}: the kept pixels (mask = 1) changed; only the pixels where "
                "mask = 0 may be scaled and shifted")
        elif torch.allclose(z, x):
            problems.append(f"with {label}: the layer changed nothing although its network "
                            "outputs a non-zero log-scale and shift")
        if problems:
            return problems
    return problems


def _bound_problems(coupling_cls: type) -> list[str]:
    """The bound: a huge network output must still give |s| <= exp(log_scale)."""
    problems: list[str] = []
    c, h, w = 2, 4, 4
    x = torch.randn(3, c, h, w, generator=torch.Generator().manual_seed(0))
    mask = _expected_checkerboard(h, w, False)
    what = f"ImageAffineCoupling({c}, <a checkerboard mask>, net=RandomConvNet({c}, gain=100))"
    layer = _build(coupling_cls, what, problems, c, mask, net=RandomConvNet(c, gain=100.0))
    if layer is None:
        return problems
    bound = 0.5
    with torch.no_grad():
        layer.log_scale.fill_(math.log(bound))
        out = _try(f"{what}.forward", lambda: layer(x), problems)
    if out is None:
        return problems
    ld = out[1]
    per_pixel = ld.abs().max().item() / ((1 - mask).sum().item() * c)
    if not math.isfinite(per_pixel) or per_pixel > bound * (1 + 1e-5):
        problems.append(
            f"the log-scale is not bounded: with exp(log_scale) = {bound} and a network whose "
            f"output is about 100, |log_det| per transformed pixel is {per_pixel:.3g} > {bound}; "
            "use s = exp(log_scale) * tanh(s_raw / exp(log_scale))")
    elif per_pixel < 0.2 * bound:
        problems.append(
            f"with a network whose output is about 100 and exp(log_scale) = {bound}, the "
            f"log-scale per pixel is only {per_pixel:.3g}: is s = exp(log_scale) * tanh(s_raw / "
            "exp(log_scale)) computed from the first c_in output channels?")
    return problems


def coupling_init_problems(coupling_cls: type) -> list[str]:
    """A freshly built coupling with its default network must be the identity map."""
    problems: list[str] = []
    for c, (h, w), mask in [(1, (6, 5), _expected_checkerboard(6, 5, False)),
                            (2, (5, 5), _expected_channel(2, True)),
                            (3, (4, 6), _expected_channel(3, False))]:
        what = f"ImageAffineCoupling({c}, mask, c_hidden=8, num_layers=1)"
        layer = _build(coupling_cls, what, problems, c, mask, c_hidden=8, num_layers=1)
        if layer is None:
            return problems
        x = torch.randn(4, c, h, w, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = _try(f"{what}.forward", lambda layer=layer, x=x: layer(x), problems)
            inv = _try(f"{what}.inverse", lambda layer=layer, x=x: layer.inverse(x), problems)
        if out is None or inv is None:
            return problems
        for direction, (y, ld) in (("forward", out), ("inverse", inv)):
            if not isinstance(y, Tensor) or y.shape != x.shape or not torch.allclose(y, x):
                problems.append(
                    f"{what}.{direction} is not the identity right after construction: zero the "
                    "network's last layer (GatedConvNet does by default) and make s = t = 0 give "
                    "z = x")
            elif not isinstance(ld, Tensor) or ld.shape != (4,) or bool(ld.abs().max() > 1e-6):
                problems.append(f"{what}.{direction}: log_det must be zeros of shape (4,) at "
                                "initialisation")
        if problems:
            return problems
    return problems


def coupling_independence(coupling_cls: type) -> list[str]:
    """Advice when the coupling is (or subclasses) a reference coupling."""
    return _independence(coupling_cls, "nfcourse.flows.AffineCoupling",
                         "nfcourse.flows.MaskedAffineCoupling")


def check_coupling(coupling_cls: type) -> bool:
    """Print what is right or wrong with ``ImageAffineCoupling``; True when all is well."""
    return _report("ImageAffineCoupling", coupling_independence(coupling_cls)
                   + coupling_problems(coupling_cls))


def check_coupling_init(coupling_cls: type) -> bool:
    """Print whether a fresh ``ImageAffineCoupling`` is the identity; True when it is."""
    return _report("ImageAffineCoupling at initialisation", coupling_init_problems(coupling_cls))


# --------------------------------------------------------------------------------- the flow
def _flow_layers(model: Any) -> list[nn.Module]:
    flow = getattr(model, "flow", None)
    if flow is None:
        return []
    if hasattr(flow, "layers"):
        return list(flow.layers)
    return list(flow.children())


def _mask_of(layer: nn.Module, shape: tuple[int, ...]) -> Tensor | None:
    """The layer's mask (``self.mask``, or ``get_mask(x)`` for layers that build it per input)."""
    m = getattr(layer, "mask", None)
    get = getattr(layer, "get_mask", None)
    if not isinstance(m, Tensor) and callable(get):
        m = _try("get_mask", lambda: get(torch.zeros(1, *shape)), [])
    return m.detach().cpu().float() if isinstance(m, Tensor) else None


def simple_flow_problems(build: Callable[..., Any], coupling_cls: type) -> list[str]:
    """What is wrong with ``build_simple_flow``, run on small images with one channel (the
    lesson's) and with three (a builder must use the shape it is given), even and odd
    sizes, an even and an odd number of couplings."""
    for shape, n in (((1, 8, 8), 4), ((3, 5, 6), 3)):
        problems = _simple_flow_problems_at(build, coupling_cls, shape, n)
        if problems:
            return problems
    return []


def _simple_flow_problems_at(build: Callable[..., Any], coupling_cls: type,
                             shape: tuple[int, int, int], num_couplings: int) -> list[str]:
    """:func:`simple_flow_problems` at one image shape and number of couplings."""
    from nfcourse.flows import Dequantization, FlowModel, VariationalDequantization

    problems: list[str] = []
    c, hh, ww = shape
    what = (f"build_simple_flow(shape={shape}, num_couplings={num_couplings}, c_hidden=8, "
            "num_layers=1)")
    model = _try(what, lambda: build(shape=shape, num_couplings=num_couplings, c_hidden=8,
                                     num_layers=1), problems)
    if model is None:
        return problems
    if not isinstance(model, FlowModel):
        return [f"{what} returned {type(model).__name__}; return a nfcourse.flows.FlowModel"]
    layers = _flow_layers(model)
    if not layers or not isinstance(layers[0], Dequantization):
        problems.append("the flow must start with a dequantization layer (nfcourse.flows."
                        "Dequantization or VariationalDequantization)")
    couplings = [m for m in model.modules() if isinstance(m, coupling_cls)]
    if len(couplings) != num_couplings:
        problems.append(f"{what}: asked for num_couplings={num_couplings}, found "
                        f"{len(couplings)} ImageAffineCoupling layer(s) in the model")
    masks = [_mask_of(layer, shape) for layer in couplings]
    if couplings and any(m is None for m in masks):
        problems.append("every ImageAffineCoupling must keep its mask as `self.mask`")
    elif couplings:
        boards = (_expected_checkerboard(hh, ww, False), _expected_checkerboard(hh, ww, True))
        for k, m in enumerate(masks):
            if m.shape != (1, 1, hh, ww) or not any(torch.equal(m, b) for b in boards):
                problems.append(f"{what}: coupling {k} does not use a {hh}x{ww} checkerboard "
                                "mask")
                break
        else:
            for k in range(len(masks) - 1):
                if not torch.equal(masks[k] + masks[k + 1], torch.ones_like(masks[k])):
                    problems.append(
                        f"couplings {k} and {k + 1} use the same mask: alternate the "
                        "checkerboard and its inverse, so that every pixel gets transformed")
                    break
    prior_shape = tuple(getattr(model.prior, "shape", ()))
    if prior_shape != shape:
        problems.append(f"the prior must be StandardNormal({shape}), got shape {prior_shape}")
    if problems:
        return problems

    x = torch.randint(0, 256, (6, *shape), generator=torch.Generator().manual_seed(2))
    # identity at initialisation: log p(x) equals the dequantization's alone under N(0, I)
    def seeded(fn: Callable[[], Tensor]) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            return fn()

    with torch.no_grad():
        lp = _try("model.log_prob(x)", lambda: seeded(lambda: model.log_prob(x)), problems)
        if lp is None:
            return problems
        if not isinstance(lp, Tensor) or lp.shape != (6,):
            return problems + [f"model.log_prob(x) for 6 images must have shape (6,), got "
                               f"{tuple(getattr(lp, 'shape', ()))}"]
        deq = layers[0]

        def deq_only() -> Tensor:
            z, ld = deq(x.float())
            return model.prior.log_prob(z) + ld

        if not isinstance(deq, VariationalDequantization):
            base = seeded(deq_only)
            if not torch.allclose(lp, base, rtol=1e-5, atol=1e-2):
                problems.append(
                    "a freshly built flow must be the identity after dequantization (zero-"
                    "initialised last layers): its log p(x) differs from the dequantization's "
                    f"alone by up to {(lp - base).abs().max().item():.3g} nats")
    # nudge every coupling so it is not the identity, then check the whole flow
    with torch.no_grad():
        gen = torch.Generator().manual_seed(4)
        for layer in couplings:
            for p in layer.parameters():
                if p.requires_grad:  # a frozen parameter (a mask) is not the network's
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        out = _try("model.flow(x)", lambda: seeded(lambda: model.flow(x.float())), problems)
        if out is None:
            return problems
        z, ld = out
        back = _try("model.flow.inverse(z)", lambda: model.flow.inverse(z), problems)
        if back is None:
            return problems
        if not torch.equal(back[0].round(), x.float()):
            wrong = (back[0].round() != x.float()).float().mean().item()
            problems.append(f"model.flow.inverse(model.flow(x)) does not give back the pixels "
                            f"({wrong:.1%} differ) once the couplings are not the identity")
        if ld.shape != (6,) or not bool(torch.isfinite(ld).all()):
            problems.append("the flow's log_det must be finite with shape (batch,)")
        lp2 = seeded(lambda: model.log_prob(x))
        expected = model.prior.log_prob(z) + ld
        if not torch.allclose(lp2, expected, rtol=1e-5, atol=1e-3):
            problems.append("model.log_prob(x) is not prior.log_prob(z) + log_det of the flow")
        samples = _try("model.sample(3)", lambda: model.sample(3), problems)
        if samples is not None and (
            tuple(samples.shape) != (3, *shape) or bool((samples != samples.round()).any())
            or bool((samples < 0).any()) or bool((samples > 255).any())
        ):
            problems.append("model.sample(3) must give 3 images of integers in [0, 255]")
    vd = _try("build_simple_flow(..., vardeq=True)",
              lambda: build(shape=shape, num_couplings=2, c_hidden=8, num_layers=1, vardeq=True),
              problems)
    if vd is not None:
        first = _flow_layers(vd)[:1]
        if not first or not isinstance(first[0], VariationalDequantization):
            problems.append("with vardeq=True the flow must start with a "
                            "VariationalDequantization layer")
    return problems


def check_simple_flow(build: Callable[..., Any], coupling_cls: type) -> bool:
    """Print what is right or wrong with ``build_simple_flow``; True when all is well."""
    return _report("build_simple_flow",
                   _independence(build, "nfcourse.flows.simple_image_flow",
                                 "nfcourse.flows.multiscale_flow")
                   + simple_flow_problems(build, coupling_cls))


# --------------------------------------------------------------------------------- training
def training_problems(model: Any, coupling_cls: type, test_images: Tensor,
                      threshold: float | None = None) -> list[str]:
    """The trained model must be built from ``coupling_cls`` and beat ``threshold`` test bpd."""
    from nfcourse.flows import FlowModel

    threshold = bpd_bar() if threshold is None else threshold
    if not isinstance(model, FlowModel):
        return [f"`model` is {type(model).__name__}; train the FlowModel of build_simple_flow"]
    n = sum(isinstance(m, coupling_cls) for m in model.modules())
    if n < 8:
        return [f"the trained model has {n} ImageAffineCoupling layers; the lesson's flow has 8"]
    from nfcourse.train import evaluate

    bpd = _try("evaluating the model on the test images",
               lambda: evaluate(model, test_images, batch_size=256, seed=0), [])
    if bpd is None or not math.isfinite(bpd):
        return ["the trained model's test bits/dim is not finite"]
    if bpd >= threshold:
        return [f"test bits/dim {bpd:.3f} does not beat {threshold}: train longer or check the "
                "learning rate"]
    return []


def check_training(model: Any, coupling_cls: type, test_images: Tensor,
                   threshold: float | None = None) -> bool:
    """Print whether the trained model beats the lesson's test-bpd bar; True when it does."""
    return _report("trained flow", training_problems(model, coupling_cls, test_images, threshold))
