"""Lesson 01 graded end to end: full marks, zero for the stubs, planted bugs, tampering.

See harness.py for what each generated test does. Each planted bug is one edit of the
solution's answer (solution markers stripped) and names exactly the test cells that must
then score zero.
"""

from harness import Bug, lesson_grading_tests

LESSON = "01_two_moons_realnvp"

BUGS = [
    # forward's log-det with the wrong sign: the forward test and the training test (the
    # model learns to contract instead of to fit) fail; the inverse is still right.
    Bug("logdet_sign", cell="coupling_answer",
        old="log_det = s.sum(dim=1)", new="log_det = -s.sum(dim=1)",
        loses={"coupling_test_forward", "train_test"}),
    # scale and shift not zeroed on the kept (mask == 1) half: the kept half's scales leak
    # into both log-dets. Training exploits the fake volume (its loss goes far below the
    # entropy), but the map itself stays a valid flow and still beats the bar when its NLL is
    # measured with autograd's log-det, so only the coupling tests fail.
    Bug("scale_on_kept_half", cell="coupling_answer",
        old="return s * free, t * free", new="return s, t",
        loses={"coupling_test_forward", "coupling_test_inverse"}),
    # inverse scales before subtracting the shift: only the inverse is wrong.
    Bug("inverse_shift_then_scale", cell="coupling_answer",
        old="((z - t) * torch.exp(-s))", new="(z * torch.exp(-s) - t)",
        loses={"coupling_test_inverse"}),
    # every layer gets the same mask: the second coordinate is never conditioned on; the
    # stack test fails, training still beats the bar.
    Bug("masks_not_alternating", cell="realnvp_answer",
        old="torch.tensor([1.0, 0.0]) if k % 2 == 0 else torch.tensor([0.0, 1.0])",
        new="torch.tensor([1.0, 0.0])",
        loses={"realnvp_test"}),
    # the stack's inverse runs the layers first to last.
    Bug("stack_inverse_order", cell="realnvp_answer",
        old="for layer in reversed(self.layers):", new="for layer in self.layers:",
        loses={"realnvp_test"}),
    # log_prob subtracts the log-det: the density test fails, and so does training.
    Bug("density_logdet_sign", cell="density_answer",
        old="return log_pz + log_det", new="return log_pz - log_det",
        loses={"density_test", "train_test"}),
]

globals().update(lesson_grading_tests(LESSON, BUGS))


# --------------------------------------------------------------------------------------------
# The checks themselves, without notebooks (fast): the solution passes them, the planted bugs
# and answers built on the reference layers do not, and the self-checks never raise.
# --------------------------------------------------------------------------------------------
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import nbformat  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from harness import REPO, strip_solution_markers  # noqa: E402
from torch import nn  # noqa: E402

from nfcourse.checks import lesson01 as checks  # noqa: E402

ANSWER_CELLS = ("coupling_answer", "realnvp_answer", "density_answer")


def _answers(bug: Bug | None = None) -> dict:
    """The solution's coupling, RealNVP and FlowDensity, defined in a fresh namespace."""
    nb = nbformat.read(REPO / "solutions" / LESSON / f"{LESSON}.ipynb", as_version=4)
    namespace = {"torch": torch, "nn": nn, "math": math}
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in ANSWER_CELLS:
            source = strip_solution_markers(cell.source)
            if bug is not None and bug.cell == grade_id:
                source = source.replace(bug.old, bug.new)
            exec(compile(source, grade_id, "exec"), namespace)  # noqa: S102
    return namespace


ASSERTS = {
    "coupling_test_forward": lambda ns: checks.assert_coupling_forward(ns["MaskedAffineCoupling"]),
    "coupling_test_inverse": lambda ns: checks.assert_coupling_inverse(ns["MaskedAffineCoupling"]),
    "realnvp_test": lambda ns: checks.assert_realnvp(ns["RealNVP"]),
    "density_test": lambda ns: checks.assert_density(ns["FlowDensity"]),
}


def test_checks_accept_the_solution():
    ns = _answers()
    for check in ASSERTS.values():
        check(ns)
    checks.assert_warmup(1 / 6, lambda z1, z2: 4 * z1 * z2)


@pytest.mark.parametrize("bug", [b for b in BUGS if b.cell in ANSWER_CELLS], ids=lambda b: b.name)
def test_checks_catch_each_bug_where_declared(bug):
    ns = _answers(bug)
    for test_id, check in ASSERTS.items():
        if test_id in bug.loses:
            with pytest.raises(AssertionError):
                check(ns)
        else:
            check(ns)


def test_answers_built_on_the_reference_fail_in_the_grading_edition(tmp_path):
    """Absence, not detection: in lesson 01's edition of the package, an answer that wraps,
    subclasses or calls the reference layers fails with ExerciseRemoved naming the exercise,
    and the self-check reports it in words."""
    from nfcourse.grade.edition import build_edition

    root = build_edition(LESSON, tmp_path / "edition")
    script = """
import pytest, torch
from torch import nn
import nfcourse
from nfcourse import flows
from nfcourse.checks import lesson01 as checks

class Wrapped(nn.Module):  # wraps the reference
    def __init__(self, mask, hidden=64):
        super().__init__()
        self.inner = flows.MaskedAffineCoupling(mask, hidden=hidden)
    def forward(self, x):
        return self.inner(x)
    def inverse(self, z):
        return self.inner.inverse(z)

for check in (checks.assert_coupling_forward, checks.assert_coupling_inverse):
    with pytest.raises(nfcourse.ExerciseRemoved, match="exercise 'coupling'"):
        check(Wrapped)
with pytest.raises(nfcourse.ExerciseRemoved, match="exercise 'coupling'"):
    class Sub(flows.AffineCoupling):
        pass
with pytest.raises(nfcourse.ExerciseRemoved, match="exercise 'density'"):
    from nfcourse.flows import FlowModel
with pytest.raises(nfcourse.ExerciseRemoved, match="exercise 'realnvp'"):
    flows.realnvp_2d(num_layers=2, hidden=8)
assert not checks.check_coupling(Wrapped)
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert "is not available while lesson 01 is graded" in out.stdout


def test_self_checks_report_and_never_raise(capsys):
    class Stub(nn.Module):
        def __init__(self, mask, hidden=64):
            raise NotImplementedError()

    assert checks.check_coupling(Stub) is False
    assert checks.check_warmup(1 / 3, lambda z1, z2: z1) is False
    ns = _answers()
    assert checks.check_coupling(ns["MaskedAffineCoupling"]) is True
    assert checks.check_realnvp(ns["RealNVP"]) is True
    assert checks.check_density(ns["FlowDensity"]) is True
    out = capsys.readouterr().out
    assert "NotImplementedError" in out and "All checks passed." in out and "1/6" in out
