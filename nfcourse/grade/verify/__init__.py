"""Verdicts the student's code cannot touch.

nbgrader runs the hidden tests in the student's own kernel, where a submission can redefine
``np.allclose``, patch ``nfcourse.checks`` or fake a layer. The *independent check* runs in
the grader's process instead: it sends the kernel inputs it has just drawn at random,
receives plain numbers back, and decides with its own float64 NumPy computation whether
those numbers are what the specified maths gives (invertibility, log-determinants from its
own finite-difference Jacobians, the coupling structure, a normalised density with a low
held-out NLL). A kernel that lies can only pass by computing the right numbers, which is
the exercise. The grader then adds an error to every test cell whose check failed, so
nbgrader, still the gradebook and feedback of record, scores it zero with the reason.

Nothing in the kernel watches the student's code: the grading kernel runs an edition of the
package without the lesson's reference answers (:mod:`nfcourse.grade.edition`), so there is
nothing to call but the student's own code, and how it looked names up is not graded. The
check's inputs are drawn from a seed computed from the submission (the same notebook gets
the same verdict). Dynamic code in the student's cells (``__import__``, ``exec``,
``importlib``, shell escapes, ...) is listed for the instructor to read
(:func:`review_notes`); those notes are never scored.

A lesson opts in with a module here that defines ``VERIFIER`` (see :mod:`.lesson01`).
"""

from __future__ import annotations

from nfcourse.grade.verify.base import (
    LocalOracle,
    Oracle,
    OracleError,
    Verdict,
    Verifier,
    review_notes,
    verifier_for,
)

__all__ = ["LocalOracle", "Oracle", "OracleError", "Verdict", "Verifier", "review_notes",
           "verifier_for"]
