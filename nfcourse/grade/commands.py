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
from nfcourse.grade.failures import clear_failure, read_failure, write_failure
from nfcourse.grade.submission import SubmissionError, check_submission, student_id_problem

__all__ = [
    "Course",
    "GradeError",
    "CellScore",
    "AutogradeResult",
    "CollectResult",
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
    "failure",
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


def _check_isolation(course: Course, unsandboxed: bool, *, quiet: bool = False) -> Config:
    """The grading config: sandboxed, or refused, or (explicitly) not sandboxed (said once,
    by the caller that drives the class, not by every worker: ``quiet``)."""
    config = copy.deepcopy(course.config)
    if unsandboxed:
        if not quiet:
            log.warning("grading WITHOUT a sandbox (--unsandboxed): submissions run with "
                        "your permissions and can read and change your files")
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


@dataclass
class AutogradeResult:
    """What :func:`autograde` did: ``graded`` students (in order), ``failed`` ones with the
    reason (``{student: reason}``; each is recorded as "graded 0 / needs a look"), the
    grading workers' peak resident memory (MB, their own, not their kernels') and the
    seconds each submission took. Iterating gives the graded students."""

    graded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    peak_mb: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def __iter__(self):
        return iter(self.graded)

    def __len__(self) -> int:
        return len(self.graded)


def _short_reason(error: str) -> str:
    """The line of a GradeError that says what went wrong: the last exception in nbgrader's
    log (``ValueError: ...``), else the error's first line."""
    lines = error.splitlines()
    for line in reversed(lines):
        match = re.match(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)): (.+)", line)
        if match:
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(3)}"[:300]
    return (lines[0] if lines else "unknown error")[:300]


def _grade_in_worker(root: str, db_url: str | None, lesson: str, student: str, force: bool,
                     unsandboxed: bool, verbose: bool) -> dict:
    """Grade one submission by its exact id; runs in a worker process
    (:mod:`nfcourse.grade.workers`). Returns ``{"error": reason or None, "log": ...}``."""
    _quiet_warnings()
    logging.basicConfig(format="%(message)s")
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    course = Course(root, db_url=db_url)
    notebook = course.submitted_dir / student / lesson / f"{lesson}.ipynb"
    try:
        check_submission(notebook)
    except SubmissionError as error:
        return {"error": str(error), "log": ""}
    config = _check_isolation(course, unsandboxed, quiet=True)
    try:
        _autograde_one(course, lesson, student, config, force)
    except GradeError as error:
        return {"error": _short_reason(str(error)), "log": str(error)}
    return {"error": None, "log": ""}


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def _worker_memory_mb(course: Course) -> int:
    """The cap of one grading worker: the grader's own share
    (``NfcourseGrade.grader_memory_mb``) plus the kernel's cap, as the kernel's cgroup nests
    in the worker's (see :mod:`nfcourse.grade.workers`)."""
    from nfcourse.grade.sandbox import Limits

    own = int(course.config.NfcourseGrade.get("grader_memory_mb", 2048))
    kernel = int(course.config.SandboxedKernelManager.get("memory_mb", Limits.memory_mb))
    return own + kernel


def _job_timeout(course: Course, lesson: str) -> float:
    """Seconds one submission may take in all before its worker is stopped: the notebook's
    budget (or every cell at its limit, when there is none) plus time for the check."""
    budget = int(course.config.GradingExecute.get("notebook_timeout", 0) or 0)
    if not budget:
        budget = 60 * lesson_timeout(course.config, lesson)
    return float(budget + 900)


def _record_failure(course: Course, lesson: str, student: str, reason: str, log_text: str
                    ) -> None:
    """Write the failure record and make the gradebook say 0 for the submission, flagged
    for manual grading (nbgrader's own "needs a look")."""
    write_failure(course.autograded_dir / student / lesson, student, lesson, reason, log_text)
    try:
        with warnings.catch_warnings(), course.gradebook() as gb:
            _quiet_warnings()
            gb.update_or_create_student(student)
            submission = gb.update_or_create_submission(lesson, student)
            for notebook in submission.notebooks:
                for grade in notebook.grades:
                    grade.auto_score = 0
                    grade.manual_score = None
                    grade.needs_manual_grade = True
            gb.db.commit()
    except Exception as error:  # noqa: BLE001  (the record above still says it failed)
        log.warning("could not mark %s's %s as 0 in the gradebook: %s", student, lesson, error)


def failure(course: Course, lesson: str, student: str) -> str | None:
    """Why ``student``'s ``lesson`` could not be graded, or None when it was not a failure."""
    record = read_failure(course.autograded_dir / student / lesson)
    return record["reason"] if record else None


