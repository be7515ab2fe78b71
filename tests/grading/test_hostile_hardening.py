"""Tampered and malformed submissions graded as one class: no one stops anyone else.

The class is an honest control (``alice``, the solution) and every submission of
``hardening_attacks.py`` (plus ``hardening_caps.caps_attacks`` when that module exists),
each as its own student, graded with one ``commands.autograde`` call. Nothing may stop
the run; every submission that can be graded is, and scores what its honest work deserves;
the ones that cannot are failed alone, with a clear reason, and show as "graded 0 / needs
a look" in ``status`` and the CSV; the command line prints everyone and exits with 2.
"""

from __future__ import annotations

import csv
import re
import resource
import time

import pytest
from hardening_attacks import CONTROL, LESSON, hand_in, hardening_attacks
from harness import _diff, make_course, max_points, student_notebook

from nfcourse.grade import Course, commands
from nfcourse.grade.cli import main as grade_main
from nfcourse.grade.failures import FAILURE_FILE
from nfcourse.grade.sandbox import isolation_problems

pytestmark = [pytest.mark.notebook, pytest.mark.xdist_group("hardening")]

# Short limits so that a hostile cell hits them quickly (the real ones are in the config).
TEST_LIMITS = """
c.NfcourseGrade.lesson_timeouts = {"01_two_moons_realnvp": 25}
c.SandboxedKernelManager.memory_mb = 1536
c.GradingExecute.notebook_timeout = 600
"""


def _caps_attacks(course: Course, port: int) -> dict:
    """The resource-cap attacks of ``hardening_caps.py`` (another part of issue 16), when
    that module is there; ``{}`` otherwise."""
    try:
        from hardening_caps import caps_attacks
    except ImportError:
        return {}
    return caps_attacks(course, port)


# Session scope: pytest may interleave this module's parametrized tests with other modules'
# on the same xdist worker, which would tear a module-scoped class down and grade it again.
@pytest.fixture(scope="session")
def graded(tmp_path_factory):
    """Grade the class once. Returns ``course``, ``attacks`` (``{student: Attack}``, the
    control excluded), ``students`` (everyone handed in), ``result`` (the
    :class:`AutogradeResult`), ``scores`` (``{student: {grade_id: score}}``), ``points``,
    ``seconds``, ``peak_mb`` (the grading workers' own peak resident memory) and
    ``children_peak_mb`` (this process's reaped children, ``RUSAGE_CHILDREN``), ``listener``
    (a TCP server on 127.0.0.1 that the caps attacks may try to reach)."""
    from test_hostile import Listener

    if isolation_problems():
        pytest.fail("this machine cannot sandbox submissions: " + "; ".join(isolation_problems())
                    + " (.ci/run installs bubblewrap)")
    root = tmp_path_factory.mktemp("hardening-course")
    make_course(root, [LESSON])
    with open(root / "grading" / "nbgrader_config.py", "a") as handle:
        handle.write(TEST_LIMITS)
    course = Course(root)
    listener = Listener()
    attacks = hardening_attacks(course)
    extra = _caps_attacks(course, listener.port)
    clash = set(extra) & (set(attacks) | {CONTROL})
    assert not clash, f"hardening_caps reuses the names {sorted(clash)}"
    attacks.update(extra)
    hand_in(course, CONTROL, student_notebook(course, LESSON))
    for name, attack in attacks.items():
        hand_in(course, name, attack.notebook)
    started = time.monotonic()
    try:
        result = commands.autograde(course, LESSON)
    finally:
        listener.close()
    seconds = time.monotonic() - started
    scores = {}
    for student in course.students(LESSON):
        try:
            scores[student] = {k: v.score for k, v in commands.scores(course, LESSON,
                                                                     student).items()}
        except Exception:  # noqa: BLE001  (no gradebook entry: reported by the tests)
            scores[student] = None
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\nhardening class: {len(scores)} submissions in {seconds:.0f} s, "
          f"{len(result.failed)} failed; grading workers' peak {result.peak_mb:.0f} MB")
    return {"course": course, "attacks": attacks, "students": {CONTROL, *attacks},
            "result": result, "scores": scores, "points": max_points(course, LESSON),
            "seconds": seconds, "peak_mb": result.peak_mb, "children_peak_mb": children,
            "listener": listener}


def test_every_student_is_graded_or_failed_with_a_reason(graded):
    result = graded["result"]
    assert set(result.graded) | set(result.failed) == graded["students"]
    assert not set(result.graded) & set(result.failed)
    must_fail = {n for n, a in graded["attacks"].items() if a.fails is not None}
    assert set(result.failed) == must_fail, result.failed


def test_control_gets_full_marks(graded):
    got = graded["scores"][CONTROL]
    assert got == graded["points"], _diff(got or {}, graded["points"])
    assert CONTROL in graded["result"].graded


GRADED_NAMES = ["stub_skip_tags", "flipped_flags", "fake_grade_cells"]
FAILED_NAMES = ["schema_v4", "bad_json", "bad_utf8", "nbformat3", "alic?"]


def test_the_class_is_complete(graded):
    ours = {n for n in graded["attacks"] if n in GRADED_NAMES + FAILED_NAMES}
    assert ours == set(GRADED_NAMES + FAILED_NAMES)


