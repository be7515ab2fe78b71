"""The grading edition of the package: ``nfcourse`` without the answers of one lesson.

A lesson's grading kernel must not hold an implementation of any exercise of that lesson
(security by absence: a tracer inside a process the student controls cannot be made sound).
:func:`build_edition` writes a copy of this package's own source in which

* ``nfcourse/grade/`` is left out (the kernel never needs grading code);
* every reference named in :data:`EXERCISES` for the lesson is deleted from its module (a
  class, a function, a module-level assignment, or one method of a class);
* every re-export of a removed name (``from .coupling import AffineCoupling``, ``__all__``)
  is dropped, and each module that defined or re-exported one gets a module ``__getattr__``
  (PEP 562) raising :class:`nfcourse.removed.ExerciseRemoved`, so ``from m import Name``,
  ``m.Name`` and ``getattr(importlib.import_module(m), name)`` all fail naming the exercise;
* every remaining use of a removed name in package code raises the same error when it
  runs (an ``isinstance`` test against a removed class reads False instead);
* there are no ``__pycache__`` folders and every file is read-only.

Editions are cached per lesson and hash of the package source under :func:`cache_root`
and built atomically (a temporary folder, then a rename).

Example:
    >>> path = build_edition("03_coupling_layers", Path(tempfile.mkdtemp()))  # doctest: +SKIP
    >>> (path / "nfcourse" / "grade").exists()                                 # doctest: +SKIP
    False
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EXERCISES", "Removal", "build_edition", "cache_root", "edition_for", "removals",
           "source_hash"]

_COUPLINGS = ("nfcourse.flows.coupling:MaskedAffineCoupling",
              "nfcourse.flows.coupling:AffineCoupling")
_IMAGE_BUILDERS = ("nfcourse.flows.builders:simple_image_flow",
                   "nfcourse.flows.builders:multiscale_flow", "nfcourse.flows.builders:glow")

#: lesson -> exercise -> the package code that implements it ("module:Name", or
#: "module:Class.method" for one method). A lesson keeps what earlier lessons taught unless it
#: grades it again; package code built on a removed reference fails where it uses it.
EXERCISES: dict[str, dict[str, tuple[str, ...]]] = {
    "01_two_moons_realnvp": {
        "coupling": _COUPLINGS,
        "realnvp": ("nfcourse.flows.builders:realnvp_2d", *_IMAGE_BUILDERS),
        "density": ("nfcourse.flows.model:FlowModel",),
        # a continuous flow trained on the moons would stand in for the student's RealNVP
        "train": ("nfcourse.cnf:CNF", "nfcourse.cnf:cnf_2d"),
    },
    "02_dequantization": {
        "dequantization": ("nfcourse.flows.dequantization:Dequantization",
                           "nfcourse.flows.dequantization:LogitTransform",
                           "nfcourse.flows.dequantization:check_pixels"),
        "bits_per_dim": ("nfcourse.flows.model:FlowModel.bits_per_dim",),
        "importance_bpd": ("nfcourse.flows.model:FlowModel.importance_bpd",
                           "nfcourse.flows.model:FlowModel.importance_log_prob"),
        "vardeq": ("nfcourse.flows.dequantization:VariationalDequantization",),
    },
    "03_coupling_layers": {
        "checkerboard_mask": ("nfcourse.flows.masks:checkerboard_mask",),
        "channel_mask": ("nfcourse.flows.masks:channel_mask",),
        "coupling": _COUPLINGS,
        "simple_flow": _IMAGE_BUILDERS,
    },
    "04_multiscale": {
        "squeeze": ("nfcourse.flows.multiscale:Squeeze",),
        "split": ("nfcourse.flows.multiscale:Split",),
        "multiscale": ("nfcourse.flows.builders:multiscale_flow",
                       "nfcourse.flows.builders:glow"),
    },
    "05_glow": {
        "actnorm": ("nfcourse.flows.glow:ActNorm",),
        "invconv": ("nfcourse.flows.glow:InvConv1x1",),
        "invconv_lu": ("nfcourse.flows.glow:InvConv1x1LU",),
        "glow_step": ("nfcourse.flows.glow:GlowStep",),
        "glow": ("nfcourse.flows.builders:glow",),
    },
    "06_ffjord_gifs": {
        "odefunc": ("nfcourse.cnf:ODENet",),
        "exact_divergence": ("nfcourse.cnf:exact_divergence", "nfcourse.cnf:_exact"),
        "hutchinson": ("nfcourse.cnf:hutchinson_divergence", "nfcourse.cnf:_hutchinson",
                       "nfcourse.cnf:sample_noise"),
        "cnf": ("nfcourse.cnf:CNF", "nfcourse.cnf:_Dynamics", "nfcourse.cnf:cnf_2d"),
    },
}

PACKAGE = Path(__file__).resolve().parent.parent  # the nfcourse folder
EDITION_VERSION = "1"  # bump when the way editions are written changes


@dataclass(frozen=True)
class Removal:
    """One removed reference: ``module`` (dotted), ``name`` (``Class`` or ``Class.method``),
    and the lesson and exercise it answers."""

    module: str
    name: str
    lesson: str
    exercise: str

    @property
    def what(self) -> str:
        """The public dotted name (``nfcourse.flows.AffineCoupling`` for a flows layer)."""
        if self.module.startswith("nfcourse.flows.") and "." not in self.name:
            return f"nfcourse.flows.{self.name}"
        return f"{self.module}.{self.name}"


def removals(lesson: str) -> list[Removal]:
    """The references removed from ``lesson``'s edition (first exercise that names one wins).

    A lesson without an entry in :data:`EXERCISES` (a new one, or an instructor's own) gets
    every lesson's removals: absence by default, until its entry says what it may keep.

    Example:
        >>> [r.what for r in removals("04_multiscale")][:2]
        ['nfcourse.flows.Squeeze', 'nfcourse.flows.Split']
    """
    if not lesson or "/" in lesson:
        raise ValueError(f"not a lesson name: {lesson!r}")
    table = EXERCISES.get(lesson)
    if table is None:
        table = {}
        for exercises in EXERCISES.values():
            for exercise, targets in exercises.items():
                table[exercise] = (*table.get(exercise, ()), *targets)
    out: dict[tuple[str, str], Removal] = {}
    for exercise, targets in table.items():
        for target in targets:
            module, sep, name = target.partition(":")
            if not sep or not module.startswith("nfcourse") or not name:
                raise ValueError(f"EXERCISES[{lesson!r}][{exercise!r}]: {target!r} is not "
                                 "'nfcourse.module:Name'")
            out.setdefault((module, name), Removal(module, name, lesson, exercise))
    return list(out.values())


# ------------------------------------------------------------------------- the source
def _module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, every module of the package but ``grade``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] == "grade" or "__pycache__" in rel.parts:
            continue
        parts = ["nfcourse", *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _data_files(package: Path = PACKAGE) -> list[Path]:
    """Files of the package other than Python source (the logo), ``grade`` left out."""
    return [p for p in sorted(package.rglob("*"))
            if p.is_file() and p.suffix not in (".py", ".pyc")
            and p.relative_to(package).parts[0] not in ("grade", "__pycache__")
            and "__pycache__" not in p.relative_to(package).parts]


def source_hash(package: Path = PACKAGE) -> str:
    """SHA-256 over the package's files (``grade`` included: its ``EXERCISES`` shape it)."""
    digest = hashlib.sha256(EDITION_VERSION.encode())
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(package)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _resolve(module: str, level: int, target: str | None, is_package: bool) -> str:
    """The absolute module of a (possibly relative) ``from ... import`` inside ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


class _Rewriter(ast.NodeTransformer):
    """Turns every load of a removed local name into a call that raises (or, as the class
    of an ``isinstance``/``issubclass`` test, into :class:`nfcourse.removed.Absent`)."""

    def __init__(self, local: dict[str, Removal]):
        self.local = local
        self.changed = False
        self.in_function = False

    def _raise_call(self, r: Removal) -> ast.expr:
        self.changed = True
        # Code that runs at import (a module-level table of layers) gets a stand-in that
        # raises when it is used; code in a function raises where it reaches the name.
        helper = "_nfc_removed" if self.in_function else "_nfc_Placeholder"
        return ast.Call(func=ast.Name(helper, ast.Load()),
                        args=[ast.Constant(r.what), ast.Constant(r.lesson),
                              ast.Constant(r.exercise)], keywords=[])

    def visit_Name(self, node: ast.Name) -> ast.AST:
        r = self.local.get(node.id)
        if r is None or not isinstance(node.ctx, ast.Load):
            return node
        return ast.copy_location(self._raise_call(r), node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        func = node.func
        if (isinstance(func, ast.Name) and func.id in ("isinstance", "issubclass")
                and len(node.args) == 2):
            node.args[0] = self.visit(node.args[0])
            node.args[1] = self._absent(node.args[1])
            node.keywords = [self.visit(k) for k in node.keywords]
            return node
        return self.generic_visit(node)

    def _absent(self, node: ast.expr) -> ast.expr:
        if isinstance(node, ast.Name) and node.id in self.local:
            self.changed = True
            return ast.copy_location(ast.Name("_nfc_Absent", ast.Load()), node)
        if isinstance(node, ast.Tuple):
            node.elts = [self._absent(e) for e in node.elts]
            return node
        return self.visit(node)

    def _strip_annotation(self, node: ast.expr | None) -> ast.expr | None:
        # Annotations are strings here (``from __future__ import annotations``): a removed
        # name in one is harmless text, but typing.get_type_hints would evaluate it.
        if node is None:
            return None
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        if names & set(self.local):
            self.changed = True
            return ast.Constant("Any")
        return node

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.annotation = self._strip_annotation(node.annotation)
        return node

    def visit_FunctionDef(self, node):  # also AsyncFunctionDef
        node.returns = self._strip_annotation(node.returns)
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.args = self.visit(node.args)
        # a parameter or local variable of the same name is not the removed one
        bound = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
        bound |= {n.id for stmt in node.body for n in ast.walk(stmt)
                  if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        saved, was_in_function = self.local, self.in_function
        self.local = {k: v for k, v in saved.items() if k not in bound}
        self.in_function = True
        try:
            node.body = [self.visit(stmt) for stmt in node.body]
        finally:
            self.local, self.in_function = saved, was_in_function
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        node.annotation = self._strip_annotation(node.annotation)
        if node.value is not None:
            node.value = self.visit(node.value)
        return node


def _defined_names(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return [stmt.name]
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    return []


def _transform(module: str, tree: ast.Module, is_package: bool,
               gone: dict[tuple[str, str], Removal]) -> tuple[dict[str, Removal], bool]:
    """Edit ``tree`` in place; returns the names this module no longer has and whether it
    changed. ``gone`` maps (module, name) to its removal and grows with re-exports."""
    local: dict[str, Removal] = {}
    changed = False
    body: list[ast.stmt] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom):
            source = _resolve(module, stmt.level, stmt.module, is_package)
            kept = []
            for alias in stmt.names:
                r = gone.get((source, alias.name))
                if r is None:
                    kept.append(alias)
                else:
                    local[alias.asname or alias.name] = r
            if len(kept) != len(stmt.names):
                changed = True
                if not kept:
                    continue
                stmt.names = kept
        names = _defined_names(stmt)
        hits = [gone[(module, n)] for n in names if (module, n) in gone]
        if hits:
            changed = True
            for n in names:
                if (module, n) in gone:
                    local[n] = gone[(module, n)]
            continue
        if isinstance(stmt, ast.ClassDef):
            changed |= _remove_members(module, stmt, gone)
        body.append(stmt)
    tree.body = body
    for stmt in tree.body:  # __all__ loses the removed names
        if (isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                 for t in stmt.targets)
                and isinstance(stmt.value, (ast.List, ast.Tuple))):
            before = len(stmt.value.elts)
            stmt.value.elts = [e for e in stmt.value.elts
                               if not (isinstance(e, ast.Constant) and e.value in local)]
            changed |= len(stmt.value.elts) != before
    rewriter = _Rewriter(local)
    tree = rewriter.visit(tree)
    return local, changed or rewriter.changed


def _remove_members(module: str, cls: ast.ClassDef,
                    gone: dict[tuple[str, str], Removal]) -> bool:
    """Replace removed methods of ``cls`` by a descriptor that raises when read."""
    changed = False
    for i, stmt in enumerate(cls.body):
        if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        r = gone.get((module, f"{cls.name}.{stmt.name}"))
        if r is None:
            continue
        stub = ast.parse(f"{stmt.name} = _nfc_removed_member({r.what!r}, {r.lesson!r}, "
                         f"{r.exercise!r})").body[0]
        cls.body[i] = ast.copy_location(stub, stmt)
        changed = True
    return changed


_PRELUDE = ("from nfcourse.removed import Absent as _nfc_Absent, Placeholder as _nfc_Placeholder, "
            "removed as _nfc_removed, removed_member as _nfc_removed_member, "
            "module_getattr as _nfc_module_getattr")


def _insert_prelude(tree: ast.Module) -> None:
    """The edition's imports go after the docstring and ``from __future__`` lines."""
    at = 0
    for i, stmt in enumerate(tree.body):
        docstring = (i == 0 and isinstance(stmt, ast.Expr)
                     and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str))
        future = isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"
        if docstring or future:
            at = i + 1
        else:
            break
    tree.body[at:at] = ast.parse(_PRELUDE).body


