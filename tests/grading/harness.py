"""Grade real notebooks as a student would be graded: the shared harness of tests/grading.

A lesson's grading tests are one call (see ``test_lesson01.py``)::

    from harness import Bug, lesson_grading_tests

    BUGS = [
        Bug("logdet_sign", cell="coupling_answer", old="return z, log_det",
            new="return z, -log_det", loses={"coupling_test_forward", "train_test"}),
        ...
    ]
    globals().update(lesson_grading_tests("01_two_moons_realnvp", BUGS))

which defines these pytest tests (all ``@pytest.mark.notebook``):

* ``test_solution_gets_full_marks``: the released lesson with every answer filled in from
  ``solutions/`` (solution markers stripped) scores full marks on every test cell; its
  feedback HTML is generated and names every test cell;
* ``test_untouched_lesson_gets_zero``: the released lesson as is finishes autograding and
  scores zero on every test cell; nbgrader's ``validate --invert`` finds no visible test that
  passes against the stubs;
* ``test_planted_bug[NAME]``: for each :class:`Bug`, the solution with that one edit loses all
  the points of exactly the test cells in ``bug.loses`` and keeps every other point;
* ``test_tampering_is_undone``: a student who edits a test cell, deletes another and splits a
  third still gets full marks (nbgrader restores locked cells and re-adds missing ones).

Everything runs in a temporary copy of the course (``solutions/LESSON`` and
``grading/nbgrader_config.py``) with its own gradebook, so tests run in parallel under
pytest-xdist; the copy is made once per module and worker. Grading goes through the real
command, ``nfcourse grade --course-root COPY autograde LESSON --student S --force``.

The building blocks are public for tests of your own: :func:`make_course`,
:func:`released_notebook`, :func:`solution_answers`, :func:`student_notebook`,
:func:`submit`, :func:`autograde`, :func:`max_points`.

Cost: each autograde executes the whole notebook once (fast mode). Keep lessons quick under
``NFCOURSE_FAST=1`` and the number of planted bugs reasonable (4-6).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

from nfcourse.grade import Course, commands
from nfcourse.grade.cli import main as grade_main
from nfcourse.grade.config import CONFIG_RELPATH
from nfcourse.grade.execute import VERIFICATION_FILE

REPO = Path(__file__).resolve().parents[2]

__all__ = [
    "REPO",
    "Bug",
    "make_course",
    "released_notebook",
    "solution_answers",
    "strip_solution_markers",
    "student_notebook",
    "submit",
    "autograde",
    "max_points",
    "lesson_grading_tests",
]


@dataclass(frozen=True)
class Bug:
    """One planted bug: in the answer cell ``cell`` (its grade id), replace ``old`` by ``new``
    (``old`` must occur in the solution's answer exactly ``count`` times; all are replaced).
    ``loses`` names the test cells (grade ids) that must then score zero; every other test
    cell must keep its full points."""

    name: str
    cell: str
    old: str
    new: str
    loses: frozenset[str] = field(default_factory=frozenset)
    count: int = 1

    def __post_init__(self):
        object.__setattr__(self, "loses", frozenset(self.loses))


# ---------------------------------------------------------------------------- the course copy
def make_course(dest: Path, lessons: Iterable[str] | None = None, repo: Path = REPO) -> Course:
    """A copy of the course at ``dest``: ``solutions/LESSON`` for each lesson (all by default)
    and ``grading/nbgrader_config.py``; its gradebook is ``dest/grading/gradebook.db``.
    Lessons are released (``lessons/`` of the copy, and the gradebook) before returning."""
    dest = Path(dest)
    src_solutions = repo / "solutions"
    names = list(lessons) if lessons is not None else sorted(
        p.name for p in src_solutions.iterdir() if (p / f"{p.name}.ipynb").is_file()
    )
    for name in names:
        shutil.copytree(
            src_solutions / name,
            dest / "solutions" / name,
            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "*.gif"),
        )
    (dest / CONFIG_RELPATH).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(repo / CONFIG_RELPATH, dest / CONFIG_RELPATH)
    course = Course(dest)
    for name in names:
        commands.release(course, name)
    return course


def _meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def released_notebook(course: Course, lesson: str):
    """The student version of ``lesson`` as released in ``course`` (a fresh copy)."""
    return nbformat.read(course.release_dir / lesson / f"{lesson}.ipynb", as_version=4)


_BEGIN = re.compile(r"^[ \t]*#+[ \t]*BEGIN SOLUTION[^\n]*\n", re.MULTILINE)
_END = re.compile(r"^[ \t]*#+[ \t]*END SOLUTION[^\n]*(\n|$)", re.MULTILINE)


def strip_solution_markers(source: str) -> str:
    """``source`` without its ``### BEGIN SOLUTION`` / ``### END SOLUTION`` lines."""
    return _END.sub("", _BEGIN.sub("", source))


Cell = tuple[str | None, str]  # (grade id or None, source)


def solution_cells(lesson: str, *, skip_prefixes: tuple[str, ...] = (),
                   skip_containing: tuple[str, ...] = (),
                   drop_lines: tuple[str, ...] = ()) -> list[Cell]:
    """The code cells of the lesson's solution notebook that are not hidden tests, markers
    stripped, as ``(grade_id, source)``: what a student's kernel holds after running the
    notebook. Cells that start with one of ``skip_prefixes`` or contain one of
    ``skip_containing`` (pictures, self-checks) are left out, and so are the lines that
    start with one of ``drop_lines``."""
    nb = nbformat.read(REPO / "solutions" / lesson / f"{lesson}.ipynb", as_version=4)
    cells = []
    for cell in nb.cells:
        meta = _meta(cell)
        if cell.cell_type != "code" or meta.get("grade"):
            continue
        source = strip_solution_markers(cell.source)
        if source.lstrip().startswith(skip_prefixes) or any(m in source for m in skip_containing):
            continue
        if drop_lines:
            source = "".join(line for line in source.splitlines(keepends=True)
                             if not line.lstrip().startswith(drop_lines))
        cells.append((meta.get("grade_id"), source))
    return cells


def changed(cells: Iterable[Cell], edits: Mapping[str, tuple[str, str]] | None = None,
            replace: Mapping[str, str] | None = None) -> list[Cell]:
    """``cells`` with answers changed: ``replace[grade_id]`` is a whole new source,
    ``edits[grade_id] = (old, new)`` replaces text that must be there."""
    out = []
    for grade_id, source in cells:
        if replace and grade_id in replace:
            source = replace[grade_id]
        if edits and grade_id in edits:
            old, new = edits[grade_id]
            assert old in source, f"{old!r} is not in {grade_id}"
            source = source.replace(old, new)
        out.append((grade_id, source))
    return out


def run_cells(ns: dict, cells: Iterable[Cell]) -> dict:
    """Run ``cells`` in ``ns`` as a kernel would: quietly, and a cell that fails leaves what
    it defined before the error (then the next cell runs)."""
    for grade_id, source in cells:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                exec(compile(source, f"<{grade_id or 'cell'}>", "exec"), ns)  # noqa: S102
            except Exception:  # noqa: BLE001
                pass
    return ns


def solution_answers(course: Course, lesson: str) -> dict[str, str]:
    """``grade_id -> answer`` of every answer cell in ``solutions/``, markers stripped."""
    nb = nbformat.read(course.source_notebook(lesson), as_version=4)
    return {
        _meta(c)["grade_id"]: strip_solution_markers(c.source)
        for c in nb.cells
        if _meta(c).get("solution")
    }


def max_points(course: Course, lesson: str) -> dict[str, float]:
    """``grade_id -> points`` of every test cell of ``lesson``."""
    nb = nbformat.read(course.source_notebook(lesson), as_version=4)
    return {
        _meta(c)["grade_id"]: float(_meta(c).get("points", 0))
        for c in nb.cells
        if _meta(c).get("grade")
    }


def student_notebook(course: Course, lesson: str, *, answered: bool = True,
                     bug: Bug | None = None):
    """The released lesson as a student hands it in: every answer cell filled in from the
    solution (``answered=True``) or left as released; ``bug`` planted when given."""
    nb = released_notebook(course, lesson)
    if not answered:
        assert bug is None, "a bug needs the answers"
        return nb
    answers = solution_answers(course, lesson)
    if bug is not None:
        assert bug.cell in answers, f"{bug.name}: no answer cell {bug.cell!r} in {lesson}"
        found = answers[bug.cell].count(bug.old)
        assert found == bug.count, (
            f"{bug.name}: {bug.old!r} occurs {found} times in {bug.cell}, expected {bug.count}")
        answers[bug.cell] = answers[bug.cell].replace(bug.old, bug.new)
    for cell in nb.cells:
        grade_id = _meta(cell).get("grade_id")
        if _meta(cell).get("solution") and grade_id in answers:
            cell.source = answers[grade_id]
    return nb


def submit(course: Course, lesson: str, student: str, nb) -> Path:
    """Hand in ``nb`` as ``student``'s submission (replacing an earlier one)."""
    folder = course.submitted_dir / student / lesson
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    path = folder / f"{lesson}.ipynb"
    nbformat.write(nb, path)
    return path


def autograde(course: Course, lesson: str, student: str) -> dict[str, float]:
    """Run ``nfcourse grade autograde`` on one submission; ``grade_id -> score``."""
    rc = grade_main(
        ["--course-root", str(course.root), "autograde", lesson, "--student", student, "--force"]
    )
    assert rc == 0, f"nfcourse grade autograde {lesson} --student {student} exited with {rc}"
    return {k: v.score for k, v in commands.scores(course, lesson, student).items()}


def _reasons(course: Course, lesson: str, student: str) -> dict[str, list[str]]:
    """``grade_id -> why it lost points``: the graded notebook's errors and the independent
    check's message, so that a failing grading test says what happened in the kernel."""
    folder = course.autograded_dir / student / lesson
    reasons: dict[str, list[str]] = {}
    graded = folder / f"{lesson}.ipynb"
    if graded.is_file():
        for cell in nbformat.read(graded, as_version=4).cells:
            grade_id = _meta(cell).get("grade_id")
            for out in cell.get("outputs", []) if grade_id else []:
                if out.get("output_type") == "error":
                    text = f"{out.get('ename')}: {out.get('evalue', '')}".strip()
                    reasons.setdefault(grade_id, []).append(text[:300])
    record = folder / VERIFICATION_FILE
    if record.is_file():
        for verdict in json.loads(record.read_text()).get("verdicts", []):
            if not verdict.get("passed"):
                reasons.setdefault(verdict["grade_id"], []).append(
                    "independent check: " + str(verdict.get("message", ""))[:300])
    return reasons


def _diff(scores: Mapping[str, float], expected: Mapping[str, float],
          reasons: Mapping[str, list[str]] | None = None) -> str:
    lines = []
    for grade_id in sorted(set(scores) | set(expected)):
        got, want = scores.get(grade_id), expected.get(grade_id)
        mark = "" if got == want else f"   <-- expected {want}"
        lines.append(f"  {grade_id:28s} {got}{mark}")
        if mark and reasons:
            lines += [f"      {why}" for why in dict.fromkeys(reasons.get(grade_id, []))]
    return "\n".join(lines)


# ------------------------------------------------------------------------- generated tests
def lesson_grading_tests(lesson: str, bugs: Iterable[Bug]) -> dict[str, object]:
    """The standard grading tests of ``lesson`` (see the module docstring), as a dict to merge
    into a test module's globals: ``globals().update(lesson_grading_tests(...))``."""
    bugs = list(bugs)
    names = [b.name for b in bugs]
    assert len(set(names)) == len(names), "bug names must be unique"

    @pytest.fixture(scope="module")
    def course(tmp_path_factory) -> Course:
        return make_course(tmp_path_factory.mktemp(f"course-{lesson}"), [lesson])

    @pytest.mark.notebook
    def test_solution_gets_full_marks(course):
        points = max_points(course, lesson)
        assert points, f"{lesson} has no test cells"
        submit(course, lesson, "solution", student_notebook(course, lesson))
        scores = autograde(course, lesson, "solution")
        assert scores == points, "the solution must get full marks:\n" + _diff(
            scores, points, _reasons(course, lesson, "solution"))
        html = commands.feedback(course, lesson, "solution")
        assert len(html) == 1 and html[0].stat().st_size > 0, "no feedback HTML written"
        text = html[0].read_text()
        for grade_id in points:
            assert grade_id in text, f"feedback does not mention {grade_id}"

    @pytest.mark.notebook
    def test_untouched_lesson_gets_zero(course):
        from nbgrader.validator import Validator

        points = max_points(course, lesson)
        submit(course, lesson, "untouched", student_notebook(course, lesson, answered=False))
        scores = autograde(course, lesson, "untouched")
        zeros = {k: 0.0 for k in points}
        assert scores == zeros, "stubs must score zero everywhere:\n" + _diff(
            scores, zeros, _reasons(course, lesson, "untouched"))
        # `nbgrader validate --invert` on the released lesson: no visible test may pass.
        validator = Validator(config=copy.deepcopy(course.config), invert=True)
        with commands.setenv(commands.grading_env(course)):
            result = validator.validate(str(course.release_dir / lesson / f"{lesson}.ipynb"))
        assert "passed" not in result, (
            "visible tests pass against the stubs:\n"
            + "\n---\n".join(c["source"] for c in result.get("passed", [])))

    @pytest.mark.notebook
    @pytest.mark.parametrize("bug", bugs, ids=names)
    def test_planted_bug(course, bug: Bug):
        points = max_points(course, lesson)
        unknown = bug.loses - set(points)
        assert not unknown, f"{bug.name}: no test cells {sorted(unknown)} in {lesson}"
        student = f"bug-{bug.name}"
        submit(course, lesson, student, student_notebook(course, lesson, bug=bug))
        scores = autograde(course, lesson, student)
        expected = {k: (0.0 if k in bug.loses else v) for k, v in points.items()}
        assert scores == expected, (
            f"planted bug {bug.name!r} must lose exactly {sorted(bug.loses)}:\n"
            + _diff(scores, expected, _reasons(course, lesson, student)))

    @pytest.mark.notebook
    def test_tampering_is_undone(course):
        points = max_points(course, lesson)
        nb = student_notebook(course, lesson)
        tests = [i for i, c in enumerate(nb.cells) if _meta(c).get("grade")]
        assert len(tests) >= 1
        # 1. edit the first test cell so that it would pass whatever the answer
        first = nb.cells[tests[0]]
        first.source = "assert True  # the student replaced the test\n"
        # 2. split the last test cell in two (JupyterLab copies the metadata to both halves)
        if len(tests) >= 3:
            last = nb.cells[tests[-1]]
            lines = last.source.splitlines(keepends=True)
            half = max(1, len(lines) // 2)
            second = copy.deepcopy(last)
            last.source, second.source = "".join(lines[:half]), "".join(lines[half:])
            second["id"] = (second.get("id") or "split") + "-2"
            nb.cells.insert(tests[-1] + 1, second)
        # 3. delete a test cell in the middle
        if len(tests) >= 2:
            del nb.cells[tests[len(tests) // 2]]
        submit(course, lesson, "tamperer", nb)
        scores = autograde(course, lesson, "tamperer")
        assert scores == points, "tampered test cells must be restored:\n" + _diff(
            scores, points, _reasons(course, lesson, "tamperer"))

    return {
        "course": course,
        "test_solution_gets_full_marks": test_solution_gets_full_marks,
        "test_untouched_lesson_gets_zero": test_untouched_lesson_gets_zero,
        "test_planted_bug": test_planted_bug,
        "test_tampering_is_undone": test_tampering_is_undone,
    }
