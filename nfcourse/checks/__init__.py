"""Self-checks shared by students (run them before grading) and graders (hidden tests).

* :func:`check_flow` / :func:`assert_flow`: does a layer follow the flow contract and is it a
  correct flow (invertible, log-det equal to the autograd Jacobian's, batch independent, ...)?
* :func:`reference_advice`: advice for a student whose answer is the package's reference
  (it fails when graded: the grading kernel's package does not have that lesson's references).

Per-lesson, per-exercise checks live in ``nfcourse.checks.lessonNN`` and build on these.
"""

from nfcourse.checks.core import CheckResult, FlowReport, assert_flow, check_flow, reference_advice

__all__ = [
    "CheckResult",
    "FlowReport",
    "assert_flow",
    "check_flow",
    "reference_advice",
]
