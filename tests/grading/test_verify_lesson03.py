"""Lesson 03's independent check on answers run in this process (no notebook, no kernel),
and once end to end on a graded submission that patches the hidden tests' helpers.

It must pass the solution, fail exactly the exercises each planted bug breaks (see
test_lesson03.py), fail cheats the hidden tests can be fooled into passing, and turn a
kernel that answers nonsense into a failed verdict rather than a crash.

Building a namespace runs the lesson's cells, training included (about 5 s in fast mode):
the solution's is built once per module, and a bug re-runs only its own cell and the cells
after it, on a copy.
"""

from __future__ import annotations

import copy
import json

import nbformat
import numpy as np
import pytest
from harness import (
    Bug,
    Cell,
    autograde,
    changed,
    make_course,
    max_points,
    run_cells,
    solution_cells,
    student_notebook,
    submit,
)
from hostile import add_cell_after, patch_everything
from test_lesson03 import BUGS

from nfcourse.grade import commands
from nfcourse.grade.execute import VERIFICATION_FILE
from nfcourse.grade.verify import LocalOracle, verifier_for

LESSON = "03_coupling_layers"
# pictures, self-checks and the printed test bpd: not needed to answer the queries
SKIP = ("# Self-check", "def show_masks", "viz.", "torch.manual_seed(2)", "k = 4 if FAST")
ALL = {"checkerboard_mask_test", "channel_mask_test", "coupling_test", "coupling_test_init",
       "simple_flow_test", "train_test"}

pytestmark = pytest.mark.xdist_group("verify03")


def _cells() -> list[Cell]:
    return solution_cells(LESSON, skip_prefixes=SKIP)


def _run(ns: dict, name: str, source: str) -> None:
    run_cells(ns, [(name, source)])


def namespace(base: dict | None = None, start: str | None = None,
              edits: dict[str, tuple[str, str]] | None = None,
              replace: dict[str, str] | None = None) -> dict:
    """The solution's cells run as the student's kernel would hold them: all of them in a
    fresh namespace, or (``base`` and ``start``) a copy of ``base`` with only the cell
    ``start`` and those after it re-run. ``edits[cell] = (old, new)`` or ``replace[cell]``
    change answers. Later cells are re-run so that every function they define looks names
    up in the copy (a function's globals are the namespace it was defined in)."""
    ns: dict = dict(base) if base is not None else {}
    running = base is None
    for grade_id, source in changed(_cells(), edits, replace):
        running = running or grade_id == start
        if running:
            _run(ns, grade_id or "cell", source)
    assert running, f"no cell {start!r}"
    return ns


def failures(ns: dict, sources: list[str] | None = None, seed: int = 7) -> dict[str, str]:
    verifier = verifier_for(LESSON)
    verdicts = verifier.run(LocalOracle(ns), sources or [], np.random.default_rng(seed))
    return {v.grade_id: v.message for v in verdicts if not v.passed}


@pytest.fixture(scope="module")
def solution_ns():
    return namespace()


def test_solution_passes_every_check(solution_ns):
    for seed in (7, 8):
        assert failures(solution_ns, seed=seed) == {}


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_planted_bug_fails_exactly_its_exercises(solution_ns, bug):
    ns = namespace(solution_ns, bug.cell, edits={bug.cell: (bug.old, bug.new)})
    assert set(failures(ns)) == set(bug.loses)


IDENTITY_COUPLING = """
class ImageAffineCoupling(Flow):
    def __init__(self, c_in, mask, net=None, c_hidden=32, num_layers=2):
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.get_default_dtype()))
        self.net = net if net is not None else GatedConvNet(c_in, c_hidden, 2 * c_in, num_layers)
        self.log_scale = nn.Parameter(torch.zeros(1, c_in, 1, 1))

    def forward(self, x, context=None):
        return x, x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        return z, z.new_zeros(z.shape[0])
"""


def test_identity_layer_is_caught(solution_ns):
    """A coupling that is the identity with log_det 0 (its network never used): a fresh one
    is right, and that is all."""
    ns = namespace(solution_ns, "coupling_answer", replace={"coupling_answer": IDENTITY_COUPLING})
    failed = failures(ns)
    assert set(failed) == {"coupling_test", "simple_flow_test", "train_test"}
    assert "identity" in failed["coupling_test"]


def test_log_det_off_by_a_constant_is_caught(solution_ns):
    """log_det + 1 (a fresh layer then has log_det 1, too): the same gradients, so the same
    trained weights as the solution's (the trained model's layers are switched to the
    cheating class instead of training again). The trained flow still beats the bar once the
    grader charges the excess it measures."""
    ns = dict(solution_ns)
    _run(ns, "cheat", (
        "class ImageAffineCoupling(ImageAffineCoupling):\n"
        "    def forward(self, x, context=None):\n"
        "        z, ld = super().forward(x, context)\n"
        "        return z, ld + 1.0\n"))
    builder = dict(_cells())["simple_flow_answer"]
    _run(ns, "simple_flow_answer", builder)
    ns["model"] = copy.deepcopy(solution_ns["model"])
    for layer in ns["model"].flow.layers[1:]:
        layer.__class__ = ns["ImageAffineCoupling"]
    failed = failures(ns)
    assert set(failed) == {"coupling_test", "coupling_test_init", "simple_flow_test"}
    assert "log_det differs" in failed["coupling_test"]


