"""Records of submissions that could not be graded ("graded 0 / needs a look").

One small JSON file per failed submission, beside where its graded notebook would be:
``grading/autograded/STUDENT/LESSON/nfcourse_failure.json``. ``status``, the CSV export and
``autograde``'s report read it; grading the submission again removes it first. It lives in
the autograded folder because that is where an instructor looks for a student's result,
and because nbgrader leaves that folder empty when grading fails.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = write_failure(folder, "alice", "01_two_moons_realnvp", "not valid JSON")
    >>> read_failure(folder)["reason"]
    'not valid JSON'
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["FAILURE_FILE", "write_failure", "read_failure", "clear_failure"]

FAILURE_FILE = "nfcourse_failure.json"


def write_failure(folder: Path, student: str, lesson: str, reason: str, log: str = "") -> Path:
    """Record why ``student``'s ``lesson`` could not be graded (atomically); returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"student": student, "lesson": lesson, "reason": reason,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "log": log[-20_000:]}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".nfcourse-", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle, indent=1)
    path = folder / FAILURE_FILE
    os.replace(tmp, path)  # replaces the name itself, never a file a link points to
    return path


def read_failure(folder: Path) -> dict | None:
    """The failure record in ``folder``, or None when there is none (or it is unreadable)."""
    path = Path(folder) / FAILURE_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("reason"), str) else None


def clear_failure(folder: Path) -> None:
    """Remove ``folder``'s failure record, and the folder when nothing else is in it (so that
    nbgrader grades the submission again instead of skipping an existing result)."""
    folder = Path(folder)
    try:
        (folder / FAILURE_FILE).unlink()
    except FileNotFoundError:
        return
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: a graded notebook is there too
