"""Grading: a thin layer over nbgrader (``nfcourse grade ...``, see ``grading/README.md``).

* :mod:`nfcourse.grade.config`: find the course root, load ``grading/nbgrader_config.py``.
* :mod:`nfcourse.grade.commands`: ``release``, ``collect``, ``autograde``, ``feedback``,
  ``export_csv``, ``status``, ``scores`` on a :class:`Course`.
* :mod:`nfcourse.grade.cli`: the command line, ``main(argv) -> int``.
"""

from nfcourse.grade.commands import (
    CellScore,
    Course,
    GradeError,
    autograde,
    collect,
    ensure_gradebook,
    export_csv,
    feedback,
    gradebook_is_current,
    release,
    scores,
    status,
)
from nfcourse.grade.config import find_course_root, load_config

__all__ = [
    "CellScore",
    "Course",
    "GradeError",
    "autograde",
    "collect",
    "ensure_gradebook",
    "export_csv",
    "feedback",
    "find_course_root",
    "gradebook_is_current",
    "load_config",
    "release",
    "scores",
    "status",
]