def test_inflated_log_dets_of_the_trained_model_are_caught(solution_ns):
    """The trained layers claim 50 nats more each: evaluate() then reports a far lower bpd
    (the hidden test passes), but the grader measures the excess and charges it."""
    from nfcourse.train import evaluate

    ns = dict(solution_ns)
    model = copy.deepcopy(solution_ns["model"])
    _run(ns, "cheat", (
        "class _Inflated(ImageAffineCoupling):\n"
        "    def forward(self, x, context=None):\n"
        "        z, ld = super().forward(x, context)\n"
        "        return z, ld + 50.0\n"))
    for layer in model.flow.layers[1:]:
        layer.__class__ = ns["_Inflated"]
    ns["model"] = model
    honest = evaluate(solution_ns["model"], solution_ns["test_images"][:64], seed=0)
    claimed = evaluate(model, solution_ns["test_images"][:64], seed=0)
    assert claimed < honest - 0.5
    failed = failures(ns)
    assert set(failed) == {"train_test"}
    assert "exceed log|det J|" in failed["train_test"]


def test_an_untrained_model_is_caught(solution_ns):
    ns = dict(solution_ns)
    _run(ns, "untrained", "model = build_simple_flow(c_hidden=8, num_layers=1)")
    failed = failures(ns)
    assert set(failed) == {"train_test"} and "does not beat" in failed["train_test"]


def test_a_builder_tuned_to_the_hidden_test_is_caught(solution_ns):
    """Always four couplings, the number the hidden test asks for: it passes, the grader's
    counts (never 4) do not."""
    ns = dict(solution_ns)
    builder = dict(_cells())["simple_flow_answer"].replace(
        "for k in range(num_couplings):", "for k in range(4):")
    _run(ns, "simple_flow_answer", builder)
    failed = failures(ns)
    assert "simple_flow_test" in failed and "ImageAffineCoupling layers" in failed[
        "simple_flow_test"]


def test_naming_the_reference_costs_nothing(solution_ns):
    """Naming the package's masks or couplings in a cell used to zero the notebook."""
    sources = ["from nfcourse.flows import AffineCoupling\n",
               "from nfcourse.flows import Compose, checkerboard_mask\n",
               "m = nfcourse.flows.channel_mask(4)  # compare with mine\n"]
    assert failures(solution_ns, sources) == {}


# ------------------------------------------------------------ sizes every check must cover
#: Bugs that only odd channel counts or several channels show: the hidden tests and the
#: independent check must both catch them, every time (not only when a random size happens
#: to be odd), and each loses exactly its own exercise.
EDGE_BUGS = [
    # ceil(C/2) channels kept: the same mask as C // 2 for every even C
    Bug("channel_mask_ceil", cell="channel_mask_answer",
        old="mask[: c // 2] = 1", new="mask[: (c + 1) // 2] = 1",
        loses={"channel_mask_test"}),
    # every coupling built for one channel: right for MNIST, wrong for any other shape
    Bug("builder_one_channel", cell="simple_flow_answer",
        old="ImageAffineCoupling(c, mask", new="ImageAffineCoupling(1, mask",
        loses={"simple_flow_test"}),
    # the log-det of the first channel only: right for one channel; the builder's
    # several-channel case shows it too
    Bug("logdet_first_channel", cell="coupling_answer",
        old="return z, s.flatten(1).sum(1)", new="return z, s[:, :1].flatten(1).sum(1)",
        loses={"coupling_test", "simple_flow_test"}),
]


@pytest.mark.parametrize("bug", EDGE_BUGS, ids=[b.name for b in EDGE_BUGS])
@pytest.mark.parametrize("seed", [7, 8])
def test_edge_size_bug_is_always_caught(solution_ns, bug, seed):
    from alternatives import hidden_test_failures

    ns = namespace(solution_ns, bug.cell, edits={bug.cell: (bug.old, bug.new)})
    assert set(failures(ns, seed=seed)) == set(bug.loses)
    # the hidden tests (the self-checks students see) name the bug too, in no other cell
    # (the independent check is what zeroes the rest)
    hidden = set(hidden_test_failures(ns, LESSON))
    assert hidden and hidden <= set(bug.loses), hidden


# ------------------------------------------------------------------------- end to end


@pytest.mark.notebook
def test_patched_hidden_tests_do_not_save_a_wrong_inverse(tmp_path):
    """A wrong inverse (shift after the scale) with the hidden tests' helpers, np.allclose
    and torch.allclose patched: nbgrader's own tests pass, the independent check fails
    exactly the two exercises that invert, and says why."""
    course = make_course(tmp_path / "course", [LESSON])
    bug = Bug("inverse_shift_then_scale", cell="coupling_answer",
              old="x = (z - t) * torch.exp(-s)", new="x = z * torch.exp(-s) - t")
    nb = add_cell_after(student_notebook(course, LESSON, bug=bug), "coupling_answer",
                        patch_everything(LESSON))
    submit(course, LESSON, "patcher", nb)
    scores = autograde(course, LESSON, "patcher")
    loses = {"coupling_test", "simple_flow_test"}
    points = max_points(course, LESSON)
    assert scores == {k: (0.0 if k in loses else v) for k, v in points.items()}

    folder = course.autograded_dir / "patcher" / LESSON
    verdicts = json.loads((folder / VERIFICATION_FILE).read_text())["verdicts"]
    failed = {v["grade_id"]: v["message"] for v in verdicts if not v["passed"]}
    assert set(failed) == loses
    assert "inverse(forward(x))" in failed["coupling_test"]
    assert "backwards does not give" in failed["simple_flow_test"]
    # the hidden tests themselves were fooled: the only errors are the independent check's
    graded = nbformat.read(folder / f"{LESSON}.ipynb", as_version=4)
    for cell in graded.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") in loses:
            errors = [o.get("ename") for o in cell.outputs if o.get("output_type") == "error"]
            assert errors == ["IndependentCheckFailed"], errors
    html = commands.feedback(course, LESSON, "patcher")[0].read_text()
    assert "IndependentCheckFailed" in html and "inverse(forward(x))" in html
