"""Reference-evasion submissions of lesson 01: each reaches for the package's reference.

The package and its grader are open source, so a student can read how grading works and
try to get the reference layers to do the exercises. Each submission here is the released
lesson with the warm-up answered honestly (that is the honest work, 2 points: the stubs
score 0 and every later exercise needs the coupling) and a trick that would let the
reference answer the rest: it runs in a worker thread, the call tracer is paused or its
record cleared, the kernel's JSON answer or IPython's hooks and input transformers are
patched, the package source is copied under another name, names are computed (with a
``x = !true`` line beside), the check phase is detected, the source is read or its bytecode
loaded, a third-party flow library or ``pip`` stands in, the grader's own package is
imported, a reference pickled elsewhere is loaded... In the grading edition the reference
is simply not there, so each must score exactly its honest work.

Beside them, honest submissions that must keep FULL marks: a correct answer whose
docstring names the reference, one that imports the reference after the exercise to
compare with it (catching the ImportError), one that reaches an allowed package function
by a computed name.

:func:`evasion_submissions` returns ``{name: Hostile}`` (``loses``: the test cells that must
score zero; every other keeps its points), like ``hostile.py``.
"""

from __future__ import annotations

import base64
import copy
import pickle

from harness import _meta, released_notebook, solution_answers, student_notebook
from hostile import ALL, LESSON, Hostile

from nfcourse.grade import Course

#: what the honest work (the warm-up) keeps: everything else is lost
HONEST_WORK_LOSES = ALL - {"warmup_test"}

# -------------------------------------------------------------------------- the payload
#: the rest of the exercises done by the reference, given ``_lib`` (something with the
#: reference's names): RealNVP from ``realnvp_2d``, FlowDensity a ``FlowModel``
REALNVP_BY_REFERENCE = '''
class RealNVP(nn.Module):
    def __init__(self, n_layers=6, hidden=64, coupling=None):
        super().__init__()
        self.flow = _lib.realnvp_2d(num_layers=n_layers, hidden=hidden, num_hidden=2).flow
        if coupling is not None:
            for i, layer in enumerate(self.flow.layers):
                self.flow.layers[i] = coupling(layer.mask, hidden)
        self.layers = self.flow.layers

    def forward(self, x, context=None):
        return self.flow(x)

    def inverse(self, z, context=None):
        return self.flow.inverse(z)
'''

DENSITY_BY_REFERENCE = '''
class FlowDensity(_lib.FlowModel):
    def __init__(self, flow):
        super().__init__(flow, _lib.StandardNormal(2), data_shape=(2,))
'''

COUPLING_IS_REFERENCE = "\nMaskedAffineCoupling = _lib.MaskedAffineCoupling\n"

#: a wrapper around the reference coupling whose calls go through ``_call(fn, *args)``
WRAPPED_COUPLING = '''
class MaskedAffineCoupling(nn.Module):
    def __init__(self, mask, hidden=64):
        super().__init__()
        self.inner = _call(_lib.MaskedAffineCoupling, mask, hidden)
        self.mask = self.inner.mask

    def forward(self, x, context=None):
        return _call(self.inner.forward, x)

    def inverse(self, z, context=None):
        return _call(self.inner.inverse, z)
'''

# ----------------------------------------------------------------------- the nine tricks
THREAD = '''
import importlib
from concurrent.futures import ThreadPoolExecutor

_pool = ThreadPoolExecutor(1)  # sys.settrace is per thread: the tracer never sees this one


def _call(fn, *args):
    return _pool.submit(fn, *args).result()


_lib = _call(importlib.import_module, "nfcourse.flows")
''' + WRAPPED_COUPLING

PAUSE_TRACER = '''
from sys import gettrace, settrace

import nfcourse.flows as _lib


def _call(fn, *args):
    saved = gettrace()
    settrace(None)
    try:
        return fn(*args)
    finally:
        settrace(saved)
''' + WRAPPED_COUPLING

CLEAR_RECORD = '''
import nfcourse.flows as _lib


def _call(fn, *args):
    try:
        return fn(*args)
    finally:  # whatever recorded the call is emptied
        for _name, _value in list(globals().items()):
            if _name.startswith("_nf") and isinstance(_value, (list, dict, set)) \\
                    and _name not in ("_nfv_inputs", "_nfv_store"):
                try:
                    _value.clear()
                except Exception:
                    pass
''' + WRAPPED_COUPLING

