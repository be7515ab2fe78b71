"""Self-checks of lesson 04, "Multi-scale architecture".

Like :mod:`nfcourse.checks.lesson03`: each ``check_<exercise>`` prints what is right and
wrong (with advice when an answer is the reference layer) and returns ``True`` when all
passed; ``<exercise>_problems`` returns the problems with the answer's behaviour as a list
(what the hidden tests assert on). A mistake in an answer becomes a
problem, never an exception.

Conventions the lesson asks for:

* ``Squeeze()``: ``(B, C, H, W) -> (B, 4C, H/2, W/2)`` with
  ``out[b, 4*c + 2*i + j, h, w] = x[b, c, 2*h + i, 2*w + j]`` (the 2x2 block read row by
  row: top-left, top-right, bottom-left, bottom-right), log-det zero.
* ``Split()``: ``forward`` keeps the first half of the channels and returns the log-density
  of the second half under ``N(0, I)`` as its log-det; ``inverse(z, context=None, z2=None)``
  appends ``z2``, else ``self.z2`` when set, else ``self.temperature * N(0, I)`` samples, and
  returns ``-log N(z2)``.
* ``build_multiscale_flow(shape, c_hidden, num_couplings, num_layers, vardeq)``:
  dequantization; ``num_couplings[0]`` checkerboard couplings; squeeze;
  ``num_couplings[1]`` channel couplings; split; squeeze; ``num_couplings[2]`` channel
  couplings; prior ``StandardNormal((8C, H/4, W/4))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from nfcourse.checks.core import check_flow
from nfcourse.checks.lesson03 import _flow_layers, _independence
from nfcourse.checks.reporting import attempt as _try
from nfcourse.checks.reporting import fast_mode_bar
from nfcourse.checks.reporting import report_problems as _report

__all__ = [
    "squeeze_problems",
    "split_problems",
    "multiscale_problems",
    "training_problems",
    "check_squeeze",
    "check_split",
    "check_multiscale",
    "check_training",
    "bpd_bar",
]

#: test bits/dim a trained multi-scale flow must beat: in full mode, and in fast mode per data
#: source (the digits fallback, 8x8 digits upscaled to 28x28, has more grey levels per pixel
#: than MNIST and costs more bits after a few dozen steps)
THRESHOLDS = {"full": 1.25, "mnist": 3.5, "digits": 6.0}


def bpd_bar(source: str = "mnist") -> float:
    """The test-bpd bar of the training exercise: ``source`` is ``lesson_images().source``."""
    return fast_mode_bar(THRESHOLDS, source)


def _log_normal(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` per sample, from torch's own Normal: not the package's Split (it is
    this lesson's exercise, so its grading edition does not have it)."""
    return torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)


def _pair(out: Any, what: str, problems: list[str]) -> tuple[Tensor, Tensor] | None:
    if (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(o, Tensor) for o in out)):
        return out[0], out[1]
    problems.append(f"{what} must return a tuple (tensor, log_det)")
    return None


# ---------------------------------------------------------------------------------- squeeze
def squeeze_problems(squeeze_cls: type) -> list[str]:
    """What is wrong with a ``Squeeze`` class."""
    problems: list[str] = []
    layer = _try("Squeeze()", squeeze_cls, problems)
    if layer is None:
        return problems
    for b, c, h, w in SQUEEZE_SHAPES:
        problems += _squeeze_shape_problems(layer, b, c, h, w)
        if problems:
            return problems
    report = check_flow(layer, torch.randn(2, 1, 4, 4, dtype=torch.float64), name="Squeeze")
    problems += [f"{r.title}: {r.message}" for r in report.failed]
    return problems


#: (B, C, H, W) every squeeze check tries: one channel, odd and even counts, the smallest
#: image and a non-square one
SQUEEZE_SHAPES = ((1, 1, 2, 2), (2, 3, 4, 6), (3, 2, 6, 2), (2, 4, 2, 8))


