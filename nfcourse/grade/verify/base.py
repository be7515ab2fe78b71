"""The pieces every lesson's independent check is made of.

* :class:`Oracle`: asks the student's kernel to run a short query and returns the arrays it
  printed back (float64, decoded in the grader; nothing from the kernel is unpickled or
  executed here).
* :class:`Verdict`: pass or fail of one graded test cell, with the reason in plain words.
* :class:`Verifier`: a lesson's checks, one per graded test cell.
* :func:`review_notes`: what in the student's cells an instructor should read (never scored).

Nothing here looks for the package's reference answers in the student's code: the grading
kernel runs an edition of the package without the lesson's answers (security by absence,
:mod:`nfcourse.grade.edition`), so a submission can only pass by computing the numbers.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib
import json
import secrets
import textwrap
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Oracle", "LocalOracle", "OracleError", "Verdict", "Verifier", "verifier_for",
           "review_notes", "KERNEL_PREAMBLE", "draw_seed", "check_array", "submission_seed"]


class OracleError(RuntimeError):
    """The kernel did not answer a query with well-formed numbers."""


@dataclass(frozen=True)
class Verdict:
    """The independent check's decision on one graded test cell."""

    grade_id: str
    passed: bool
    message: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"grade_id": self.grade_id, "passed": self.passed, "message": self.message,
                "seconds": round(self.seconds, 3)}


#: Sent once before the queries: helpers the queries use. Names start with ``_nfv`` so they
#: do not clobber the student's; redefining them from a submission changes nothing, since
#: this runs after every cell of the notebook.
KERNEL_PREAMBLE = r'''
import base64 as _nfv_b64, json as _nfv_json
import numpy as _nfv_np
import torch as _nfv_torch
_nfv_store = {}

def _nfv_decode(spec):
    data = _nfv_np.frombuffer(_nfv_b64.b64decode(spec["data"]), dtype="<f8")
    return data.reshape(spec["shape"]).copy()

def _nfv_encode(value):
    if isinstance(value, _nfv_torch.Tensor):
        value = value.detach().to("cpu", _nfv_torch.float64).numpy()
    array = _nfv_np.ascontiguousarray(_nfv_np.asarray(value, dtype="<f8"))
    return {"shape": list(array.shape), "data": _nfv_b64.b64encode(array.tobytes()).decode()}

def _nfv_prep(module, seed, std):
    """Float64 and trainable parameters drawn from N(0, std^2): a layer that only works at
    its zero initialisation (the identity) shows itself. A frozen parameter
    (requires_grad=False, e.g. a mask kept as nn.Parameter) is a constant of the layer,
    not something training could move, so it is left alone."""
    module = module.double()
    gen = _nfv_torch.Generator().manual_seed(int(seed))
    with _nfv_torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(_nfv_torch.randn(p.shape, generator=gen, dtype=_nfv_torch.float64) * std)
    return module

class _NfvCoupling(_nfv_torch.nn.Module):
    """A coupling whose maths the grader knows: z_free = x_free e^s + t with
    s = 0.6 tanh(x_kept + 0.3), t = 0.8 sin(x_kept)."""
    def __init__(self, mask, hidden=0):
        super().__init__()
        self.register_buffer("mask", _nfv_torch.as_tensor(mask).detach().clone().double().flatten())
        self.gain = _nfv_torch.nn.Parameter(_nfv_torch.tensor(0.6, dtype=_nfv_torch.float64))
    def _st(self, kept):
        k = (kept * self.mask).sum(dim=1, keepdim=True)
        return self.gain * _nfv_torch.tanh(k + 0.3), 0.8 * _nfv_torch.sin(k)
    def forward(self, x, context=None):
        s, t = self._st(x)
        free = 1 - self.mask
        return x * self.mask + free * (x * _nfv_torch.exp(s) + t), (s * free).sum(dim=1)
    def inverse(self, z, context=None):
        s, t = self._st(z)
        free = 1 - self.mask
        return z * self.mask + free * ((z - t) * _nfv_torch.exp(-s)), -(s * free).sum(dim=1)

class _NfvAffineFlow(_nfv_torch.nn.Module):
    """z = x A^T + b with A and b sent by the grader."""
    def __init__(self, a, b):
        super().__init__()
        self.a = _nfv_torch.nn.Parameter(_nfv_torch.as_tensor(a))
        self.b = _nfv_torch.nn.Parameter(_nfv_torch.as_tensor(b))
    def forward(self, x, context=None):
        logdet = _nfv_torch.linalg.slogdet(self.a)[1]
        return x @ self.a.T + self.b, logdet.expand(x.shape[0])
    def inverse(self, z, context=None):
        logdet = _nfv_torch.linalg.slogdet(self.a)[1]
        return (z - self.b) @ _nfv_torch.linalg.inv(self.a).T, -logdet.expand(z.shape[0])
'''


