"""nfcourse.checks: check_flow passes correct layers and names the property each planted bug
breaks; reference_advice tells a student whose answer is the package's reference (which the
grading edition does not have: tests/grading/test_edition.py)."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
from torch import nn

import nfcourse.checks as checks
from nfcourse.checks import FlowReport, assert_flow, check_flow, reference_advice
from nfcourse.flows.base import Compose, Flow, Inverse

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Correct layers
# --------------------------------------------------------------------------------------------
class ElementwiseAffine(Flow):
    """z = x * exp(s) + t with learned s, t."""

    def __init__(self, dim: int):
        super().__init__()
        self.s = nn.Parameter(0.3 * torch.randn(dim))
        self.t = nn.Parameter(torch.randn(dim))

    def forward(self, x, context=None):
        return x * self.s.exp() + self.t, self.s.sum().expand(x.shape[0])

    def inverse(self, z, context=None):
        return (z - self.t) * (-self.s).exp(), (-self.s.sum()).expand(z.shape[0])


class Coupling(Flow):
    """A masked affine coupling: mask == 1 passes through, the rest is scaled and shifted."""

    def __init__(self, mask: torch.Tensor, hidden: int = 16, context_dim: int = 0):
        super().__init__()
        self.register_buffer("mask", mask.float())
        d = mask.numel()
        self.net = nn.Sequential(nn.Linear(d + context_dim, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2 * d))

    def _st(self, xm, context):
        h = xm if context is None else torch.cat([xm, context], dim=1)
        s, t = self.net(h).chunk(2, dim=1)
        return torch.tanh(s) * (1 - self.mask), t * (1 - self.mask)

    def forward(self, x, context=None):
        s, t = self._st(x * self.mask, context)
        return x * self.mask + (1 - self.mask) * (x * s.exp() + t), s.sum(dim=1)

    def inverse(self, z, context=None):
        s, t = self._st(z * self.mask, context)
        return z * self.mask + (1 - self.mask) * ((z - t) * (-s).exp()), -s.sum(dim=1)


class Squeeze(Flow):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): shape changes, numel kept, volume kept."""

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, z, context=None):
        b, c, h, w = z.shape
        z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c // 4, 2 * h, 2 * w), z.new_zeros(b)


