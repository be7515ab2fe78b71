"""Grading of lesson 05 (Glow): full marks, zero, and planted bugs.

Each bug is one edit of the solution; ``loses`` lists every test cell that must then score
zero (the rest keep their points). The Glow step is built from the student's own ActNorm and
1x1 convolutions and its test checks the step as a flow with ``mixing="lu"`` and
``"reverse"``, so a bug that breaks ActNorm's or the LU layer's log-det also costs the step;
the multi-scale test checks structure and the round trip, not log-dets.
"""

import os
from pathlib import Path

import pytest
from harness import REPO, Bug, lesson_grading_tests

LESSON = "05_glow"

BUGS = [
    # statistics over the batch only: one shift and scale per pixel instead of per channel
    Bug("actnorm_per_pixel", cell="actnorm_answer",
        old="dim=(0, 2, 3), keepdim=True", new="dim=0, keepdim=True", count=2,
        loses={"actnorm_test", "actnorm_test_init", "glow_step_test"}),
    # the "initialised" flag as a plain attribute: not in state_dict, a loaded model
    # initialises itself again
    Bug("actnorm_flag_not_saved", cell="actnorm_answer",
        old='self.register_buffer("initialized", torch.tensor(False))',
        new="self.initialized = torch.tensor(False)",
        loses={"actnorm_test_init"}),
    # log|det W| counted once instead of once per pixel
    Bug("invconv_missing_hw", cell="invconv_answer",
        old="log_det = h * w * torch.linalg.slogdet(self.weight)[1]",
        new="log_det = torch.linalg.slogdet(self.weight)[1]",
        loses={"invconv_test"}),
    # the LU log-det sums s instead of log|s|
    Bug("lu_s_not_log_s", cell="invconv_lu_answer",
        old="h * w * self.log_s.sum()", new="h * w * (self.sign_s * self.log_s.exp()).sum()",
        count=2,
        loses={"invconv_lu_test", "glow_step_test"}),
    # the coupling shifts the half it is conditioned on: no longer invertible
    Bug("coupling_changes_condition", cell="glow_step_answer",
        old="z = torch.cat([x_cond, y], dim=1)", new="z = torch.cat([x_cond + t, y], dim=1)",
        loses={"glow_step_test", "glow_test"}),
]

_SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="module", autouse=True)
def _mnist_folder():
    """Grade with the MNIST files of the shared data folder when NFCOURSE_DATA is unset (the
    lesson falls back to scikit-learn's digits without them; both work, MNIST is faster)."""
    if os.environ.get("NFCOURSE_DATA") or not Path(_SHARED_MNIST).is_dir():
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NFCOURSE_DATA", str(_SHARED_MNIST))
        yield


globals().update(lesson_grading_tests(LESSON, BUGS))


# -------------------------------------------- the self-checks warn about the reference
@pytest.mark.parametrize("name", ["ActNorm", "InvConv1x1", "InvConv1x1LU", "GlowStep"])
def test_self_checks_warn_about_the_reference(name, capsys):
    """While the lesson is graded the reference layers are not in the package, so an answer
    built on one fails there by itself: the self-check says so beforehand (advice, not a
    grade: the hidden tests and the grader decide from numbers)."""
    from nfcourse import flows
    from nfcourse.checks import lesson05 as checks

    class Wrapped(getattr(flows, name)):
        """A "student" layer that only subclasses the reference."""

    assert checks._advice(Wrapped, name)
    assert checks._advice(getattr(flows, name), name)
    assert checks._advice(type("Own", (), {}), name) == []
    assert not checks.check_actnorm(flows.ActNorm)
    assert "fail when graded" in capsys.readouterr().out
