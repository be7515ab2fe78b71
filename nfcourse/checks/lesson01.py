"""Lesson 01 (change of variables, RealNVP on two moons): self-checks and grading helpers.

Students call ``check_<exercise>(...)`` before the test cell of each exercise: it prints a
plain-words report and never raises. The hidden tests call the ``assert_<exercise>(...)``
functions, which check the same properties and raise ``AssertionError`` with a message that
says what is wrong. Every check is about a property (the change-of-variables formula, an
exact inverse, the log-det against the autograd Jacobian in float64, masked dimensions left
alone, a trained model's held-out NLL), never about one way of writing the code.

The exercises and what they are checked with:

==============  ============================================  ==============================
exercise        answer                                        checked with
==============  ============================================  ==============================
``warmup``      ``jacobian_det``, ``p_z(z1, z2)``             :func:`assert_warmup`
``coupling``    ``MaskedAffineCoupling(mask, hidden)``        :func:`assert_coupling_forward`,
                                                              :func:`assert_coupling_inverse`
``realnvp``     ``RealNVP(n_layers, hidden, coupling)``       :func:`assert_realnvp` (with a test
                                                              coupling, :class:`SinhCoupling`)
``density``     ``FlowDensity(flow)``: log_prob, sample       :func:`assert_density` (with known
                                                              flows)
``train``       a trained ``model``                           :func:`assert_trained`
==============  ============================================  ==============================
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nfcourse.checks.core import check_flow, reference_advice
from nfcourse.removed import ExerciseRemoved

__all__ = [
    "NLL_THRESHOLD",
    "GAUSSIAN_NLL",
    "SinhCoupling",
    "AffineTestFlow",
    "references",
    "perturbed",
    "held_out_moons",
    "true_nll",
    "assert_warmup",
    "assert_coupling_forward",
    "assert_coupling_inverse",
    "assert_realnvp",
    "assert_density",
    "assert_trained",
    "check_warmup",
    "check_coupling",
    "check_coupling_inverse",
    "check_realnvp",
    "check_density",
    "check_training",
]

#: NLL (nats per point) of N(0, I) on standardised data: where an untrained flow starts.
GAUSSIAN_NLL = 1.0 + math.log(2 * math.pi)
#: Held-out NLL a trained model must beat (fast mode reaches about 1.4-2.0 with any correct
#: implementation; the untrained flow sits at 2.84, broken ones far above).
NLL_THRESHOLD = 2.3

_TOL64 = 1e-6


# ------------------------------------------------------------------------------ helpers
def references(exercise: str) -> tuple[str, ...]:
    """The package's reference implementations of ``exercise`` (dotted names): while this
    lesson is graded they are not in the package, so an answer built on one fails."""
    refs = {
        "coupling": ("nfcourse.flows.MaskedAffineCoupling", "nfcourse.flows.AffineCoupling"),
        "realnvp": ("nfcourse.flows.realnvp_2d",),
        "density": ("nfcourse.flows.FlowModel",),
    }
    return refs[exercise]


@torch.no_grad()
def perturbed(module: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """A float64 copy of ``module`` with Gaussian noise added to every trainable parameter,
    so that a layer whose last layer starts at zero (the identity) shows its log-det and
    inverse. Frozen parameters (``requires_grad=False``, e.g. a mask kept as a parameter)
    are constants of the layer and stay as they are."""
    module = copy.deepcopy(module).double()
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return module


def _batch(n: int = 64, seed: int = 0, scale: float = 1.5) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def _jacobians(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Per-sample Jacobians ``(B, D, D)`` of a map applied row by row to ``x`` ``(B, D)``."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    rows = [
        torch.autograd.grad(y[:, i].sum(), x, retain_graph=True, allow_unused=True)[0]
        for i in range(y.shape[1])
    ]
    rows = [torch.zeros_like(x) if r is None else r for r in rows]
    return torch.stack(rows, dim=1)


def _autograd_logdet(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return torch.linalg.slogdet(_jacobians(fn, x))[1]


def _two_tensors(out: Any, what: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(o, Tensor) for o in out)):
        raise AssertionError(f"{what} must return a tuple of two tensors (output, log_det), "
                             f"got {type(out).__name__}")
    return out[0], out[1]


def _build_coupling(cls: Callable, mask: Tensor, hidden: int = 16) -> nn.Module:
    try:
        return cls(mask, hidden=hidden)
    except TypeError:
        return cls(mask)


def _advice(answer: Any, exercise: str) -> bool:
    """Print the advice of :func:`reference_advice` when there is some; True when none."""
    advice = reference_advice(answer, *references(exercise))
    if advice is not None:
        print(f"✗ {advice}")
    return advice is None


def _max(t: Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


# --------------------------------------------------------------------------- test flows
class SinhCoupling(nn.Module):
    """A coupling layer that is *not* affine, used to test ``RealNVP`` on its own: on the
    transformed part ``b`` (where ``mask == 0``) ``z_b = 2 asinh(x_b / 2) exp(s) + t`` with
    ``s = a tanh(x_a)``, ``t = c x_a``; ``z_a = x_a``. It keeps the mask it was built with
    in ``.mask``."""

    def __init__(self, mask: Tensor, hidden: int = 0):
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.get_default_dtype()))
        d = self.mask.numel()
        gen = torch.Generator().manual_seed(int(self.mask.argmax()) * 7 + d)
        self.a = nn.Parameter(0.5 * torch.randn(d, generator=gen))
        self.c = nn.Parameter(0.5 * torch.randn(d, generator=gen))

    def _st(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m = self.mask.to(x)
        xa = (x * m).sum(1, keepdim=True)
        return (self.a.to(x) * torch.tanh(xa)) * (1 - m), (self.c.to(x) * xa) * (1 - m)

    def forward(self, x: Tensor, context: Any = None) -> tuple[Tensor, Tensor]:
        m = self.mask.to(x)
        s, t = self._st(x)
        z = x * m + (1 - m) * (2 * torch.asinh(x / 2) * torch.exp(s) + t)
        log_det = ((s - 0.5 * torch.log1p(x**2 / 4)) * (1 - m)).sum(1)
        return z, log_det

    def inverse(self, z: Tensor, context: Any = None) -> tuple[Tensor, Tensor]:
        m = self.mask.to(z)
        s, t = self._st(z)
        x_b = 2 * torch.sinh((z - t) * torch.exp(-s) / 2)
        x = z * m + (1 - m) * x_b
        log_det = -((s - 0.5 * torch.log1p(x_b**2 / 4)) * (1 - m)).sum(1)
        return x, log_det


class AffineTestFlow(nn.Module):
    """``z = (x - shift) / scale`` per dimension: the data density is N(shift, diag(scale^2)).
    Used to test ``FlowDensity`` against a density known in closed form."""

    def __init__(self, shift=(1.0, -0.5), scale=(2.0, 0.5)):
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(shift))
        self.log_scale = nn.Parameter(torch.tensor(scale).log())

    def forward(self, x: Tensor, context: Any = None) -> tuple[Tensor, Tensor]:
        z = (x - self.shift) * torch.exp(-self.log_scale)
        return z, (-self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Any = None) -> tuple[Tensor, Tensor]:
        x = z * torch.exp(self.log_scale) + self.shift
        return x, self.log_scale.sum().expand(z.shape[0])


# ------------------------------------------------------------------------------ data
def held_out_moons(n: int = 2000, seed: int = 12345) -> Tensor:
    """Fresh two-moons points (noise 0.05), standardised with the population mean and std."""
    from nfcourse.data.toy import two_moons, two_moons_population_standardization

    raw, _ = two_moons(n, seed=seed, standardize=False)
    return two_moons_population_standardization().apply(raw.double()).float()


@torch.enable_grad()
def true_nll(flow: nn.Module, x: Tensor) -> float:
    """Mean NLL (nats) of ``x`` under N(0, I) pushed through ``flow``, with the log-det from
    the autograd Jacobian (float64) rather than the flow's own: a wrong log-det cannot hide."""
    flow = copy.deepcopy(flow).double().eval()
    x = x.detach().double()
    z = _two_tensors(flow(x), "the flow's forward")[0]
    ld = _autograd_logdet(lambda v: flow(v)[0], x)
    log_p = -0.5 * (z.detach() ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + ld
    return float(-log_p.mean())


# ----------------------------------------------------------------------------- asserts
def assert_warmup(jacobian_det: Any, p_z: Callable) -> None:
    """The warm-up: ``jacobian_det`` is ``|det dz/dx| = 1/6`` and ``p_z`` is a density on the
    unit square that equals ``p_x(x(z)) |det dx/dz|`` and integrates to 1."""
    det = float(jacobian_det)
    assert abs(det - 1 / 6) < 1e-9, (
        f"jacobian_det = {det:.6g}; z1 = (x1 - 1)/3 and z2 = x2/2 give |det dz/dx| = 1/6")
    n = 400
    g = (np.arange(n) + 0.5) / n
    z1, z2 = np.meshgrid(g, g, indexing="ij")
    values = np.asarray(p_z(z1, z2), dtype=float)
    assert values.shape == z1.shape, (
        f"p_z(z1, z2) on arrays of shape {z1.shape} returned shape {values.shape}")
    assert np.all(np.isfinite(values)) and np.all(values >= 0), "p_z must be finite and >= 0"
    total = values.mean()  # midpoint rule on the unit square (area 1)
    assert abs(total - 1) < 1e-3, f"p_z integrates to {total:.4f} over the unit square, not 1"
    x1, x2 = 1 + 3 * z1, 2 * z2
    expected = (x1 - 1) * x2 / 9 * 6
    err = np.abs(values - expected).max()
    assert err < 1e-6, (
        f"p_z differs from p_x(x(z)) * |det dx/dz| by up to {err:.3g}")


def assert_coupling_forward(cls: Callable) -> None:
    """``forward``: shapes, masked dimensions untouched, log-det equal to the autograd
    Jacobian's (float64, both masks, parameters nudged away from any zero init)."""
    for mask in ([1.0, 0.0], [0.0, 1.0]):
        mask_t = torch.tensor(mask)
        layer = perturbed(_build_coupling(cls, mask_t))
        x = _batch()
        z, ld = _two_tensors(layer(x), "forward")
        assert z.shape == x.shape, f"forward changed the shape {tuple(x.shape)} -> {tuple(z.shape)}"
        assert ld.shape == (x.shape[0],), f"log_det must have shape (batch,), got {tuple(ld.shape)}"
        keep = mask_t.bool()
        moved = _max(z[:, keep] - x[:, keep])
        assert moved == 0, (
            f"mask {mask}: the dimensions where mask == 1 must pass through unchanged, "
            f"they moved by up to {moved:.3g}")
        changed = _max(z[:, ~keep] - x[:, ~keep])
        assert changed > 1e-6, f"mask {mask}: the dimensions where mask == 0 were not transformed"
        ref = _autograd_logdet(lambda v, layer=layer: layer(v)[0], x)
        err = _max(ld - ref)
        assert err < _TOL64 * (1 + _max(ref)), (
            f"mask {mask}: log_det differs from log|det J| of the autograd Jacobian by up to "
            f"{err:.3g} (is it the sum of the scales of the transformed dimensions, with the "
            "right sign?)")


def assert_coupling_inverse(cls: Callable) -> None:
    """``inverse``: undoes ``forward`` exactly, and its log-det is that of the inverse map."""
    for mask in ([1.0, 0.0], [0.0, 1.0]):
        layer = perturbed(_build_coupling(cls, torch.tensor(mask)))
        x = _batch(seed=1)
        z, _ = _two_tensors(layer(x), "forward")
        x_back, ld_inv = _two_tensors(layer.inverse(z.detach()), "inverse")
        assert x_back.shape == x.shape, f"inverse returned shape {tuple(x_back.shape)}"
        err = _max(x_back - x)
        assert err < 1e-8, f"mask {mask}: inverse(forward(x)) differs from x by up to {err:.3g}"
        assert ld_inv.shape == (x.shape[0],), "the inverse's log_det must have shape (batch,)"
        ref = _autograd_logdet(lambda v, layer=layer: layer.inverse(v)[0], z.detach())
        err = _max(ld_inv - ref)
        assert err < _TOL64 * (1 + _max(ref)), (
            f"mask {mask}: the inverse's log_det differs from the autograd Jacobian's by up to "
            f"{err:.3g} (it should be minus the forward one)")


def _layers_of(flow: nn.Module) -> list[nn.Module]:
    layers = getattr(flow, "layers", None)
    if layers is None:
        raise AssertionError("RealNVP must keep its coupling layers in `self.layers` "
                             "(an nn.ModuleList), in forward order")
    return list(layers)


def assert_realnvp(cls: Callable, n_layers: int = 4) -> None:
    """``RealNVP(n_layers, hidden, coupling)``: builds ``n_layers`` layers with ``coupling``,
    masks alternate, forward runs them in order and adds the log-dets, inverse undoes it."""
    built: list[SinhCoupling] = []

    def make(mask, hidden=0):
        layer = SinhCoupling(mask, hidden)
        built.append(layer)
        return layer

    flow = cls(n_layers=n_layers, hidden=8, coupling=make)
    layers = _layers_of(flow)
    assert len(built) == n_layers and len(layers) == n_layers, (
        f"RealNVP(n_layers={n_layers}, coupling=...) built {len(built)} layers with `coupling` "
        f"and holds {len(layers)}; it must build every layer with coupling(mask, hidden)")
    masks = [layer.mask.flatten() for layer in layers]
    for k, m in enumerate(masks):
        assert m.numel() == 2 and 0 < float(m.sum()) < 2, (
            f"layer {k}'s mask {m.tolist()} is not a 2-D mask with one 1")
    for k in range(n_layers - 1):
        assert torch.equal(masks[k] + masks[k + 1], torch.ones(2)), (
            f"masks must alternate: layer {k} has {masks[k].tolist()}, layer {k + 1} "
            f"{masks[k + 1].tolist()}")
    flow = copy.deepcopy(flow).double()
    x = _batch(seed=2)
    z, ld = _two_tensors(flow(x), "RealNVP.forward")
    h, total = x, torch.zeros(x.shape[0], dtype=x.dtype)
    for layer in _layers_of(flow):
        h, d = layer(h)
        total = total + d
    assert _max(z - h) < 1e-10, "forward must apply the layers in order, first layer first"
    assert _max(ld - total) < 1e-8, "forward's log_det must be the sum of the layers' log-dets"
    ref = _autograd_logdet(lambda v: flow(v)[0], x)
    assert _max(ld - ref) < _TOL64 * (1 + _max(ref)), "log_det differs from the autograd Jacobian's"
    x_back, ld_inv = _two_tensors(flow.inverse(z.detach()), "RealNVP.inverse")
    err = _max(x_back - x)
    assert err < 1e-8, f"inverse(forward(x)) differs from x by up to {err:.3g} (last layer first?)"
    err = _max(ld_inv + ld)
    assert err < 1e-8, f"the inverse's log_det must be minus the forward one (off by {err:.3g})"


def assert_density(cls: Callable) -> None:
    """``FlowDensity(flow)``: ``log_prob`` is the change-of-variables formula with a standard
    normal base; ``sample(n)`` runs the flow backwards on N(0, I) noise."""
    flow = AffineTestFlow()
    model = cls(flow)
    x = _batch(n=200, seed=3)
    with torch.no_grad():
        lp = model.log_prob(x.float())
    assert isinstance(lp, Tensor) and lp.shape == (200,), (
        f"log_prob must return one number per point, shape (200,), got "
        f"{tuple(lp.shape) if isinstance(lp, Tensor) else type(lp).__name__}")
    normal = torch.distributions.Normal(flow.shift.detach(), flow.log_scale.detach().exp())
    expected = normal.log_prob(x.float()).sum(1)
    err = _max(lp - expected)
    assert err < 1e-4, (
        f"log_prob differs from the exact log-density of a known flow by up to {err:.3g} "
        "(log N(z; 0, I) + log_det, with log N(z) = -|z|^2/2 - (D/2) log 2 pi)")
    # a nonlinear flow: against the change of variables with an autograd Jacobian
    nonlinear = nn.ModuleList([SinhCoupling(torch.tensor([1.0, 0.0])),
                               SinhCoupling(torch.tensor([0.0, 1.0]))])

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nonlinear

        def forward(self, v, context=None):
            total = v.new_zeros(v.shape[0])
            for layer in self.layers:
                v, d = layer(v)
                total = total + d
            return v, total

        def inverse(self, v, context=None):
            total = v.new_zeros(v.shape[0])
            for layer in reversed(self.layers):
                v, d = layer.inverse(v)
                total = total + d
            return v, total

    two = Two().double()
    model2 = cls(two)
    x2 = _batch(n=50, seed=4, scale=1.0)
    with torch.no_grad():
        lp2 = model2.log_prob(x2)
    z2 = two(x2)[0].detach()
    ref = (-0.5 * (z2**2).sum(1) - math.log(2 * math.pi)
           + _autograd_logdet(lambda v: two(v)[0], x2))
    err = _max(lp2 - ref)
    assert err < 1e-6, f"log_prob is off the change-of-variables formula by {err:.3g}"
    torch.manual_seed(0)
    with torch.no_grad():
        s = model.sample(20000)
    assert isinstance(s, Tensor) and s.shape == (20000, 2), (
        f"sample(20000) must return a (20000, 2) tensor of points, got "
        f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}")
    mean, std = s.float().mean(0), s.float().std(0)
    true_std = flow.log_scale.exp().detach()
    assert _max(mean - flow.shift.detach()) < 0.05 and _max(std - true_std) < 0.05, (
        f"samples of a known flow have mean {mean.tolist()} and std {std.tolist()}; expected "
        f"{flow.shift.tolist()} and {flow.log_scale.exp().tolist()} (z ~ N(0, I), then the "
        "flow's inverse)")


def assert_trained(model: nn.Module, threshold: float = NLL_THRESHOLD,
                   x_test: Tensor | None = None) -> None:
    """The trained ``model`` (a FlowDensity with ``.flow``) reaches a held-out NLL below
    ``threshold``, measured with the autograd Jacobian (its own log-det is not trusted).

    Returns None on purpose: nbgrader reads a number left as a test cell's value as a
    partial score."""
    flow = getattr(model, "flow", None)
    assert isinstance(flow, nn.Module), "model must be a FlowDensity with the flow in `.flow`"
    x_test = held_out_moons() if x_test is None else x_test
    nll = true_nll(flow, x_test)
    assert math.isfinite(nll), "the held-out NLL is not finite"
    assert nll < threshold, (
        f"held-out NLL {nll:.3f} nats is not below {threshold} (N(0, I) alone gives "
        f"{GAUSSIAN_NLL:.2f}); train longer, or check the log-det's sign and log_prob")


# ---------------------------------------------------------------------- student checks
def _report(title: str, fn: Callable[[], Any]) -> bool:
    """Run one assert_* and print a plain-words line; never raises."""
    try:
        fn()
    except ExerciseRemoved as error:  # only while graded: the answer reached the reference
        print(f"✗ {title}: {error}")
        return False
    except AssertionError as error:
        print(f"✗ {title}: {error}")
        return False
    except NotImplementedError:
        print(f"– {title}: not written yet (NotImplementedError)")
        return False
    except Exception as error:  # the student's code may raise anything
        from nfcourse.checks.core import _describe_exception

        print(f"✗ {title}: {_describe_exception('your code', error)}")
        return False
    print(f"✓ {title}")
    return True


def _build_failure(what: str, error: Exception) -> str:
    """One line for a constructor that raised: the stub's NotImplementedError in plain words,
    anything else with its type, message and the student's line."""
    if isinstance(error, NotImplementedError):
        return f"– {what}: not written yet (the answer cell still raises NotImplementedError)"
    from nfcourse.checks.core import _describe_exception

    return f"✗ building {_describe_exception(what, error)}"


def _verdict(ok: bool) -> bool:
    print("All checks passed." if ok else "Some checks failed: fix them before grading.")
    return ok


def check_warmup(jacobian_det: Any, p_z: Callable) -> bool:
    """Self-check of the warm-up (prints a report; returns True when everything passes)."""
    return _verdict(_report("Jacobian determinant and transformed density",
                            lambda: assert_warmup(jacobian_det, p_z)))


def check_coupling(cls: Callable) -> bool:
    """Self-check of ``MaskedAffineCoupling``: a full :func:`check_flow` report for each mask
    (parameters nudged away from zero, float64), then the graded properties."""
    ok = _advice(cls, "coupling")
    for mask in ([1.0, 0.0], [0.0, 1.0]):
        try:
            layer = perturbed(_build_coupling(cls, torch.tensor(mask)))
        except Exception as error:  # noqa: BLE001
            print(_build_failure(f"MaskedAffineCoupling({mask}, hidden=16)", error))
            return _verdict(False)
        report = check_flow(layer, _batch(16), name=f"MaskedAffineCoupling(mask={mask})")
        print(report)
        ok &= report.ok
    ok &= _report("forward: masked dims untouched, log-det = autograd's",
                  lambda: assert_coupling_forward(cls))
    ok &= _report("inverse: exact, log-det = autograd's", lambda: assert_coupling_inverse(cls))
    return _verdict(ok)


def check_coupling_inverse(cls: Callable) -> bool:
    """Self-check of ``MaskedAffineCoupling.inverse`` alone (what its second test grades)."""
    return _verdict(_report("inverse: undoes forward exactly, log-det = autograd's",
                            lambda: assert_coupling_inverse(cls)))


def check_realnvp(cls: Callable) -> bool:
    """Self-check of ``RealNVP``: a :func:`check_flow` report of a small stack built with your
    coupling, then the graded properties (tested with a different coupling layer)."""
    ok = _advice(cls, "realnvp")
    try:
        flow = perturbed(cls(n_layers=4, hidden=16))
    except Exception as error:  # noqa: BLE001
        print(_build_failure("RealNVP(n_layers=4, hidden=16)", error))
        flow = None
        ok = False
    if flow is not None:
        report = check_flow(flow, _batch(16), name="RealNVP(n_layers=4) with your coupling")
        print(report)
        ok &= report.ok
    ok &= _report("layers built with `coupling`, masks alternate, log-dets add, exact inverse",
                  lambda: assert_realnvp(cls))
    return _verdict(ok)


def check_density(cls: Callable) -> bool:
    """Self-check of ``FlowDensity`` against flows whose density is known."""
    return _verdict(_advice(cls, "density") & _report(
        "log_prob = change of variables, sample = inverse of noise", lambda: assert_density(cls)))


def check_training(model: nn.Module, entropy: float | None = None) -> bool:
    """Self-check of the trained model: held-out NLL (autograd log-det) against the bar."""
    ok = True
    try:
        nll = true_nll(model.flow, held_out_moons())
        gap = f", KL gap to the entropy floor {nll - entropy:.3f}" if entropy is not None else ""
        print(f"held-out NLL {nll:.3f} nats per point (bar: {NLL_THRESHOLD}{gap})")
    except Exception as error:  # noqa: BLE001
        print(f"✗ could not evaluate the model: {type(error).__name__}: {error}")
        return _verdict(False)
    ok &= _report("trained model beats the bar", lambda: assert_trained(model))
    return _verdict(ok)