def _squeeze_shape_problems(layer: Any, b: int, c: int, h: int, w: int) -> list[str]:
    """:func:`squeeze_problems` for one batch shape."""
    problems: list[str] = []
    x = torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w)
    out = _try("Squeeze().forward(x)", lambda: layer(x), problems)
    if out is None or (out := _pair(out, "Squeeze.forward", problems)) is None:
        return problems
    z, ld = out
    if tuple(z.shape) != (b, 4 * c, h // 2, w // 2):
        return problems + [f"squeezing a {(b, c, h, w)} batch gave shape {tuple(z.shape)}; "
                           f"expected {(b, 4 * c, h // 2, w // 2)}"]
    for cc in range(c):
        for i in range(2):
            for j in range(2):
                got = z[:, 4 * cc + 2 * i + j]
                want = x[:, cc, i::2, j::2]
                if not torch.equal(got, want):
                    where = ("top-left", "top-right", "bottom-left", "bottom-right")[2 * i + j]
                    return problems + [
                        f"output channel {4 * cc + 2 * i + j} should hold the {where} pixel of "
                        f"every 2x2 block of input channel {cc} (out[b, 4c + 2i + j, h, w] = "
                        f"x[b, c, 2h + i, 2w + j]); it holds something else"]
    if tuple(ld.shape) != (b,) or bool(ld.abs().max() > 0):
        problems.append(f"Squeeze only moves numbers: its log_det must be zeros of shape ({b},)")
    back = _try("Squeeze().inverse(z)", lambda: layer.inverse(z), problems)
    if back is None or (back := _pair(back, "Squeeze.inverse", problems)) is None:
        return problems
    if tuple(back[0].shape) != tuple(x.shape) or not torch.equal(back[0], x):
        problems.append("Squeeze.inverse(Squeeze.forward(x)) does not give back x exactly")
    if tuple(back[1].shape) != (b,) or bool(back[1].abs().max() > 0):
        problems.append("Squeeze.inverse must return a zero log_det of shape (batch,)")
    return problems


def check_squeeze(squeeze_cls: type) -> bool:
    """Print what is right or wrong with ``Squeeze``; True when all is well."""
    return _report("Squeeze", _independence(squeeze_cls, "nfcourse.flows.Squeeze")
                   + squeeze_problems(squeeze_cls))


# ---------------------------------------------------------------------------------- split
def split_problems(split_cls: type) -> list[str]:
    """What is wrong with a ``Split`` class."""
    problems: list[str] = []
    for half in SPLIT_HALVES:
        layer = _try("Split()", split_cls, problems)
        if layer is None:
            return problems
        problems += _split_half_problems(layer, half)
        if problems:
            return problems
    return problems


#: channels of the half a split keeps, every time: one, even and odd
SPLIT_HALVES = (2, 1, 3)


def _split_half_problems(layer: Any, k: int) -> list[str]:
    """:func:`split_problems` for inputs of ``2 k`` channels."""
    problems: list[str] = []
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(3, 2 * k, 2, 2, generator=gen, dtype=torch.float64)
    out = _try("Split().forward(x)", lambda: layer(x), problems)
    if out is None or (out := _pair(out, "Split.forward", problems)) is None:
        return problems
    z1, ld = out
    if tuple(z1.shape) != (3, k, 2, 2) or not torch.equal(z1, x[:, :k]):
        return problems + ["Split.forward must return the first half of the channels "
                           f"(shape (3, {k}, 2, 2) for a (3, {2 * k}, 2, 2) input), got shape "
                           f"{tuple(z1.shape)}" + ("" if tuple(z1.shape) != (3, k, 2, 2)
                                                   else " with other values")]
    expected = _log_normal(x[:, k:])
    if tuple(ld.shape) != (3,):
        return problems + [f"Split.forward's log_det must have shape (3,), got {tuple(ld.shape)}"]
    if not torch.allclose(ld, expected, rtol=1e-6, atol=1e-6):
        hint = (" (it is zero: the factored-out half must be scored by the prior here)"
                if bool(ld.abs().max() == 0) else "")
        return problems + [
            "Split.forward's log_det must be log N(z2; 0, I) of the factored-out half, summed "
            f"per sample: expected {expected.tolist()}, got {ld.tolist()}{hint}"]
    back = _try("Split().inverse(z1, z2=z2)", lambda: layer.inverse(z1, z2=x[:, k:]), problems)
    if back is None or (back := _pair(back, "Split.inverse", problems)) is None:
        return problems
    if tuple(back[0].shape) != tuple(x.shape) or not torch.equal(back[0], x):
        problems.append("Split.inverse(z1, z2=z2) must put the halves back in order: "
                        "torch.cat([z1, z2], dim=1)")
    if tuple(back[1].shape) != (3,) or not torch.allclose(back[1], -expected, atol=1e-6):
        problems.append("Split.inverse's log_det must be -log N(z2; 0, I) (minus the forward one)")
    if problems:
        return problems
    # self.z2, then sampling with the temperature
    layer.z2 = x[:, k:] * 2
    got = _try("Split().inverse(z1) with self.z2 set", lambda: layer.inverse(z1), problems)
    layer.z2 = None
    if got is None or (got := _pair(got, "Split.inverse", problems)) is None:
        return problems
    if not torch.equal(got[0][:, k:], x[:, k:] * 2):
        problems.append("Split.inverse(z1) must use self.z2 for the second half when it is set")
    for temperature in (0.0, 1.0):
        layer.temperature = temperature
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            got = _try("Split().inverse(z1)", lambda: layer.inverse(z1), problems)
        if got is None or (got := _pair(got, "Split.inverse", problems)) is None:
            return problems
        y = got[0]
        if tuple(y.shape) != tuple(x.shape) or not torch.equal(y[:, :k], z1):
            return problems + ["Split.inverse(z1) without z2 must return (B, 2C, H, W) with z1 "
                               "as the first half"]
        if not bool(torch.isfinite(got[1]).all()) or tuple(got[1].shape) != (3,):
            return problems + ["Split.inverse(z1) without z2 must return a finite log_det of "
                               "shape (batch,)"]
        spread = y[:, k:].std().item()
        if temperature == 0.0 and spread != 0.0:
            problems.append("with self.temperature = 0 the sampled half must be all zeros "
                            "(sample temperature * N(0, I))")
        if temperature == 1.0 and not 0.3 < spread < 3:
            problems.append(f"with self.temperature = 1 the sampled half should look like "
                            f"N(0, I); its standard deviation is {spread:.3g}")
    layer.temperature = 1.0
    return problems


def check_split(split_cls: type) -> bool:
    """Print what is right or wrong with ``Split``; True when all is well."""
    return _report("Split", _independence(split_cls, "nfcourse.flows.Split")
                   + split_problems(split_cls))


# ---------------------------------------------------------------------------------- the flow
def _kinds(layers: list[nn.Module], squeeze_cls: type, split_cls: type) -> list[str]:
    from nfcourse.flows import AffineCoupling, Dequantization

    kinds = []
    for layer in layers:
        if isinstance(layer, Dequantization):
            kinds.append("dequantization")
        elif isinstance(layer, squeeze_cls):
            kinds.append("squeeze")
        elif isinstance(layer, split_cls):
            kinds.append("split")
        elif isinstance(layer, AffineCoupling) or (
                hasattr(layer, "mask") and hasattr(layer, "net")):
            kinds.append("coupling")
        else:
            kinds.append(type(layer).__name__)
    return kinds


def _mask_kind(layer: nn.Module, c: int, h: int, w: int) -> str:
    get = getattr(layer, "get_mask", None)
    x = torch.zeros(1, c, h, w)
    m = get(x) if callable(get) else getattr(layer, "mask", None)
    if not isinstance(m, Tensor):
        return "unknown"
    m = m.detach().cpu().float()
    full = torch.broadcast_to(m, (1, c, h, w))
    if m.shape[1] == 1 and m.shape[2:] == (h, w):
        return "checkerboard" if bool(full[0, 0, 0, 0] == 1) else "checkerboard_inv"
    if m.shape[2:] == (1, 1) and m.shape[1] == c:
        return "channel" if bool(m[0, 0, 0, 0] == 1) else "channel_inv"
    return "unknown"


def multiscale_problems(build: Callable[..., Any], squeeze_cls: type,
                        split_cls: type) -> list[str]:
    """What is wrong with ``build_multiscale_flow`` (run on small 1x8x8 images)."""
    from nfcourse.flows import Dequantization, FlowModel, VariationalDequantization

    problems: list[str] = []
    shape = (1, 8, 8)
    what = ("build_multiscale_flow(shape=(1, 8, 8), c_hidden=(8, 8, 8), num_couplings=(2, 2, 2),"
            " num_layers=1)")
    model = _try(what, lambda: build(shape=shape, c_hidden=(8, 8, 8), num_couplings=(2, 2, 2),
                                     num_layers=1), problems)
    if model is None:
        return problems
    if not isinstance(model, FlowModel):
        return [f"{what} returned {type(model).__name__}; return a nfcourse.flows.FlowModel"]
    layers = _flow_layers(model)
    kinds = _kinds(layers, squeeze_cls, split_cls)
    expected = (["dequantization"] + ["coupling"] * 2 + ["squeeze"] + ["coupling"] * 2
                + ["split", "squeeze"] + ["coupling"] * 2)
    if kinds != expected:
        return [f"with num_couplings=(2, 2, 2) the flow's layers should be {expected}; got "
                f"{kinds}"]
    masks = [_mask_kind(layers[i], c, hw, hw) for i, c, hw in
             [(1, 1, 8), (2, 1, 8), (4, 4, 4), (5, 4, 4), (8, 8, 2), (9, 8, 2)]]
    wanted = ["checkerboard", "checkerboard_inv", "channel", "channel_inv", "channel",
              "channel_inv"]
    if masks != wanted:
        problems.append(f"the couplings' masks should be {wanted} (checkerboards at full "
                        f"resolution, channel masks after squeezing, alternating); got {masks}")
    prior_shape = tuple(getattr(model.prior, "shape", ()))
    if prior_shape != (8, 2, 2):
        problems.append(f"the prior must be over the final latent (8, 2, 2) for (1, 8, 8) "
                        f"images, got shape {prior_shape}")
    if tuple(model.data_shape) != shape:
        problems.append(f"model.data_shape must be {shape} (pass data_shape=shape to FlowModel)"
                        f", got {model.data_shape}")
    # several input channels, odd and even: a builder sized for MNIST's one channel fails
    for multi in MULTI_CHANNEL_SHAPES:
        problems += _multi_channel_problems(build, multi)
    if problems:
        return problems

    x = torch.randint(0, 256, (5, *shape), generator=torch.Generator().manual_seed(2))

    def seeded(fn: Callable[[], Any]) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            return fn()

    with torch.no_grad():
        lp = _try("model.log_prob(x)", lambda: seeded(lambda: model.log_prob(x)), problems)
        if lp is None:
            return problems
        if not isinstance(lp, Tensor) or tuple(lp.shape) != (5,):
            return problems + [f"model.log_prob(x) for 5 images must have shape (5,), got "
                               f"{tuple(getattr(lp, 'shape', ()))}"]
        deq = layers[0]
        if not isinstance(deq, VariationalDequantization):
            def deq_only() -> Tensor:
                v, ld = deq(x.float())
                return _log_normal(v) + ld

            base = seeded(deq_only)
            if not torch.allclose(lp, base, rtol=1e-5, atol=1e-2):
                problems.append(
                    "a fresh multi-scale flow only rearranges the dequantized pixels, so its "
                    "log p(x) must equal log N(all dequantized values) + the dequantization's "
                    f"log-det; it differs by up to {(lp - base).abs().max().item():.3g} nats "
                    "(does every factored-out half reach the prior?)")
        # nudge the couplings, then invert with the factored-out halves put back
        gen = torch.Generator().manual_seed(4)
        for layer in layers[1:]:
            for p in layer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        captured: dict[int, Tensor] = {}
        splits = [m for m in layers if isinstance(m, split_cls)]
        hooks = [s.register_forward_hook(
            lambda mod, inp, out: captured.__setitem__(id(mod), inp[0][:, inp[0].shape[1] // 2:]))
            for s in splits]
        try:
            out = _try("model.flow(x)", lambda: seeded(lambda: model.flow(x.float())), problems)
        finally:
            for hk in hooks:
                hk.remove()
        if out is None:
            return problems
        z, ld = out
        for s in splits:
            s.z2 = captured.get(id(s))
        try:
            back = _try("model.flow.inverse(z)", lambda: model.flow.inverse(z), problems)
        finally:
            for s in splits:
                s.z2 = None
        if back is None:
            return problems
        if tuple(back[0].shape) != tuple(x.shape) or not torch.equal(back[0].round(), x.float()):
            problems.append("model.flow.inverse(model.flow(x)), with every Split given back the "
                            "half it factored out, does not return the pixels")
        lp2 = seeded(lambda: model.log_prob(x))
        if not torch.allclose(lp2, model.prior.log_prob(z) + ld, rtol=1e-5, atol=1e-3):
            problems.append("model.log_prob(x) is not prior.log_prob(z) + log_det of the flow")
        samples = _try("model.sample(3)", lambda: model.sample(3), problems)
        if samples is not None and (
            tuple(samples.shape) != (3, *shape) or bool((samples != samples.round()).any())
            or bool((samples < 0).any()) or bool((samples > 255).any())
        ):
            problems.append("model.sample(3) must give 3 images of integers in [0, 255]")
    vd = _try("build_multiscale_flow(..., vardeq=True)",
              lambda: build(shape=shape, c_hidden=(8, 8, 8), num_couplings=(2, 2, 2),
                            num_layers=1, vardeq=True), problems)
    if vd is not None:
        first = _flow_layers(vd)[:1]
        if not first or not isinstance(first[0], VariationalDequantization):
            problems.append("with vardeq=True the flow must start with a "
                            "VariationalDequantization layer")
    if problems:
        return problems
    if not any(isinstance(m, Dequantization) for m in layers[:1]):
        problems.append("the flow must start with a dequantization layer")
    return problems


#: image shapes with several channels every builder check builds
MULTI_CHANNEL_SHAPES = ((3, 4, 4), (2, 4, 8))


def _multi_channel_problems(build: Callable[..., Any], shape: tuple[int, int, int]) -> list[str]:
    """The builder on ``shape``: the prior over ``(8C, H/4, W/4)``, a finite log_prob."""
    problems: list[str] = []
    c, h, w = shape
    what = (f"build_multiscale_flow(shape={shape}, c_hidden=(8, 8, 8), num_couplings=(1, 1, 1),"
            " num_layers=1)")
    model = _try(what, lambda: build(shape=shape, c_hidden=(8, 8, 8), num_couplings=(1, 1, 1),
                                     num_layers=1), problems)
    if model is None:
        return problems
    prior_shape = tuple(getattr(getattr(model, "prior", None), "shape", ()))
    if prior_shape != (8 * c, h // 4, w // 4):
        return [f"{what}: the prior must be over the final latent {(8 * c, h // 4, w // 4)}, "
                f"got shape {prior_shape}"]
    x = torch.randint(0, 256, (2, *shape), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        lp = _try(f"{what}.log_prob(x)", lambda: model.log_prob(x), problems)
    if lp is not None and (not isinstance(lp, Tensor) or tuple(lp.shape) != (2,)
                           or not bool(torch.isfinite(lp).all())):
        problems.append(f"{what}: log_prob of 2 images must be 2 finite numbers")
    return problems


def check_multiscale(build: Callable[..., Any], squeeze_cls: type, split_cls: type) -> bool:
    """Print what is right or wrong with ``build_multiscale_flow``; True when all is well."""
    return _report("build_multiscale_flow",
                   _independence(build, "nfcourse.flows.multiscale_flow")
                   + multiscale_problems(build, squeeze_cls, split_cls))


# ---------------------------------------------------------------------------------- training
def training_problems(model: Any, split_cls: type, test_images: Tensor,
                      threshold: float | None = None) -> list[str]:
    """The trained model must hold the student's Split and beat ``threshold`` test bpd."""
    from nfcourse.flows import FlowModel
    from nfcourse.train import evaluate

    threshold = bpd_bar() if threshold is None else threshold
    if not isinstance(model, FlowModel):
        return [f"the trained model is {type(model).__name__}; train the FlowModel of "
                "build_multiscale_flow"]
    if not any(isinstance(m, split_cls) for m in model.modules()):
        return ["the trained model holds no Split of yours: train build_multiscale_flow's model"]
    bpd = _try("evaluating the model on the test images",
               lambda: evaluate(model, test_images, batch_size=256, seed=0), [])
    if bpd is None or not math.isfinite(bpd):
        return ["the trained model's test bits/dim is not finite"]
    if bpd >= threshold:
        return [f"test bits/dim {bpd:.3f} does not beat {threshold}: train longer or check the "
                "learning rate"]
    return []


def check_training(model: Any, split_cls: type, test_images: Tensor,
                   threshold: float | None = None) -> bool:
    """Print whether the trained multi-scale flow beats the bar; True when it does."""
    return _report("trained multi-scale flow",
                   training_problems(model, split_cls, test_images, threshold))
