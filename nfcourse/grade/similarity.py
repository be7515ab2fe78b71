"""Similarity of answer cells, for plagiarism review: never scored, changes no grade.

Copying the package's reference layer into a cell by hand, or a classmate's answer, is not
something the grader can (or should) decide from numbers: the code works. So it is
reported, for an instructor to read. For one lesson, every submission's answer cells (the
cells the solution notebook marks as answers, matched by grade id) are compared with

* ``solution``: the solution notebook's answer for that cell,
* ``reference``: the source of the package's reference code for that exercise (its class or
  function, read with :func:`inspect.getsource` in the grader's process),
* every other submission's same cell.

The comparison is copydetect's winnowing (Schleimer, Wilkerson & Aiken 2003, as MOSS does):
the code is tokenised as Python with names, strings and comments normalised away (a renamed,
reformatted, re-commented copy is still a copy), its k-grams hashed and winnowed into
fingerprints, and the released lesson's stub of the cell is removed as boilerplate (the
class and method signatures every student starts from). A pair's similarity is the share
of the student's own tokens found in the other text; matched spans are kept for the report.

Outputs, in ``grading/reports/LESSON/`` of the course (written atomically):
``similarity.html`` (pairs above the threshold first, matched code highlighted side by side),
``similarity.json`` and ``similarity.csv``. Nothing here opens the gradebook.

Example:
    >>> report = similarity_report(Course(), "01_two_moons_realnvp")   # doctest: +SKIP
    >>> [(m.student, m.other, round(m.similarity, 2)) for m in report.flagged][:1]  # doctest: +SKIP
    [('bob', 'reference:nfcourse.flows.coupling:MaskedAffineCoupling', 0.97)]
"""

from __future__ import annotations

import csv
import importlib
import inspect
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
import numpy as np
from copydetect import CodeFingerprint, compare_files
from copydetect.utils import get_token_coverage, hashed_kgrams
from pygments.lexers.python import PythonLexer
from pygments.token import Token

from nfcourse.grade.commands import Course, GradeError
from nfcourse.grade.config import CONFIG_RELPATH

__all__ = [
    "K",
    "WINDOW",
    "DEFAULT_THRESHOLD",
    "REFERENCES",
    "Match",
    "SimilarityReport",
    "ADDED",
    "added_cells",
    "answer_cells",
    "reference_sources",
    "compare_code",
    "similarity_report",
    "report_dir",
    "summary_lines",
    "to_csv",
    "to_json",
]

#: k-gram length, in characters of the normalised code (``V=V.V(V)`` for ``z = net.f(x)``):
#: copydetect's default 25 is tuned for whole files; answer cells are a few lines, so a
#: shorter k still finds a copied line while a window of 4 keeps a match guaranteed for
#: any shared run of K + WINDOW - 1 = 19 normalised characters (about one statement).
K = 16
WINDOW = 4
DEFAULT_THRESHOLD = 0.6
#: answers whose normalised code (less the stub) is shorter than this are listed but never
#: flagged: a two-line ``bits_per_dim`` is the same for everyone who gets it right.
MIN_TOKENS = 3 * K
#: a hostile submission's cell is cut here before tokenising (the report says so).
MAX_CELL_CHARS = 100_000
#: the pseudo-cell of a submission's own added code cells (see :func:`added_cells`)
ADDED = "(added cells)"

