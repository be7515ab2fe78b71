"""Lesson 01's independent check on answers run in this process (no notebook, no kernel).

It must pass the solution, fail exactly the exercises each planted bug breaks (the same
ones the notebook's hidden tests fail, see test_lesson01.py), fail the cheats the hidden
tests can be fooled into passing, and turn a kernel that answers nonsense into a failed
verdict rather than a crash.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import Cell, changed, run_cells, solution_cells
from hostile import IDENTITY_COUPLING
from test_lesson01 import BUGS

from nfcourse.grade.verify import LocalOracle, verifier_for

LESSON = "01_two_moons_realnvp"
SKIP = ("fig", "gif", "states", "history", "viz.", "checks.")

pytestmark = pytest.mark.xdist_group("verify01")


def _cells() -> list[Cell]:
    # pictures and self-checks: not needed to answer the queries
    return solution_cells(LESSON, skip_prefixes=SKIP)


def namespace(edits: dict[str, tuple[str, str]] | None = None,
              replace: dict[str, str] | None = None) -> dict:
    """Run the solution's cells (with ``edits[cell] = (old, new)`` or whole ``replace``d
    answers) in a fresh namespace, as the student's kernel would hold them."""
    return run_cells({}, changed(_cells(), edits, replace))


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


# What the issue measured: a correct answer that names the reference in a docstring, imports
# it after the exercise to compare with it (lesson 06 invites that), or looks names up by a
# computed string used to score 0 on every cell. How the student looked classes up is not
# graded: only the numbers are (the grading kernel holds no reference to run).
MENTIONS = [
    'class Note:\n    """My coupling does not use `nfcourse.flows.MaskedAffineCoupling`."""\n',
    "from nfcourse.flows import realnvp_2d as reference  # to compare, after the exercise\n",
    "import nfcourse.flows as lib\nFM = getattr(lib, 'Flow' 'Model')\n",
    "x = !true\n",
]


def test_naming_the_reference_costs_nothing(solution_ns):
    assert failures(solution_ns, MENTIONS) == {}
    # only the shell escape is listed for the instructor; nothing of it is scored
    assert verifier_for(LESSON).review(MENTIONS) == ["cell 4, line 1: runs a shell command"]


OBFUSCATED_REFERENCE = (
    "_m = __import__('nfcourse.fl' + 'ows', fromlist=['_'])\n"
    "class MaskedAffineCoupling(getattr(_m, 'MaskedAffine' + 'Coupling')):\n"
    "    def __init__(self, mask, hidden=16):\n"
    "        super().__init__(mask, hidden=hidden)\n"
)


def test_dynamic_lookups_are_listed_for_review():
    """Reaching code by a computed name is listed for the instructor to read (in the grading
    kernel the reference is absent, so it cannot score: see the edition's tests)."""
    assert verifier_for(LESSON).review([OBFUSCATED_REFERENCE]) == [
        "cell 1, line 1: calls __import__", "cell 1, line 2: calls getattr with a computed name"]


def test_review_notes_list_dynamic_code_in_order():
    from nfcourse.grade.verify import review_notes

    cells = ["%matplotlib inline\nimport numpy as np\nx = np.ones(3)\n",
             "import importlib\nimport sys\nf = eval('1')\nsys.modules['a'] = None\n",
             "_nfv_seen.clear()\n", "def broken(:\n",
             "C = getattr(flows, 'Affine' + 'Coupling')\nd = getattr(flows, 'Flow')\n",
             # a shell escape made a whole cell unreadable to a plain parser (SyntaxError,
             # so it was skipped): read as IPython reads it, its other lines are seen too
             "x = !true\nm = __import__('nfcourse.fl' + 'ows')\n",
             "%run helper.py\n", "%%bash\necho hi\n"]
    assert review_notes(cells) == [
        "cell 2, line 1: imports importlib", "cell 2, line 3: calls eval",
        "cell 2, line 4: uses .modules", "cell 3, line 1: names the grader's _nfv_seen",
        "cell 4, line 1: cannot be parsed (invalid syntax): read the whole cell",
        "cell 5, line 1: calls getattr with a computed name",
        "cell 6, line 1: runs a shell command", "cell 6, line 2: calls __import__",
        "cell 7, line 1: runs the magic %run", "cell 8, line 1: runs the magic %bash"]
    innocent = [s for s in cells if not any(w in s for w in ("importlib", "_nfv", "+", "(:",
                                                              "%run", "%%bash"))]
    assert review_notes(innocent + ["d = getattr(flows, 'Flow')\n",
                                    "n = sum(1 for m in model.modules())\n",
                                    "%time y = 1\n"]) == []