def _encode(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(np.asarray(array, dtype="<f8"))
    return {"shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def _decode(spec) -> np.ndarray:
    if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
        raise OracleError("the kernel's answer is not an array")
    shape = [int(s) for s in spec["shape"]]
    raw = base64.b64decode(str(spec.get("data", "")), validate=True)
    if len(raw) != 8 * int(np.prod(shape, dtype=np.int64)):
        raise OracleError("the kernel's answer has the wrong size")
    return np.frombuffer(raw, dtype="<f8").reshape(shape).copy()


class Oracle:
    """Runs queries in the student's kernel through ``execute(code) -> printed text``.

    ``query(code, inputs)`` runs ``code`` as the body of a function of ``inp`` (the float64
    arrays sent) that fills a dict ``out``; it returns ``out`` as float64 NumPy arrays, or
    raises :class:`OracleError` with the kernel's error message.
    """

    def __init__(self, execute: Callable[[str, float], str], timeout: float = 60.0):
        self._execute = execute
        self.timeout = timeout
        self._ready = False

    def _prepare(self) -> None:
        if not self._ready:
            self._execute(KERNEL_PREAMBLE, self.timeout)
            self._ready = True

    def _run(self, code: str, timeout: float | None = None) -> dict:
        marker = f"@@nfv-{secrets.token_hex(8)}@@"
        program = (
            f"{code}\n"
            f"print({marker!r} + _nfv_json.dumps(_nfv_result), flush=True)\n"
        )
        text = self._execute(program, self.timeout if timeout is None else timeout)
        for line in reversed(text.splitlines()):
            if line.startswith(marker):
                try:
                    return json.loads(line[len(marker):])
                except json.JSONDecodeError as error:
                    raise OracleError(f"the kernel's answer is garbled ({error})") from None
        raise OracleError("the kernel gave no answer (did the notebook replace print or "
                          "sys.stdout, or stop the kernel?)")

    def query(self, code: str, timeout: float | None = None,
              **inputs: np.ndarray | float) -> dict[str, np.ndarray]:
        self._prepare()
        payload = json.dumps({k: _encode(np.asarray(v, dtype=float)) for k, v in inputs.items()})
        body = textwrap.indent(textwrap.dedent(code).strip(), "        ")
        program = (
            "def _nfv_query(inp):\n"
            "    out = {}\n"
            "    with _nfv_torch.no_grad():\n"
            f"{body}\n"
            "    return out\n"
            "try:\n"
            f"    _nfv_inputs = _nfv_json.loads({payload!r})\n"
            "    _nfv_inputs = {k: _nfv_decode(v) for k, v in _nfv_inputs.items()}\n"
            "    _nfv_answer = _nfv_query(_nfv_inputs)\n"
            "    _nfv_result = {'ok': True,\n"
            "                   'out': {k: _nfv_encode(v) for k, v in _nfv_answer.items()}}\n"
            "except BaseException as _nfv_error:\n"
            "    _nfv_result = {'ok': False, 'error': type(_nfv_error).__name__ + ': ' + "
            "str(_nfv_error)[:300]}\n"
        )
        answer = self._run(program, timeout)
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error", "?") if isinstance(answer, dict) else "?"
            raise OracleError(f"your code raised {error}")
        out = answer.get("out")
        if not isinstance(out, dict):
            raise OracleError("the kernel's answer is not a dict of arrays")
        return {str(k): _decode(v) for k, v in out.items()}


def submission_seed(lesson: str, sources: Iterable[str]) -> int:
    """The independent check's seed for one submission: a 63-bit number from the SHA-256 of
    the lesson's name and the student's code cells, in order. Grading the same notebook
    twice draws the same inputs (the same verdict, reproducible from the recorded seed);
    any change to a cell draws new ones. Each part is length-prefixed, so moving text from
    one cell to the next changes the seed too.

    Example:
        >>> submission_seed("01_x", ["a = 1"]) == submission_seed("01_x", ["a = 1"])
        True
        >>> submission_seed("01_x", ["a = 1"]) == submission_seed("01_x", ["a = 2"])
        False
    """
    digest = hashlib.sha256()
    for part in (lesson, *sources):
        data = str(part).encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def draw_seed(rng: np.random.Generator) -> int:
    """A seed for the kernel's torch generator, drawn from the check's own ``rng``."""
    return int(rng.integers(0, 2**31 - 1))


def check_array(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    """Fail, naming ``name``, unless ``array`` has exactly ``shape`` and only finite values."""
    shape = tuple(shape)
    assert array.shape == shape, f"{name} has shape {tuple(array.shape)}, expected {shape}"
    assert np.all(np.isfinite(array)), f"{name} contains NaN or Inf"


Check = Callable[[Oracle, np.random.Generator], str]


#: Constructs that load or run code by a computed name, or reach into the grader's helpers:
#: legitimate lesson code never needs them, so a submission that uses one is listed for the
#: instructor to read (the verdicts stand; a name scan alone cannot see through them).
_DYNAMIC_CALLS = {"__import__", "exec", "eval", "compile", "globals", "vars"}
#: attribute access by a name computed at run time (``getattr(flows, "Affine" + "Coupling")``
#: gets past a name scan; a constant name does not, and is not listed)
_BY_NAME = {"getattr", "setattr", "delattr"}
_DYNAMIC_MODULES = {"importlib", "builtins", "ctypes", "gc", "inspect"}
_DYNAMIC_ATTRS = {"modules", "settrace", "setprofile", "gettrace", "__builtins__",
                  "__globals__", "__code__", "__subclasses__", "__dict__", "__getattribute__"}


#: IPython magics that run code from elsewhere (a file, another interpreter, a shell):
#: ``get_ipython().run_line_magic('run', ...)`` after IPython's own transformation
_CODE_MAGICS = {"run", "load", "loadpy", "writefile", "script", "bash", "sh", "system", "sx",
                "python", "python2", "python3", "pypy", "perl", "ruby", "js", "javascript",
                "html", "prun", "capture", "macro", "store", "autoreload", "aimport",
                "load_ext", "reload_ext", "env", "set_env", "alias", "cd"}


def _python_of(source: str) -> str:
    """The Python a cell runs: IPython's own transformation of magics, shell escapes
    (``x = !true``) and help syntax, so that a cell is read the way the kernel reads it.

    Example:
        >>> _python_of("x = !true")
        "x = get_ipython().getoutput('true')\n"
    """
    # IPython ships with the kernel; its transformer is the definition of what a cell means
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def _ipython_call(node: ast.Call) -> str | None:
    """What a ``get_ipython().<method>(...)`` call of a transformed cell does, when it runs
    code or a shell command; None for other calls (``%matplotlib inline`` and the like)."""
    func = node.func
    if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call)
            and isinstance(func.value.func, ast.Name) and func.value.func.id == "get_ipython"):
        return None
    if func.attr in ("system", "getoutput"):
        return "runs a shell command"
    if func.attr in ("run_line_magic", "run_cell_magic") and node.args:
        name = node.args[0]
        magic = name.value if isinstance(name, ast.Constant) else None
        if not isinstance(magic, str) or magic in _CODE_MAGICS:
            return f"runs the magic %{magic}" if isinstance(magic, str) else "runs a magic"
    return None


def review_notes(sources: Iterable[str]) -> list[str]:
    """What in the student's cells an instructor should read: dynamic imports and code,
    shell commands and code-running magics, access to the interpreter's internals, the
    grader's ``_nfv`` helpers, and any cell that cannot be read as Python at all (it is
    listed, never skipped). Cells are read after IPython's own transformation, as the kernel
    runs them. The notes are for reading; nothing is scored from them.

    Example:
        >>> review_notes(["m = __import__('nfc' + 'ourse.flows')"])
        ['cell 1, line 1: calls __import__']
    """
    notes: list[tuple[int, int, str]] = []
    for number, source in enumerate(sources, start=1):
        try:
            tree = ast.parse(_python_of(source))
        except SyntaxError as error:
            notes.append((number, error.lineno or 0, f"cannot be parsed ({error.msg}): read "
                          "the whole cell"))
            continue
        except Exception as error:  # noqa: BLE001  (IPython's transformer may raise anything)
            notes.append((number, 0, f"cannot be transformed by IPython "
                          f"({type(error).__name__}): read the whole cell"))
            continue
        # ``model.modules()`` is torch; ``sys.modules`` (never called) is the interpreter's
        called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        for node in ast.walk(tree):
            what = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in _DYNAMIC_CALLS:
                what = f"calls {node.func.id}"
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in _BY_NAME and len(node.args) >= 2 \
                    and not isinstance(node.args[1], ast.Constant):
                what = f"calls {node.func.id} with a computed name"
            elif isinstance(node, ast.Call) and _ipython_call(node):
                what = _ipython_call(node)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                    else [node.module or ""]
                hit = [n for n in names if n.split(".")[0] in _DYNAMIC_MODULES]
                if hit:
                    what = f"imports {hit[0]}"
            elif isinstance(node, ast.Attribute) and node.attr in _DYNAMIC_ATTRS \
                    and not (node.attr == "modules" and id(node) in called):
                what = f"uses .{node.attr}"
            elif isinstance(node, ast.Name) and node.id.startswith("_nfv"):
                what = f"names the grader's {node.id}"
            if what is not None:
                notes.append((number, getattr(node, "lineno", 0), what))
    return [f"cell {n}, line {line}: {what}" for n, line, what in sorted(notes)]


@dataclass
class Verifier:
    """A lesson's independent checks: ``checks[grade_id](oracle, rng)`` returns a short
    summary of what it verified, or raises AssertionError / OracleError saying what is
    wrong. Verdicts come from numbers alone: how the student wrote or looked up the code
    is not graded (the grading kernel holds no reference answer to look up).

    Example:
        >>> v = Verifier("00_demo", {"t": lambda oracle, rng: "ok"})
        >>> [d.passed for d in v.run(None, [], np.random.default_rng(0))]
        [False]
    """

    lesson: str
    checks: dict[str, Check]
    depends: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def review(self, sources: Iterable[str]) -> list[str]:
        """:func:`review_notes` of the student's cells (for reading; never scored)."""
        return review_notes(sources)

    def run(self, oracle: Oracle | None, student_sources: Iterable[str],
            rng: np.random.Generator) -> list[Verdict]:
        """One verdict per check; ``oracle=None`` (no kernel) fails each, saying so.
        ``student_sources`` are not scored (see :meth:`review`)."""
        verdicts = []
        unchecked = "the kernel could not be started to check this exercise"
        for grade_id, check in self.checks.items():
            if oracle is None:
                verdicts.append(Verdict(grade_id, False, unchecked))
                continue
            started = time.monotonic()
            try:
                passed, message = True, check(oracle, rng)
            except OracleError as error:
                passed, message = False, str(error)
            except AssertionError as error:
                passed, message = False, str(error) or "a property failed"
            except Exception as error:  # noqa: BLE001  (a malformed answer: still a verdict)
                passed, message = False, f"{type(error).__name__}: {error}"
            verdicts.append(Verdict(grade_id, passed, message, time.monotonic() - started))
        return verdicts


def verifier_for(lesson: str) -> Verifier | None:
    """The lesson's verifier (module ``lessonNN``), or None when it has none yet."""
    number = lesson[:2]
    if not number.isdigit():
        return None
    try:
        module = importlib.import_module(f"nfcourse.grade.verify.lesson{number}")
    except ModuleNotFoundError:
        return None
    return getattr(module, "VERIFIER", None)


class LocalOracle(Oracle):
    """An :class:`Oracle` over a namespace in this process (``exec``): for testing a lesson's
    checks against answers without a notebook or a kernel. Never use it on submissions."""

    def __init__(self, namespace: dict, timeout: float = 60.0):
        import contextlib
        import io

        def execute(code: str, timeout: float) -> str:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(compile(code, "<nfv-query>", "exec"), namespace)  # noqa: S102
            return buffer.getvalue()

        super().__init__(execute, timeout)