def autograde(
    course: Course,
    lesson: str,
    student: str | None = None,
    *,
    force: bool = False,
    workers: int = 1,
    unsandboxed: bool = False,
) -> AutogradeResult:
    """Execute and score the submissions of ``lesson`` (one ``student`` or all of them).

    Each submission's kernel runs in a sandbox (:mod:`nfcourse.grade.sandbox`) with the
    lesson's cell timeout and the grading kernel environment (fast mode, no progress bars)
    from the config; grading refuses to run where isolation is impossible unless
    ``unsandboxed=True``. Every submission is graded by its exact id in a memory-capped
    worker process (:mod:`nfcourse.grade.workers`); ``workers > 1`` grades that many at
    once (one GPU each when there are several) and needs a gradebook that takes concurrent
    writers (PostgreSQL: ``Course(db_url=...)``).

    A submission that cannot be graded (unreadable, an invalid student id, a grader that
    crashed or ran out of memory on it) is failed with the reason, recorded as "graded 0 /
    needs a look" (:func:`failure`, ``status``, the CSV), and the others are graded anyway.
    Raises :class:`GradeError` only for what stops the whole class (no such lesson or
    submission, no sandbox, SQLite with several workers).

    Example:
        >>> result = autograde(Course(), "01_two_moons_realnvp")   # doctest: +SKIP
        >>> result.graded, result.failed                          # doctest: +SKIP
        (['alice'], {'bob': 'bob is not valid JSON (the file is cut off): ...'})
    """
    from nfcourse.grade.workers import Job, shared_pool

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
    _check_isolation(course, unsandboxed)
    result = AutogradeResult()
    if not students:
        return result
    ensure_gradebook(course, lesson)
    logs: dict[str, str] = {}
    todo = []
    for name in students:
        problem = student_id_problem(name)
        if problem:  # nbgrader would read it as a glob pattern (alic? matches alice)
            result.failed[name] = problem
            continue
        clear_failure(course.autograded_dir / name / lesson)
        todo.append(name)
    size = min(workers, len(todo)) or 1
    slot_env = [{} for _ in range(size)]
    gpus = _gpu_count() if size > 1 else 0
    if gpus > 1:
        slot_env = [{"CUDA_VISIBLE_DEVICES": str(k % gpus)} for k in range(size)]
    jobs = [Job(name, "nfcourse.grade.commands:_grade_in_worker", {
        "root": str(course.root), "db_url": course.db_url, "lesson": lesson, "student": name,
        "force": force, "unsandboxed": unsandboxed,
        "verbose": log.isEnabledFor(logging.INFO)}) for name in todo]
    done: set[str] = set()
    if jobs:
        pool = shared_pool(size, _worker_memory_mb(course), slot_env)
        for outcome in pool.run(jobs, timeout=_job_timeout(course, lesson)):
            result.peak_mb = max(result.peak_mb, outcome.peak_mb)
            result.seconds[outcome.key] = outcome.seconds
            value = outcome.value if isinstance(outcome.value, dict) else {}
            error = outcome.error or value.get("error")
            if error:
                result.failed[outcome.key] = error
                logs[outcome.key] = value.get("log", "")
            else:
                done.add(outcome.key)
    result.graded = [name for name in todo if name in done]
    for name, reason in result.failed.items():
        if name not in (".", "..") and "/" not in name and "\0" not in name:
            _record_failure(course, lesson, name, reason, logs.get(name, ""))
        log.warning("%s: not graded: %s", name, reason)
    return result


def feedback(course: Course, lesson: str, student: str | None = None) -> list[Path]:
    """Write HTML feedback for autograded submissions; returns the files written."""
    from nbgrader.converters import GenerateFeedback

    lesson = course.check_lesson(lesson)
    problem = student_id_problem(student) if student else None
    if problem:  # nbgrader would read it as a glob pattern
        raise GradeError(problem)
    ensure_gradebook(course, lesson)
    if not any((course.autograded_dir / s / lesson / f"{lesson}.ipynb").is_file()
               for s in course.students(lesson)):
        raise GradeError(f"nothing autograded for {lesson} yet (run `nfcourse grade autograde`)")
    coursedir = course.coursedir(assignment_id=lesson, student_id=student or "*")
    _run(GenerateFeedback, course, coursedir, force=True)
    pattern = f"{student or '*'}/{lesson}/*.html"
    return sorted(course.feedback_dir.glob(pattern))


