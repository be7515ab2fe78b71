"""Lesson 06's independent check on answers run in this process (no notebook, no kernel).

It must pass the solution, fail exactly the exercises each planted bug breaks (the same
ones the notebook's hidden tests fail, see test_lesson06.py), fail the cheats the hidden
tests can be fooled into passing, and turn a kernel that answers nonsense into a failed
verdict rather than a crash. One end-to-end test grades a submission that patches
``nfcourse.checks`` and ``torch.allclose`` around a wrong answer.
"""

from __future__ import annotations

import contextlib
import json

import nbformat
import numpy as np
import pytest
from harness import (
    REPO,
    Bug,
    Cell,
    autograde,
    make_course,
    max_points,
    run_cells,
    solution_cells,
    student_notebook,
    submit,
)
from hostile import edit_answer, patch_everything
from test_lesson06 import BUGS

from nfcourse.grade import commands
from nfcourse.grade.execute import VERIFICATION_FILE
from nfcourse.grade.verify import LocalOracle, Verifier, verifier_for
from nfcourse.grade.verify.lesson06 import (
    expm,
    rk4_augmented,
    two_step_logabsdet,
    two_step_points,
)

LESSON = "06_ffjord_gifs"
#: cells the queries do not need: pictures, demos, self-checks, the RealNVP comparison, GIFs
SKIP = ("def rotation", "# Self-check", "def estimates", "class Counted",
        "from torchdiffeq import odeint_adjoint", "def validate", "fig,", "torch.manual_seed(2)",
        "with torch.no_grad(), checks.tight_solver", "def flow_path", "labels =", "MY_IMAGE")
ALL = {"odefunc_test", "divergence_test", "hutchinson_test", "hutchinson_test_noise",
       "cnf_test", "cnf_test_jacobian", "train_moons_test", "train_image_test"}

pytestmark = pytest.mark.xdist_group("verify06")


def _notebook():
    return nbformat.read(REPO / "solutions" / LESSON / f"{LESSON}.ipynb", as_version=4)


def _cells() -> list[Cell]:
    return solution_cells(LESSON, skip_prefixes=SKIP)  # the rest answers no query


def with_edit(base: dict, cell: str, old: str, new: str) -> dict:
    """``base`` (the solution's namespace) with answer ``cell`` edited and it and every cell
    after it run again on a copy (the cells before it are the solution's anyway)."""
    cells = _cells()
    start = [gid for gid, _ in cells].index(cell)
    gid, source = cells[start]
    assert source.count(old) == 1, f"{old!r} is not once in {cell}"
    cells[start] = (gid, source.replace(old, new))
    return run_cells(dict(base), cells[start:])


@contextlib.contextmanager
def patched(ns: dict, code: str, undo: str = ""):
    """``ns`` with ``code`` run after the notebook (a submission's extra cell), in place so
    that the answers' functions, whose globals are ``ns``, see it; ``undo`` and restoring
    ``ns``'s names put the solution back afterwards."""
    saved = dict(ns)
    exec(code, ns)  # noqa: S102
    try:
        yield ns
    finally:
        if undo:
            exec(undo, ns)  # noqa: S102
        ns.clear()
        ns.update(saved)


def failures(ns: dict, sources: list[str] | None = None, seed: int = 7,
             only: tuple[str, ...] | None = None) -> dict[str, str]:
    """The failed checks (grade id -> message); ``only`` runs just those checks (the
    training checks cost a second each: cheats that cannot touch a check skip it)."""
    verifier = verifier_for(LESSON)
    if only is not None:
        verifier = Verifier(lesson=verifier.lesson,
                            checks={k: verifier.checks[k] for k in only})
    verdicts = verifier.run(LocalOracle(ns), sources or [], np.random.default_rng(seed))
    return {v.grade_id: v.message for v in verdicts if not v.passed}


@pytest.fixture(scope="module")
def solution_ns():
    return run_cells({}, _cells())


# ------------------------------------------------------------------- the grader's own maths
def test_grader_maths_is_exact():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    values, vectors = np.linalg.eig(a)
    by_eig = (vectors * np.exp(values)) @ np.linalg.inv(vectors)
    assert np.max(np.abs(expm(a) - by_eig.real)) < 1e-12
    assert np.max(np.abs(expm(3 * a) - expm(a) @ expm(a) @ expm(a))) < 1e-9

    def linear(t, z):  # dz/dt = t A z: the flow is expm(A t^2 / 2)
        return t * (z @ a.T), np.full(len(z), t * np.trace(a))

    x = rng.normal(size=(4, 3))
    z, ld = rk4_augmented(linear, x, 0.0, 1.2)
    assert np.max(np.abs(z - x @ expm(a * 0.72).T)) < 1e-9
    assert np.max(np.abs(ld - 0.72 * np.trace(a))) < 1e-12
    # central differences at two steps of z = tanh(x) A^T: log|det| = log|det A| + sum log(1 -
    # tanh^2 x), and the error estimate bounds the actual error
    got, err = two_step_logabsdet(np.tanh(two_step_points(x, 1e-4)) @ a.T, 4, 3, 1e-4)
    expected = np.linalg.slogdet(a)[1] + np.log(1 - np.tanh(x) ** 2).sum(axis=1)
    assert np.max(np.abs(got - expected)) < 1e-8 and np.all(err < 1e-6)