#: answer grade id -> the package's reference code for it (``module:qualname``), per lesson.
#: The grading edition's ``nfcourse.grade.edition.EXERCISES`` (what the sandbox removes) takes
#: precedence where it names a cell (:func:`reference_names`); this table covers the cells it
#: names differently and keeps the report working without it.
REFERENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "01_two_moons_realnvp": {
        "coupling_answer": ("nfcourse.flows.coupling:MaskedAffineCoupling",),
        "realnvp_answer": ("nfcourse.flows.builders:realnvp_2d", "nfcourse.flows.base:Compose"),
        "density_answer": ("nfcourse.flows.model:FlowModel",
                           "nfcourse.flows.priors:StandardNormal"),
    },
    "02_dequantization": {
        "dequantization_answer": ("nfcourse.flows.dequantization:Dequantization",
                                  "nfcourse.flows.dequantization:LogitTransform"),
        "bits_per_dim_answer": ("nfcourse.flows.model:FlowModel.bits_per_dim",),
        "importance_bpd_answer": ("nfcourse.flows.model:FlowModel.importance_bpd",
                                  "nfcourse.flows.model:FlowModel.importance_log_prob"),
        "vardeq_answer": ("nfcourse.flows.dequantization:VariationalDequantization",),
    },
    "03_coupling_layers": {
        "checkerboard_mask_answer": ("nfcourse.flows.masks:checkerboard_mask",),
        "channel_mask_answer": ("nfcourse.flows.masks:channel_mask",),
        "coupling_answer": ("nfcourse.flows.coupling:AffineCoupling",),
        "simple_flow_answer": ("nfcourse.flows.builders:simple_image_flow",),
    },
    "04_multiscale": {
        "squeeze_answer": ("nfcourse.flows.multiscale:Squeeze",),
        "split_answer": ("nfcourse.flows.multiscale:Split",),
        "multiscale_answer": ("nfcourse.flows.builders:multiscale_flow",),
    },
    "05_glow": {
        "actnorm_answer": ("nfcourse.flows.glow:ActNorm",),
        "invconv_answer": ("nfcourse.flows.glow:InvConv1x1",),
        "invconv_lu_answer": ("nfcourse.flows.glow:InvConv1x1LU",),
        "glow_step_answer": ("nfcourse.flows.glow:GlowStep",),
        "glow_answer": ("nfcourse.flows.builders:glow",),
    },
    "06_ffjord_gifs": {
        "odefunc_answer": ("nfcourse.cnf:ODENet",),
        "divergence_answer": ("nfcourse.cnf:exact_divergence", "nfcourse.cnf:_exact"),
        "hutchinson_answer": ("nfcourse.cnf:hutchinson_divergence", "nfcourse.cnf:_hutchinson",
                              "nfcourse.cnf:sample_noise"),
        "cnf_answer": ("nfcourse.cnf:CNF",),
    },
}


@dataclass(frozen=True)
class Match:
    """One compared pair: ``student``'s answer ``cell`` against ``other``.

    ``kind`` is ``"solution"``, ``"reference"`` or ``"student"``; ``other`` is ``"solution"``,
    ``"reference:MODULE:QUALNAME"`` or the other student's id. ``similarity`` is the share of
    the student's normalised tokens found in the other text, ``other_similarity`` the share of
    the other's found in the student's; ``spans``/``other_spans`` are the matched character
    ranges ``(start, end)`` in each raw text. ``flagged``: at or above the threshold and long
    enough to judge.
    """

    cell: str
    student: str
    kind: str
    other: str
    similarity: float
    other_similarity: float
    spans: tuple[tuple[int, int], ...]
    other_spans: tuple[tuple[int, int], ...]
    flagged: bool

    @property
    def score(self) -> float:
        """What the report sorts by: between students the larger share (a short answer
        copied into a long one is still a copy), else the student's share."""
        if self.kind == "student":
            return max(self.similarity, self.other_similarity)
        return self.similarity


@dataclass
class SimilarityReport:
    """Everything the HTML, JSON and CSV show. ``texts[(owner, cell)]`` is each compared
    text (owner: a student id, ``"solution"`` or ``"reference:..."``); ``notes`` lists what
    could not be compared (an unreadable notebook, a missing answer cell, a cut cell)."""

    lesson: str
    threshold: float
    students: list[str]
    cells: list[str]
    matches: list[Match]
    texts: dict[tuple[str, str], str]
    notes: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def flagged(self) -> list[Match]:
        """The pairs to review, most similar first."""
        return [m for m in self.matches if m.flagged]