def edition_sources(lesson: str, package: Path = PACKAGE) -> dict[str, str]:
    """Relative path -> text of every Python file of ``lesson``'s edition."""
    files = _module_files(package)
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in files.items()}
    gone: dict[tuple[str, str], Removal] = {}
    for r in removals(lesson):
        if r.module not in files:
            raise ValueError(f"EXERCISES[{lesson!r}]: no module {r.module}")
        defined = {n for s in trees[r.module].body for n in _defined_names(s)}
        head = r.name.split(".")[0]
        if head not in defined:
            raise ValueError(f"EXERCISES[{lesson!r}]: {r.module} defines no {head}")
        gone[(r.module, r.name)] = r
    # Re-exports chain (flows.coupling -> flows -> a module importing from flows): find
    # every (module, name) that ends up removed before rewriting anything.
    while True:
        grown = False
        for m, tree in trees.items():
            is_package = files[m].name == "__init__.py"
            for stmt in tree.body:
                if not isinstance(stmt, ast.ImportFrom):
                    continue
                source = _resolve(m, stmt.level, stmt.module, is_package)
                for alias in stmt.names:
                    r = gone.get((source, alias.name))
                    key = (m, alias.asname or alias.name)
                    if r is not None and key not in gone:
                        gone[key] = r
                        grown = True
        if not grown:
            break
    out: dict[str, str] = {}
    for m, path in files.items():
        rel = str(path.relative_to(package.parent))
        text = path.read_text()
        local, changed = _transform(m, trees[m], path.name == "__init__.py", gone)
        if changed or local:
            tree = trees[m]
            _insert_prelude(tree)
            if local:
                names = {n: (r.what, r.lesson, r.exercise) for n, r in sorted(local.items())}
                tree.body += ast.parse(
                    f"__getattr__ = _nfc_module_getattr(__name__, {names!r})").body
            text = ("# Grading edition of nfcourse (nfcourse/grade/edition.py): this lesson's "
                    "answers are removed.\n" + ast.unparse(ast.fix_missing_locations(tree))
                    + "\n")
        out[rel] = text
    return out


