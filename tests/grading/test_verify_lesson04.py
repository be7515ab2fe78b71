"""Lesson 04's independent check on answers run in this process (no notebook, no kernel).

It must pass the solution, fail exactly the exercises each planted bug breaks (see
test_lesson04.py), fail the cheats the hidden tests can be fooled into passing, and turn a
kernel that answers nonsense into a failed verdict rather than a crash. One end-to-end test
grades a wrong submission that patches the package's checks and NumPy's and torch's
comparisons: nbgrader's hidden tests then pass, the independent check does not.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from harness import (
    Cell,
    autograde,
    make_course,
    max_points,
    run_cells,
    solution_cells,
    student_notebook,
    submit,
)
from hostile import add_cell_after, patch_everything
from test_lesson04 import BUGS

from nfcourse.grade.verify import LocalOracle, lesson04, verifier_for

LESSON = "04_multiscale"
ANSWERS = ("squeeze_answer", "split_answer", "multiscale_answer")
ALL = {"squeeze_test", "split_test", "multiscale_test", "train_test"}
#: cells the queries do not need: self-checks, pictures, the comparison table
SKIP = ("# Self-check", "def show_squeeze", "simple_image_flow(", "viz.image_grid")
#: lines of the cells kept that only draw
DROP = ("show_squeeze(", "viz.loss_curve(", "plt.show()")

pytestmark = pytest.mark.xdist_group("verify04")


def _cells() -> list[Cell]:
    return solution_cells(LESSON, skip_containing=SKIP, drop_lines=DROP)


def _run(ns: dict, grade_id: str | None, source: str) -> None:
    run_cells(ns, [(grade_id, source)])


@pytest.fixture(scope="module")
def solution():
    """The solution's namespace, and copies of it just before each answer cell."""
    ns: dict = {}
    before: dict[str, dict] = {}
    for grade_id, source in _cells():
        if grade_id in ANSWERS:
            before[grade_id] = dict(ns)
        _run(ns, grade_id, source)
    return ns, before


def rerun(solution, cell: str, edit) -> dict:
    """The notebook with ``edit(source)`` as the answer ``cell``: that cell and the ones after
    it (training included) run again on a copy of the namespace the solution had before it."""
    ns = dict(solution[1][cell])
    started = False
    for grade_id, source in _cells():
        started = started or grade_id == cell
        if started:
            _run(ns, grade_id, edit(source) if grade_id == cell else source)
    return ns


def redefine(solution, cell: str, edit) -> dict:
    """The solution's namespace, trained model included, with the answer ``cell`` replaced
    by ``edit(source)`` afterwards (and the later answers run again, so that the builder
    uses the new classes): a cheat that leaves the training alone."""
    ns = dict(solution[0])
    started = False
    for grade_id, source in _cells():
        started = started or grade_id == cell
        if started and grade_id in ANSWERS:
            _run(ns, grade_id, edit(source) if grade_id == cell else source)
    return ns


@pytest.fixture(scope="module")
def bugs(solution):
    """Each planted bug's namespace and the checks it fails, built once."""
    cache: dict[str, tuple[dict, dict[str, str]]] = {}

    def get(bug):
        if bug.name not in cache:
            def edit(source):
                assert source.count(bug.old) == bug.count
                return source.replace(bug.old, bug.new)

            ns = rerun(solution, bug.cell, edit)
            cache[bug.name] = ns, failures(ns)
        return cache[bug.name]

    return get


def failures(ns: dict, sources: list[str] | None = None) -> dict[str, str]:
    verdicts = verifier_for(LESSON).run(LocalOracle(ns), sources or [],
                                        np.random.default_rng(7))
    return {v.grade_id: v.message for v in verdicts if not v.passed}


def test_solution_passes_every_check(solution):
    assert failures(solution[0]) == {}


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_planted_bug_fails_exactly_its_exercises(bugs, bug):
    failed = bugs(bug)[1]
    assert set(failed) == set(bug.loses), failed


