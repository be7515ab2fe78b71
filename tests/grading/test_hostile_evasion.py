"""Reference-evasion submissions of lesson 01 score exactly their honest work.

One class, graded with one ``commands.autograde`` call (two workers into a throwaway
PostgreSQL gradebook when the machine has PostgreSQL, else one into SQLite): the solution
(the control, full marks), ``honest_stub`` (only the warm-up answered: the honest work every
trick keeps, 2 of 15), every trick of ``evasion.py`` (the same 2), and the honest answers
that name, compare with or compute names near the reference (full marks).
"""

from __future__ import annotations

import time

import pytest
from evasion import HONEST_WORK_LOSES, evasion_submissions
from harness import _diff, _reasons, make_course, max_points, student_notebook, submit
from hostile import LESSON

from nfcourse.grade import Course, commands
from nfcourse.grade.sandbox import isolation_problems

pytestmark = [pytest.mark.notebook, pytest.mark.xdist_group("evasion")]

# The training cell of a full-marks submission takes ~10 s alone; two workers share 2 cores.
TEST_LIMITS = """
c.NfcourseGrade.lesson_timeouts = {"01_two_moons_realnvp": 90}
c.GradingExecute.notebook_timeout = 600
"""

NAMES = ["honest_stub", "thread", "pause_tracer", "clear_record", "patch_json", "swap_hooks",
         "input_transformer", "copy_package", "computed_names", "detect_check",
         "read_source", "pyc", "third_party", "third_party_files", "pip", "grader_package",
         "live_objects", "module_dict", "path_search", "pickled",
         "honest_docstring_and_computed_name", "honest_compare_after"]


def _gradebook(request, root) -> tuple[Course, int]:
    """A PostgreSQL gradebook and 2 workers where PostgreSQL runs here, else SQLite and 1."""
    try:
        url = request.getfixturevalue("postgres_url")
    except pytest.skip.Exception:
        return Course(root), 1
    from postgres_server import create_database

    return Course(root, db_url=create_database(url, "evasion")), 2


# Session scope, like test_hostile.py: the class is graded once per xdist worker.
@pytest.fixture(scope="session")
def graded(tmp_path_factory, request):
    if isolation_problems():
        pytest.fail("this machine cannot sandbox submissions: " + "; ".join(isolation_problems())
                    + " (.ci/run installs bubblewrap)")
    root = tmp_path_factory.mktemp("evasion-course")
    make_course(root, [LESSON])
    with open(root / "grading" / "nbgrader_config.py", "a") as handle:
        handle.write(TEST_LIMITS)
    course, workers = _gradebook(request, root)
    class_ = evasion_submissions(course)
    submit(course, LESSON, "solution", student_notebook(course, LESSON))
    for name, submission in class_.items():
        submit(course, LESSON, name, submission.notebook)
    started = time.monotonic()
    commands.autograde(course, LESSON, workers=workers)
    seconds = time.monotonic() - started
    scores = {s: {k: v.score for k, v in commands.scores(course, LESSON, s).items()}
              for s in course.students(LESSON)}
    print(f"\nevasion class: {len(scores)} submissions, {workers} worker(s), {seconds:.0f} s")
    for name in sorted(scores):
        print(f"    {name:40s} {sum(scores[name].values()):g}")
    return {"course": course, "class": class_, "scores": scores, "seconds": seconds}


def test_control_gets_full_marks(graded):
    points = max_points(graded["course"], LESSON)
    got = graded["scores"]["solution"]
    assert got == points, _diff(got, points, _reasons(graded["course"], LESSON, "solution"))


def test_the_class_is_complete(graded):
    assert sorted(graded["class"]) == sorted(NAMES)
    tricks = [n for n, h in graded["class"].items() if h.loses == HONEST_WORK_LOSES]
    assert len(tricks) >= 1 + 9 + 10  # the baseline, the nine of issue 15, ten more


def test_honest_work_is_the_warm_up(graded):
    """What a trick's submission deserves, measured: the warm-up's 2 points of 15."""
    points = max_points(graded["course"], LESSON)
    assert points["warmup_test"] == 2 and sum(points.values()) == 15
    got = graded["scores"]["honest_stub"]
    assert sum(got.values()) == 2, _diff(got, {**{k: 0.0 for k in points}, "warmup_test": 2.0})


@pytest.mark.parametrize("name", NAMES)
def test_scores_exactly_its_honest_work(graded, name):
    submission = graded["class"][name]
    points = max_points(graded["course"], LESSON)
    expected = {k: (0.0 if k in submission.loses else v) for k, v in points.items()}
    got = graded["scores"][name]
    assert got == expected, f"{name} ({submission.what}):\n" + _diff(
        got, expected, _reasons(graded["course"], LESSON, name))
