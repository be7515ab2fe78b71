"""Lesson 02's independent check on answers run in this process (no notebook, no kernel).

It must pass the solution, fail exactly the exercises each planted bug breaks (the same
ones the notebook's hidden tests fail, see test_lesson02.py), fail the cheats the hidden
tests can be fooled into passing, and turn a kernel that answers nonsense into a failed
verdict rather than a crash. One end-to-end test grades a wrong answer that patches the
package's checks and the comparisons of NumPy and torch.
"""

from __future__ import annotations

import json

import nbformat
import numpy as np
import pytest
from harness import (
    REPO,
    _meta,
    autograde,
    make_course,
    max_points,
    run_cells,
    strip_solution_markers,
    student_notebook,
    submit,
)
from hostile import patch_everything
from test_lesson02 import BUGS

from nfcourse.grade import commands
from nfcourse.grade.execute import VERIFICATION_FILE
from nfcourse.grade.verify import LocalOracle, verifier_for

LESSON = "02_dequantization"
ALL = {"dequantization_test", "dequantization_test_log_det", "bits_per_dim_test",
       "importance_bpd_test", "vardeq_test", "vardeq_test_train"}

pytestmark = pytest.mark.xdist_group("verify02")


def _notebook():
    return nbformat.read(REPO / "solutions" / LESSON / f"{LESSON}.ipynb", as_version=4)


def _cells() -> list[tuple[str | None, str]]:
    """The setup cell (imports) and the answer cells: all the queries need. Pictures, the
    MNIST training and the self-checks are left out."""
    out = []
    for cell in _notebook().cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type != "code" or meta.get("grade"):
            continue
        if meta.get("solution") or cell.source.lstrip().startswith("import"):
            out.append((meta.get("grade_id"), strip_solution_markers(cell.source)))
    return out


CELLS = _cells()


def edited(base: dict, cell: str, old: str, new: str, count: int = 1) -> dict:
    """A copy of ``base`` with answer ``cell`` edited and it and the cells after it re-run."""
    ids = [grade_id for grade_id, _ in CELLS]
    start = ids.index(cell)
    cells = list(CELLS[start:])
    source = cells[0][1]
    assert source.count(old) == count, f"{old!r} is not in {cell}"
    cells[0] = (cell, source.replace(old, new))
    return run_cells(dict(base), cells)


def replaced(base: dict, cell: str, source: str) -> dict:
    """A copy of ``base`` with answer ``cell`` replaced and the cells after it re-run."""
    ids = [grade_id for grade_id, _ in CELLS]
    start = ids.index(cell)
    return run_cells(dict(base), [(cell, source), *CELLS[start + 1:]])


def failures(ns: dict, sources: list[str] | None = None, seed: int = 7) -> dict[str, str]:
    verifier = verifier_for(LESSON)
    verdicts = verifier.run(LocalOracle(ns), sources or [], np.random.default_rng(seed))
    return {v.grade_id: v.message for v in verdicts if not v.passed}


@pytest.fixture(scope="module")
def solution_ns():
    return run_cells({}, CELLS)


def test_the_checks_cover_every_graded_cell():
    graded = {c.metadata["nbgrader"]["grade_id"] for c in _notebook().cells
              if c.metadata.get("nbgrader", {}).get("grade")}
    assert graded == ALL == set(verifier_for(LESSON).checks)


@pytest.mark.parametrize("seed", [7, 8])
def test_solution_passes_every_check(solution_ns, seed):
    assert failures(solution_ns, seed=seed) == {}


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_planted_bug_fails_exactly_its_exercises(solution_ns, bug):
    ns = edited(solution_ns, bug.cell, bug.old, bug.new, bug.count)
    assert set(failures(ns)) == set(bug.loses)


def test_log_det_off_by_a_constant_is_caught(solution_ns):
    ns = edited(solution_ns, "dequantization_answer", "return z, log_det.flatten(1).sum(1)",
                "return z, log_det.flatten(1).sum(1) + 1.0")
    failed = failures(ns)
    assert set(failed) == {"dequantization_test_log_det", "vardeq_test", "vardeq_test_train"}
    assert "log_det" in failed["dequantization_test_log_det"]


@pytest.mark.parametrize("seed", [7, 8])
def test_log_det_of_one_channel_is_caught_every_time(solution_ns, seed):
    """The log-det summed over the first channel only: right for one-channel images, so
    the check must always send several channels (not only when a random draw does)."""
    from alternatives import hidden_test_failures

    ns = edited(solution_ns, "dequantization_answer", "return z, log_det.flatten(1).sum(1)",
                "return z, log_det[:, :1].flatten(1).sum(1)")
    failed = failures(ns, seed=seed)
    assert set(failed) == {"dequantization_test_log_det", "vardeq_test"}, failed
    assert "log_det" in failed["dequantization_test_log_det"]
    hidden = set(hidden_test_failures(ns, LESSON))
    assert hidden <= set(failed), hidden