def test_split_without_prior_term_cannot_fake_its_bpd(bugs):
    """Why that bug also loses training: the model's own bpd is impossible."""
    from nfcourse.train import evaluate

    ns, failed = bugs(next(b for b in BUGS if b.name == "split_missing_prior_term"))
    assert "train_test" in failed  # on any data: the grader's own bits/dim is far too high
    if ns["data"].source != "mnist":
        pytest.skip("the negative bits/dim is measured on MNIST; this run has "
                    f"{ns['data'].source} (set NFCOURSE_DATA)")
    assert evaluate(ns["model"], ns["test_images"][:256], batch_size=256) < 0  # "bits/dim"
    message = failed["train_test"]
    assert "not a bound" in message and "prior" in message


# ------------------------------------------------------------------------------------- cheats
STILL_COUPLING = '''
class _Still(Flow):
    """Looks like a coupling to the hidden test (mask, net), changes nothing."""

    def __init__(self, c_in, mask, c_hidden=32, num_layers=3):
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.float32))
        self.net = torch.nn.Conv2d(c_in, 2 * c_in, 3, padding=1)

    def forward(self, x, context=None):
        return x, x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        return z, z.new_zeros(z.shape[0])
'''


def test_identity_couplings_are_caught(solution):
    """Layers that only look like couplings pass the hidden multi-scale test."""
    from nfcourse.checks.lesson04 import multiscale_problems

    ns = redefine(solution, "multiscale_answer",
                  lambda s: STILL_COUPLING + s.replace("AffineCoupling(", "_Still("))
    assert multiscale_problems(ns["build_multiscale_flow"], ns["Squeeze"], ns["Split"]) == []
    failed = failures(ns)
    assert set(failed) == {"multiscale_test"}
    assert "identity" in failed["multiscale_test"]


def test_builder_that_ignores_its_arguments_is_caught(solution):
    """The hidden test only builds num_couplings=(2, 2, 2)."""
    ns = redefine(solution, "multiscale_answer",
                  lambda s: s.replace("range(num_couplings[2])", "range(2)"))
    failed = failures(ns)
    assert set(failed) == {"multiscale_test"}
    assert "num_couplings=(1, 3, 3)" in failed["multiscale_test"]


def test_inflated_log_det_of_the_trained_model_is_caught(solution):
    """A split layer of the trained model that adds 500 nats to its log-det: the hidden
    training test (the model's own bpd) is fooled, the grader's held-out bpd is not."""
    from nfcourse.checks.lesson04 import bpd_bar, training_problems

    ns = dict(solution[0])
    ns["model"] = model = copy.deepcopy(solution[0]["model"]).float()
    split = next(m for m in model.flow.layers if isinstance(m, ns["Split"]))
    honest = split.forward
    split.forward = lambda x, context=None: (honest(x)[0], honest(x)[1] + 500.0)
    bar = bpd_bar(ns["data"].source)
    assert training_problems(model, ns["Split"], ns["test_images"][:256], bar) == []
    failed = failures(ns)
    assert set(failed) == {"train_test"}
    assert "not a bound" in failed["train_test"]


def test_split_whose_log_det_is_off_by_a_constant_is_caught(solution):
    ns = redefine(solution, "split_answer", lambda s: s + (
        "\nclass Split(Split):\n"
        "    def forward(self, x, context=None):\n"
        "        z, ld = super().forward(x, context)\n        return z, ld + 1.0\n"))
    assert set(failures(ns)) == {"split_test", "multiscale_test"}


def test_squeeze_in_another_valid_order_is_caught(solution):
    """A plain reshape is a permutation with log-det 0, but not the lesson's ordering."""
    ns = redefine(solution, "squeeze_answer", lambda s: s + (
        "\nclass Squeeze(Squeeze):\n"
        "    def forward(self, x, context=None):\n"
        "        b, c, h, w = x.shape\n"
        "        return x.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)\n"
        "    def inverse(self, z, context=None):\n"
        "        b, c, h, w = z.shape\n"
        "        return z.reshape(b, c // 4, 2 * h, 2 * w), z.new_zeros(b)\n"))
    failed = failures(ns)
    assert set(failed) == {"squeeze_test", "multiscale_test"}
    assert "output channel 0 should hold the top-left pixel" in failed["squeeze_test"]


