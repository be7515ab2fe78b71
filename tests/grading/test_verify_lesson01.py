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

from nfcourse.grade.verify import LocalOracle, Oracle, OracleError, verifier_for

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


def test_reference_in_a_student_cell_fails_everything(solution_ns):
    failed = failures(solution_ns, ["from nfcourse.flows import MaskedAffineCoupling\n"])
    assert len(failed) == 6 and all("nfcourse.flows" in m for m in failed.values())


# The reference reached without naming it: a name scan cannot see this, the call tracing does.
OBFUSCATED_REFERENCE = (
    "_m = __import__('nfcourse.fl' + 'ows', fromlist=['_'])\n"
    "class MaskedAffineCoupling(getattr(_m, 'MaskedAffine' + 'Coupling')):\n"
    "    def __init__(self, mask, hidden=16):\n"
    "        super().__init__(mask, hidden=hidden)\n"
)


def test_reference_reached_by_a_computed_name_is_caught():
    ns = namespace(replace={"coupling_answer": OBFUSCATED_REFERENCE})
    sources = [OBFUSCATED_REFERENCE]
    verifier = verifier_for(LESSON)
    assert verifier.scan(sources) is None  # the name scan alone lets it through
    failed = failures(ns, sources)
    assert set(failed) == {"coupling_test_forward", "coupling_test_inverse", "train_test"}
    assert all("reference answer (MaskedAffineCoupling" in m for m in failed.values())
    assert verifier.review(sources) == ["cell 1, line 1: calls __import__",
                                       "cell 1, line 2: calls getattr with a computed name"]


def test_switching_off_the_tracing_is_caught(solution_ns):
    ns = dict(solution_ns)
    exec("import sys\n"  # noqa: S102
         "class MaskedAffineCoupling(MaskedAffineCoupling):\n"
         "    def forward(self, x, context=None):\n"
         "        sys.settrace(None)\n"
         "        return super().forward(x)\n", ns)
    failed = failures(ns)
    assert set(failed) == {"coupling_test_forward", "coupling_test_inverse"}
    assert all("switched off" in m for m in failed.values())


def test_package_code_built_on_the_reference_may_call_it():
    """A trusted caller (the package's variational dequantization, made of the reference
    couplings) runs them freely; the same couplings called from the student's code, even
    through the package's own Compose or beside a trusted object, are still caught."""
    import torch

    from nfcourse import flows
    from nfcourse.grade.verify.base import _reference_files

    class Wrapper(torch.nn.Module):  # a "student" layer that hides a reference coupling
        def __init__(self):
            super().__init__()
            self.inner = flows.VariationalDequantization(channels=1, c_hidden=4, num_layers=1)

        def forward(self, x):
            return self.inner.noise_flow(x, x)

    oracle = LocalOracle({"flows": flows, "Wrapper": Wrapper})
    oracle.watch(_reference_files(["nfcourse.flows.coupling", "nfcourse.flows.masks"]),
                 _reference_files(["nfcourse.flows.dequantization:VariationalDequantization"]))
    out = oracle.query("""
        vd = flows.VariationalDequantization(channels=1, c_hidden=4, num_layers=1)
        out['z'] = vd(_nfv_torch.as_tensor(inp['x']).float())[0]
    """, x=np.full((2, 1, 4, 4), 3.0))
    assert out["z"].shape == (2, 1, 4, 4)
    for attempt in ("flows.Compose([flows.AffineCoupling(1, 'checkerboard')])",
                    "Wrapper()"):
        with pytest.raises(OracleError, match="reference answer.*AffineCoupling"):
            oracle.query(f"out['z'] = ({attempt})(_nfv_torch.as_tensor(inp['x']).float())[0]",
                         x=np.ones((2, 1, 4, 4)))


def test_review_notes_list_dynamic_code_in_order():
    from nfcourse.grade.verify import review_notes

    cells = ["%matplotlib inline\nimport numpy as np\nx = np.ones(3)\n",
             "import importlib\nimport sys\nf = eval('1')\nsys.modules['a'] = None\n",
             "_nfv_seen.clear()\n", "def broken(:\n",
             "C = getattr(flows, 'Affine' + 'Coupling')\nd = getattr(flows, 'Flow')\n"]
    assert review_notes(cells) == [
        "cell 2, line 1: imports importlib", "cell 2, line 3: calls eval",
        "cell 2, line 4: uses .modules", "cell 3, line 1: names the grader's _nfv_seen",
        "cell 5, line 1: calls getattr with a computed name"]
    innocent = [s for s in cells if not any(w in s for w in ("importlib", "_nfv", "+"))]
    assert review_notes(innocent + ["d = getattr(flows, 'Flow')\n",
                                    "n = sum(1 for m in model.modules())\n"]) == []


@pytest.mark.notebook
def test_tracing_works_in_a_real_kernel():
    """The call tracing runs inside ipykernel as it does here: an obfuscated reference is
    caught and the student's own code is not."""
    from jupyter_client.manager import start_new_kernel

    from nfcourse.grade.verify.base import _reference_files

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        def execute(code: str, timeout: float) -> str:
            chunks: list[str] = []

            def hook(msg):
                if msg["msg_type"] == "stream":
                    chunks.append(msg["content"]["text"])

            kc.execute_interactive(code, timeout=timeout, output_hook=hook)
            return "".join(chunks)

        execute("import torch\nfrom torch import nn\n" + OBFUSCATED_REFERENCE, 60)
        execute("class Own(nn.Module):\n    def forward(self, x):\n        return 2 * x\n", 60)
        oracle = Oracle(execute)
        oracle.watch(_reference_files(["nfcourse.flows.coupling:MaskedAffineCoupling"]))
        out = oracle.query("out['z'] = Own()(_nfv_torch.as_tensor(inp['x']))", x=np.ones(3))
        assert out["z"].tolist() == [2.0, 2.0, 2.0]
        with pytest.raises(OracleError, match="reference answer"):
            oracle.query("""
                layer = MaskedAffineCoupling(_nfv_torch.tensor([1.0, 0.0]), hidden=4)
                out['z'] = layer(_nfv_torch.as_tensor(inp['x']).float())[0]
            """, x=np.ones((2, 2)))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