def test_hard_coded_eight_bits_is_caught(solution_ns):
    """Passes the visible test (a uniform model gives 8) and nothing else."""
    ns = replaced(solution_ns, "bits_per_dim_answer",
                  "def bits_per_dim(log_prob, x):\n    return torch.full_like(log_prob, 8.0)\n")
    assert set(failures(ns)) == {"bits_per_dim_test"}


def test_one_sample_importance_bound_is_caught(solution_ns):
    """Ignores k and calls log_prob once: the visible test (equal weights) passes."""
    ns = replaced(solution_ns, "importance_bpd_answer",
                  "def importance_bpd(log_prob, x, k=8):\n"
                  "    return -log_prob(x) / (x[0].numel() * math.log(2))\n")
    failed = failures(ns)
    assert set(failed) == {"importance_bpd_test"}
    assert "called" in failed["importance_bpd_test"]


def test_variational_layer_with_uniform_noise_is_caught(solution_ns):
    """Ignores its noise flow: the visible test (shapes, round trip) passes."""
    ns = replaced(solution_ns, "vardeq_answer",
                  "class VariationalDequantization(Dequantization):\n"
                  "    def __init__(self, noise_flow, levels=256, alpha=1e-5):\n"
                  "        super().__init__(levels, alpha)\n"
                  "        self.noise_flow = noise_flow\n")
    failed = failures(ns)
    assert set(failed) == {"vardeq_test", "vardeq_test_train"}
    assert "noise flow" in failed["vardeq_test"]


def test_naming_the_reference_costs_nothing(solution_ns):
    """Importing the package's layers by name, subclassing them in a cell the checks do not
    use, or calling model.bits_per_dim used to zero every cell of the notebook; only the
    numbers the answers compute are graded now."""
    sources = ["from nfcourse.flows import Flow, Dequantization\n",
               "from nfcourse.flows import (\n    Flow,\n    VariationalDequantization,\n)\n",
               "from nfcourse import flows\nclass D(flows.Dequantization):\n    pass\n",
               "bpd = model.bits_per_dim(x)\n"]
    assert failures(solution_ns, sources) == {}


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def patched_submission(tmp_path_factory):
    """The log-det without -log(levels), graded with the package's checks, np.allclose and
    torch.allclose patched so that every hidden test passes (``require`` hands the report
    back, as the real one does)."""
    bug = next(b for b in BUGS if b.name == "logdet_missing_levels")
    course = make_course(tmp_path_factory.mktemp("course-verify02"), [LESSON])
    nb = student_notebook(course, LESSON, bug=bug)
    at = next(i for i, c in enumerate(nb.cells) if _meta(c).get("grade_id") == bug.cell)
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(patch_everything(LESSON)))
    submit(course, LESSON, "patcher", nb)
    scores = autograde(course, LESSON, "patcher")
    folder = course.autograded_dir / "patcher" / LESSON
    return {"bug": bug, "course": course, "scores": scores, "folder": folder,
            "points": max_points(course, LESSON)}


@pytest.mark.notebook
def test_patched_checks_do_not_hide_a_wrong_log_det(patched_submission):
    """The independent check fails the three exercises the bug breaks and says why, in the
    graded notebook, its record and the feedback; the hidden tests themselves were fooled."""
    bug, folder = patched_submission["bug"], patched_submission["folder"]
    record = json.loads((folder / VERIFICATION_FILE).read_text())
    verdicts = {v["grade_id"]: v for v in record["verdicts"]}
    assert {g for g, v in verdicts.items() if not v["passed"]} == set(bug.loses)
    assert "log(levels)" in verdicts["dequantization_test_log_det"]["message"]
    assert "log(levels)" in verdicts["vardeq_test"]["message"]
    assert "not be above" in verdicts["vardeq_test_train"]["message"]

    graded = nbformat.read(folder / f"{LESSON}.ipynb", as_version=4)
    for cell in graded.cells:
        if _meta(cell).get("grade_id") in bug.loses:  # only the independent check failed them
            errors = [o.get("ename") for o in cell.outputs if o.get("output_type") == "error"]
            assert errors == ["IndependentCheckFailed"], (_meta(cell)["grade_id"], errors)
    html = commands.feedback(patched_submission["course"], LESSON, "patcher")[0].read_text()
    assert "IndependentCheckFailed" in html and "log(levels)" in html

    # vardeq_test_train ends in a bare expression (checks.require(...)): nbgrader scores a
    # cell by its first error or execute_result, so the check's error must come first
    scores, points = patched_submission["scores"], patched_submission["points"]
    assert scores == {k: (0.0 if k in bug.loses else v) for k, v in points.items()}
