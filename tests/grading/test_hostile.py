"""Hostile submissions of lesson 01 cannot escape the sandbox or change their own verdict.

One class is graded together: the solution (the control) and every submission of
``hostile.py``. Each must score exactly full marks minus the test cells it broke; the
control must keep full marks; nothing outside the submissions may change; the grader's
server on 127.0.0.1 must see no connection. Then ``patch_checks`` is graded once more with
the independent check switched off, to show that plain nbgrader is fooled by it.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import nbformat
import pytest
from harness import _diff, make_course, max_points, student_notebook, submit
from hostile import LESSON, hostile_submissions

from nfcourse.grade import Course, commands
from nfcourse.grade.execute import VERIFICATION_FILE
from nfcourse.grade.sandbox import isolation_problems

pytestmark = [pytest.mark.notebook, pytest.mark.xdist_group("hostile")]

# Short limits so the hostile cells hit them quickly (the real ones are in the config).
TEST_LIMITS = """
c.NfcourseGrade.lesson_timeouts = {"01_two_moons_realnvp": 25}
c.SandboxedKernelManager.memory_mb = 1536
c.GradingExecute.notebook_timeout = 600
"""


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Listener:
    """A TCP server on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.accepted += 1
                conn.close()
            except OSError:
                continue

    def close(self):
        self._stop = True
        self.thread.join()
        self.sock.close()


# Session scope: pytest may interleave this module's parametrized tests with other modules'
# on the same xdist worker, which would tear a module-scoped class down and grade it again.
@pytest.fixture(scope="session")
def graded(tmp_path_factory):
    if isolation_problems():
        pytest.fail("this machine cannot sandbox submissions: " + "; ".join(isolation_problems())
                    + " (.ci/run installs bubblewrap)")
    root = tmp_path_factory.mktemp("hostile-course")
    make_course(root, [LESSON])
    with open(root / "grading" / "nbgrader_config.py", "a") as handle:
        handle.write(TEST_LIMITS)
    course = Course(root)
    listener = Listener()
    class_ = hostile_submissions(course, port=listener.port)
    submit(course, LESSON, "solution", student_notebook(course, LESSON))
    for name, hostile in class_.items():
        submit(course, LESSON, name, hostile.notebook)
    solutions_before = _digest(root / "solutions")
    control_before = _digest(course.submitted_dir / "solution")
    started = time.monotonic()
    try:
        commands.autograde(course, LESSON)
    finally:
        listener.close()
    seconds = time.monotonic() - started
    scores = {s: {k: v.score for k, v in commands.scores(course, LESSON, s).items()}
              for s in course.students(LESSON)}
    return {"course": course, "class": class_, "scores": scores, "listener": listener,
            "solutions_before": solutions_before, "control_before": control_before,
            "seconds": seconds}


def test_control_gets_full_marks(graded):
    points = max_points(graded["course"], LESSON)
    assert graded["scores"]["solution"] == points, _diff(graded["scores"]["solution"], points)


HOSTILE_NAMES = ["infinite_loop", "memory_bomb", "fork_bomb", "output_flood", "os_exit",
                 "segfault", "read_instructor_files", "write_outside", "network", "patch_numpy",
                 "patch_torch", "patch_checks", "identity_layer", "tamper_tests",
                 "symlink_plant", "reference_import"]


def test_the_class_is_complete(graded):
    assert sorted(graded["class"]) == sorted(HOSTILE_NAMES)
    assert len(HOSTILE_NAMES) >= 15


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_loses_exactly_what_it_broke(graded, name):
    hostile = graded["class"][name]
    points = max_points(graded["course"], LESSON)
    expected = {k: (0.0 if k in hostile.loses else v) for k, v in points.items()}
    got = graded["scores"][name]
    assert got == expected, f"{name} ({hostile.what}):\n" + _diff(got, expected)