# ------------------------------------------------------------------------------- inputs
def _meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def answer_cells(nb, grade_ids: Iterable[str] | None = None) -> dict[str, str]:
    """``grade_id -> source`` of the answer cells (``solution: true``) of a notebook.

    Example:
        >>> nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        ...     "x = 1", metadata={"nbgrader": {"solution": True, "grade_id": "a"}})])
        >>> answer_cells(nb)
        {'a': 'x = 1'}
    """
    wanted = None if grade_ids is None else set(grade_ids)
    out: dict[str, str] = {}
    for cell in nb.get("cells", []):
        meta = _meta(cell)
        grade_id = meta.get("grade_id")
        if cell.get("cell_type") != "code" or not meta.get("solution"):
            continue
        if not isinstance(grade_id, str) or (wanted is not None and grade_id not in wanted):
            continue
        source = cell.get("source", "")
        source = source if isinstance(source, str) else "".join(source)
        # a second cell claiming the same grade id (a decoy above the real answer) is
        # compared too: both are joined
        out[grade_id] = out[grade_id] + "\n\n" + source if grade_id in out else source
    return out


def added_cells(nb, released_sources: Iterable[str]) -> str:
    """The submission's own code cells that are neither answers nor tests nor cells of the
    released lesson (where a copy could sit above an answer that only uses it), joined.

    Example:
        >>> nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os"),
        ...                                      nbformat.v4.new_code_cell("y = 2")])
        >>> added_cells(nb, ["import os"])
        'y = 2\\n'
    """
    known = {canonical(s) for s in released_sources}
    parts = []
    for cell in nb.get("cells", []):
        meta = _meta(cell)
        source = cell.get("source", "")
        source = source if isinstance(source, str) else "".join(source)
        if (cell.get("cell_type") == "code" and not meta.get("solution") and not meta.get("grade")
                and source.strip() and canonical(source) not in known):
            parts.append(canonical(source))
    return "\n".join(parts)


def _edition_table(lesson: str) -> Mapping[str, Iterable[str]] | None:
    """The grading edition's exercises of ``lesson`` (answer grade id or exercise name ->
    reference names), when ``nfcourse.grade.edition`` defines ``EXERCISES``."""
    try:
        edition = importlib.import_module("nfcourse.grade.edition")
    except Exception:  # noqa: BLE001  (not written yet, or broken: fall back to REFERENCES)
        return None
    table = getattr(edition, "EXERCISES", None)
    if not isinstance(table, Mapping) or not isinstance(table.get(lesson), Mapping):
        return None
    out: dict[str, tuple[str, ...]] = {}
    for key, names in table[lesson].items():
        names = (names,) if isinstance(names, str) else tuple(
            n for n in names if isinstance(n, str)) if isinstance(names, Iterable) else ()
        out[str(key) if str(key).endswith("_answer") else f"{key}_answer"] = names
    return out


def reference_names(lesson: str) -> dict[str, tuple[str, ...]]:
    """``answer grade id -> reference names`` of ``lesson``: the grading edition's
    ``EXERCISES`` entry where its exercise name is the cell's (``coupling`` for
    ``coupling_answer``), else :data:`REFERENCES` (lesson 06's ``divergence_answer`` is
    ``exact_divergence`` there)."""
    return {**REFERENCES.get(lesson, {}), **(_edition_table(lesson) or {})}


