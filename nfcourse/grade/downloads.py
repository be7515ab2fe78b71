"""Find the submissions in a download folder and copy them out, following no link.

An LMS download is student-made content: a folder may hold a symbolic link to the course's
solution notebook, or be named ``alic?`` or ``../x``. :func:`scan` never follows a link and
names every entry it refuses; :func:`copy_notebook` opens each path one component at a
time from the download folder with ``O_NOFOLLOW`` (a link swapped in after the scan is
refused too), so nothing outside the folder is ever read.

Example:
    >>> found, skipped = scan(Path("downloads"), "01_two_moons_realnvp",  # doctest: +SKIP
    ...                       re.compile(r"^(?P<student>[^_]+)"))
    >>> skipped                                                           # doctest: +SKIP
    {'alic?': "student id 'alic?' has characters other than ..."}
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from nfcourse.grade.submission import student_id_problem

__all__ = ["scan", "copy_notebook"]


def _notebooks_in(source: Path, folder: str, skipped: dict[str, str]) -> list[str]:
    """Notebooks below ``source/folder`` (paths relative to ``source``), links refused."""
    out = []
    for root, dirs, files, _ in os.fwalk(source / folder, follow_symlinks=False):
        rel = Path(root).relative_to(source)
        for name in list(dirs):
            if os.path.islink(os.path.join(root, name)):
                skipped[str(rel / name)] = "a symbolic link (links are never followed)"
                dirs.remove(name)
            elif name == ".ipynb_checkpoints":
                dirs.remove(name)
        for name in files:
            if not name.endswith(".ipynb"):
                continue
            if os.path.islink(os.path.join(root, name)):
                skipped[str(rel / name)] = "a symbolic link (links are never followed)"
                continue
            out.append(str(rel / name))
    return sorted(out)


def scan(source: Path, lesson: str, pattern: re.Pattern) -> tuple[dict[str, str], dict[str, str]]:
    """``({student: notebook path relative to source}, {refused entry: why})``.

    ``source`` holds one folder per student (the notebook named like the lesson wins, else
    the only one there), or notebooks side by side whose student id ``pattern`` finds in the
    file name. Every top-level entry that is not collected is named in the second dict.
    """
    found: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for entry in sorted(os.listdir(source)):
        path = source / entry
        if path.is_symlink():
            skipped[entry] = "a symbolic link (links are never followed)"
            continue
        if path.is_dir():
            student = entry
            if entry.startswith("."):
                skipped[entry] = "a hidden folder"
                continue
            problem = student_id_problem(student)
            if problem:
                skipped[entry] = problem
                continue
            notebooks = _notebooks_in(source, entry, skipped)
            named = [p for p in notebooks if Path(p).stem == lesson]
            chosen = named[0] if named else (notebooks[0] if len(notebooks) == 1 else None)
            if chosen is None:
                skipped[entry] = (f"no notebook named {lesson}.ipynb and not exactly one "
                                  f"notebook in it ({len(notebooks)} found)")
                continue
        elif path.is_file() and entry.endswith(".ipynb"):
            match = pattern.search(entry[: -len(".ipynb")])
            if not match:
                skipped[entry] = f"no student id in the name (pattern {pattern.pattern!r})"
                continue
            student = match.group("student")
            problem = student_id_problem(student)
            if problem:
                skipped[entry] = problem
                continue
            chosen = entry
        else:
            skipped[entry] = "not a folder or a notebook"
            continue
        if student in found:
            skipped[entry] = f"a second submission of {student!r} (kept {found[student]})"
            continue
        found[student] = chosen
    return found, skipped


def copy_notebook(source: Path, relative: str, dest: Path) -> float:
    """Copy ``source/relative`` to ``dest`` without following any link on the way; returns
    the file's modification time. Raises ``OSError`` for a link, a non-regular file, or a
    path that leaves ``source``."""
    parts = Path(relative).parts
    if not parts or any(p in ("", ".", "..") for p in parts) or Path(relative).is_absolute():
        raise OSError(f"{relative}: not a path inside the download folder")
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(source, flags | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        inner = os.open(parts[-1], flags, dir_fd=fd)
        os.close(fd)
        fd = inner
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{relative}: not a regular file")
        with os.fdopen(fd, "rb") as src, open(dest, "xb") as out:
            fd = -1  # owned by src now
            while chunk := src.read(1 << 20):
                out.write(chunk)
        return info.st_mtime
    finally:
        if fd >= 0:
            os.close(fd)