def test_error_estimate_covers_a_less_smooth_map():
    """z = x + 0.02 sin(40 x): correct but with curvature 32; a forward difference at 1e-5
    errs by about 1.6e-4 per entry, central ones far less, and where the map has a kink
    (|x| near 0) the two steps disagree, so the tolerance grows instead of failing a correct
    density."""
    x = np.array([[0.31, -0.7], [1.2, 0.05]])

    def wavy(v):
        return v + 0.02 * np.sin(40 * v)

    got, err = two_step_logabsdet(wavy(two_step_points(x, 1e-5)), 2, 2, 1e-5)
    expected = np.log(1 + 0.8 * np.cos(40 * x)).sum(axis=1)
    assert np.all(np.abs(got - expected) <= 10 * err + 1e-8)
    kink = np.array([[1.5e-5, 0.4]])  # |v| has a kink within 2 h of this point
    got, err = two_step_logabsdet(np.abs(two_step_points(kink, 1e-5)) + 0.5 * two_step_points(
        kink, 1e-5), 1, 2, 1e-5)
    assert np.abs(got[0] - np.log(1.5 * 1.5)) <= 10 * err[0] + 1e-8


# ---------------------------------------------------------------------- solution and bugs
def test_solution_passes_every_check(solution_ns):
    assert failures(solution_ns) == {}


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_planted_bug_fails_exactly_its_exercises(solution_ns, bug):
    ns = with_edit(solution_ns, bug.cell, bug.old, bug.new)
    assert set(failures(ns)) == set(bug.loses)


# ------------------------------------------------------------------------------ cheats
def test_exact_density_in_place_of_the_model_is_caught(solution_ns):
    """log_prob replaced by the exact two-moons density: the hidden test's KL is then zero."""
    with patched(solution_ns, "moons_model.log_prob = "
                 "lambda x: checks.moons_log_prob(x).to(x.dtype)\n",
                 "del moons_model.log_prob\n") as ns:
        failed = failures(ns, only=("cnf_test", "train_moons_test"))
    assert set(failed) == {"train_moons_test"}
    assert "change of variables" in failed["train_moons_test"]


def test_inflated_log_prob_is_caught(solution_ns):
    """log_prob + 0.5 (training is unchanged by a constant): the trained densities too."""
    with patched(solution_ns, "_lp = CNF.log_prob\n"
                 "CNF.log_prob = lambda self, x: _lp(self, x) + 0.5\n",
                 "CNF.log_prob = _lp\n") as ns:
        failed = failures(ns, only=("cnf_test", "cnf_test_jacobian", "train_image_test"))
    assert set(failed) == {"cnf_test", "train_image_test"}
    assert "negative" in failed["train_image_test"] or \
        "change of variables" in failed["train_image_test"]


def test_inflated_trained_density_is_caught(solution_ns):
    with patched(solution_ns, "_lp = image_model.log_prob\n"
                 "image_model.log_prob = lambda x: _lp(x) + 0.3\n",
                 "del image_model.log_prob\n") as ns:
        assert set(failures(ns, only=("train_moons_test", "train_image_test"))) == {
            "train_image_test"}


def test_identity_flow_is_caught(solution_ns):
    with patched(solution_ns, "_transform = CNF.transform\n"
                 "CNF.transform = lambda self, x, t0, t1: (x, x.new_zeros(x.shape[0]))\n",
                 "CNF.transform = _transform\n") as ns:
        failed = failures(ns, only=("divergence_test", "cnf_test", "cnf_test_jacobian",
                                    "train_moons_test"))
    assert set(failed) == {"cnf_test", "cnf_test_jacobian", "train_moons_test"}


def test_exact_trace_as_hutchinson_is_caught(solution_ns):
    """An 'estimator' that ignores its noise is exact, so every hidden mean test passes."""
    with patched(solution_ns, "def hutchinson_divergence(f, z, t, noise):\n"
                 "    return exact_divergence(f, z, t)\n") as ns:
        failed = failures(ns, only=("divergence_test", "hutchinson_test",
                                    "hutchinson_test_noise", "cnf_test_jacobian"))
    assert set(failed) == {"hutchinson_test", "cnf_test_jacobian"}


def test_builder_that_ignores_its_arguments_is_caught(solution_ns):
    with patched(solution_ns, "_Base = ODEFunc\n"
                 "class ODEFunc(_Base):\n"
                 "    def __init__(self, dim=2, hidden=64, layers=3):\n"
                 "        super().__init__(dim=2, hidden=hidden, layers=layers)\n") as ns:
        failed = failures(ns, only=("odefunc_test", "divergence_test"))
    assert set(failed) == {"odefunc_test"}