PATCH_JSON = '''
import json

import nfcourse.flows as _lib

_real_dumps = json.dumps


def _dumps(obj, *args, **kwargs):
    if isinstance(obj, dict):
        obj = {k: ([] if k in ("reference", "seen", "used") else True if k == "traced" else v)
               for k, v in obj.items()}
    return _real_dumps(obj, *args, **kwargs)


json.dumps = _dumps
''' + COUPLING_IS_REFERENCE

SWAP_HOOKS = '''
import nfcourse.flows as _lib

_ip = get_ipython()
for _event in ("pre_run_cell", "post_run_cell", "pre_execute", "post_execute"):
    for _callback in list(_ip.events.callbacks.get(_event, [])):
        _ip.events.unregister(_event, _callback)
    _ip.events.register(_event, lambda *args, **kwargs: None)
''' + COUPLING_IS_REFERENCE

INPUT_TRANSFORMER = '''
import nfcourse.flows as _lib


def _disarm(lines):
    """Rewrite whatever the grader sends: no tracer, no record of what ran."""
    out = []
    for line in lines:
        if "settrace" in line or "setprofile" in line:
            line = line[: len(line) - len(line.lstrip())] + "pass\\n"
        out.append(line.replace("_nfv_seen[:5]", "[]"))
    return out


get_ipython().input_transformers_cleanup.append(_disarm)
''' + COUPLING_IS_REFERENCE

COPY_PACKAGE = '''
import pathlib
import shutil
import sys
import tempfile

import nfcourse

_home = pathlib.Path(tempfile.mkdtemp())
shutil.copytree(pathlib.Path(nfcourse.__file__).parent, _home / "mylib",
                ignore=shutil.ignore_patterns("__pycache__"))
for _file in (_home / "mylib").rglob("*.py"):
    _file.chmod(0o644)
    _file.write_text(_file.read_text().replace("nfcourse", "mylib"))
sys.path.insert(0, str(_home))
import mylib.flows as _lib  # the same code, under a name nothing watches
''' + COUPLING_IS_REFERENCE

COMPUTED_NAMES = '''
x = !true
import importlib

_lib = importlib.import_module("nf" "course" + ".flows")
MaskedAffineCoupling = getattr(_lib, "Masked" + "Affine" "Coupling")
'''

DETECT_CHECK = '''
import sys
import threading


def _checking():
    """True while the grader's check runs: its frames or its helpers are there."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name.startswith("_nf") or "nfcourse/grade" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return sys.gettrace() is not None or any(k.startswith("_nfv") for k in globals())


def _hidden(fn, *args):
    """Run ``fn`` where a tracer cannot see it, but only when the check is looking."""
    if not _checking():
        return fn(*args)
    box = []
    worker = threading.Thread(target=lambda: box.append(fn(*args)))
    worker.start()
    worker.join()
    return box[0]


class MaskedAffineCoupling(nn.Module):
    """The reference, run out of sight whenever the grader's check is the caller."""

    def __init__(self, mask, hidden=64):
        super().__init__()
        import nfcourse.flows as lib

        self.inner = _hidden(lib.MaskedAffineCoupling, mask, hidden)
        self.mask = self.inner.mask

    def forward(self, x, context=None):
        return _hidden(self.inner.forward, x)

    def inverse(self, z, context=None):
        return _hidden(self.inner.inverse, z)


import nfcourse.flows as _lib  # for RealNVP and FlowDensity below
'''

# ----------------------------------------------------------------------- more of them
#: ``_load_flows(folder)``: the reference modules' source in ``folder`` (a ``flows/``) run
#: into one namespace
LOAD_FLOWS = '''
import types


def _load_flows(folder):
    lib = types.SimpleNamespace()
    for part in ("priors.py", "coupling.py", "model.py", "builders.py"):
        path = str(folder) + "/" + part
        with open(path) as handle:
            exec(compile(handle.read(), path, "exec"), lib.__dict__)
    return lib
'''