def build_edition(lesson: str, dest: str | os.PathLike) -> Path:
    """Write ``lesson``'s edition into ``dest`` (which must not exist, or be empty) and
    return the folder holding ``nfcourse/``: put it first on ``sys.path``, or bind its
    ``nfcourse`` over the package's folder. Files read-only, no bytecode.

    Example:
        >>> root = build_edition("05_glow", Path(tempfile.mkdtemp()) / "e")   # doctest: +SKIP
        >>> sorted(p.name for p in (root / "nfcourse").iterdir())[:2]          # doctest: +SKIP
        ['__init__.py', 'assets']
    """
    dest = Path(dest)
    sources = edition_sources(lesson)  # raises on an unknown lesson before writing anything
    for rel, text in sources.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for path in _data_files():
        target = dest / path.relative_to(PACKAGE.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    for path in sorted(dest.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file():
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        else:
            path.chmod(0o555)
    dest.chmod(0o555)
    return dest


def cache_root() -> Path:
    """Where editions are cached: ``$NFCOURSE_EDITION_CACHE`` or a folder of the grader's
    own under the temp directory (not writable by anyone else)."""
    root = os.environ.get("NFCOURSE_EDITION_CACHE")
    path = Path(root) if root else Path(tempfile.gettempdir()) / f"nfcourse-editions-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise PermissionError(f"{path} is not a private folder of this user: refusing to use "
                              "it as the grading edition cache (set NFCOURSE_EDITION_CACHE)")
    return path


def edition_for(lesson: str) -> Path:
    """``lesson``'s edition for the current package source, built on first use (atomically:
    a temporary folder renamed into place, so concurrent graders never see half of one).

    Example:
        >>> (edition_for("01_two_moons_realnvp") / "nfcourse").is_dir()   # doctest: +SKIP
        True
    """
    removals(lesson)  # a clear error for an unknown lesson
    final = cache_root() / f"{lesson}-{source_hash()}"
    if (final / "nfcourse" / "__init__.py").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{lesson}-"))
    try:
        build_edition(lesson, tmp / "e")
        try:
            os.rename(tmp / "e", final)
        except OSError:
            if not (final / "nfcourse" / "__init__.py").is_file():
                raise  # not another grader's finished copy
    finally:
        _rmtree(tmp)
    return final


def _rmtree(path: Path) -> None:
    """Remove a folder of read-only files (an edition)."""
    for p in path.rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
    if path.exists():
        path.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)
