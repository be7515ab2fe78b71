"""Lesson 05's independent check on answers run in this process (no notebook, no kernel).

It must pass the solution, fail exactly the exercises each planted bug breaks (the same
ones the notebook's hidden tests fail, see test_lesson05.py), fail the cheats the hidden
tests can be fooled into passing, and turn a kernel that answers nonsense into a failed
verdict rather than a crash. One end-to-end test grades a notebook whose wrong answer comes
with patched checks and comparisons.
"""

from __future__ import annotations

import json

import nbformat
import numpy as np
import pytest
from harness import (
    Cell,
    _meta,
    autograde,
    changed,
    make_course,
    max_points,
    run_cells,
    solution_cells,
    student_notebook,
    submit,
)
from hostile import patch_everything
from test_lesson05 import BUGS

from nfcourse.grade import commands
from nfcourse.grade.execute import VERIFICATION_FILE
from nfcourse.grade.verify import LocalOracle, verifier_for

LESSON = "05_glow"
ALL = {"actnorm_test", "actnorm_test_init", "invconv_test", "invconv_lu_test",
       "glow_step_test", "glow_test"}
# self-checks, pictures, the timing table and the training runs: no query needs them
SKIP = ("# Self-check", "def show", "def time_call", "from nfcourse.data", "results, models",
        'if "lu" in models')

pytestmark = pytest.mark.xdist_group("verify05")


def _cells() -> list[Cell]:
    return solution_cells(LESSON, skip_prefixes=SKIP)


def namespace(edits: dict[str, tuple[str, str]] | None = None,
              replace: dict[str, str] | None = None) -> dict:
    """Run the solution's cells (with ``edits[cell] = (old, new)`` or whole ``replace``d
    answers) in a fresh namespace, as the student's kernel would hold them. Without the
    training cells this takes well under a second, so every case builds its own."""
    return run_cells({}, changed(_cells(), edits, replace))


def failures(ns: dict, sources: list[str] | None = None, seed: int = 7) -> dict[str, str]:
    verifier = verifier_for(LESSON)
    verdicts = verifier.run(LocalOracle(ns), sources or [], np.random.default_rng(seed))
    assert {v.grade_id for v in verdicts} == ALL
    return {v.grade_id: v.message for v in verdicts if not v.passed}


def patched(source: str) -> dict:
    """The solution's namespace after ``source`` (a student's extra cell) ran in it: one
    namespace, as in a kernel, so that names the answers look up see the change."""
    ns = namespace()
    exec(source, ns)  # noqa: S102
    return ns


@pytest.fixture(scope="module")
def solution_ns():
    return namespace()


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_solution_passes_every_check(solution_ns, seed):
    assert failures(solution_ns, seed=seed) == {}


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_planted_bug_fails_exactly_its_exercises(bug):
    ns = namespace(edits={bug.cell: (bug.old, bug.new)})
    assert set(failures(ns)) == set(bug.loses)


IDENTITY_ACTNORM = """
class ActNorm(Flow):
    def __init__(self, num_channels):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    def forward(self, x, context=None):
        return x, x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        return z, z.new_zeros(z.shape[0])
"""


def test_identity_actnorm_is_caught():
    failed = failures(namespace(replace={"actnorm_answer": IDENTITY_ACTNORM}))
    assert set(failed) == {"actnorm_test", "actnorm_test_init", "glow_step_test"}
    assert "identity" in failed["actnorm_test"] or "did not change" in failed["actnorm_test"]


def test_actnorm_that_initialises_on_every_batch_is_caught():
    ns = patched("class ActNorm(ActNorm):\n"
                              "    def forward(self, x, context=None):\n"
                              "        self.initialize(x)\n"
                              "        return super().forward(x, context)\n")
    failed = failures(ns)
    assert set(failed) == {"actnorm_test", "actnorm_test_init", "glow_step_test"}
    assert "initialised itself again" in failed["actnorm_test_init"]