def export_csv(course: Course, path: str | os.PathLike) -> Path:
    """Every student's score on every lesson, as nbgrader's CSV plus two columns: ``status``
    (``graded``, ``needs a look`` for a submission that could not be graded, scored 0, or
    ``not graded``) and ``reason`` (why it needs a look)."""
    import csv

    from nbgrader.plugins import CsvExportPlugin

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    plugin = CsvExportPlugin(config=course.config)
    plugin.to = str(path)
    with course.gradebook() as gb:
        plugin.export(gb)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
        fields = list(rows[0]) if rows else []
    if not fields:
        return path
    for row in rows:
        lesson, student = row.get("assignment", ""), row.get("student_id", "")
        folder = course.autograded_dir / student / lesson
        reason = failure(course, lesson, student) if lesson and student else None
        if reason is not None:
            row["status"], row["reason"] = "needs a look", reason
            for key in ("raw_score", "score"):
                if key in row:
                    row[key] = "0.0"
        elif (folder / f"{lesson}.ipynb").is_file():
            row["status"], row["reason"] = "graded", ""
        else:
            row["status"], row["reason"] = "not graded", ""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".nfcourse-", suffix=".csv")
    with os.fdopen(fd, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*fields, "status", "reason"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


# Everything before the first "_" (alice_01_two_moons_realnvp.ipynb); the id is then checked
# against [A-Za-z0-9._-] and refused, with the reason, when it has anything else.
_DEFAULT_STUDENT_PATTERN = r"^(?P<student>[^_]+)"


@dataclass
class CollectResult:
    """What :func:`collect` did: ``copied`` (``{student: notebook}``), ``skipped``
    (``{entry in the download folder: why it was refused}``), ``kept`` (students whose
    earlier submission was kept). Iterating, ``items()`` and ``in`` work on ``copied``."""

    copied: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    def items(self):
        return self.copied.items()

    def __iter__(self):
        return iter(self.copied)

    def __len__(self) -> int:
        return len(self.copied)

    def __contains__(self, student) -> bool:
        return student in self.copied

    def __getitem__(self, student: str) -> Path:
        return self.copied[student]


def collect(
    course: Course,
    lesson: str,
    source: str | os.PathLike,
    *,
    pattern: str = _DEFAULT_STUDENT_PATTERN,
    overwrite: bool = True,
) -> CollectResult:
    """Copy downloaded submissions into ``grading/submitted/STUDENT/LESSON/LESSON.ipynb``.

    ``source`` is a folder as an LMS download leaves it, either

    * one folder per student (``alice/01_two_moons_realnvp.ipynb``, any depth below it;
      the notebook named like the lesson wins, else the only notebook there), or
    * notebooks side by side, the student id taken from the file name with ``pattern``
      (a regular expression with a ``student`` group; default: everything before the first
      ``_``, as in ``alice_01_two_moons_realnvp.ipynb``).

    Symbolic links are never followed (each is refused and named), nothing is read from
    outside ``source``, and a student id must match ``[A-Za-z0-9._-]+`` (not ``.`` or
    ``..``). The file's modification time becomes nbgrader's submission timestamp.

    Example:
        >>> result = collect(Course(), "01_two_moons_realnvp", "downloads")  # doctest: +SKIP
        >>> dict(result.items()), result.skipped                             # doctest: +SKIP
        ({'alice': PosixPath('.../alice/01_two_moons_realnvp/01_two_moons_realnvp.ipynb')},
         {'alic?': "student id 'alic?' has characters other than letters, ..."})
    """
    from nfcourse.grade.downloads import copy_notebook, scan

    lesson = course.check_lesson(lesson)
    given = Path(source)
    if not given.is_dir():
        raise GradeError(f"{given} is not a folder")
    try:
        regexp = re.compile(pattern)
    except re.error as error:
        raise GradeError(f"--pattern {pattern!r} is not a regular expression: {error}") from None
    if "student" not in regexp.groupindex:
        raise GradeError(f"--pattern {pattern!r} has no (?P<student>...) group")
    root = given.resolve()  # the folder the instructor named may itself be a link
    found, skipped = scan(root, lesson, regexp)
    result = CollectResult(skipped=skipped)
    for student, relative in found.items():
        real = Path(os.path.realpath(root / relative))
        if root not in real.parents:
            result.skipped[relative] = "resolves outside the download folder"
            continue
        dest_dir = course.submitted_dir / student / lesson
        if dest_dir.exists() and not overwrite:
            log.warning("keeping the existing submission of %s", student)
            result.kept.append(student)
            continue
        # Copied into a hidden folder beside the destination, then moved in: an earlier
        # submission is replaced only by a complete new one.
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".collect-", dir=dest_dir.parent))
        try:
            dest = staging / f"{lesson}.ipynb"
            try:
                mtime = copy_notebook(root, relative, dest)
            except OSError as error:
                result.skipped[relative] = f"not copied: {error.strerror or error}"
                continue
            stamp = datetime.fromtimestamp(mtime, tz=timezone.utc)
            (staging / "timestamp.txt").write_text(stamp.strftime("%Y-%m-%d %H:%M:%S.%f %Z"))
            if dest_dir.exists():
                shutil.rmtree(dest_dir)
            os.replace(staging, dest_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        result.copied[student] = dest_dir / f"{lesson}.ipynb"
    for entry, why in result.skipped.items():
        log.warning("skipped %s: %s", entry, why)
    return result


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
    failed: dict[str, str] = field(default_factory=dict)  # student -> why: graded 0, needs a look


def status(course: Course, lessons: Iterable[str] | None = None) -> list[LessonStatus]:
    """What exists for each lesson: released copy, gradebook entry, submissions, scores."""
    from nbgrader.api import MissingEntry

    out = []
    for lesson in lessons or course.lessons():
        released = (course.release_dir / lesson / f"{lesson}.ipynb").is_file()
        current = course.has_gradebook() and gradebook_is_current(course, lesson)
        row = LessonStatus(lesson, released, current)
        row.submitted = course.students(lesson)
        for s in row.submitted:
            reason = failure(course, lesson, s)
            if reason is not None:
                row.failed[s] = reason
        row.autograded = [
            s for s in row.submitted
            if s not in row.failed
            and (course.autograded_dir / s / lesson / f"{lesson}.ipynb").is_file()
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