class DropHalf(Flow):
    """Changes the number of values (not a bijection): the Jacobian check must be skipped."""

    def forward(self, x, context=None):
        return x[:, : x.shape[1] // 2] * 2, x.new_full((x.shape[0],), (x.shape[1] // 2) * 0.6931)

    def inverse(self, z, context=None):
        return torch.cat([z / 2, torch.zeros_like(z)], dim=1), z.new_zeros(z.shape[0])


def alternating_mask(d: int = 4, parity: int = 0) -> torch.Tensor:
    return (torch.arange(d) % 2 == parity).float()


def nudged(layer: nn.Module) -> nn.Module:
    """Random weights everywhere (so a zero-initialised layer is not the identity)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def x2d(batch: int = 8, d: int = 4) -> torch.Tensor:
    return torch.randn(batch, d)


def names_failed(report: FlowReport) -> set[str]:
    return {r.name for r in report.failed}


# --------------------------------------------------------------------------------------------
# check_flow on correct layers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: ElementwiseAffine(4),
        lambda: Coupling(alternating_mask()),
        lambda: Compose([Coupling(alternating_mask(4, 0)), Coupling(alternating_mask(4, 1))]),
        lambda: Inverse(Coupling(alternating_mask())),
    ],
    ids=["elementwise", "coupling", "compose", "inverse"],
)
def test_correct_layers_pass(make):
    layer = make()
    report = check_flow(layer, x2d())
    assert report.ok, str(report)
    ran = {r.name for r in report.results if r.passed}
    assert {"returns", "log_det_shape", "inverse", "log_det", "inverse_log_det",
            "batch_independent", "finite", "gradients"} <= ran
    assert_flow(layer, x2d())  # does not raise


def test_coupling_reports_its_mask_and_numbers():
    report = check_flow(Coupling(alternating_mask()), x2d(), name="MyCoupling")
    assert report["mask"].passed
    text = str(report)
    assert text.startswith("MyCoupling: all") and "✓" in text and "max abs error" in text
    assert report["log_det"].value is not None and report["log_det"].value < 1e-6
    html = check_flow(nudged(WrongSign(alternating_mask())), x2d())._repr_html_()
    assert "<table>" in html and "✗" in html and "did you return -sum(s) in forward?" in html


def test_context_is_passed_and_sliced():
    layer = Coupling(alternating_mask(), context_dim=3)
    report = check_flow(layer, x2d(), torch.randn(8, 3))
    assert report.ok, str(report)


def test_float64_input():
    report = check_flow(Coupling(alternating_mask()).double(), x2d().double())
    assert report.ok, str(report)


def test_shape_changing_layer_runs():
    report = check_flow(Squeeze(), torch.randn(3, 2, 4, 4))
    assert report.ok, str(report)
    assert report["log_det"].passed  # numel kept: square Jacobian (a permutation)


def test_numel_changing_layer_skips_jacobian_with_a_note():
    report = check_flow(DropHalf(), x2d())
    assert report["log_det"].skipped
    assert "4 numbers to 2" in report["log_det"].message
    assert "inverse" in names_failed(report)  # not a bijection, reported with a number


def test_layer_is_not_mutated_and_mode_kept():
    layer = nudged(Coupling(alternating_mask()))
    layer.eval()
    before = copy.deepcopy(layer.state_dict())
    check_flow(layer, x2d())
    assert not layer.training
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert all(p.grad is None for p in layer.parameters())
    assert all(p.dtype == torch.float32 for p in layer.parameters())


def test_global_random_state_is_untouched():
    layer, x = Coupling(alternating_mask()), x2d()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    check_flow(layer, x)
    assert torch.equal(torch.rand(3), expected)


def test_skip_and_atol_are_honoured():
    report = check_flow(ElementwiseAffine(4), x2d(), skip=("log_det", "gradients"), atol=1e-3)
    assert report["log_det"].skipped and report["gradients"].skipped
    assert report["inverse"].tolerance > 1e-3
    with pytest.raises(ValueError, match="unknown checks"):
        check_flow(ElementwiseAffine(4), x2d(), skip=("jacobian",))


# --------------------------------------------------------------------------------------------
# check_flow on planted bugs
# --------------------------------------------------------------------------------------------
class WrongSign(Coupling):
    def forward(self, x, context=None):
        z, ld = super().forward(x, context)
        return z, -ld


class MaskLeak(Coupling):
    """Scales and shifts every dimension, the conditioning half included."""

    def forward(self, x, context=None):
        s, t = self._st(x * self.mask, context)
        return x * s.exp() + t + 0.5 * x * self.mask, s.sum(dim=1)


class NotInverse(Coupling):
    def inverse(self, z, context=None):
        s, t = self._st(z * self.mask, context)
        return z * self.mask + (1 - self.mask) * ((z - t) * s.exp()), -s.sum(dim=1)


class BatchMixing(ElementwiseAffine):
    def forward(self, x, context=None):
        z, ld = super().forward(x, context)
        return z - z.mean(dim=0, keepdim=True), ld

    def inverse(self, z, context=None):
        return super().inverse(z, context)


class LogDetPerDim(ElementwiseAffine):
    def forward(self, x, context=None):
        return x * self.s.exp() + self.t, self.s.expand(x.shape[0], -1)


class ScalarLogDet(ElementwiseAffine):
    def forward(self, x, context=None):
        return x * self.s.exp() + self.t, self.s.sum()


class ReturnsOnlyZ(ElementwiseAffine):
    def forward(self, x, context=None):
        return x * self.s.exp() + self.t


class ReturnsNaN(ElementwiseAffine):
    def forward(self, x, context=None):
        z, ld = super().forward(x, context)
        return z.log(), ld  # negative inputs give NaN


class Unreachable(ElementwiseAffine):
    def __init__(self, dim):
        super().__init__(dim)
        self.unused = nn.Parameter(torch.ones(dim))

    def forward(self, x, context=None):
        return x * self.s.exp() + self.t * self.unused.detach(), self.s.sum().expand(x.shape[0])


class InverseSameSign(ElementwiseAffine):
    def inverse(self, z, context=None):
        x, ld = super().inverse(z, context)
        return x, -ld


class Crashes(ElementwiseAffine):
    def forward(self, x, context=None):
        return self.s @ x.T @ torch.ones(3, 3), None  # shape mismatch


@pytest.mark.parametrize(
    "layer, property_, words",
    [
        (lambda: nudged(WrongSign(alternating_mask())), "log_det", "wrong sign"),
        (lambda: nudged(MaskLeak(alternating_mask())), "mask", "masked dimensions changed"),
        (lambda: nudged(NotInverse(alternating_mask())), "inverse", "max abs error"),
        (lambda: BatchMixing(4), "batch_independent", "changing only sample 7"),
        (lambda: LogDetPerDim(4), "log_det_shape", "(8, 4), expected (8,)"),
        (lambda: ScalarLogDet(4), "log_det_shape", "shape (), expected (8,)"),
        (lambda: ReturnsOnlyZ(4), "returns", "forward returned a tensor of shape (8, 4)"),
        (lambda: ReturnsNaN(4), "finite", "NaN"),
        (lambda: Unreachable(4), "gradients", "no gradient reaches unused"),
        (lambda: InverseSameSign(4), "inverse_log_det", "inverse log_det"),
        (lambda: Crashes(4), "returns", "forward raised RuntimeError"),
    ],
    ids=["wrong-sign", "mask-leak", "not-inverse", "batch-mixing", "log-det-per-dim",
         "scalar-log-det", "return-type", "nan", "unreachable-param", "inverse-same-sign",
         "crash"],
)
def test_planted_bug_is_named(layer, property_, words):
    report = check_flow(layer(), x2d())
    assert not report.ok
    assert property_ in names_failed(report), str(report)
    assert words in report[property_].message + report[property_].hint, str(report)
    assert report[property_].hint
    with pytest.raises(AssertionError) as info:
        assert_flow(layer(), x2d())
    assert f"[{property_}]" in str(info.value) and "hint:" in str(info.value)


def test_wrong_sign_hint_and_numbers():
    report = check_flow(nudged(WrongSign(alternating_mask())), x2d())
    r = report["log_det"]
    assert "did you return -sum(s) in forward?" in r.hint
    assert r.value > r.tolerance and " vs " in r.message
    assert "✗" in str(report) and "hint: log-det has the wrong sign" in str(report)


def test_mask_leak_also_breaks_log_det_with_the_mask_hint():
    report = check_flow(nudged(MaskLeak(alternating_mask())), x2d())
    assert {"mask", "log_det"} <= names_failed(report)
    assert report["log_det"].hint.startswith("masked dimensions changed")


def test_crash_is_reported_with_location_not_raised():
    report = check_flow(Crashes(4), x2d())
    msg = report["returns"].message
    assert "test_checks.py" in msg and "in forward" in msg and "self.s @ x.T" in msg
    assert report["inverse"].skipped


def test_missing_inverse_is_reported():
    class NoInverse(Flow):
        def forward(self, x, context=None):
            return x, x.new_zeros(x.shape[0])

    report = check_flow(NoInverse(), x2d())
    assert "NotImplementedError" in report["returns"].message
    assert report["returns"].hint.startswith("implement inverse")


def test_zero_initialised_layer_is_not_flagged_and_gets_a_note():
    layer = Coupling(alternating_mask())
    nn.init.zeros_(layer.net[-1].weight)
    nn.init.zeros_(layer.net[-1].bias)
    report = check_flow(layer, x2d())
    assert report.ok, str(report)  # earlier layers' gradients are zero only at init
    assert any("identity" in n for n in report.notes)


def test_stochastic_layer_gets_the_same_noise_each_call():
    class Dequant(Flow):
        def forward(self, x, context=None):
            y = (x.float() + torch.rand(x.shape)) / 4
            return y, y.new_full((len(x),), -x[0].numel() * math.log(4))

        def inverse(self, z, context=None):
            return torch.floor(z * 4), z.new_full((len(z),), z[0].numel() * math.log(4))

    x = torch.randint(0, 4, (6, 3), dtype=torch.uint8)
    report = check_flow(Dequant(), x)
    for name in ("inverse", "log_det", "batch_independent", "finite"):
        assert report[name].passed, str(report)


def test_data_dependent_init_is_done_on_the_copy():
    class ActNorm(Flow):
        def __init__(self, d):
            super().__init__()
            self.loc = nn.Parameter(torch.zeros(d))
            self.log_scale = nn.Parameter(torch.zeros(d))
            self.register_buffer("initialised", torch.tensor(False))

        def forward(self, x, context=None):
            if not self.initialised:
                with torch.no_grad():
                    self.loc.copy_(-x.mean(0))
                    self.log_scale.copy_(-x.std(0).log())
                    self.initialised.fill_(True)
            return (x + self.loc) * self.log_scale.exp(), self.log_scale.sum().expand(len(x))

        def inverse(self, z, context=None):
            return z * (-self.log_scale).exp() - self.loc, (-self.log_scale.sum()).expand(len(z))

    layer = ActNorm(4)
    report = check_flow(layer, x2d() * 3 + 1)
    assert report.ok, str(report)
    assert not layer.initialised and not layer.loc.any()


def test_layer_without_forward_is_named():
    report = check_flow(object(), x2d())
    assert not report.ok and "no forward and no inverse" in report["returns"].message


# --------------------------------------------------------------------------------------------
# The reference coupling, once it exists
# --------------------------------------------------------------------------------------------
def _reference_coupling():
    try:
        flows = importlib.import_module("nfcourse.flows")
    except ImportError:
        return None
    return getattr(flows, "MaskedAffineCoupling", None)


def _build(cls, d=4):
    mask = alternating_mask(d)
    for attempt in (lambda: cls(mask), lambda: cls(mask, hidden=16), lambda: cls(d, mask)):
        try:
            return attempt()
        except TypeError:
            continue
    pytest.skip(f"could not guess how to build {cls.__name__}")


def test_reference_coupling_passes():
    ref = _reference_coupling()
    if ref is None:
        pytest.skip("nfcourse.flows.MaskedAffineCoupling does not exist yet")
    layer = nudged(_build(ref))
    report = check_flow(layer, x2d())
    assert report.ok, str(report)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_check_flow_on_gpu():
    layer = nudged(Coupling(alternating_mask())).cuda()
    report = check_flow(layer, x2d().cuda())
    assert report.ok, str(report)
    planted = check_flow(nudged(WrongSign(alternating_mask())).cuda(), x2d().cuda())
    assert "log_det" in names_failed(planted)


# --------------------------------------------------------------------------------------------
# reference_advice
# --------------------------------------------------------------------------------------------
def test_reference_advice_names_the_reference_its_subclasses_and_instances():
    from nfcourse import flows

    class Sub(flows.Squeeze):
        pass

    for answer, how in ((flows.Squeeze, "is"), (Sub, "subclasses"),
                        (flows.Squeeze(), "is an instance of")):
        advice = reference_advice(answer, "nfcourse.flows.Split", "nfcourse.flows.Squeeze")
        assert advice is not None and advice.startswith(f"your answer {how} nfcourse.flows.Squeeze")
        assert "not in the package" in advice


def test_reference_advice_is_silent_for_own_answers_and_missing_references():
    class Own(Flow):
        pass

    assert reference_advice(Own, "nfcourse.flows.Squeeze", "nfcourse.flows.Split") is None
    assert reference_advice(lambda x: x, "nfcourse.flows.checkerboard_mask") is None
    # a name that is not there (as in a grading edition) gives no advice and no error
    assert reference_advice(Own, "nfcourse.flows.NoSuchLayer", "nfcourse.nosuchmodule.X") is None


def test_reexports():
    assert set(checks.__all__) >= {"check_flow", "assert_flow", "reference_advice", "FlowReport"}
    assert not hasattr(checks, "assert_independent") and not hasattr(checks, "forbid_calls")
