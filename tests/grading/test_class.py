"""A class of 200: graded by 2 workers into PostgreSQL, equal to grading one at a time.

The lesson is a small course of its own (three exercises in plain Python, so that 200
sandboxed kernels fit in CI's time); the submissions mix correct, buggy and hostile ones.
Every student's every score must be in the PostgreSQL gradebook and equal to the score
the same kind of submission gets from a single worker into nbgrader's SQLite default.
"""

from __future__ import annotations

import random
import shutil
import time
from collections import Counter
from pathlib import Path

import nbformat
import pytest
from harness import REPO, released_notebook, submit

from nfcourse.grade import Course, commands
from nfcourse.grade.cli import main as grade_main
from nfcourse.grade.config import CONFIG_RELPATH
from nfcourse.grade.sandbox import isolation_problems

pytestmark = [pytest.mark.notebook, pytest.mark.xdist_group("class")]

LESSON = "00_toy"
POINTS = {"square_test": 1.0, "mean_test": 2.0, "lse_test": 2.0}
LIMITS = f"""
c.NfcourseGrade.lesson_timeouts = {{"{LESSON}": 5}}
c.GradingExecute.notebook_timeout = 60
c.SandboxedKernelManager.memory_mb = 512
"""

ANSWERS = {
    "square_answer": "def square(x):\n    return x * x\n",
    "mean_answer": "def mean(xs):\n    return sum(xs) / len(xs)\n",
    "lse_answer": ("def lse(xs):\n    m = max(xs)\n"
                   "    return m + math.log(sum(math.exp(x - m) for x in xs))\n"),
}
TESTS = {
    "square_test": "assert square(3) == 9\nassert square(-2) == 4\n",
    "mean_test": "assert mean([1, 2, 3]) == 2\nassert mean([5]) == 5\n",
    "lse_test": "assert abs(lse([1000, 1000]) - (1000 + math.log(2))) < 1e-9\n",
}


def _cell(source: str, grade_id: str | None = None, *, solution=False, grade=False):
    cell = nbformat.v4.new_code_cell(source)
    if grade_id:
        meta = {"grade": grade, "grade_id": grade_id, "locked": grade, "schema_version": 3,
                "solution": solution, "task": False}
        if grade:
            meta["points"] = POINTS[grade_id]
        cell.metadata["nbgrader"] = meta
    return cell


def toy_source() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells.append(nbformat.v4.new_markdown_cell("# A toy lesson for grading at scale"))
    nb.cells.append(_cell("import math"))
    for name, test in zip(ANSWERS, TESTS, strict=True):
        body = ANSWERS[name].split("\n", 1)
        source = f"{body[0]}\n    ### BEGIN SOLUTION\n{body[1]}    ### END SOLUTION\n"
        nb.cells.append(_cell(source, name, solution=True))
        nb.cells.append(_cell(TESTS[test], test, grade=True))
    return nb


def make_toy_course(root: Path) -> Course:
    (root / "solutions" / LESSON).mkdir(parents=True)
    nbformat.write(toy_source(), root / "solutions" / LESSON / f"{LESSON}.ipynb")
    (root / CONFIG_RELPATH).parent.mkdir(parents=True)
    shutil.copy(REPO / CONFIG_RELPATH, root / CONFIG_RELPATH)
    with open(root / CONFIG_RELPATH, "a") as handle:
        handle.write(LIMITS)
    course = Course(root)
    commands.release(course, LESSON)
    return course


# kind -> (answers edited, extra cell after the first test, test cells that score zero)
KINDS: dict[str, tuple[dict[str, str], str | None, set[str]]] = {
    "correct": ({}, None, set()),
    "bug_square": ({"square_answer": "def square(x):\n    return x + x\n"}, None,
                   {"square_test"}),
    "bug_mean": ({"mean_answer": "def mean(xs):\n    return sum(xs) / (len(xs) + 1)\n"}, None,
                 {"mean_test"}),
    "bug_lse": ({"lse_answer": "def lse(xs):\n    return math.log(sum(math.exp(x) for x in xs))\n"},
                None, {"lse_test"}),
    "empty": (None, None, set(POINTS)),
    "os_exit": ({"mean_answer": "import os\nos._exit(1)\n" + ANSWERS["mean_answer"]}, None,
                {"mean_test"}),
    "endless": ({"square_answer": "while True:\n    pass\n" + ANSWERS["square_answer"]}, None,
                {"square_test"}),
    "flood": ({}, "for _ in range(5):\n    print('x' * 1_000_000)\n", set()),
    "write_outside": ({}, "for p in {targets!r}:\n    try:\n        open(p, 'a').write('x')\n"
                      "    except OSError:\n        pass\n", set()),
    "read_gradebook": ({"square_answer": "import os\nif os.path.exists({gradebook!r}):\n"
                        "    " + ANSWERS["square_answer"].replace("\n", "\n    ")}, None,
                       {"square_test"}),
}
MIX = {"correct": 60, "bug_square": 25, "bug_mean": 25, "bug_lse": 25, "empty": 20,
       "os_exit": 15, "endless": 4, "flood": 10, "write_outside": 8, "read_gradebook": 8}