def _resolve(name: str):
    """The object ``module:qualname`` (or a dotted ``module.attr``) names."""
    if ":" in name:
        module_name, qualname = name.split(":", 1)
    else:
        module_name, _, qualname = name.rpartition(".")
    obj = importlib.import_module(module_name)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def reference_sources(lesson: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``answer grade id -> {reference name: source}`` of ``lesson``, and a note for every
    name whose source could not be read."""
    sources: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    for cell, names in reference_names(lesson).items():
        for name in names:
            try:
                sources.setdefault(cell, {})[name] = canonical(inspect.getsource(_resolve(name)))
            except Exception as error:  # noqa: BLE001  (reported, the rest still compared)
                notes.append(f"reference {name} of {cell}: source unavailable ({error})")
    return sources, notes


# ---------------------------------------------------------------------------- comparing
def canonical(code: str) -> str:
    """``code`` as the report shows and compares it: Unix newlines, no blank lines around.

    Pygments (copydetect's tokenizer) does the same to its input, so matched spans then
    point into exactly this text.

    Example:
        >>> canonical("\\r\\nx = 1\\r\\n\\n")
        'x = 1\\n'
    """
    return code.replace("\r\n", "\n").replace("\r", "\n").strip("\n") + "\n"


_PSEUDO = {"self": "_slf", "cls": "_cl"}


def _unpseudo(code: str) -> str:
    """``code`` with ``self`` and ``cls`` spelled as plain names of the same length.

    copydetect turns every name into ``V`` but keeps Pygments' pseudo-builtins as they are,
    so renaming ``self`` would hide a copy; equal lengths keep every span in place."""
    out = list(code)
    for index, kind, value in PythonLexer(stripnl=False, ensurenl=False).get_tokens_unprocessed(
            code):
        if kind in Token.Name.Builtin.Pseudo and value in _PSEUDO:
            out[index:index + len(value)] = _PSEUDO[value]
    return "".join(out)


def _fingerprint(code: str, boilerplate: np.ndarray) -> CodeFingerprint:
    """copydetect's fingerprint of ``code`` (canonical) as Python, less the boilerplate.

    The boilerplate is removed here rather than through copydetect's ``boilerplate``
    argument: that path intersects arrays that may hold repeated hashes with
    ``assume_unique=True``, which also drops a cell's own repeated k-grams."""
    fp = CodeFingerprint("cell.py", K, WINDOW, language="python",
                         fp=io.StringIO(_unpseudo(code)))
    if len(boilerplate):
        common = fp.hashes.intersection(boilerplate.tolist())
        fp.hashes = fp.hashes - common
        fp.hash_idx = {h: i for h, i in fp.hash_idx.items() if h not in common}
        fp.token_coverage = get_token_coverage(fp.hash_idx, K, len(fp.filtered_code))
    return fp


def _stub_hashes(stub: str) -> np.ndarray:
    """Every k-gram hash of the released stub (not only the winnowed ones: a student's
    fingerprint may pick any k-gram of the stub)."""
    if not stub.strip():
        return np.array([], dtype=np.int64)
    fp = CodeFingerprint("stub.py", K, 1, language="python",
                         fp=io.StringIO(_unpseudo(canonical(stub))))
    return np.unique(hashed_kgrams(fp.filtered_code, K))


def _spans(slices, length: int) -> tuple[tuple[int, int], ...]:
    if len(slices) == 0 or len(slices[0]) == 0:
        return ()
    pairs = sorted((max(0, min(int(a), length)), max(0, min(int(b), length)))
                   for a, b in zip(slices[0], slices[1], strict=True))
    return tuple((a, b) for a, b in pairs if b > a)


def compare_code(code: str, other: str, stub: str = "") -> tuple[float, float, tuple, tuple]:
    """``(similarity, other_similarity, spans, other_spans)`` of two Python texts, ``stub``
    (the code both started from) not counted.

    Example:
        >>> a = "def f(x):\\n    y = x * 2 + 1\\n    return torch.exp(y) - torch.log(x + 3)\\n"
        >>> b = "def g(v):  # mine\\n    w = v*2 + 1\\n    return torch.exp(w) - torch.log(v+3)\\n"
        >>> round(compare_code(a, b)[0], 2)
        1.0
    """
    boiler = _stub_hashes(stub)
    return _compare(_fingerprint(canonical(code), boiler),
                    _fingerprint(canonical(other), boiler))


def _compare(fp: CodeFingerprint, other: CodeFingerprint) -> tuple[float, float, tuple, tuple]:
    if not fp.hashes or not other.hashes:
        return 0.0, 0.0, (), ()
    _, (sim, other_sim), (slices, other_slices) = compare_files(fp, other)
    return (min(1.0, float(sim)), min(1.0, float(other_sim)),
            _spans(slices, len(fp.raw_code)), _spans(other_slices, len(other.raw_code)))


# ------------------------------------------------------------------------------ the report
def report_dir(course: Course, lesson: str) -> Path:
    """``grading/reports/LESSON/`` of the course (beside the gradebook, outside anything a
    student's sandbox sees)."""
    return course.root / CONFIG_RELPATH.parent / "reports" / lesson


def _read(path: Path) -> object:
    if path.is_symlink():
        raise GradeError(f"{path} is a symbolic link")
    return nbformat.read(path, as_version=4)


def _submission(course: Course, lesson: str, student: str) -> Path:
    """The student's own notebook: the submitted one, else the autograded copy."""
    for folder in (course.submitted_dir, course.autograded_dir):
        path = folder / student / lesson / f"{lesson}.ipynb"
        if path.is_file():
            return path
    raise GradeError(f"no notebook of {lesson} for {student}")


def _students(course: Course, lesson: str) -> list[str]:
    found = set(course.students(lesson))
    if course.autograded_dir.is_dir():
        found |= {p.name for p in course.autograded_dir.iterdir() if (p / lesson).is_dir()}
    return sorted(found)


def similarity_report(course: Course, lesson: str, *, threshold: float = DEFAULT_THRESHOLD,
                      students: Iterable[str] | None = None, write: bool = True
                      ) -> SimilarityReport:
    """Compare every submission's answer cells of ``lesson`` (see the module docstring) and,
    with ``write``, write the HTML, JSON and CSV report; nothing is scored.

    Raises :class:`GradeError` for an unknown lesson or a threshold outside (0, 1].
    """
    from nfcourse.grade.similarity_html import render_html
    from nfcourse.train import atomic_write_bytes

    lesson = course.check_lesson(lesson)
    if not 0.0 < float(threshold) <= 1.0:
        raise GradeError(f"the similarity threshold must be in (0, 1], not {threshold}")
    solution_nb = nbformat.read(course.source_notebook(lesson), as_version=4)
    solution = {k: canonical(_strip_markers(v)) for k, v in answer_cells(solution_nb).items()}
    cells = list(solution)
    released = course.release_dir / lesson / f"{lesson}.ipynb"
    released_nb = nbformat.read(released, as_version=4) if released.is_file() else None
    stubs = answer_cells(released_nb, cells) if released_nb is not None else {}
    released_sources = [c.source for c in (released_nb.cells if released_nb else [])]
    references, notes = reference_sources(lesson)
    # cells a student added are compared with every reference of the lesson
    references[ADDED] = {n: src for refs in list(references.values()) for n, src in refs.items()}
    students = sorted(students) if students is not None else _students(course, lesson)

    answers: dict[str, dict[str, str]] = {}
    for student in students:
        try:
            nb = _read(_submission(course, lesson, student))
            got = answer_cells(nb, cells)
            extra = added_cells(nb, released_sources)
        except Exception as error:  # noqa: BLE001  (a hostile or broken notebook: noted)
            notes.append(f"{student}: notebook not readable ({type(error).__name__}: "
                         f"{str(error)[:200]})")
            continue
        for cell in solution:
            if cell not in got:
                notes.append(f"{student}: no answer cell {cell}")
            elif len(got[cell]) > MAX_CELL_CHARS:
                notes.append(f"{student}: {cell} cut to its first {MAX_CELL_CHARS} characters")
                got[cell] = got[cell][:MAX_CELL_CHARS]
        got = {cell: canonical(source) for cell, source in got.items()}
        if extra:
            got[ADDED] = extra[:MAX_CELL_CHARS]
        answers[student] = got
    if any(ADDED in a for a in answers.values()):
        cells.append(ADDED)

    texts: dict[tuple[str, str], str] = {}
    matches: list[Match] = []
    for cell in cells:
        boiler = _stub_hashes(stubs.get(cell, ""))
        others: dict[tuple[str, str], CodeFingerprint] = {}
        if cell in solution:
            others[("solution", "solution")] = _fingerprint(solution[cell], boiler)
            texts[("solution", cell)] = solution[cell]
        for name, source in references.get(cell, {}).items():
            others[("reference", f"reference:{name}")] = _fingerprint(source, boiler)
            texts[(f"reference:{name}", cell)] = source
        prints = {s: _fingerprint(a[cell], boiler) for s, a in answers.items() if cell in a}
        for student in prints:
            texts[(student, cell)] = answers[student][cell]
        for student, fp in prints.items():
            judged = bool(fp.token_coverage >= MIN_TOKENS)
            for (kind, other), ofp in others.items():
                sim, osim, spans, ospans = _compare(fp, ofp)
                matches.append(Match(cell, student, kind, other, sim, osim, spans, ospans,
                                     judged and sim >= threshold))
        names = sorted(prints)
        for i, student in enumerate(names):
            for other in names[i + 1:]:
                fp, ofp = prints[student], prints[other]
                sim, osim, spans, ospans = _compare(fp, ofp)
                judged = bool(min(fp.token_coverage, ofp.token_coverage) >= MIN_TOKENS)
                matches.append(Match(cell, student, "student", other, sim, osim, spans,
                                     ospans, judged and max(sim, osim) >= threshold))
    matches.sort(key=lambda m: (not m.flagged, -m.score, m.cell, m.student, m.other))
    report = SimilarityReport(lesson, float(threshold), students, cells, matches, texts, notes)
    if write:
        folder = report_dir(course, lesson)
        report.paths = {"html": folder / "similarity.html", "json": folder / "similarity.json",
                        "csv": folder / "similarity.csv"}
        atomic_write_bytes(report.paths["json"], to_json(report).encode())
        atomic_write_bytes(report.paths["csv"], to_csv(report).encode())
        atomic_write_bytes(report.paths["html"], render_html(report).encode())
    return report


def _strip_markers(source: str) -> str:
    """An answer without its ``### BEGIN/END SOLUTION`` lines (what a student would see)."""
    return "".join(line for line in source.splitlines(keepends=True)
                   if not line.strip().lstrip("#").strip().startswith(
                       ("BEGIN SOLUTION", "END SOLUTION")))


def to_json(report: SimilarityReport) -> str:
    """The report as JSON: every pair (flagged first), the notes; no student code."""
    rows = []
    for m in report.matches:
        row = asdict(m)
        row["spans"], row["other_spans"] = [list(s) for s in m.spans], [
            list(s) for s in m.other_spans]
        rows.append(row)
    return json.dumps({"lesson": report.lesson, "threshold": report.threshold,
                       "scored": False, "k": K, "window": WINDOW,
                       "students": report.students, "cells": report.cells,
                       "notes": report.notes, "pairs": rows}, indent=1) + "\n"


def to_csv(report: SimilarityReport) -> str:
    """One row per compared pair: cell, student, kind, other, both shares, flagged."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["cell", "student", "kind", "other", "similarity", "other_similarity",
                     "flagged"])
    for m in report.matches:
        writer.writerow([m.cell, _csv_safe(m.student), m.kind, _csv_safe(m.other),
                         f"{m.similarity:.3f}", f"{m.other_similarity:.3f}", int(m.flagged)])
    return out.getvalue()


def _csv_safe(text: str) -> str:
    """A student id as a spreadsheet should show it: a leading ``= + - @`` would make the
    cell a formula (CSV injection), so it is quoted with an apostrophe."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def summary_lines(report: SimilarityReport, top: int = 10) -> list[str]:
    """What ``nfcourse grade similarity`` prints: the ``top`` pairs to review and the paths.

    Example:
        >>> summary_lines(SimilarityReport("01_x", 0.6, ["a"], ["c"], [], {}))[0]
        '01_x: 1 submissions, 0 pairs to review (threshold 60%; never scored)'
    """
    flagged = report.flagged
    lines = [f"{report.lesson}: {len(report.students)} submissions, {len(flagged)} pairs to "
             f"review (threshold {100 * report.threshold:.0f}%; never scored)"]
    for m in flagged[:max(0, top)]:
        other = "the solution" if m.kind == "solution" else m.other.removeprefix("reference:")
        lines.append(f"    {m.cell:24s} {_printable(m.student):20s} ~ {_printable(other)}: "
                     f"{100 * m.similarity:.0f}% / {100 * m.other_similarity:.0f}%")
    if len(flagged) > top:
        lines.append(f"    ... and {len(flagged) - top} more in the report")
    lines += [f"{kind}: {path}" for kind, path in report.paths.items()]
    lines += [f"note: {_printable(n)}" for n in report.notes[:5]]
    return lines


def _printable(text: str) -> str:
    """A student id or note safe to print on a terminal (no escape sequences)."""
    return "".join(c if c.isprintable() else "?" for c in text)
