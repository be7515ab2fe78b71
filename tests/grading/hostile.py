"""Hostile submissions of lesson 01: each tries to break, escape or fool the grader.

:func:`hostile_submissions` returns ``{name: Hostile}``; each holds the notebook a student
would hand in and the test cells it must lose (every other test cell keeps its points).
The suite in ``test_hostile.py`` grades them all in one class, with the solution beside
them as a control, and checks the scores, the feedback and that nothing outside each
submission changed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from harness import Bug, _meta, strip_solution_markers, student_notebook

from nfcourse.grade import Course

LESSON = "01_two_moons_realnvp"

#: every test cell of lesson 01
ALL = frozenset({"warmup_test", "coupling_test_forward", "coupling_test_inverse",
                 "realnvp_test", "density_test", "train_test"})


@dataclass
class Hostile:
    name: str
    notebook: object
    loses: frozenset[str] = field(default_factory=frozenset)
    what: str = ""


def _index(nb, grade_id: str) -> int:
    for i, cell in enumerate(nb.cells):
        if _meta(cell).get("grade_id") == grade_id:
            return i
    raise KeyError(grade_id)


def _new_cell(source: str):
    import nbformat

    return nbformat.v4.new_code_cell(source)


def add_cell_after(nb, grade_id: str, source: str):
    nb = copy.deepcopy(nb)
    nb.cells.insert(_index(nb, grade_id) + 1, _new_cell(source))
    return nb


def edit_answer(nb, grade_id: str, edit) -> object:
    nb = copy.deepcopy(nb)
    cell = nb.cells[_index(nb, grade_id)]
    cell.source = edit(cell.source)
    return nb


PATCH_CHECKS = """
import nfcourse.checks.lesson01 as _checks_module
for _name in dir(_checks_module):
    if _name.startswith(("assert_", "check_")):
        setattr(_checks_module, _name, lambda *args, **kwargs: None)
"""


def patch_everything(lesson: str) -> str:
    """A cell that makes every hidden test's helpers pass: ``np.allclose`` and
    ``torch.allclose``, and in the lesson's checks module every ``check_*`` (True),
    ``*_problems`` (none) and ``require`` (the report, unread)."""
    return f"""
import numpy as np
import torch
import nfcourse.checks.lesson{lesson[:2]} as _checks_module
for _name in dir(_checks_module):
    if _name.endswith("_problems"):
        setattr(_checks_module, _name, lambda *args, **kwargs: [])
    elif _name.startswith("check_"):
        setattr(_checks_module, _name, lambda *args, **kwargs: True)
_checks_module.require = lambda report, *names, **kwargs: report
np.allclose = lambda *args, **kwargs: True
torch.allclose = lambda *args, **kwargs: True
"""


IDENTITY_COUPLING = """
class MaskedAffineCoupling(nn.Module):
    def __init__(self, mask, hidden=64):
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.get_default_dtype()))
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return x, x.new_zeros(x.shape[0])

    def inverse(self, z):
        return z, z.new_zeros(z.shape[0])
