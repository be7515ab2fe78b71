"""The independent check's seed comes from the submission: grading the same notebook twice
draws the same inputs (same verdicts), a changed answer draws new ones.

Unit level: :meth:`GradingExecute._verify` with no kernel (every verdict then fails, but the
seed is chosen and recorded all the same), no notebook run.
"""

from __future__ import annotations

import json

import pytest
from harness import REPO

from nfcourse.grade.execute import VERIFICATION_FILE, GradingExecute
from nfcourse.grade.verify.base import submission_seed

LESSON = "01_two_moons_realnvp"


def _recorded_seed(nb, folder) -> int:
    grader = GradingExecute()
    grader.nb = nb
    resources = {"nbgrader": {"assignment": LESSON}, "metadata": {"path": str(folder)}}
    verdicts = grader._verify(resources, kernel=False)
    assert verdicts is not None and len(verdicts) == 6
    return json.loads((folder / VERIFICATION_FILE).read_text())["seed"]


@pytest.fixture
def solution():
    import nbformat

    return nbformat.read(REPO / "solutions" / LESSON / f"{LESSON}.ipynb", as_version=4)


def _answer(nb, grade_id: str):
    return next(c for c in nb.cells
                if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id)


def test_same_notebook_same_seed_changed_answer_new_seed(solution, tmp_path):
    import copy

    first = _recorded_seed(solution, tmp_path)
    assert _recorded_seed(copy.deepcopy(solution), tmp_path) == first
    changed = copy.deepcopy(solution)
    _answer(changed, "coupling_answer").source += "\n# a comment changes the submission\n"
    assert _recorded_seed(changed, tmp_path) != first
    # the test cells are the instructor's (restored before grading): they do not count
    tests = copy.deepcopy(solution)
    _answer(tests, "train_test").source += "\n# edited test\n"
    assert _recorded_seed(tests, tmp_path) == first
    assert 0 <= first < 2**63


def test_seed_depends_on_lesson_order_and_cell_boundaries():
    base = submission_seed("01_x", ["a = 1", "b = 2"])
    assert submission_seed("01_x", ["a = 1", "b = 2"]) == base
    assert submission_seed("02_x", ["a = 1", "b = 2"]) != base
    assert submission_seed("01_x", ["b = 2", "a = 1"]) != base
    assert submission_seed("01_x", ["a = 1b = 2"]) != base
    assert submission_seed("01_x", ["a = 1", "", "b = 2"]) != base
