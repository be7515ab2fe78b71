"""``collect`` takes only the download folder's own files, and only valid student ids.

No kernels and no nbgrader converters: a course with one (unreleased) lesson is enough.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from harness import REPO

from nfcourse.grade import Course, commands
from nfcourse.grade.cli import main as grade_main
from nfcourse.grade.config import CONFIG_RELPATH
from nfcourse.grade.downloads import copy_notebook
from nfcourse.grade.submission import student_id_problem

TOY = "00_toy"


def _notebook(text: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(text)]
    return nb


@pytest.fixture
def course(tmp_path) -> Course:
    root = tmp_path / "course"
    (root / "solutions" / TOY).mkdir(parents=True)
    nbformat.write(_notebook("ANSWER = 42  # the solution"),
                   root / "solutions" / TOY / f"{TOY}.ipynb")
    (root / CONFIG_RELPATH).parent.mkdir(parents=True)
    shutil.copy(REPO / CONFIG_RELPATH, root / CONFIG_RELPATH)
    return Course(root)


@pytest.fixture
def downloads(tmp_path, course) -> Path:
    """An honest alice (nested folder), an honest bob (flat file) and the attacks."""
    d = tmp_path / "downloads"
    (d / "alice" / "nested").mkdir(parents=True)
    nbformat.write(_notebook("alice = 1"), d / "alice" / "nested" / f"{TOY}.ipynb")
    nbformat.write(_notebook("bob = 1"), d / f"bob_1234_{TOY}.ipynb")
    solution = course.source_notebook(TOY)
    # links to the solution: a student folder's notebook, a whole folder, a flat file
    (d / "mallory").mkdir()
    os.symlink(solution, d / "mallory" / f"{TOY}.ipynb")
    os.symlink(solution.parent, d / "oscar")
    os.symlink(solution, d / f"eve_{TOY}.ipynb")
    # a folder inside a student's folder that leads out of the download folder
    outside = d.parent / "outside"
    outside.mkdir()
    shutil.copy(solution, outside / f"{TOY}.ipynb")
    (d / "trudy").mkdir()
    os.symlink(outside, d / "trudy" / "work")
    # names that are not student ids
    for name in ("alic?", "al ice"):
        (d / name).mkdir()
        nbformat.write(_notebook("x = 1"), d / name / f"{TOY}.ipynb")
    nbformat.write(_notebook("x = 1"), d / f".._{TOY}.ipynb")
    return d


def test_only_honest_submissions_are_collected(course, downloads):
    result = commands.collect(course, TOY, downloads)
    assert sorted(result) == ["alice", "bob"]
    assert course.students(TOY) == ["alice", "bob"]
    copied = result["alice"]
    assert copied == course.submitted_dir / "alice" / TOY / f"{TOY}.ipynb"
    assert not copied.is_symlink() and "alice = 1" in copied.read_text()
    assert (copied.parent / "timestamp.txt").is_file()
    # nothing of the solution reached any submission
    for path in course.submitted_dir.rglob("*"):
        assert not path.is_symlink(), path
        if path.is_file():
            assert "the solution" not in path.read_text(), path


def test_every_refused_entry_is_named_with_its_reason(course, downloads):
    skipped = commands.collect(course, TOY, downloads).skipped
    link = "a symbolic link (links are never followed)"
    assert skipped[f"mallory/{TOY}.ipynb"] == link
    assert skipped["oscar"] == link
    assert skipped[f"eve_{TOY}.ipynb"] == link
    assert skipped["trudy/work"] == link
    assert skipped["mallory"].startswith("no notebook named")
    assert skipped["trudy"].startswith("no notebook named")
    assert "has characters other than" in skipped["alic?"]
    assert "has characters other than" in skipped["al ice"]
    assert skipped[f".._{TOY}.ipynb"] == "student id '..' is not a name"


def test_command_line_names_what_it_skipped(course, downloads, capsys):
    assert grade_main(["--course-root", str(course.root), "collect", TOY,
                       "--from", str(downloads)]) == 0
    captured = capsys.readouterr()
    assert "alice: " in captured.out and "bob: " in captured.out
    for entry in ("alic?", "al ice", "oscar", f"eve_{TOY}.ipynb", "trudy/work"):
        assert f"skipped {entry}: " in captured.err, captured.err


def test_nothing_collectable_is_an_error(course, tmp_path, capsys):
    d = tmp_path / "only-links"
    d.mkdir()
    os.symlink(course.source_notebook(TOY), d / f"eve_{TOY}.ipynb")
    assert grade_main(["--course-root", str(course.root), "collect", TOY, "--from", str(d)]) == 1
    assert "nothing collected" in capsys.readouterr().err
    assert course.students(TOY) == []


@pytest.mark.parametrize("name", ["alic?", "../x", "al ice", ".", "..", "a/b", "", "ä"])
def test_bad_student_ids_are_refused(name):
    assert student_id_problem(name) is not None


@pytest.mark.parametrize("name", ["alice", "bob.smith", "s-001", "A_b.9"])
def test_good_student_ids_pass(name):
    assert student_id_problem(name) is None


def test_copy_never_follows_a_link_on_the_way(tmp_path, downloads):
    """Even a link swapped in after the scan: every component is opened with O_NOFOLLOW."""
    dest = tmp_path / "copy.ipynb"
    with pytest.raises(OSError):
        copy_notebook(downloads, f"trudy/work/{TOY}.ipynb", dest)
    with pytest.raises(OSError):
        copy_notebook(downloads, f"mallory/{TOY}.ipynb", dest)
    with pytest.raises(OSError, match="not a path inside"):
        copy_notebook(downloads, f"../outside/{TOY}.ipynb", dest)
    assert not dest.exists()
    copy_notebook(downloads, f"alice/nested/{TOY}.ipynb", dest)
    assert "alice = 1" in dest.read_text()


def test_a_bad_pattern_is_a_clear_error(course, downloads):
    with pytest.raises(commands.GradeError, match="no \\(\\?P<student>"):
        commands.collect(course, TOY, downloads, pattern=r"^(\w+)_")
    with pytest.raises(commands.GradeError, match="not a regular expression"):
        commands.collect(course, TOY, downloads, pattern=r"(?P<student>[")