@pytest.mark.parametrize("name", GRADED_NAMES)
def test_tampered_submission_scores_its_honest_work(graded, name):
    attack = graded["attacks"][name]
    expected = attack.expected(graded["points"])
    got = graded["scores"][name]
    assert got == expected, f"{name} ({attack.what}):\n" + _diff(got or {}, expected)


@pytest.mark.parametrize("name", FAILED_NAMES)
def test_malformed_submission_fails_alone_with_a_clear_reason(graded, name):
    attack = graded["attacks"][name]
    reason = graded["result"].failed.get(name)
    assert reason is not None, f"{name} ({attack.what}) was not failed"
    assert re.search(attack.fails, reason), f"{name}: {reason!r} does not say {attack.fails!r}"
    assert "Traceback" not in reason and "\n" not in reason, reason
    assert commands.failure(graded["course"], LESSON, name) == reason


def test_caps_attacks_score_what_they_deserve(graded):
    """Whatever ``hardening_caps`` added: the same rule (nothing to check without it)."""
    ours = set(GRADED_NAMES) | set(FAILED_NAMES)
    for name, attack in graded["attacks"].items():
        if name in ours:
            continue
        if attack.fails is not None:
            assert re.search(attack.fails, graded["result"].failed.get(name, "")), name
        else:
            expected = attack.expected(graded["points"])
            assert graded["scores"][name] == expected, f"{name} ({attack.what}):\n" + _diff(
                graded["scores"][name] or {}, expected)


def test_failed_students_show_as_needs_a_look(graded, tmp_path, capsys):
    course = graded["course"]
    failed = graded["result"].failed
    rows = {row.lesson: row for row in commands.status(course)}
    row = rows[LESSON]
    assert row.failed == failed
    assert not set(row.autograded) & set(failed)
    assert set(row.autograded) == set(graded["result"].graded)
    for name in failed:
        # the gradebook says 0 for them (nbgrader's own tools then show 0 as well)
        assert graded["scores"][name] == {k: 0.0 for k in graded["points"]}, name
        assert (course.autograded_dir / name / LESSON / FAILURE_FILE).is_file()

    assert grade_main(["--course-root", str(course.root), "status"]) == 0
    out = capsys.readouterr().out
    for name in failed:
        assert re.search(rf"{re.escape(name)}\s+graded 0 / \d+, needs a look: ", out), out

    table = tmp_path / "grades.csv"
    assert grade_main(["--course-root", str(course.root), "export", "--csv", str(table)]) == 0
    csv_rows = {r["student_id"]: r for r in csv.DictReader(table.open())
                if r["assignment"] == LESSON}
    for name, reason in failed.items():
        assert csv_rows[name]["status"] == "needs a look" and csv_rows[name]["reason"] == reason
        assert float(csv_rows[name]["score"]) == 0
    assert csv_rows[CONTROL]["status"] == "graded"
    assert float(csv_rows[CONTROL]["score"]) == sum(graded["points"].values())


def test_command_line_prints_everyone_and_exits_2(graded, capsys):
    """Without --force the graded submissions are kept (nbgrader skips them) and the
    malformed ones fail again: every score is printed, then one line per failure."""
    course = graded["course"]
    rc = grade_main(["--course-root", str(course.root), "autograde", LESSON])
    captured = capsys.readouterr()
    assert rc == 2, captured.out + captured.err
    full = sum(graded["points"].values())
    assert f"{CONTROL}: {full:g} / {full:g}" in captured.out, captured.out
    for name in graded["result"].graded:
        assert re.search(rf"^{re.escape(name)}: [\d.]+ / {full:g}$", captured.out, re.M), name
    for name, reason in graded["result"].failed.items():
        assert f"{name}: NOT GRADED (graded 0, needs a look): {reason}" in captured.out
    assert f"{len(graded['result'].failed)} of " in captured.err
    # the control's result was kept, not regraded into something else
    got = {k: v.score for k, v in commands.scores(course, LESSON, CONTROL).items()}
    assert got == graded["points"]


def test_grading_overhead_is_reported(graded):
    """Numbers for the report: the workers' peak memory stays far below their cap."""
    cap = commands._worker_memory_mb(graded["course"])
    assert 0 < graded["peak_mb"] < cap


def test_many_workers_isolate_failures_too(tmp_path, postgres_db):
    """The same rule with two workers into PostgreSQL: the malformed ones fail alone, the
    stub beside them is graded (zero everywhere), and nothing is skipped."""
    root = tmp_path / "course"
    make_course(root, [LESSON])
    with open(root / "grading" / "nbgrader_config.py", "a") as handle:
        handle.write(TEST_LIMITS)
    course = Course(root, db_url=postgres_db)
    attacks = hardening_attacks(course)
    for name in ("bad_json", "nbformat3", "alic?"):
        hand_in(course, name, attacks[name].notebook)
    hand_in(course, "alice", student_notebook(course, LESSON, answered=False))
    result = commands.autograde(course, LESSON, workers=2)
    assert result.graded == ["alice"]
    assert sorted(result.failed) == ["alic?", "bad_json", "nbformat3"]
    for name, reason in result.failed.items():
        assert re.search(attacks[name].fails, reason), (name, reason)
    got = {k: v.score for k, v in commands.scores(course, LESSON, "alice").items()}
    assert got == {k: 0.0 for k in max_points(course, LESSON)}
    assert {r.lesson: r for r in commands.status(course)}[LESSON].failed == result.failed