# ---------------------------------------------- sizes varied and the stated rules (issue 15)
def test_odefunc_that_ignores_layers_is_caught(solution_ns):
    with patched(solution_ns, "_Base = ODEFunc\n"
                 "class ODEFunc(_Base):\n"
                 "    def __init__(self, dim=2, hidden=64, layers=3):\n"
                 "        super().__init__(dim=dim, hidden=hidden, layers=3)\n") as ns:
        failed = failures(ns, only=("odefunc_test", "divergence_test"))
    assert set(failed) == {"odefunc_test"}
    assert "`layers` must set the depth" in failed["odefunc_test"]


def test_odefunc_that_ignores_hidden_is_caught(solution_ns):
    with patched(solution_ns, "_Base = ODEFunc\n"
                 "class ODEFunc(_Base):\n"
                 "    def __init__(self, dim=2, hidden=64, layers=3):\n"
                 "        super().__init__(dim=dim, hidden=32, layers=layers)\n") as ns:
        failed = failures(ns, only=("odefunc_test",))
    assert set(failed) == {"odefunc_test"}
    assert "`hidden` must set the width" in failed["odefunc_test"]


def test_odefunc_that_breaks_in_one_dimension_is_caught(solution_ns):
    """The time column built for two dimensions only: every dimension count is tried."""
    with patched(solution_ns, "_Base = ODEFunc\n"
                 "class ODEFunc(_Base):\n"
                 "    def forward(self, t, z):\n"
                 "        if z.shape[1] < 2:\n"
                 "            raise ValueError('two dimensions at least')\n"
                 "        return super().forward(t, z)\n") as ns:
        failed = failures(ns, only=("odefunc_test",))
    assert set(failed) == {"odefunc_test"}
    assert "dim=1" in failed["odefunc_test"]


def test_noise_drawn_at_every_evaluation_is_caught(solution_ns):
    """Fresh Hutchinson noise at every function evaluation: still unbiased, so the mean tests
    pass, but it breaks the lesson's rule of one draw per solve."""
    with patched(solution_ns, "_dyn = CNF.dynamics\n"
                 "def _fresh(self, t, state):\n"
                 "    if self.divergence == 'hutchinson':\n"
                 "        self.noise = sample_noise(state[0])\n"
                 "    return _dyn(self, t, state)\n"
                 "CNF.dynamics = _fresh\n", "CNF.dynamics = _dyn\n") as ns:
        failed = failures(ns, only=("cnf_test", "cnf_test_jacobian"))
    assert set(failed) == {"cnf_test_jacobian"}
    assert "drawn once per solve" in failed["cnf_test_jacobian"]


def test_noise_kept_across_solves_is_caught(solution_ns):
    """One draw kept for every solve (a fixed seed in transform): not fresh per solve."""
    with patched(solution_ns, "_tr = CNF.transform\n"
                 "def _seeded(self, x, t0, t1):\n"
                 "    with torch.random.fork_rng(devices=[]):\n"
                 "        torch.manual_seed(0)\n"
                 "        return _tr(self, x, t0, t1)\n"
                 "CNF.transform = _seeded\n", "CNF.transform = _tr\n") as ns:
        failed = failures(ns, only=("cnf_test_jacobian",))
    assert set(failed) == {"cnf_test_jacobian"}
    assert "fresh noise for every solve" in failed["cnf_test_jacobian"]


# ------------------------------------------------------------------------- end to end


@pytest.mark.notebook
def test_patched_submission_loses_what_its_wrong_answer_breaks(tmp_path):
    """Uniform noise in sample_noise, with the checks and torch.allclose patched so that every
    hidden test passes: the independent check still takes the three exercises it breaks."""
    course = make_course(tmp_path / "course", [LESSON])
    bug = next(b for b in BUGS if b.name == "hutchinson_uniform_noise")
    nb = edit_answer(student_notebook(course, LESSON, bug=Bug(
        "uniform", cell=bug.cell, old=bug.old, new=bug.new)), bug.cell,
        lambda source: source + "\n" + patch_everything(LESSON))
    # the demos and pictures grade nothing: a student may delete them (keeps the test quick)
    demos = tuple(p for p in SKIP if p != "# Self-check")
    nb.cells = [c for c in nb.cells if c.cell_type != "code" or "nbgrader" in c.metadata
                or not c.source.lstrip().startswith(demos)]
    submit(course, LESSON, "patcher", nb)
    scores = autograde(course, LESSON, "patcher")
    points = max_points(course, LESSON)
    assert scores == {k: (0.0 if k in bug.loses else v) for k, v in points.items()}
    record = json.loads((course.autograded_dir / "patcher" / LESSON / VERIFICATION_FILE)
                        .read_text())
    failed = {v["grade_id"]: v["message"] for v in record["verdicts"] if not v["passed"]}
    assert set(failed) == set(bug.loses)
    assert "E[eps eps^T] = I" in failed["hutchinson_test_noise"]
    assert "biased" in failed["hutchinson_test"] and "biased" in failed["cnf_test_jacobian"]
    commands.feedback(course, LESSON, "patcher")
    html = (course.feedback_dir / "patcher" / LESSON / f"{LESSON}.html").read_text()
    assert "IndependentCheckFailed" in html and "E[eps eps^T] = I" in html