READ_SOURCE = '''
import importlib
import inspect
import pathlib
import types

import nfcourse

_root = pathlib.Path(nfcourse.__file__).parent
_lib = types.SimpleNamespace()
for _part in ("flows/priors.py", "flows/coupling.py", "flows/model.py", "flows/builders.py"):
    _module = types.ModuleType("mine_" + _part.replace("/", "_")[:-3])
    exec(compile((_root / _part).read_text(), str(_root / _part), "exec"), _module.__dict__)
    _lib.__dict__.update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
try:  # or the source of the loaded module
    exec(inspect.getsource(importlib.import_module("nfcourse.flows.coupling")), _lib.__dict__)
except Exception:
    pass
''' + COUPLING_IS_REFERENCE

PYC = '''
import glob
import importlib.util
import marshal
import os
import sys
import types

_found = []
for _entry in [os.path.dirname(importlib.util.find_spec("nfcourse").origin), *sys.path]:
    if os.path.isdir(_entry):
        _found += glob.glob(os.path.join(_entry, "**", "coupling*.pyc"), recursive=True)
_module = types.ModuleType("mine")
for _path in _found:
    with open(_path, "rb") as _file:
        exec(marshal.loads(_file.read()[16:]), _module.__dict__)
    if hasattr(_module, "MaskedAffineCoupling"):
        break
MaskedAffineCoupling = _module.MaskedAffineCoupling
'''

THIRD_PARTY = '''
try:
    import zuko  # noqa: F401  (no 2-D coupling of the right shape there: normflows then)
except ImportError:
    pass
import normflows as nf


class MaskedAffineCoupling(nn.Module):
    def __init__(self, mask, hidden=64):
        super().__init__()
        self.mask = torch.as_tensor(mask, dtype=torch.get_default_dtype())
        self.inner = nf.flows.MaskedAffineFlow(
            self.mask, nf.nets.MLP([2, hidden, 2], init_zeros=True),
            nf.nets.MLP([2, hidden, 2], init_zeros=True))

    def forward(self, x, context=None):
        z, log_det = self.inner.inverse(x)
        return z, log_det

    def inverse(self, z, context=None):
        return self.inner(z)
'''

THIRD_PARTY_FILES = '''
import glob
import importlib.util
import os
import sys

# past an import hook that only blocks the name: the files, loaded under another one
_init = None
for _root in [sys.prefix, *sys.path, "/usr/lib", "/usr/local/lib", "/opt", "/root", "/home"]:
    _hits = glob.glob(os.path.join(_root, "**", "normflows", "__init__.py"), recursive=True)
    if _hits:
        _init = _hits[0]
        break
_spec = importlib.util.spec_from_file_location(
    "nf_copy", _init, submodule_search_locations=[os.path.dirname(_init)])
nf = importlib.util.module_from_spec(_spec)
sys.modules["nf_copy"] = nf
_spec.loader.exec_module(nf)
''' + THIRD_PARTY.split("import normflows as nf\n", 1)[1]

PIP = '''
import subprocess
import sys
import tempfile

_target = tempfile.mkdtemp()
for _package in ("nfcourse", "normflows"):
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--retries", "0", "--timeout", "3", "--target", _target, _package],
                   timeout=60, capture_output=True)
sys.path.insert(0, _target)
import nfcourse.flows as _lib  # noqa: E402  (the freshly installed one, if it came)
''' + COUPLING_IS_REFERENCE

GRADER_PACKAGE = LOAD_FLOWS + '''
import importlib
import pathlib
import types

_lib = types.SimpleNamespace()
for _name in ("nfcourse.grade.edition", "nfcourse.grade.verify.lesson01", "nfcourse.grade"):
    try:
        _grader = importlib.import_module(_name)
    except Exception:
        continue
    _origin = getattr(_grader, "PACKAGE", None) or next(
        p for p in pathlib.Path(_grader.__file__).parents if p.name == "nfcourse")
    _lib = _load_flows(pathlib.Path(_origin) / "flows")
    break
''' + COUPLING_IS_REFERENCE