"""


def _with_bug(course: Course, bug: Bug):
    return student_notebook(course, LESSON, bug=bug)


def hostile_submissions(course: Course, *, port: int) -> dict[str, Hostile]:
    """The hostile class. ``port``: a TCP port on 127.0.0.1 the test listens on."""
    root = Path(course.root)
    solutions = root / "solutions" / LESSON / f"{LESSON}.ipynb"
    gradebook = course.db_path or root / "grading" / "gradebook.db"
    good = student_notebook(course, LESSON)
    out: list[Hostile] = []

    out.append(Hostile("infinite_loop", edit_answer(
        good, "warmup_answer", lambda s: "while True:\n    pass\n" + s),
        {"warmup_test"}, "an endless loop in the warm-up answer"))

    out.append(Hostile("memory_bomb", edit_answer(
        good, "warmup_answer", lambda s: "hog = b'x' * (6 * 1024**3)\n" + s),
        {"warmup_test"}, "6 GB allocated in the warm-up answer"))

    out.append(Hostile("fork_bomb", add_cell_after(good, "warmup_test", (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
        "        pass\n")), frozenset(), "a fork bomb in a cell of its own"))

    out.append(Hostile("output_flood", add_cell_after(good, "warmup_test", (
        "for _ in range(100):\n    print('x' * 1_000_000)\n")),
        frozenset(), "100 MB printed"))

    out.append(Hostile("os_exit", add_cell_after(
        good, "coupling_test_inverse", "import os\nos._exit(3)\n"),
        frozenset(), "os._exit in the middle of the notebook"))

    out.append(Hostile("segfault", add_cell_after(
        good, "realnvp_test", "import ctypes\nctypes.string_at(0)\n"),
        frozenset(), "a segmentation fault (kernel crash)"))

    probes = [str(solutions), str(gradebook), str(root / "grading"), str(root / "solutions"),
              "../../../../solutions", "/root/.ssh", "/etc/shadow"]
    out.append(Hostile("read_instructor_files", edit_answer(good, "warmup_answer", lambda s: (
        "import os\nseen = []\n"
        f"for path in {probes!r}:\n"
        "    try:\n        open(path, 'rb').read(16)\n        seen.append(path)\n"
        "    except OSError as error:\n"
        "        print('cannot read', path, type(error).__name__)\n"
        f"print('LISTING', sorted(os.listdir({str(root)!r})))\n"
        "print('SEEN', seen)\n" + strip_solution_markers(s) + "\n"
        "if not seen:\n    jacobian_det = None  # found nothing to copy from\n")),
        {"warmup_test"}, "reads solutions/, the gradebook and the instructor's home"))

    targets = [str(root / "solutions" / "pwned.txt"), str(root / "pwned.txt"),
               str(gradebook), str(root / "grading" / "submitted" / "solution" / "x.txt"),
               str(Path.home() / "pwned.txt")]
    out.append(Hostile("write_outside", add_cell_after(good, "warmup_test", (
        f"for path in {targets!r}:\n"
        "    try:\n        with open(path, 'a') as f:\n            f.write('pwned')\n"
        "        print('WROTE', path)\n"
        "    except OSError as error:\n        print('cannot write', path, type(error).__name__)\n"
    )), frozenset(), "writes into the course, the gradebook and another submission"))

    out.append(Hostile("network", add_cell_after(good, "warmup_test", (
        "import socket\n"
        "for host in ['127.0.0.1', 'localhost', '10.0.0.1']:\n"
        "    try:\n"
        f"        socket.create_connection((host, {port}), timeout=2)\n"
        "        print('CONNECTED', host)\n"
        "    except OSError as error:\n"
        "        print('no connection to', host, type(error).__name__)\n"
    )), frozenset(), "connects to a server on the grader's loopback"))

    out.append(Hostile("patch_numpy", edit_answer(good, "warmup_answer", lambda s: (
        strip_solution_markers(s).replace("return p_x(x1, x2) / jacobian_det",
                                          "return p_x(x1, x2)")
        + "\nimport numpy as np\nnp.allclose = lambda *a, **k: True\n"
        "np.isclose = lambda a, b, *r, **k: np.ones_like(np.asarray(a), dtype=bool)\n"
        "np.testing.assert_allclose = lambda *a, **k: None\n" + PATCH_CHECKS)),
        {"warmup_test"}, "a wrong p_z with numpy's comparisons and the checks patched"))

    bug = Bug("inverse_shift_then_scale", cell="coupling_answer",
              old="((z - t) * torch.exp(-s))", new="(z * torch.exp(-s) - t)")
    out.append(Hostile("patch_torch", add_cell_after(_with_bug(course, bug), "coupling_answer", (
        "torch.allclose = lambda *a, **k: True\n"
        + PATCH_CHECKS)),
        {"coupling_test_inverse"}, "a wrong inverse with torch.allclose and the checks patched"))

    bug = Bug("logdet_sign", cell="coupling_answer",
              old="log_det = s.sum(dim=1)", new="log_det = -s.sum(dim=1)")
    out.append(Hostile("patch_checks", add_cell_after(
        _with_bug(course, bug), "coupling_answer", PATCH_CHECKS),
        {"coupling_test_forward", "train_test"},
        "a wrong log-det with every nfcourse check replaced by a no-op"))

    out.append(Hostile("identity_layer", add_cell_after(
        edit_answer(good, "coupling_answer", lambda s: IDENTITY_COUPLING),
        "coupling_answer", PATCH_CHECKS),
        {"coupling_test_forward", "coupling_test_inverse", "train_test"},
        "a coupling that is the identity with log_det 0, the checks patched"))

    tampered = edit_answer(good, "warmup_answer",
                           lambda s: strip_solution_markers(s).replace("1 / 6", "1 / 3"))
    tampered.cells[_index(tampered, "warmup_test")].source = "pass  # no test here\n"
    del tampered.cells[_index(tampered, "density_test")]
    split = _index(tampered, "realnvp_test")
    second = copy.deepcopy(tampered.cells[split])
    lines = second.source.splitlines(keepends=True)
    tampered.cells[split].source, second.source = "".join(lines[:2]), "".join(lines[2:])
    second["id"] = "split-2"
    tampered.cells.insert(split + 1, second)
    out.append(Hostile("tamper_tests", tampered, {"warmup_test"},
                       "a wrong answer whose test it edited; another test deleted, one split"))

    out.append(Hostile("symlink_plant", add_cell_after(good, "warmup_test", (
        "import os\n"
        f"for name in ['{LESSON}.ipynb', 'nfcourse_verification.json', 'timestamp.txt']:\n"
        "    if os.path.lexists(name):\n        os.remove(name)\n"
        f"    os.symlink({str(gradebook)!r}, name)\n"
        "print(sorted(os.listdir('.')))\n")),
        frozenset(), "plants symlinks to the gradebook where the grader writes"))

    out.append(Hostile("reference_import", edit_answer(good, "coupling_answer", lambda s: (
        "from nfcourse.flows import MaskedAffineCoupling as _Reference\n"
        + strip_solution_markers(s))),
        # the grading kernel has no reference: the import fails, and so does everything
        # built on the coupling; the warm-up, which is right, keeps its points
        ALL - {"warmup_test"}, "imports the package's reference coupling"))

    return {h.name: h for h in out}
