"""Every correct answer, written any way, gets full marks: the alternatives of
``tests/grading/alternatives/lessonNN.py``, each graded twice.

* ``test_alternative_in_process[LESSON:NAME]``: the notebook's cells with the alternative's
  answers run in this process, then every test cell (its hidden tests included) must pass,
  and so must every verdict of the lesson's independent check (:class:`LocalOracle`, seeded
  from the submission as grading is);
* ``test_alternatives_autograded[LESSON]``: all of a lesson's alternatives handed in as one
  class and graded by one real, sandboxed ``autograde``: each gets full marks.

Lessons are found from the data modules, so a lesson's alternatives need only its module.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from alternatives import hidden_test_failures, in_process_cells, lesson_modules, notebook
from harness import _diff, _reasons, make_course, max_points, run_cells, submit

from nfcourse.grade import commands
from nfcourse.grade.verify import LocalOracle, verifier_for
from nfcourse.grade.verify.base import submission_seed

MODULES = lesson_modules()
CASES = [pytest.param(m, alt, id=f"{m.LESSON[:2]}:{alt.name}",
                      marks=pytest.mark.xdist_group(f"alternatives-inproc-{m.LESSON[:2]}"))
         for m in MODULES for alt in m.ALTERNATIVES]


def test_every_lesson_module_has_six_distinct_alternatives():
    assert MODULES, "no alternatives/lessonNN.py modules found"
    for module in MODULES:
        names = [a.name for a in module.ALTERNATIVES]
        assert len(names) >= 6, f"{module.LESSON}: only {len(names)} alternatives"
        assert len(set(names)) == len(names), f"{module.LESSON}: alternative names repeat"
        sources = [tuple(sorted(a.answers.items())) for a in module.ALTERNATIVES]
        assert len(set(sources)) == len(sources), f"{module.LESSON}: two alternatives are equal"


@pytest.mark.parametrize("module,alternative", CASES)
def test_alternative_in_process(module, alternative):
    started = time.monotonic()
    cells = in_process_cells(module, alternative)
    ns = run_cells({}, cells)
    failed = hidden_test_failures(ns, module.LESSON)
    assert not failed, (f"{alternative.name} ({alternative.style}) fails hidden tests:\n"
                        + "\n".join(f"  {k}: {v}" for k, v in failed.items()))
    sources = [source for grade_id, source in cells]
    verifier = verifier_for(module.LESSON)
    rng = np.random.default_rng(submission_seed(module.LESSON, sources))
    verdicts = verifier.run(LocalOracle(ns), sources, rng)
    wrong = {v.grade_id: v.message for v in verdicts if not v.passed}
    assert not wrong, (f"{alternative.name} ({alternative.style}) fails the independent "
                       "check:\n" + "\n".join(f"  {k}: {v}" for k, v in wrong.items()))
    print(f"{module.LESSON} {alternative.name}: {time.monotonic() - started:.1f} s in process")


@pytest.mark.notebook
@pytest.mark.parametrize("module", [
    pytest.param(m, id=m.LESSON[:2], marks=pytest.mark.xdist_group(f"alternatives-{m.LESSON[:2]}"))
    for m in MODULES])
def test_alternatives_autograded(module, tmp_path):
    lesson = module.LESSON
    course = make_course(tmp_path / "course", [lesson])
    # a lesson whose class of all alternatives grades too slowly for CI names the ones
    # graded for real in AUTOGRADED (all of them are graded in process above)
    chosen = set(getattr(module, "AUTOGRADED", [a.name for a in module.ALTERNATIVES]))
    students = {f"alt-{a.name.replace('_', '-')}": a for a in module.ALTERNATIVES
                if a.name in chosen}
    assert len(students) == len(chosen), f"{lesson}: AUTOGRADED names unknown alternatives"
    for student, alternative in students.items():
        submit(course, lesson, student, notebook(course, lesson, alternative))
    started = time.monotonic()
    commands.autograde(course, lesson)
    seconds = time.monotonic() - started
    points = max_points(course, lesson)
    report = []
    for student, alternative in students.items():
        got = {k: v.score for k, v in commands.scores(course, lesson, student).items()}
        if got != points:
            report.append(f"{alternative.name} ({alternative.style}):\n"
                          + _diff(got, points, _reasons(course, lesson, student)))
    print(f"{lesson}: {len(students)} alternatives autograded in {seconds:.1f} s "
          f"({seconds / len(students):.1f} s each)")
    assert not report, "alternatives that lost points:\n" + "\n".join(report)
