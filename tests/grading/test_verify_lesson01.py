"""Lesson 01's independent check on answers run in this process (no notebook, no kernel).

It must pass the solution, fail exactly the exercises each planted bug breaks (the same
ones the notebook's hidden tests fail, see test_lesson01.py), fail the cheats the hidden
tests can be fooled into passing, and turn a kernel that answers nonsense into a failed
verdict rather than a crash.
"""

from __future__ import annotations

import contextlib
import io
import re

import nbformat
import numpy as np
import pytest
from harness import REPO, strip_solution_markers
from hostile import IDENTITY_COUPLING
from test_lesson01 import BUGS

from nfcourse.grade.verify import LocalOracle, Oracle, OracleError, verifier_for

LESSON = "01_two_moons_realnvp"
SKIP = ("fig", "gif", "states", "history", "viz.", "checks.")

pytestmark = pytest.mark.xdist_group("verify01")


def _cells() -> list[tuple[str | None, str]]:
    nb = nbformat.read(REPO / "solutions" / LESSON / f"{LESSON}.ipynb", as_version=4)
    out = []
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type != "code" or meta.get("grade"):
            continue
        source = strip_solution_markers(cell.source)
        if source.lstrip().startswith(SKIP):
            continue  # pictures and self-checks: not needed to answer the queries
        out.append((meta.get("grade_id"), source))
    return out


def namespace(edits: dict[str, tuple[str, str]] | None = None,
              replace: dict[str, str] | None = None) -> dict:
    """Run the solution's cells (with ``edits[cell] = (old, new)`` or whole ``replace``d
    answers) in a fresh namespace, as the student's kernel would hold them."""
    ns: dict = {}
    for grade_id, source in _cells():
        if replace and grade_id in replace:
            source = replace[grade_id]
        if edits and grade_id in edits:
            old, new = edits[grade_id]
            assert old in source
            source = source.replace(old, new)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:  # like a kernel: a cell that fails leaves what it defined so far
                exec(compile(source, f"<{grade_id or 'cell'}>", "exec"), ns)  # noqa: S102
            except Exception:  # noqa: BLE001
                pass
    return ns


def failures(ns: dict, sources: list[str] | None = None) -> dict[str, str]:
    verifier = verifier_for(LESSON)
    verdicts = verifier.run(LocalOracle(ns), sources or [], np.random.default_rng(7))
    return {v.grade_id: v.message for v in verdicts if not v.passed}


@pytest.fixture(scope="module")
def solution_ns():
    return namespace()


def test_solution_passes_every_check(solution_ns):
    assert failures(solution_ns) == {}


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_planted_bug_fails_exactly_its_exercises(bug):
    ns = namespace(edits={bug.cell: (bug.old, bug.new)})
    assert set(failures(ns)) == set(bug.loses)


def test_identity_layer_is_caught():
    ns = namespace(replace={"coupling_answer": IDENTITY_COUPLING})
    failed = failures(ns)
    assert set(failed) == {"coupling_test_forward", "coupling_test_inverse", "train_test"}
    assert "identity" in failed["coupling_test_forward"]


def test_inflated_log_prob_is_caught(solution_ns):
    ns = dict(solution_ns)
    exec("class FlowDensity(FlowDensity):\n"  # noqa: S102
         "    def log_prob(self, x):\n        return super().log_prob(x) + 1.0\n", ns)
    assert set(failures(ns)) == {"density_test"}


def test_sampling_plain_noise_is_caught(solution_ns):
    ns = dict(solution_ns)
    exec("class FlowDensity(FlowDensity):\n"  # noqa: S102
         "    def sample(self, n):\n        return torch.randn(n, 2)\n", ns)
    assert set(failures(ns)) == {"density_test"}


def test_wrong_warm_up_is_caught():
    """p_z without the Jacobian factor (the hostile suite adds patched NumPy and checks)."""
    ns = namespace(edits={"warmup_answer": ("return p_x(x1, x2) / jacobian_det",
                                            "return p_x(x1, x2)")})
    assert set(failures(ns)) == {"warmup_test"}


def test_reference_in_a_student_cell_fails_everything(solution_ns):
    failed = failures(solution_ns, ["from nfcourse.flows import MaskedAffineCoupling\n"])
    assert len(failed) == 6 and all("nfcourse.flows" in m for m in failed.values())


def test_a_lying_or_silent_kernel_fails_cleanly():
    def silent(code, timeout):
        return ""

    def garbage(code, timeout):
        marker = re.search(r"@@nfv-[0-9a-f]+@@", code)
        return (marker.group() + "{not json\n") if marker else "noise\n"

    verifier = verifier_for(LESSON)
    for execute in (silent, garbage):
        verdicts = verifier.run(Oracle(execute), [], np.random.default_rng(0))
        assert [v.passed for v in verdicts] == [False] * 6
        assert all(v.message for v in verdicts)
    with pytest.raises(OracleError, match="no answer"):
        Oracle(silent).query("out['x'] = 1")
