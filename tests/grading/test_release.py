"""lessons/ is exactly what `nfcourse grade release` makes of solutions/ (no stale copies)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from harness import REPO, make_course

SOLUTIONS = sorted(
    p.name for p in (REPO / "solutions").iterdir() if (p / f"{p.name}.ipynb").is_file()
) if (REPO / "solutions").is_dir() else []

# Editor and execution state that may differ without the lesson being different.
VOLATILE_CELL_METADATA = {"execution", "collapsed", "scrolled", "jupyter", "ExecuteTime"}


def _files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and ".ipynb_checkpoints" not in p.parts and "__pycache__" not in p.parts
    )


def _normalized(path: Path) -> dict:
    nb = nbformat.read(path, as_version=4)
    cells = []
    for cell in nb.cells:
        meta = {k: v for k, v in cell.metadata.items() if k not in VOLATILE_CELL_METADATA}
        cells.append({"cell_type": cell.cell_type, "source": cell.source, "metadata": meta})
    return {"kernelspec": nb.metadata.get("kernelspec"), "cells": cells}


@pytest.mark.parametrize("lesson", SOLUTIONS)
def test_released_lesson_is_up_to_date(tmp_path, lesson):
    course = make_course(tmp_path / "course", [lesson])
    fresh = course.release_dir / lesson
    committed = REPO / "lessons" / lesson
    hint = f"lessons/{lesson} is stale: run `nfcourse grade release {lesson}` and commit it"
    assert committed.is_dir(), f"lessons/{lesson} is missing: run `nfcourse grade release`"
    assert _files(committed) == _files(fresh), hint
    notebook = f"{lesson}.ipynb"
    want, got = _normalized(fresh / notebook), _normalized(committed / notebook)
    assert len(got["cells"]) == len(want["cells"]), hint
    for i, (a, b) in enumerate(zip(got["cells"], want["cells"], strict=True)):
        assert a == b, f"{hint} (first difference in cell {i})"
    assert got == want, hint
    committed_nb = nbformat.read(committed / notebook, as_version=4)
    assert not any(c.get("outputs") for c in committed_nb.cells), f"lessons/{lesson} has outputs"


def test_no_lesson_without_solution():
    lessons = REPO / "lessons"
    released = sorted(p.name for p in lessons.iterdir() if p.is_dir()) if lessons.is_dir() else []
    stale = [name for name in released if name not in SOLUTIONS]
    assert not stale, f"lessons/ holds {stale} with no solutions/ source: delete them"