LIVE_OBJECTS = '''
import gc
import sys

import nfcourse.checks.lesson01  # noqa: F401  (the checks know the reference)
import nfcourse.flows  # noqa: F401


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


_candidates = [c for c in [*_subclasses(nn.Module), *gc.get_objects()]
               if isinstance(c, type) and c.__name__ == "MaskedAffineCoupling"
               and c.__module__.startswith("nfcourse")]
for _module in list(sys.modules.values()):
    _value = vars(_module).get("MaskedAffineCoupling") if hasattr(_module, "__dict__") else None
    if isinstance(_value, type):
        _candidates.append(_value)
MaskedAffineCoupling = _candidates[0]
'''

MODULE_DICT = '''
import importlib
import sys

_module = importlib.import_module("nfcourse.flows.coupling")
MaskedAffineCoupling = (vars(_module).get("MaskedAffineCoupling")
                        or object.__getattribute__(_module, "__dict__")["MaskedAffineCoupling"]
                        or sys.modules["nfcourse.flows"].__dict__["MaskedAffineCoupling"])
'''

PATH_SEARCH = LOAD_FLOWS + '''
import glob
import os
import sys
import types

_lib = types.SimpleNamespace()
for _entry in [*sys.path, os.getcwd(), "/", os.path.expanduser("~")]:
    for _path in glob.glob(os.path.join(_entry, "*", "nfcourse", "flows", "coupling.py")) + \\
            glob.glob(os.path.join(_entry, "nfcourse", "flows", "coupling.py")):
        try:
            _code = open(_path).read()
        except OSError:
            continue
        if "class MaskedAffineCoupling" in _code:
            _lib = _load_flows(os.path.dirname(_path))
            break
''' + COUPLING_IS_REFERENCE


def _pickled_reference() -> str:
    """The reference's classes pickled in this (the grader's test) process, as a student
    would ship them from a run on their own machine."""
    from nfcourse.flows.coupling import MaskedAffineCoupling

    layer = MaskedAffineCoupling([1.0, 0.0], hidden=8)
    return base64.b64encode(pickle.dumps((MaskedAffineCoupling, layer))).decode()


def pickled(blob: str) -> str:
    return f'''
import base64
import pickle

_class, _layer = pickle.loads(base64.b64decode({blob!r}))
MaskedAffineCoupling = _class
'''


# ------------------------------------------------------------------------------ notebooks
def _set(nb, answers: dict[str, str]):
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        grade_id = _meta(cell).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    return nb


def _with_cell_after(nb, grade_id: str, source: str):
    import nbformat

    nb = copy.deepcopy(nb)
    index = next(i for i, c in enumerate(nb.cells) if _meta(c).get("grade_id") == grade_id)
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    return nb


def honest_stub(course: Course):
    """The released lesson with only the warm-up answered (the honest work)."""
    return _set(released_notebook(course, LESSON),
                {"warmup_answer": solution_answers(course, LESSON)["warmup_answer"]})


def by_reference(course: Course, trick: str):
    """The honest warm-up, ``trick`` in the coupling cell, RealNVP, FlowDensity and the
    training done by the reference the trick reached."""
    answers = solution_answers(course, LESSON)
    return _set(honest_stub(course), {"coupling_answer": trick,
                                      "realnvp_answer": REALNVP_BY_REFERENCE,
                                      "density_answer": DENSITY_BY_REFERENCE,
                                      "train_answer": answers["train_answer"]})


def honest_rest(course: Course, trick: str):
    """Every answer honest (the solution's) except the coupling, which is ``trick``: without
    a coupling of its own, RealNVP's, FlowDensity's and the training's tests fail too."""
    return _set(student_notebook(course, LESSON), {"coupling_answer": trick})


DOCSTRING = '''
    """An affine coupling of my own: it does not use nfcourse.flows.AffineCoupling or
    nfcourse.flows.MaskedAffineCoupling (the package's references), only torch.nn."""
'''

COMPARE_AFTER = '''
# Going further: compare my coupling with the package's (not available while grading).
try:
    from nfcourse.flows import MaskedAffineCoupling as ReferenceCoupling
except ImportError as error:
    print("the reference is not available here:", error)
else:
    reference = ReferenceCoupling(torch.tensor([1.0, 0.0]), hidden=16)
    print("parameters: mine", sum(p.numel() for p in MaskedAffineCoupling(
        torch.tensor([1.0, 0.0]), hidden=16).parameters()), "reference",
        sum(p.numel() for p in reference.parameters()))
'''