def test_invconv_log_det_off_by_a_constant_is_caught():
    ns = patched("class InvConv1x1(InvConv1x1):\n"
                              "    def forward(self, x, context=None):\n"
                              "        z, log_det = super().forward(x, context)\n"
                              "        return z, log_det + 1.0\n")
    failed = failures(ns)
    assert set(failed) == {"invconv_test"}
    assert "log_det" in failed["invconv_test"]


def test_identity_lu_layer_is_caught():
    ns = patched("""
class InvConv1x1LU(Flow):
    def __init__(self, num_channels):
        super().__init__()
        self.log_s = nn.Parameter(torch.zeros(num_channels))
    @property
    def weight(self):
        return torch.eye(self.log_s.shape[0], dtype=self.log_s.dtype)
    def forward(self, x, context=None):
        return x, x.new_zeros(x.shape[0])
    def inverse(self, z, context=None):
        return z, z.new_zeros(z.shape[0])
""")
    failed = failures(ns)
    # the step is judged by what it does: with an identity "LU" layer it mixes no channels
    assert set(failed) == {"invconv_lu_test", "glow_step_test"}
    assert "did not change" in failed["invconv_lu_test"]
    assert "every input channel" in failed["glow_step_test"]


def test_step_without_the_coupling_log_det_is_caught():
    """Leaves the coupling's log-scales out of the log-det in both directions, so forward and
    inverse still agree."""
    ns = patched("class GlowStep(GlowStep):\n"
                 "    def _outer(self, x):\n"
                 "        y, ld_norm = self.norm(x)\n"
                 "        return ld_norm + self.mix(y)[1]\n"
                 "    def forward(self, x, context=None):\n"
                 "        return super().forward(x, context)[0], self._outer(x)\n"
                 "    def inverse(self, z, context=None):\n"
                 "        x = super().inverse(z, context)[0]\n"
                 "        return x, -self._outer(x)\n")
    failed = failures(ns)
    assert set(failed) == {"glow_step_test"}
    assert "finite differences" in failed["glow_step_test"]


def test_builder_that_ignores_its_arguments_is_caught():
    ns = patched("_honest = build_glow\n"
                              "def build_glow(shape=(1, 28, 28), **kwargs):\n"
                              "    return _honest(shape=shape)\n")
    failed = failures(ns)
    assert set(failed) == {"glow_test"}
    assert "steps" in failed["glow_test"] or "order" in failed["glow_test"]


def test_builder_with_a_wrong_prior_is_caught():
    ns = patched("_honest = build_glow\n"
                              "def build_glow(*args, **kwargs):\n"
                              "    model = _honest(*args, **kwargs)\n"
                              "    model.prior = StandardNormal(model.data_shape)\n"
                              "    return model\n")
    failed = failures(ns)
    assert set(failed) == {"glow_test"}
    assert "prior" in failed["glow_test"]


# ---------------------------------------------------------------------------- end to end


@pytest.mark.notebook
def test_patched_checks_do_not_save_a_wrong_answer(tmp_path):
    """The LU log-det sums s instead of log|s|, and the notebook replaces every check of the
    lesson, ``assert_independent``, ``np.allclose`` and ``torch.allclose`` by ones that pass:
    the hidden tests pass, the independent check still takes the LU exercise and the step."""
    bug = next(b for b in BUGS if b.name == "lu_s_not_log_s")
    course = make_course(tmp_path / "course", [LESSON])
    nb = student_notebook(course, LESSON, bug=bug)
    at = next(i for i, c in enumerate(nb.cells) if _meta(c).get("grade_id") == bug.cell)
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(patch_everything(LESSON)))
    submit(course, LESSON, "patcher", nb)
    scores = autograde(course, LESSON, "patcher")
    expected = {k: (0.0 if k in bug.loses else v) for k, v in max_points(course, LESSON).items()}
    assert scores == expected

    folder = course.autograded_dir / "patcher" / LESSON
    graded = nbformat.read(folder / f"{LESSON}.ipynb", as_version=4)
    for cell in graded.cells:
        if _meta(cell).get("grade_id") in bug.loses:  # the hidden tests were fooled ...
            errors = [o.ename for o in cell.outputs if o.output_type == "error"]
            assert errors == ["IndependentCheckFailed"], errors  # ... the grader was not
    record = json.loads((folder / VERIFICATION_FILE).read_text())
    failed = {v["grade_id"]: v["message"] for v in record["verdicts"] if not v["passed"]}
    assert set(failed) == bug.loses
    assert "sum(log_s)" in failed["invconv_lu_test"]
    assert "finite differences" in failed["glow_step_test"]
    html = commands.feedback(course, LESSON, "patcher")[0].read_text()
    assert "IndependentCheckFailed" in html and "not of s itself" in html


