"""Tampered and malformed lesson-01 submissions, as students and mishaps produce them.

:func:`hardening_attacks` returns ``{student: Attack}``. Each :class:`Attack` is what that
student hands in (a notebook, or raw bytes for files that are not one) and what grading must
make of it: either the scores its honest work deserves (``loses``: the test cells that
score zero, every other one keeps its points), or a failure (``fails``: a regular expression
the recorded reason must match; the student then shows as "graded 0 / needs a look").

``test_hostile_hardening.py`` grades them all as one class beside an honest control, with
the attacks of ``hardening_caps.caps_attacks`` when that module exists (same format).

Example:
    >>> attacks = hardening_attacks(course)                               # doctest: +SKIP
    >>> attacks["bad_json"].fails                                         # doctest: +SKIP
    'not valid JSON'
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from harness import Bug, _meta, student_notebook

from nfcourse.grade import Course

LESSON = "01_two_moons_realnvp"

#: every test cell of lesson 01
ALL = frozenset({"warmup_test", "coupling_test_forward", "coupling_test_inverse",
                 "realnvp_test", "density_test", "train_test"})

#: the honest control; ``alic?`` is handed in beside it
CONTROL = "alice"


@dataclass
class Attack:
    """One submission: ``notebook`` (a notebook node, or the file's bytes), ``loses`` (test
    cells that must score 0) or ``fails`` (a regex the failure's reason must match)."""

    name: str
    notebook: object
    loses: frozenset[str] = field(default_factory=frozenset)
    fails: str | None = None
    what: str = ""

    def expected(self, points: dict[str, float]) -> dict[str, float]:
        """The scores this submission must get, given every test cell's points."""
        if self.fails is not None:
            return {k: 0.0 for k in points}
        return {k: (0.0 if k in self.loses else v) for k, v in points.items()}


def hand_in(course: Course, student: str, notebook) -> Path:
    """Put ``notebook`` (node or bytes) where ``collect`` would, bypassing its checks."""
    folder = course.submitted_dir / student / LESSON
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{LESSON}.ipynb"
    if isinstance(notebook, bytes):
        path.write_bytes(notebook)
    else:
        nbformat.write(notebook, path)
    return path


def _index(nb, grade_id: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if _meta(c).get("grade_id") == grade_id)


def _fake_pass_output():
    return nbformat.v4.new_output("stream", name="stdout", text="all tests passed\n")


def hardening_attacks(course: Course) -> dict[str, Attack]:
    """The class of tampered and malformed submissions (see the module docstring)."""
    good = student_notebook(course, LESSON)
    stub = student_notebook(course, LESSON, answered=False)
    out: list[Attack] = []

    # Stubs whose test cells ask nbclient not to run them (or to accept their error), with
    # pre-filled outputs that look like passing tests: all of that is removed first.
    tagged = copy.deepcopy(stub)
    for k, grade_id in enumerate(sorted(ALL)):
        cell = tagged.cells[_index(tagged, grade_id)]
        cell.metadata["tags"] = ["skip-execution"] if k % 2 == 0 else ["raises-exception"]
        cell.outputs = [_fake_pass_output()]
        cell.execution_count = 1
    out.append(Attack("stub_skip_tags", tagged, ALL,
                      what="stub answers, test cells tagged skip-execution / raises-exception "
                      "with pre-filled passing outputs"))

    # Honest answers; a test cell no longer a grade cell, one turned into an answer cell,
    # one worth 100 points: the gradebook's flags and points come back.
    flipped = copy.deepcopy(good)
    flipped.cells[_index(flipped, "warmup_test")].metadata["nbgrader"]["grade"] = False
    forward = flipped.cells[_index(flipped, "coupling_test_forward")].metadata["nbgrader"]
    forward["solution"] = True
    forward["locked"] = False
    flipped.cells[_index(flipped, "realnvp_test")].metadata["nbgrader"]["points"] = 100
    out.append(Attack("flipped_flags", flipped, frozenset(),
                      what="the solution with grade/solution flags flipped and points raised"))

    # A wrong warm-up answer plus grade cells of the student's own making: one with a new
    # grade id worth 50 points, one with no grade id. They must add nothing.
    bug = Bug("warmup_wrong", cell="warmup_answer", old="1 / 6", new="1 / 3")
    faked = student_notebook(course, LESSON, bug=bug)
    bonus = nbformat.v4.new_code_cell("print('bonus')\n")
    bonus.metadata["nbgrader"] = {"grade": True, "grade_id": "bonus_test", "locked": True,
                                  "points": 50, "schema_version": 3, "solution": False,
                                  "task": False}
    nameless = nbformat.v4.new_code_cell("pass\n")
    nameless.metadata["nbgrader"] = {"grade": True, "points": 5, "schema_version": 3,
                                     "solution": False, "locked": False}
    at = _index(faked, "warmup_test") + 1
    faked.cells[at:at] = [bonus, nameless]
    out.append(Attack("fake_grade_cells", faked, frozenset({"warmup_test"}),
                      what="a wrong warm-up answer and two grade cells the student made up"))

    # Malformed files: each fails alone with a clear reason.
    schema = copy.deepcopy(good)
    schema.cells[_index(schema, "coupling_answer")].metadata["nbgrader"]["schema_version"] = 4
    out.append(Attack("schema_v4", schema, fails=r"schema version 4",
                      what="nbgrader metadata of schema version 4 in one cell"))

    text = nbformat.writes(good).encode()
    out.append(Attack("bad_json", text[: len(text) // 2],
                      fails=r"not valid JSON \(the file is cut off\)",
                      what="the notebook file cut off half way"))

    marker = b'"cell_type"'
    out.append(Attack("bad_utf8", text.replace(marker, b'"\xff\xfecell_type"', 1),
                      fails=r"not valid UTF-8 \(byte 0xff",
                      what="bytes that are not UTF-8 inside the JSON"))

    old = nbformat.writes(nbformat.convert(copy.deepcopy(good), 3)).encode()
    out.append(Attack("nbformat3", old, fails=r"nbformat 3",
                      what="the solution saved as nbformat 3"))

    # A folder whose name is a glob pattern matching the control's: it must fail alone and
    # the control must still be graded (not "skipped as existing").
    out.append(Attack("alic?", good, fails=r"student id 'alic\?' has characters",
                      what="a student folder named alic? next to alice"))

    return {a.name: a for a in out}
