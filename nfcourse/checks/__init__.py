"""Self-checks shared by students (run them before grading) and graders (hidden tests).

* :func:`check_flow` / :func:`assert_flow`: does a layer follow the flow contract and is it a
  correct flow (invertible, log-det equal to the autograd Jacobian's, batch independent, ...)?
* :func:`assert_independent` / :func:`forbid_calls`: an answer must not import, subclass, wrap
  or call the reference implementation of the layer it is asked to write.

Per-lesson, per-exercise checks live in ``nfcourse.checks.lessonNN`` and build on these.
"""

from nfcourse.checks.core import (
    CheckResult,
    FlowReport,
    ReferenceUsedError,
    assert_flow,
    assert_independent,
    check_flow,
    forbid_calls,
)

__all__ = [
    "CheckResult",
    "FlowReport",
    "ReferenceUsedError",
    "assert_flow",
    "assert_independent",
    "check_flow",
    "forbid_calls",
]