def test_variational_dequantization_is_checked_in_its_own_noise(solution):
    """The training check on a flow that starts with a learned dequantization: its claimed
    log-det (-log q(u|x) included) must match finite differences in the Gaussian noise."""
    ns = dict(solution[0])
    torch.manual_seed(0)
    model = ns["build_multiscale_flow"](shape=(1, 8, 8), c_hidden=(8, 8, 8),
                                        num_couplings=(2, 2, 2), num_layers=1, vardeq=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ns["model"] = model
    images = np.random.default_rng(0).integers(0, 256, size=(12, 1, 8, 8)).astype(float)
    bpd, note = lesson04.trained_bpd(LocalOracle(ns), np.random.default_rng(1), images, n=8)
    assert np.isfinite(bpd) and "D = 64" in note
    deq = model.flow.layers[0]
    honest = deq.forward
    deq.forward = lambda x, context=None, noise=None: (
        lambda out: (out[0], out[1] + 1.0))(honest(x, context, noise))
    with pytest.raises(AssertionError, match="not log"):
        lesson04.trained_bpd(LocalOracle(ns), np.random.default_rng(1), images, n=8)


# ------------------------------------------------- edge sizes every time (issue 15): bugs
def test_squeeze_that_breaks_on_one_channel_is_caught(solution):
    """A squeeze that takes the channel count from a view that only works for C > 1 (here:
    refusing C = 1 outright): the edge shapes are tried on every grading."""
    ns = redefine(solution, "squeeze_answer", lambda source: source.replace(
        "        b, c, h, w = x.shape\n",
        "        b, c, h, w = x.shape\n        assert c > 1, 'one channel'\n", 1))
    failed = failures(ns)
    assert "squeeze_test" in failed and "one channel" in failed["squeeze_test"]


def test_split_that_breaks_on_one_channel_is_caught(solution):
    """torch.split with a hard-coded half of 2 channels: right for MNIST's squeezed 4."""
    ns = redefine(solution, "split_answer", lambda source: source.replace(
        "z1, z2 = x.chunk(2, dim=1)", "z1, z2 = x[:, :2], x[:, 2:]"))
    failed = failures(ns)
    # the flows of 2 and 3 input channels split 8 and 12 channels: the flow loses too
    assert set(failed) == {"split_test", "multiscale_test"}
    assert "(3, 1, 1, 1)" in failed["split_test"]  # the one-channel half was tried


def test_builder_hard_coded_to_one_channel_is_caught(solution):
    """Couplings sized for one input channel whatever the shape: multi-channel shapes are
    always built."""
    ns = redefine(solution, "multiscale_answer", lambda source: source.replace(
        "    c, h, w = shape\n", "    _, h, w = shape\n    c = 1\n", 1))
    failed = failures(ns)
    assert set(failed) == {"multiscale_test"}


# ---------------------------------------------------------------------------- end to end


@pytest.mark.notebook
def test_patched_checks_do_not_save_a_wrong_split(tmp_path):
    """A split without its prior term, with the package's checks, assert_independent and the
    comparisons patched: every hidden test passes (its own bpd is negative), but the grader
    zeroes the split, the flow and the training, and says why."""
    from nfcourse.grade import commands
    from nfcourse.grade.execute import VERIFICATION_FILE

    course = make_course(tmp_path / "course", [LESSON])
    bug = next(b for b in BUGS if b.name == "split_missing_prior_term")
    nb = add_cell_after(student_notebook(course, LESSON, bug=bug), "squeeze_answer",
                        patch_everything(LESSON))
    # a student may delete ungraded cells: dropping the comparison table and the pictures
    # (two more trainings) keeps this test quick and changes no graded cell
    nb.cells = [c for c in nb.cells if not any(m in c.source for m in SKIP[2:])]
    submit(course, LESSON, "patcher", nb)
    scores = autograde(course, LESSON, "patcher")
    lost = {"split_test", "multiscale_test", "train_test"}
    points = max_points(course, LESSON)
    assert scores == {k: (0.0 if k in lost else v) for k, v in points.items()}, scores
    record = course.autograded_dir / "patcher" / LESSON / VERIFICATION_FILE
    verdicts = {v["grade_id"]: v for v in json.loads(record.read_text())["verdicts"]}
    assert {k for k, v in verdicts.items() if not v["passed"]} == lost
    assert "scored by the prior" in verdicts["split_test"]["message"]
    assert "not a bound" in verdicts["train_test"]["message"]
    html = commands.feedback(course, LESSON, "patcher")[0].read_text()
    assert "IndependentCheckFailed" in html and "factored-out half" in html
