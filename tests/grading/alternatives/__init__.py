"""Alternative correct answers, as data: every one must get full marks.

The lessons promise that every correct answer, written any way, gets full marks. Each module
``lessonNN.py`` here holds answers to lesson NN written in styles clearly different from the
solution's (a mask kept as a frozen parameter or computed on the fly, indexing instead of
multiplying by a mask, another valid tanh bound, a class hierarchy, ...), and
``tests/grading/test_alternatives.py`` grades each of them twice: in this process (the
hidden tests and the independent check against the answers' namespace) and through a real
sandboxed autograde (all of a lesson's alternatives in one class).

A module defines:

* ``LESSON``: the lesson's folder name, e.g. ``"01_two_moons_realnvp"``;
* ``ALTERNATIVES``: a list of :class:`Alternative`; each replaces some answer cells (by
  grade id) with whole new sources, the other answer cells keep the solution's;
* ``SKIP`` (optional): prefixes of the notebook's other cells that the in-process run may
  leave out (pictures, self-checks, training the graded cells do not use), as for
  :func:`harness.solution_cells`.

A new lesson needs only a new data module: the tests find every ``lessonNN`` module here.

Example:
    >>> alt = Alternative("frozen_mask", "mask as a frozen nn.Parameter",
    ...                   {"coupling_answer": "class MaskedAffineCoupling: ..."})
    >>> sorted(alt.answers)
    ['coupling_answer']
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType

import nbformat
from harness import (
    REPO,
    Cell,
    changed,
    solution_cells,
    strip_solution_markers,
    student_notebook,
)

from nfcourse.grade import Course

__all__ = ["Alternative", "lesson_modules", "answer_ids", "notebook", "in_process_cells",
           "test_cells", "hidden_test_failures"]


@dataclass(frozen=True)
class Alternative:
    """One correct submission: ``answers[grade_id]`` is the whole source of that answer
    cell (answer cells not named keep the solution's); ``style`` says in a few words how it
    differs from the solution."""

    name: str
    style: str
    answers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"alternative name {self.name!r} must be an identifier "
                             "(it names a student)")
        if not self.answers:
            raise ValueError(f"alternative {self.name!r} replaces no answer cell")


def lesson_modules() -> list[ModuleType]:
    """Every ``lessonNN`` data module of this package, in lesson order."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__)
                   if m.name.startswith("lesson") and m.name[6:].isdigit())
    return [importlib.import_module(f"{__name__}.{name}") for name in names]


def _solution(lesson: str):
    return nbformat.read(REPO / "solutions" / lesson / f"{lesson}.ipynb", as_version=4)


def answer_ids(lesson: str) -> set[str]:
    """The grade ids of the lesson's answer cells."""
    return {c.metadata["nbgrader"]["grade_id"] for c in _solution(lesson).cells
            if c.get("metadata", {}).get("nbgrader", {}).get("solution")}


def _checked(lesson: str, alternative: Alternative) -> Mapping[str, str]:
    unknown = set(alternative.answers) - answer_ids(lesson)
    if unknown:
        raise KeyError(f"{alternative.name}: {lesson} has no answer cells {sorted(unknown)}")
    return alternative.answers


def notebook(course: Course, lesson: str, alternative: Alternative):
    """The released lesson handed in with ``alternative``'s answers (the solution's
    elsewhere), as a student would submit it."""
    answers = _checked(lesson, alternative)
    nb = student_notebook(course, lesson)
    for cell in nb.cells:
        grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    return nb


def in_process_cells(module: ModuleType, alternative: Alternative) -> list[Cell]:
    """The notebook's non-test code cells with ``alternative``'s answers, what a kernel
    holds after running it (less the module's ``SKIP`` cells)."""
    answers = _checked(module.LESSON, alternative)
    cells = solution_cells(module.LESSON, skip_prefixes=tuple(getattr(module, "SKIP", ())))
    return changed(cells, replace=answers)


def test_cells(lesson: str) -> list[Cell]:
    """The lesson's test cells with their hidden tests, ``(grade_id, source)`` in order."""
    return [(c.metadata["nbgrader"]["grade_id"], strip_solution_markers(c.source))
            for c in _solution(lesson).cells
            if c.cell_type == "code" and c.get("metadata", {}).get("nbgrader", {}).get("grade")]


# pytest must not collect the helper above as a test
test_cells.__test__ = False


def hidden_test_failures(ns: dict, lesson: str) -> dict[str, str]:
    """Run every test cell of ``lesson`` (hidden tests included) in ``ns``, as nbgrader
    does in the kernel: ``grade_id -> the error`` of each that fails."""
    failures = {}
    for grade_id, source in test_cells(lesson):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                exec(compile(source, f"<{grade_id}>", "exec"), ns)  # noqa: S102
            except Exception as error:  # noqa: BLE001  (a failing test may raise anything)
                failures[grade_id] = f"{type(error).__name__}: {str(error)[:400]}"
    return failures