def submission(course: Course, kind: str, student: str, fmt: dict) -> nbformat.NotebookNode:
    answers, extra, _ = KINDS[kind]
    nb = released_notebook(course, LESSON)
    if answers is not None:
        for cell in nb.cells:
            grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
            if grade_id in ANSWERS:
                source = answers.get(grade_id, ANSWERS[grade_id])
                cell.source = f"# {student}\n" + source.format(**fmt)
    if extra is not None:
        at = next(i for i, c in enumerate(nb.cells)
                  if c.metadata.get("nbgrader", {}).get("grade_id") == "square_test")
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(extra.format(**fmt)))
    return nb


def expected(kind: str) -> dict[str, float]:
    return {k: (0.0 if k in KINDS[kind][2] else v) for k, v in POINTS.items()}


def test_mix_is_200_and_every_kind_is_used():
    assert sum(MIX.values()) == 200 and set(MIX) == set(KINDS)


@pytest.fixture(scope="module")
def isolation():
    if isolation_problems():
        pytest.fail("cannot sandbox here: " + "; ".join(isolation_problems()))


def test_single_worker_grades_each_kind_as_specified(tmp_path, isolation):
    """The reference: one submission of each kind, one worker, SQLite."""
    course = make_toy_course(tmp_path / "single")
    fmt = {"gradebook": str(course.db_path), "targets": [str(course.root / "pwned.txt")]}
    for kind in KINDS:
        submit(course, LESSON, kind, submission(course, kind, kind, fmt))
    commands.autograde(course, LESSON)
    for kind in KINDS:
        got = {k: v.score for k, v in commands.scores(course, LESSON, kind).items()}
        assert got == expected(kind), f"{kind}: {got}"
    assert not (course.root / "pwned.txt").exists()


def test_class_of_200_with_two_workers_into_postgresql(tmp_path, postgres_db, isolation,
                                                       capsys):
    course = make_toy_course(tmp_path / "class")
    fmt = {"gradebook": str(course.db_path), "targets": [str(course.root / "pwned.txt")]}
    kinds = [kind for kind, count in MIX.items() for _ in range(count)]
    random.Random(0).shuffle(kinds)
    students = {f"s{i:03d}": kind for i, kind in enumerate(kinds)}
    for student, kind in students.items():
        submit(course, LESSON, student, submission(course, kind, student, fmt))
    started = time.monotonic()
    rc = grade_main(["--course-root", str(course.root), "--db", postgres_db, "autograde",
                     LESSON, "--workers", "2"])
    seconds = time.monotonic() - started
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    pg = Course(course.root, db_url=postgres_db)
    wrong = {}
    for student, kind in students.items():
        got = {k: v.score for k, v in commands.scores(pg, LESSON, student).items()}
        if got != expected(kind):
            wrong[student] = (kind, got)
    assert not wrong, f"{len(wrong)} students graded wrongly: {list(wrong.items())[:5]}"
    assert Counter(students.values()) == Counter(MIX)
    assert not (course.root / "pwned.txt").exists()
    with course.gradebook() as sqlite:  # release wrote the lesson there; no grading did
        assert sqlite.students == [], "submissions went to SQLite instead of PostgreSQL"
    print(f"\n200 submissions, 2 workers: {seconds:.0f} s, "
          f"{200 / seconds * 60:.0f} submissions per minute")


def test_several_workers_refuse_sqlite(tmp_path, isolation):
    course = make_toy_course(tmp_path / "sqlite")
    submit(course, LESSON, "a", submission(course, "correct", "a", {}))
    with pytest.raises(commands.GradeError, match="PostgreSQL"):
        commands.autograde(course, LESSON, workers=2)
