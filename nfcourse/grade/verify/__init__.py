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

While a query runs the student's code, the kernel traces Python calls (``sys.settrace``, one
look per new frame): a check fails when the lesson's reference code runs, however it was
reached, or when the tracing was switched off. Dynamic code in the student's cells
(``__import__``, ``exec``, ``importlib``, ...) is listed for the instructor to read
(:func:`review_notes`).

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
