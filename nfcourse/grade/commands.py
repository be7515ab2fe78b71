"""The grading commands: a thin layer over nbgrader's converters and gradebook.

Every function takes a :class:`Course` (``Course()`` finds the course from the working
directory, ``Course("/path")`` grades a copy) and returns plain data; ``cli.py`` prints it.

The hidden tests live only in ``solutions/`` and in the gradebook. Commands that need them
(``autograde``, ``feedback``) first call :func:`ensure_gradebook`, which rebuilds the
gradebook's copy of a lesson from ``solutions/`` when it is missing or stale, writing the
student version into a temporary folder: only :func:`release` touches ``lessons/``.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import nbformat
from traitlets.config import Config

from nfcourse.grade.config import find_course_root, kernel_env, lesson_timeout, load_config, setenv

__all__ = [
    "Course",
    "GradeError",
    "CellScore",
    "release",
    "verification",
    "ensure_gradebook",
    "gradebook_is_current",
    "grading_env",
    "setenv",
    "autograde",
    "sandbox_problems",
    "feedback",
    "export_csv",
    "collect",
    "status",
    "scores",
]

log = logging.getLogger("nfcourse.grade")


def _quiet_warnings() -> None:
    """nbgrader 0.9 trips SQLAlchemy's autoflush warnings on every autograde, and re-adds
    deleted cells without an id (nbformat's MissingIDFieldWarning); both are harmless."""
    warnings.filterwarnings("ignore", message=r".*not in session.*")
    warnings.filterwarnings("ignore", message=r"Cell is missing an id field.*")


class GradeError(RuntimeError):
    """A grading step failed; the message carries nbgrader's log."""


@dataclass(frozen=True)
class CellScore:
    """One graded cell of one submission."""

    grade_id: str
    score: float
    max_score: float


def _with_driver(url: str) -> str:
    """``postgresql://`` with the driver nfcourse installs (psycopg 3) spelled out: what a
    bare ``postgresql://`` means depends on the SQLAlchemy version."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class Course:
    """A course folder and its nbgrader configuration.

    Example:
        >>> course = Course()                                 # doctest: +SKIP
        >>> course.lessons()                                  # doctest: +SKIP
        ['01_two_moons_realnvp']
    """

    def __init__(self, root: str | os.PathLike | None = None, db_url: str | None = None):
        self.root: Path = find_course_root(root)
        self.config: Config = load_config(self.root)
        if db_url:
            # e.g. postgresql://grader@db.example.org/nfcourse: one gradebook for many
            # workers or machines (nbgrader's default is grading/gradebook.db, SQLite).
            self.config.CourseDirectory.db_url = _with_driver(db_url)

    # -- paths --------------------------------------------------------------------------
    def _dir(self, step: str) -> Path:
        return self.root / getattr(self.coursedir(), step)

    @property
    def source_dir(self) -> Path:
        return self._dir("source_directory")

    @property
    def release_dir(self) -> Path:
        return self._dir("release_directory")

    @property
    def submitted_dir(self) -> Path:
        return self._dir("submitted_directory")

    @property
    def autograded_dir(self) -> Path:
        return self._dir("autograded_directory")

    @property
    def feedback_dir(self) -> Path:
        return self._dir("feedback_directory")

    @property
    def db_url(self) -> str:
        return self.coursedir().db_url

    def coursedir(self, **overrides):
        from nbgrader.coursedir import CourseDirectory

        coursedir = CourseDirectory(config=self.config)
        for key, value in overrides.items():
            setattr(coursedir, key, value)
        return coursedir

    def lessons(self) -> list[str]:
        """Every ``NN_slug`` in ``solutions/`` that holds ``NN_slug.ipynb``."""
        if not self.source_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.source_dir.iterdir() if (p / f"{p.name}.ipynb").is_file()
        )

    def check_lesson(self, lesson: str) -> str:
        lesson = lesson.strip("/").split("/")[-1]
        if lesson not in self.lessons():
            close = [name for name in self.lessons() if name.startswith(lesson[:2])]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise GradeError(f"no lesson {lesson!r} in {self.source_dir}{hint}")
        return lesson

    def source_notebook(self, lesson: str) -> Path:
        return self.source_dir / lesson / f"{lesson}.ipynb"

    def students(self, lesson: str | None = None) -> list[str]:
        """Students with a submission (of ``lesson``, or of anything)."""
        if not self.submitted_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.submitted_dir.iterdir()
            if p.is_dir() and (lesson is None or (p / lesson).is_dir())
        )

    def gradebook(self):
        from nbgrader.api import Gradebook

        if self.db_path is not None:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        with setenv(_tools_env()):
            return Gradebook(self.db_url, self.coursedir().course_id)

    @property
    def db_path(self) -> Path | None:
        """The gradebook file for a sqlite ``db_url``, else None."""
        url = self.db_url
        return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None

    def has_gradebook(self) -> bool:
        return self.db_path is None or self.db_path.is_file()


# -- running nbgrader's converters ----------------------------------------------------------
def _tools_env() -> dict[str, str]:
    """PATH with this interpreter's scripts first: nbgrader runs ``alembic`` when it creates a
    gradebook, and the venv's ``bin`` is not on PATH under ``make test``."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bindir in path.split(os.pathsep):
        return {}
    return {"PATH": bindir + os.pathsep + path}


def _run(converter_cls, course: Course, coursedir, config: Config | None = None, **traits) -> str:
    """Run one nbgrader converter; return its log, raise GradeError with the log if it fails."""
    from nbgrader.converters.base import NbGraderException

    buffer = io.StringIO()
    logger = logging.getLogger(f"nfcourse.grade.nbgrader.{converter_cls.__name__}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    logger.handlers = [handler]
    if log.isEnabledFor(logging.INFO):
        echo = logging.StreamHandler()
        echo.setFormatter(logging.Formatter("[nbgrader %(levelname)s] %(message)s"))
        logger.addHandler(echo)
    config = course.config if config is None else config
    converter = converter_cls(coursedir=coursedir, config=config, log=logger)
    for key, value in traits.items():
        setattr(converter, key, value)
    cwd = os.getcwd()
    try:
        with setenv(_tools_env()), warnings.catch_warnings():
            _quiet_warnings()
            converter.start()
    except (NbGraderException, Exception) as error:  # nbgrader logs the details first
        name = converter_cls.__name__
        raise GradeError(f"{name} failed: {error}\n{buffer.getvalue()}") from error
    finally:
        os.chdir(cwd)
        logger.handlers = []
    return buffer.getvalue()


def _grade_cells(nb) -> dict[str, tuple[str, float]]:
    """``grade_id -> (source, points)`` of a notebook's graded cells."""
    out = {}
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("grade"):
            out[meta["grade_id"]] = (cell.source, float(meta.get("points", 0)))
    return out


def gradebook_is_current(course: Course, lesson: str) -> bool:
    """True when the gradebook holds ``lesson`` with the grade cells (hidden tests and
    points) that ``solutions/`` has now."""
    from nbgrader.api import MissingEntry

    expected = _grade_cells(nbformat.read(course.source_notebook(lesson), as_version=4))
    try:
        with course.gradebook() as gb:
            notebook = gb.find_notebook(lesson, lesson)
            stored_source = {cell.name: cell.source for cell in notebook.source_cells}
            stored = {
                cell.name: (stored_source.get(cell.name), float(cell.max_score))
                for cell in notebook.grade_cells
            }
    except MissingEntry:
        return False
    return stored == expected


def ensure_gradebook(course: Course, lesson: str, *, force: bool = False) -> bool:
    """Make the gradebook's copy of ``lesson`` match ``solutions/``; True if it was rebuilt.

    The student version this produces goes to a temporary folder and is thrown away, so
    ``lessons/`` is untouched.
    """
    from nbgrader.converters import GenerateAssignment

    lesson = course.check_lesson(lesson)
    if not force and gradebook_is_current(course, lesson):
        return False
    with tempfile.TemporaryDirectory(prefix="nfcourse-release-") as tmp:
        coursedir = course.coursedir(assignment_id=lesson, release_directory=tmp)
        _run(GenerateAssignment, course, coursedir, force=True, create_assignment=True)
    log.info("gradebook: %s rebuilt from %s", lesson, course.source_notebook(lesson))
    return True


# -- commands --------------------------------------------------------------------------------
def release(course: Course, lesson: str | None = None) -> list[str]:
    """Regenerate ``lessons/LESSON`` (every lesson by default) from ``solutions/`` and record
    the lessons in the gradebook. Returns the lessons released."""
    from nbgrader.converters import GenerateAssignment

    lessons = [course.check_lesson(lesson)] if lesson else course.lessons()
    for name in lessons:
        coursedir = course.coursedir(assignment_id=name)
        _run(GenerateAssignment, course, coursedir, force=True, create_assignment=True)
        log.info("released %s", course.release_dir / name)
    return lessons


def grading_env(course: Course) -> dict[str, str]:
    """Environment variables the grading kernel runs with: the config's
    ``NfcourseGrade.kernel_env`` (fast mode, no progress bars) and this interpreter's PATH."""
    return {**kernel_env(course.config), **_tools_env()}


def sandbox_problems(course: Course) -> list[str]:
    """What stops grading from isolating submissions here (empty when nothing does)."""
    from nfcourse.grade.sandbox import isolation_problems

    return isolation_problems()


def _check_isolation(course: Course, unsandboxed: bool) -> Config:
    """The grading config: sandboxed, or refused, or (explicitly) not sandboxed."""
    config = copy.deepcopy(course.config)
    if unsandboxed:
        log.warning("grading WITHOUT a sandbox (--unsandboxed): submissions run with your "
                    "permissions and can read and change your files")
        config.SandboxedKernelManager.enabled = False
        return config
    problems = sandbox_problems(course)
    if problems:
        raise GradeError(
            "cannot isolate submissions on this machine:\n  - " + "\n  - ".join(problems)
            + "\nFix that (see grading/README.md), or pass --unsandboxed to grade without "
            "isolation (student code then runs with your permissions).")
    return config


def _autograde_one(course: Course, lesson: str, student: str | None, config: Config,
                   force: bool) -> None:
    from nbgrader.converters import Autograde

    config.Execute.timeout = lesson_timeout(course.config, lesson)
    coursedir = course.coursedir(assignment_id=lesson, student_id=student or "*")
    with setenv(grading_env(course)):
        _run(Autograde, course, coursedir, config, force=force, create_student=True)


def _worker_init(devices) -> None:
    """Give each worker process one GPU when there are several (round robin)."""
    if devices is None:
        return
    try:
        device = devices.get_nowait()
    except Exception:  # noqa: BLE001  (more workers than GPUs: share them)
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = str(device)


def _worker_grade(root: str, db_url: str | None, lesson: str, student: str, force: bool,
                  unsandboxed: bool) -> tuple[str, str | None]:
    """One submission, in a worker process; returns (student, error or None)."""
    _quiet_warnings()
    try:
        course = Course(root, db_url=db_url)
        config = _check_isolation(course, unsandboxed)
        _autograde_one(course, lesson, student, config, force)
    except Exception as error:  # noqa: BLE001  (reported per student by the parent)
        return student, f"{type(error).__name__}: {error}"
    return student, None


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def autograde(
    course: Course,
    lesson: str,
    student: str | None = None,
    *,
    force: bool = False,
    workers: int = 1,
    unsandboxed: bool = False,
) -> list[str]:
    """Execute and score the submissions of ``lesson`` (one ``student`` or all of them).

    Each submission's kernel runs in a sandbox (:mod:`nfcourse.grade.sandbox`) with the
    lesson's cell timeout and the grading kernel environment (fast mode, no progress bars)
    from the config; grading refuses to run where isolation is impossible unless
    ``unsandboxed=True``. ``workers > 1`` grades that many submissions at once, each in its
    own process (one GPU each when there are several); it needs a gradebook that takes
    concurrent writers (PostgreSQL: ``Course(db_url=...)``). Returns the students graded;
    raises :class:`GradeError` naming every submission that could not be graded.
    """
    lesson = course.check_lesson(lesson)
    students = [student] if student else course.students(lesson)
    missing = [s for s in students if not (course.submitted_dir / s / lesson).is_dir()]
    if missing:
        raise GradeError(
            f"no submission of {lesson} for {', '.join(missing)} under {course.submitted_dir}"
            " (use `nfcourse grade collect`)"
        )
    if workers < 1:
        raise GradeError(f"--workers must be at least 1, not {workers}")
    if workers > 1 and course.db_url.startswith("sqlite"):
        raise GradeError(
            f"--workers {workers} needs a gradebook that takes concurrent writers, PostgreSQL: "
            "pass --db postgresql://USER@HOST/DB (SQLite, nbgrader's default, is for one "
            "worker)")
    config = _check_isolation(course, unsandboxed)
    if not students:
        return []
    ensure_gradebook(course, lesson)
    if workers == 1 or len(students) == 1:
        _autograde_one(course, lesson, student, config, force)
        return students
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    gpus = _gpu_count()
    devices = None
    if gpus > 1:
        devices = context.Manager().Queue()
        for k in range(workers):
            devices.put(k % gpus)
    failures = {}
    with ProcessPoolExecutor(max_workers=min(workers, len(students)), mp_context=context,
                             initializer=_worker_init, initargs=(devices,)) as pool:
        futures = [pool.submit(_worker_grade, str(course.root), course.db_url, lesson, s,
                               force, unsandboxed) for s in students]
        for future in futures:
            name, error = future.result()
            if error is not None:
                failures[name] = error
    if failures:
        raise GradeError("could not grade: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return students


def feedback(course: Course, lesson: str, student: str | None = None) -> list[Path]:
    """Write HTML feedback for autograded submissions; returns the files written."""
    from nbgrader.converters import GenerateFeedback

    lesson = course.check_lesson(lesson)
    ensure_gradebook(course, lesson)
    if not any((course.autograded_dir / s / lesson).is_dir() for s in course.students(lesson)):
        raise GradeError(f"nothing autograded for {lesson} yet (run `nfcourse grade autograde`)")
    coursedir = course.coursedir(assignment_id=lesson, student_id=student or "*")
    _run(GenerateFeedback, course, coursedir, force=True)
    pattern = f"{student or '*'}/{lesson}/*.html"
    return sorted(course.feedback_dir.glob(pattern))


def export_csv(course: Course, path: str | os.PathLike) -> Path:
    """Every student's score on every lesson, as nbgrader's CSV."""
    from nbgrader.plugins import CsvExportPlugin

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    plugin = CsvExportPlugin(config=course.config)
    plugin.to = str(path)
    with course.gradebook() as gb:
        plugin.export(gb)
    return path


_DEFAULT_STUDENT_PATTERN = r"^(?P<student>[A-Za-z0-9][A-Za-z0-9.@-]*)"


def collect(
    course: Course,
    lesson: str,
    source: str | os.PathLike,
    *,
    pattern: str = _DEFAULT_STUDENT_PATTERN,
    overwrite: bool = True,
) -> dict[str, Path]:
    """Copy downloaded submissions into ``grading/submitted/STUDENT/LESSON/LESSON.ipynb``.

    ``source`` is a folder as an LMS download leaves it, either

    * one folder per student (``alice/01_two_moons_realnvp.ipynb``, any depth below it;
      the notebook named like the lesson wins, else the only notebook there), or
    * notebooks side by side, the student id taken from the file name with ``pattern``
      (a regular expression with a ``student`` group; default: everything before the first
      ``_``, as in ``alice_01_two_moons_realnvp.ipynb``).

    The file's modification time becomes nbgrader's submission timestamp. Returns
    ``{student: copied notebook}``.
    """
    lesson = course.check_lesson(lesson)
    source = Path(source)
    if not source.is_dir():
        raise GradeError(f"{source} is not a folder")
    regexp = re.compile(pattern)
    found: dict[str, Path] = {}

    def pick(notebooks: list[Path]) -> Path | None:
        named = [p for p in notebooks if p.stem == lesson]
        if named:
            return named[0]
        return notebooks[0] if len(notebooks) == 1 else None

    def notebooks_in(folder: Path) -> list[Path]:
        return sorted(
            p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
        )

    for entry in sorted(source.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            chosen = pick(notebooks_in(entry))
            if chosen is None:
                log.warning("skipping %s: no single notebook for %s in it", entry, lesson)
                continue
            found[entry.name] = chosen
        elif entry.suffix == ".ipynb":
            match = regexp.search(entry.stem)
            if not match:
                log.warning("skipping %s: no student id matches %r", entry, pattern)
                continue
            student = match.group("student")
            if student in found:
                raise GradeError(f"two notebooks for student {student!r} in {source}")
            found[student] = entry
    copied = {}
    for student, notebook in found.items():
        dest_dir = course.submitted_dir / student / lesson
        if dest_dir.exists():
            if not overwrite:
                log.warning("keeping the existing submission of %s", student)
                continue
            shutil.rmtree(dest_dir)
        dest_dir.mkdir(parents=True)
        dest = dest_dir / f"{lesson}.ipynb"
        shutil.copyfile(notebook, dest)
        stamp = datetime.fromtimestamp(notebook.stat().st_mtime, tz=timezone.utc)
        (dest_dir / "timestamp.txt").write_text(stamp.strftime("%Y-%m-%d %H:%M:%S.%f %Z"))
        copied[student] = dest
    return copied


def scores(course: Course, lesson: str, student: str) -> dict[str, CellScore]:
    """``grade_id -> CellScore`` of every graded cell of ``student``'s ``lesson``."""
    with warnings.catch_warnings(), course.gradebook() as gb:
        _quiet_warnings()
        submission = gb.find_submission_notebook(lesson, lesson, student)
        return {
            grade.name: CellScore(grade.name, float(grade.score), float(grade.max_score))
            for grade in submission.grades
        }


def verification(course: Course, lesson: str, student: str) -> dict | None:
    """The independent check's record of ``student``'s graded ``lesson`` (its verdicts and
    the notes for review), or None when the lesson has no check or it was not graded."""
    import json

    path = course.autograded_dir / student / lesson / "nfcourse_verification.json"
    if not path.is_file() or path.is_symlink():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class LessonStatus:
    lesson: str
    released: bool
    in_gradebook: bool
    max_score: float = 0.0
    submitted: list[str] = field(default_factory=list)
    autograded: list[str] = field(default_factory=list)
    feedback: list[str] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)


def status(course: Course, lessons: Iterable[str] | None = None) -> list[LessonStatus]:
    """What exists for each lesson: released copy, gradebook entry, submissions, scores."""
    from nbgrader.api import MissingEntry

    out = []
    for lesson in lessons or course.lessons():
        released = (course.release_dir / lesson / f"{lesson}.ipynb").is_file()
        current = course.has_gradebook() and gradebook_is_current(course, lesson)
        row = LessonStatus(lesson, released, current)
        row.submitted = course.students(lesson)
        row.autograded = [
            s for s in row.submitted if (course.autograded_dir / s / lesson).is_dir()
        ]
        row.feedback = [s for s in row.submitted if (course.feedback_dir / s / lesson).is_dir()]
        if not course.has_gradebook():
            out.append(row)
            continue
        with course.gradebook() as gb:
            try:
                assignment = gb.find_assignment(lesson)
                row.max_score = float(assignment.max_score)
            except MissingEntry:
                pass
            for student in row.autograded:
                try:
                    sub = gb.find_submission(lesson, student)
                    row.totals[student] = float(sub.score)
                except MissingEntry:
                    pass
        out.append(row)
    return out