def _graded_notebook(course: Course, student: str):
    return nbformat.read(course.autograded_dir / student / LESSON / f"{LESSON}.ipynb",
                         as_version=4)


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") + out.get("ename", "") + out.get("evalue", "")
                         + json.dumps(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_nothing_outside_the_submissions_changed(graded):
    course = graded["course"]
    root = Path(course.root)
    assert _digest(root / "solutions") == graded["solutions_before"]
    assert _digest(course.submitted_dir / "solution") == graded["control_before"]
    assert not (root / "pwned.txt").exists()
    assert not (Path.home() / "pwned.txt").exists()
    # The course lives under /tmp here, so some writes land in the sandbox's private /tmp
    # and print WROTE; what matters is that none reached the real files.
    assert not (course.submitted_dir / "solution" / "x.txt").exists()
    assert not list(root.rglob("pwned.txt"))
    assert not course.db_path.read_bytes().endswith(b"pwned")


def test_instructor_files_are_invisible(graded):
    text = _outputs_text(_graded_notebook(graded["course"], "read_instructor_files"))
    assert "SEEN []" in text, text[-2000:]
    # the course root shows only the empty path down to the submission's own folder
    assert "LISTING ['grading']" in text, text[-2000:]


def test_no_connection_reached_the_grader(graded):
    assert graded["listener"].accepted == 0
    text = _outputs_text(_graded_notebook(graded["course"], "network"))
    assert "CONNECTED" not in text and "no connection to 127.0.0.1" in text, text[-2000:]


def test_gradebook_and_graded_files_are_intact(graded):
    course = graded["course"]
    assert set(graded["scores"]) == {"solution", *HOSTILE_NAMES}
    for student in graded["scores"]:
        folder = course.autograded_dir / student / LESSON
        notebook = folder / f"{LESSON}.ipynb"
        assert notebook.is_file() and not notebook.is_symlink()
        record = folder / VERIFICATION_FILE
        assert record.is_file() and not record.is_symlink()
        verdicts = json.loads(record.read_text())["verdicts"]
        assert len(verdicts) == 6
    assert course.db_path.is_file() and not course.db_path.is_symlink()


def test_flood_is_cut_and_crashes_are_explained(graded):
    course = graded["course"]
    size = (course.autograded_dir / "output_flood" / LESSON / f"{LESSON}.ipynb").stat().st_size
    assert size < 6_000_000, f"the flooded notebook kept {size} bytes of output"
    assert "output cut" in _outputs_text(_graded_notebook(course, "output_flood"))
    for name in ("os_exit", "segfault", "memory_bomb"):
        assert "KernelDied" in _outputs_text(_graded_notebook(course, name)), name


def test_feedback_names_the_independent_check(graded):
    course = graded["course"]
    paths = commands.feedback(course, LESSON)
    assert len(paths) == len(graded["scores"])
    html = (course.feedback_dir / "patch_checks" / LESSON / f"{LESSON}.html").read_text()
    assert "IndependentCheckFailed" in html and "log_det differs" in html


def test_plain_nbgrader_is_fooled_by_patched_checks(graded, tmp_path):
    """The same patched submission, graded without the independent check, gets full marks:
    what the check is for."""
    root = tmp_path / "course"
    make_course(root, [LESSON])
    with open(root / "grading" / "nbgrader_config.py", "a") as handle:
        handle.write(TEST_LIMITS + "c.GradingExecute.verify = False\n")
    course = Course(root)
    submit(course, LESSON, "patch_checks", graded["class"]["patch_checks"].notebook)
    commands.autograde(course, LESSON, "patch_checks")
    got = {k: v.score for k, v in commands.scores(course, LESSON, "patch_checks").items()}
    assert got == max_points(course, LESSON), _diff(got, max_points(course, LESSON))


def test_dynamic_code_is_listed_for_review(graded):
    course = graded["course"]
    assert commands.verification(course, LESSON, "solution")["review"] == []
    notes = commands.verification(course, LESSON, "segfault")["review"]
    assert any(note.endswith("imports ctypes") for note in notes), notes