# ------------------------------------------------- black-box structure (issue 15): bugs it catches
def test_step_that_breaks_on_odd_channels_is_caught():
    """The changed half sized C // 2 instead of C - C // 2: fine for the even channel counts
    of build_glow, wrong for the odd ones every step check now tries."""
    ns = namespace(edits={"glow_step_answer": ("c_change = c - self.c_cond",
                                               "c_change = self.c_cond")})
    failed = failures(ns)
    assert set(failed) == {"glow_step_test"}
    assert "GlowStep(3" in failed["glow_step_test"] or "GlowStep(5" in failed["glow_step_test"]


def test_step_that_ignores_plain_mixing_is_caught():
    """mixing="plain" quietly builds the LU layer: the step's parameters give it away."""
    ns = namespace(edits={"glow_step_answer": ('elif mixing == "plain":\n'
                                               '            self.mix = InvConv1x1(c)',
                                               'elif mixing == "plain":\n'
                                               '            self.mix = InvConv1x1LU(c)')})
    failed = failures(ns)
    assert set(failed) == {"glow_step_test"}
    assert "mixing='plain'" in failed["glow_step_test"]


def test_step_whose_reverse_is_not_reversed_is_caught():
    """mixing="reverse" that leaves the channels in place: the kept half is the wrong input."""
    ns = patched("class ReversePermutation(Flow):\n"
                 "    def __init__(self, c):\n"
                 "        super().__init__()\n"
                 "    def forward(self, x, context=None):\n"
                 "        return x, x.new_zeros(x.shape[0])\n"
                 "    def inverse(self, z, context=None):\n"
                 "        return z, z.new_zeros(z.shape[0])\n")
    failed = failures(ns)
    assert set(failed) == {"glow_step_test"}
    assert "C - 1 - j" in failed["glow_step_test"]


def test_builder_hard_coded_to_one_channel_is_caught():
    """A builder that squeezes to 4 channels whatever the shape: right for MNIST only."""
    ns = namespace(edits={"glow_answer": ("c, h, w = 4 * c, h // 2, w // 2",
                                          "c, h, w = 4 * (c if scale else 1), h // 2, w // 2")})
    failed = failures(ns)
    assert set(failed) == {"glow_test"}
    assert "channels" in failed["glow_test"]  # the steps are built for 4, they get 8


def test_builder_that_drops_num_layers_is_caught():
    ns = namespace(edits={"glow_answer": ("hidden=hidden, num_layers=num_layers,",
                                          "hidden=hidden,")})
    failed = failures(ns)
    assert set(failed) == {"glow_test"}
    assert "pass hidden, num_layers and mixing on" in failed["glow_test"]


def test_frozen_parameters_are_not_randomised():
    """An ActNorm that keeps its "initialised" flag as a frozen nn.Parameter (part of the
    state_dict, not trainable) is correct: the checks perturb trainable parameters only."""
    ns = namespace(edits={"actnorm_answer": (
        'self.register_buffer("initialized", torch.tensor(False))',
        "self.initialized = nn.Parameter(torch.tensor(0.0), requires_grad=False)")})
    assert failures(ns) == {}
