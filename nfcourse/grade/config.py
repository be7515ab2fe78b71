"""Where the course is and how nbgrader is configured for it.

The course root is the folder holding ``solutions/``, ``lessons/`` and
``grading/nbgrader_config.py``. It is, in order: the ``root`` argument (``--course-root``),
``$NFCOURSE_COURSE_ROOT``, the nearest parent of the working directory that holds
``grading/nbgrader_config.py``, or the checkout this package was installed from.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

__all__ = [
    "CONFIG_RELPATH",
    "find_course_root",
    "load_config",
    "lesson_timeout",
    "kernel_env",
    "setenv",
]

CONFIG_RELPATH = Path("grading") / "nbgrader_config.py"
DEFAULT_TIMEOUT = 300


def _is_course(path: Path) -> bool:
    return (path / CONFIG_RELPATH).is_file()


def find_course_root(root: str | os.PathLike | None = None) -> Path:
    """The course root (see the module docstring); raises ``FileNotFoundError`` if none."""
    if root is None:
        root = os.environ.get("NFCOURSE_COURSE_ROOT") or None
    if root is not None:
        path = Path(root).resolve()
        if not _is_course(path):
            raise FileNotFoundError(f"{path} is not a course root: no {CONFIG_RELPATH} there")
        return path
    here = Path.cwd().resolve()
    for path in (here, *here.parents):
        if _is_course(path):
            return path
    checkout = Path(__file__).resolve().parents[2]
    if _is_course(checkout):
        return checkout
    raise FileNotFoundError(
        f"no course found: run inside the course, pass --course-root or set NFCOURSE_COURSE_ROOT"
        f" (looked for {CONFIG_RELPATH} above {here})"
    )


@contextmanager
def setenv(values: dict[str, str | None]):
    """Set (or, for ``None``, unset) environment variables for the ``with`` block."""
    old = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = str(value)
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_config(root: str | os.PathLike | None = None) -> Config:
    """nbgrader's configuration for the course at ``root`` (``grading/nbgrader_config.py``).

    The file computes every path from ``$NFCOURSE_COURSE_ROOT`` when set, so it is loaded with
    that variable pointing at ``root``: a copy of the course grades inside itself.
    """
    root = find_course_root(root)
    loader = PyFileConfigLoader(CONFIG_RELPATH.name, path=str(root / CONFIG_RELPATH.parent))
    with setenv({"NFCOURSE_COURSE_ROOT": str(root)}):
        config = loader.load_config()
    config.CourseDirectory.root = str(root)
    return config


def _nfcourse_section(config: Config) -> Config:
    return config.NfcourseGrade if "NfcourseGrade" in config else Config()


def lesson_timeout(config: Config, lesson: str) -> int:
    """Per-cell execution timeout (seconds) for autograding ``lesson``."""
    timeouts = dict(_nfcourse_section(config).get("lesson_timeouts", {}))
    default = config.Execute.get("timeout", DEFAULT_TIMEOUT) if "Execute" in config else None
    return int(timeouts.get(lesson, default or DEFAULT_TIMEOUT))


def kernel_env(config: Config) -> dict[str, str]:
    """Environment variables the grading kernel runs with (fast mode, no progress bars)."""
    return {k: str(v) for k, v in dict(_nfcourse_section(config).get("kernel_env", {})).items()}
