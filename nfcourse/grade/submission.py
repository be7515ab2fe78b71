"""Read a submitted notebook defensively, before nbgrader touches it.

nbgrader reads a submission with ``nbformat.read``, which upgrades nbformat 3 silently,
and fails on cut-off JSON or bad UTF-8 deep inside a converter, with a traceback as the
only explanation. :func:`check_submission` reads the bytes itself and turns each of those
into one sentence an instructor can act on (:class:`SubmissionError`). What it lets
through is still sanitised by :class:`nfcourse.grade.preprocessors.SanitizeSubmission`.

Example:
    >>> student_id_problem("alic?")
    "student id 'alic?' has characters other than letters, digits, '.', '_' and '-'"
    >>> student_id_problem("alice") is None
    True
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["SubmissionError", "check_submission", "student_id_problem", "STUDENT_ID"]

#: what a student id may be: it becomes a folder name and part of nbgrader's glob patterns
STUDENT_ID = re.compile(r"^[A-Za-z0-9._-]+$")

#: the nbgrader metadata schema this grader reads (nbgrader 0.9)
SCHEMA_VERSION = 3


class SubmissionError(ValueError):
    """A submission that cannot be graded as it is; the message says why."""


def student_id_problem(student: str) -> str | None:
    """Why ``student`` cannot be a student id, or None when it can."""
    if student in (".", ".."):
        return f"student id {student!r} is not a name"
    if not STUDENT_ID.match(student):
        return (f"student id {student!r} has characters other than letters, digits, "
                "'.', '_' and '-'")
    return None


def check_submission(path: str | Path) -> None:
    """Raise :class:`SubmissionError` unless ``path`` is a readable nbformat-4 notebook
    whose nbgrader metadata this grader understands."""
    path = Path(path)
    name = path.name
    if path.is_symlink() or not path.is_file():
        folder = path.parent
        others = sorted(p.name for p in folder.glob("*.ipynb")) if folder.is_dir() else []
        found = f" (found: {', '.join(others)})" if others else ""
        raise SubmissionError(f"no notebook {name} in the submission{found}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SubmissionError(
            f"{name} is not valid UTF-8 (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}): the file is damaged or was saved in another encoding") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        # A string with no closing quote runs to the end of the file: cut off there too.
        ends = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string")
        cut = " (the file is cut off)" if ends else ""
        raise SubmissionError(
            f"{name} is not valid JSON{cut}: {error.msg} at line {error.lineno}, "
            f"column {error.colno}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("cells", raw.get("worksheets")),
                                                   list):
        raise SubmissionError(f"{name} is JSON but not a notebook (no list of cells)")
    major = raw.get("nbformat")
    if major != 4:
        raise SubmissionError(
            f"{name} is in nbformat {major!r}; this grader reads nbformat 4 (open it in "
            "Jupyter and save it again)")
    _check_cells(name, raw["cells"])
    _check_structure(name, text)


def _check_cells(name: str, cells: list) -> None:
    for index, cell in enumerate(cells):
        if not isinstance(cell, dict):
            raise SubmissionError(f"{name}: cell {index} is not a notebook cell")
        meta = cell.get("metadata", {})
        nbgrader = meta.get("nbgrader") if isinstance(meta, dict) else None
        version = nbgrader.get("schema_version") if isinstance(nbgrader, dict) else None
        if isinstance(version, (int, float)) and version > SCHEMA_VERSION:
            raise SubmissionError(
                f"{name}: cell {index} has nbgrader metadata of schema version {version:g}; "
                f"this grader reads version {SCHEMA_VERSION} (the notebook was edited, or "
                "made with a newer nbgrader)")


def _check_structure(name: str, text: str) -> None:
    """nbformat's own schema, on the cells as grading will see them: outputs are cleared
    before the notebook runs, so a damaged output alone does not stop grading."""
    import warnings

    import nbformat

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # missing cell ids: nbformat adds them
            nb = nbformat.reads(text, as_version=4)
            for cell in nb.cells:
                if cell.get("cell_type") == "code":
                    cell["outputs"], cell["execution_count"] = [], None
            nbformat.validate(nb)
    except Exception as error:  # noqa: BLE001  (nbformat raises several kinds)
        message = str(getattr(error, "message", error)).splitlines()[0][:200]
        raise SubmissionError(f"{name} is not a valid notebook: {message}") from None