COMPUTED_ALLOWED = '''
import importlib

_trainer = getattr(importlib.import_module("nfcourse." + "train"), "f" + "it")
_steps = getattr(importlib.import_module("nfcourse.train"), "fast" + "_steps")
'''


def evasion_submissions(course: Course) -> dict[str, Hostile]:
    """The class: ``honest_stub`` (the baseline), the tricks, and the honest full-marks
    cases."""
    out: list[Hostile] = [Hostile("honest_stub", honest_stub(course), HONEST_WORK_LOSES,
                                  "only the warm-up answered: what every trick keeps")]

    def trick(name: str, notebook, what: str) -> None:
        out.append(Hostile(name, notebook, HONEST_WORK_LOSES, what))

    # the nine of issue 15, adapted
    trick("thread", by_reference(course, THREAD), "the reference imported and run in a thread")
    trick("pause_tracer", by_reference(course, PAUSE_TRACER),
          "sys.settrace(None) around every reference call")
    trick("clear_record", by_reference(course, CLEAR_RECORD),
          "the grader's record lists emptied after each call")
    trick("patch_json", by_reference(course, PATCH_JSON),
          "json.dumps drops 'reference' from the kernel's answers")
    trick("swap_hooks", by_reference(course, SWAP_HOOKS), "IPython's run-cell hooks replaced")
    trick("input_transformer", by_reference(course, INPUT_TRANSFORMER),
          "an input transformer rewrites the grader's queries")
    trick("copy_package", by_reference(course, COPY_PACKAGE),
          "the package copied at run time and imported as mylib")
    trick("computed_names", by_reference(course, COMPUTED_NAMES),
          "importlib + getattr with computed names, and x = !true")
    trick("detect_check", by_reference(course, DETECT_CHECK),
          "a coupling that answers with the reference while the check runs")
    # more
    trick("read_source", by_reference(course, READ_SOURCE),
          "the source read via nfcourse.__file__ and inspect.getsource, then exec'd")
    trick("pyc", honest_rest(course, PYC), "a coupling*.pyc found on sys.path, marshal-loaded")
    trick("third_party", honest_rest(course, THIRD_PARTY), "normflows' MaskedAffineFlow")
    trick("third_party_files", honest_rest(course, THIRD_PARTY_FILES),
          "normflows' files found on disk and loaded under another name")
    trick("pip", by_reference(course, PIP), "pip install inside the kernel (no network)")
    trick("grader_package", by_reference(course, GRADER_PACKAGE),
          "nfcourse.grade imported to find the real source")
    trick("live_objects", honest_rest(course, LIVE_OBJECTS),
          "the reference class found through gc, __subclasses__ and sys.modules")
    trick("module_dict", honest_rest(course, MODULE_DICT),
          "the module's __dict__ read past its __getattr__")
    trick("path_search", by_reference(course, PATH_SEARCH),
          "coupling.py searched for on sys.path, /, ~ and exec'd")
    trick("pickled", honest_rest(course, pickled(_pickled_reference())),
          "the reference class pickled on another machine, unpickled here")

    # honest work that must keep every point
    answers = solution_answers(course, LESSON)
    coupling = answers["coupling_answer"].replace(
        "class MaskedAffineCoupling(nn.Module):\n",
        "class MaskedAffineCoupling(nn.Module):" + DOCSTRING, 1)
    assert coupling != answers["coupling_answer"]
    train = COMPUTED_ALLOWED + answers["train_answer"].replace(
        "history = fit(", "history = _trainer(").replace("fast_steps(", "_steps(")
    assert "_trainer(" in train and "_steps(" in train
    out.append(Hostile("honest_docstring_and_computed_name",
                       _set(student_notebook(course, LESSON),
                            {"coupling_answer": coupling, "train_answer": train}),
                       frozenset(), "a docstring naming the references; fit reached by a "
                       "computed name"))
    out.append(Hostile("honest_compare_after", _with_cell_after(
        student_notebook(course, LESSON), "train_test", COMPARE_AFTER), frozenset(),
        "imports the reference after the exercises to compare (catching ImportError)"))
    return {h.name: h for h in out}
