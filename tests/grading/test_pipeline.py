"""The grading pipeline itself: `nfcourse grade` on a toy lesson, and nbval on every solution.

The toy lesson executes in about a second, so these tests cover the commands (release,
collect, autograde, feedback, export, status), the gradebook rebuild and the time limit
cheaply; the real lessons are graded in test_lessonNN.py.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import nbformat
import pytest
from harness import REPO, student_notebook, submit

from nfcourse.grade import Course, commands
from nfcourse.grade.cli import main
from nfcourse.grade.config import CONFIG_RELPATH, lesson_timeout, load_config

TOY = "00_toy"


def _cell(kind, source, **nbgrader):
    cell = nbformat.v4.new_code_cell(source) if kind == "code" else (
        nbformat.v4.new_markdown_cell(source))
    if nbgrader:
        cell.metadata["nbgrader"] = {"schema_version": 3, "task": False, **nbgrader}
    return cell


def _toy_notebook():
    nb = nbformat.v4.new_notebook()
    answer = dict(grade=False, solution=True, locked=False)
    test = dict(grade=True, solution=False, locked=True)
    nb.cells = [
        _cell("markdown", "# Toy lesson"),
        _cell("code", "import os, time\nFAST = os.environ.get('NFCOURSE_FAST')"),
        _cell("code", "def add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n"
                      "    ### END SOLUTION", grade_id="add_answer", **answer),
        _cell("code", "assert add(1, 2) == 3\n### BEGIN HIDDEN TESTS\nassert add(-2, 2) == 0\n"
                      "### END HIDDEN TESTS", grade_id="add_test", points=2, **test),
        _cell("code", "def mul(a, b):\n    ### BEGIN SOLUTION\n    return a * b\n"
                      "    ### END SOLUTION", grade_id="mul_answer", **answer),
        _cell("code", "assert mul(2, 3) == 6\nassert FAST == '1', 'graded in fast mode'",
              grade_id="mul_test", points=1, **test),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


@pytest.fixture
def toy(tmp_path) -> Course:
    """A course with one toy lesson, released, and a 10 s cell time limit."""
    root = tmp_path / "course"
    (root / "solutions" / TOY).mkdir(parents=True)
    nbformat.write(_toy_notebook(), root / "solutions" / TOY / f"{TOY}.ipynb")
    (root / CONFIG_RELPATH).parent.mkdir(parents=True)
    config = (REPO / CONFIG_RELPATH).read_text()
    config += f"\nc.NfcourseGrade.lesson_timeouts[{TOY!r}] = 10\n"
    (root / CONFIG_RELPATH).write_text(config)
    assert main(["--course-root", str(root), "release"]) == 0
    return Course(root)


def _answered(course, **edits):
    nb = student_notebook(course, TOY)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in edits:
            cell.source = edits[grade_id]
    return nb


def test_config_paths_follow_the_course_root(tmp_path, monkeypatch):
    config = load_config(REPO)
    assert config.CourseDirectory.root == str(REPO)
    assert config.CourseDirectory.source_directory == "solutions"
    assert config.CourseDirectory.release_directory == "lessons"
    assert config.OverwriteCells.add_missing_cells is True
    assert config.Execute.kernel_name == "python3"
    assert lesson_timeout(config, "01_two_moons_realnvp") > 0
    # a copy of the course grades inside itself
    (tmp_path / "grading").mkdir()
    shutil.copy(REPO / CONFIG_RELPATH, tmp_path / CONFIG_RELPATH)
    course = Course(tmp_path)
    assert course.db_path == tmp_path / "grading" / "gradebook.db"
    assert course.submitted_dir == tmp_path / "grading" / "submitted"
    monkeypatch.setenv("NFCOURSE_COURSE_ROOT", str(tmp_path))
    assert Course().root == tmp_path.resolve()


def test_release_writes_the_student_version(toy):
    released = nbformat.read(toy.release_dir / TOY / f"{TOY}.ipynb", as_version=4)
    text = "\n".join(c.source for c in released.cells)
    assert "raise NotImplementedError()" in text
    assert "return a + b" not in text and "HIDDEN" not in text and "add(-2, 2)" not in text
    assert commands.gradebook_is_current(toy, TOY)
    assert sorted(p.name for p in (toy.release_dir / TOY).iterdir()) == [f"{TOY}.ipynb"]


@pytest.mark.notebook
def test_collect_autograde_feedback_export_status(toy, tmp_path, capsys):
    root = str(toy.root)
    downloads = tmp_path / "downloads"
    (downloads / "alice" / "nested").mkdir(parents=True)
    nbformat.write(_answered(toy), downloads / "alice" / "nested" / f"{TOY}.ipynb")
    # an LMS-style flat file name: student id first
    nbformat.write(_answered(toy, mul_answer="def mul(a, b):\n    return a + b"),
                   downloads / f"bob_1234_{TOY}.ipynb")
    assert main(["--course-root", root, "collect", TOY, "--from", str(downloads)]) == 0
    assert toy.students(TOY) == ["alice", "bob"]
    assert (toy.submitted_dir / "bob" / TOY / "timestamp.txt").is_file()

    assert main(["--course-root", root, "autograde", TOY]) == 0
    out = capsys.readouterr().out
    assert "alice: 3 / 3" in out and "bob: 2 / 3" in out
    assert {k: v.score for k, v in commands.scores(toy, TOY, "bob").items()} == {
        "add_test": 2.0, "mul_test": 0.0}

    assert main(["--course-root", root, "feedback", TOY]) == 0
    for student in ("alice", "bob"):
        html = toy.feedback_dir / student / TOY / f"{TOY}.html"
        assert html.is_file() and "mul_test" in html.read_text()

    table = tmp_path / "grades.csv"
    assert main(["--course-root", root, "export", "--csv", str(table)]) == 0
    rows = {r["student_id"]: r for r in csv.DictReader(table.open())}
    assert float(rows["alice"]["score"]) == 3 and float(rows["bob"]["score"]) == 2

    assert main(["--course-root", root, "status"]) == 0
    out = capsys.readouterr().out
    assert "2 submitted, 2 autograded, 2 with feedback" in out


@pytest.mark.notebook
def test_gradebook_rebuilt_from_solutions_without_touching_lessons(toy):
    released = toy.release_dir / TOY / f"{TOY}.ipynb"
    before = released.read_bytes(), released.stat().st_mtime_ns
    toy.db_path.unlink()
    # the hidden test catches an answer that only passes the visible one
    submit(toy, TOY, "carol", _answered(toy, add_answer="def add(a, b):\n    return 3"))
    assert main(["--course-root", str(toy.root), "autograde", TOY, "--student", "carol"]) == 0
    assert commands.scores(toy, TOY, "carol")["add_test"].score == 0
    assert (released.read_bytes(), released.stat().st_mtime_ns) == before
    # a changed hidden test makes the gradebook stale; the next autograde rebuilds it
    source = toy.source_notebook(TOY)
    nb = nbformat.read(source, as_version=4)
    nb.cells[3].source = nb.cells[3].source.replace("add(-2, 2) == 0", "add(-2, 3) == 1")
    nbformat.write(nb, source)
    assert not commands.gradebook_is_current(toy, TOY)
    assert commands.ensure_gradebook(toy, TOY) is True
    assert commands.gradebook_is_current(toy, TOY)
    assert released.read_bytes() == before[0]


@pytest.mark.notebook
def test_time_limit_and_tampering(toy):
    nb = _answered(toy, add_answer="import time\ntime.sleep(120)\ndef add(a, b):\n    return a + b")
    # the student also rewrites a test and deletes another one
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "mul_test":
            cell.source = "pass"
    nb.cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") != "add_test"]
    submit(toy, TOY, "dave", nb)
    assert main(["--course-root", str(toy.root), "autograde", TOY, "--student", "dave"]) == 0
    scores = {k: v.score for k, v in commands.scores(toy, TOY, "dave").items()}
    # the sleeping cell is interrupted, so add() is never defined: the restored add_test fails;
    # mul_test is restored from the gradebook and passes
    assert scores == {"add_test": 0.0, "mul_test": 1.0}


def test_errors_are_reported(toy, capsys):
    assert main(["--course-root", str(toy.root), "autograde", "99_nothing"]) == 1
    assert "no lesson '99_nothing'" in capsys.readouterr().err
    assert main(["--course-root", str(toy.root), "autograde", TOY, "--student", "nobody"]) == 1
    assert main(["--course-root", str(toy.root / "solutions"), "status"]) == 1


# ----------------------------------------------------------------------------- nbval
SOLUTIONS = sorted(
    p.name for p in (REPO / "solutions").iterdir() if (p / f"{p.name}.ipynb").is_file()
) if (REPO / "solutions").is_dir() else []


@pytest.mark.notebook
@pytest.mark.parametrize("lesson", SOLUTIONS)
def test_solution_runs_top_to_bottom(tmp_path, lesson):
    """nbval (`--nbval-lax`: every cell must run without error; outputs are not compared) on a
    copy of the solution notebook, in fast mode, in a subprocess (one kernel per lesson)."""
    shutil.copytree(REPO / "solutions" / lesson, tmp_path / lesson)
    timeout = lesson_timeout(load_config(REPO), lesson)
    env = {**os.environ, "NFCOURSE_FAST": "1", "MPLBACKEND": "Agg", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "--nbval-lax", "--nbval-current-env", f"--nbval-cell-timeout={timeout}",
           "--rootdir", str(tmp_path), "-o", "addopts=", f"{lesson}/{lesson}.ipynb"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
