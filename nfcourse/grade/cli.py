"""``nfcourse grade ...``: release lessons, collect, autograde, feedback, export, status.

Run ``nfcourse grade --help`` (or ``python -m nfcourse.grade --help``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from nfcourse.grade import commands
from nfcourse.grade.commands import Course, GradeError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nfcourse grade",
        description="Grade the course's notebooks with nbgrader "
        "(configuration: grading/nbgrader_config.py).",
    )
    parser.add_argument(
        "--course-root",
        metavar="DIR",
        help="the course folder (default: $NFCOURSE_COURSE_ROOT, else found from the working "
        "directory)",
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        help="the gradebook's database, e.g. postgresql://grader@127.0.0.1/nfcourse (default: "
        "grading/gradebook.db, SQLite; several workers need PostgreSQL)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show nbgrader's log")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("release", help="regenerate lessons/ from solutions/ (and the gradebook)")
    p.add_argument("lesson", nargs="?", help="one lesson, e.g. 01_two_moons_realnvp (default: all)")

    p = sub.add_parser("collect", help="copy downloaded submissions into grading/submitted/")
    p.add_argument("lesson")
    p.add_argument("--from", dest="source", required=True, metavar="DIR",
                   help="folder of submissions: one sub-folder per student, or files named "
                   "STUDENT_anything.ipynb")
    p.add_argument("--pattern", default=commands._DEFAULT_STUDENT_PATTERN,
                   help="regular expression with a (?P<student>...) group, matched against "
                   "file names when notebooks lie side by side")
    p.add_argument("--keep", action="store_true", help="keep existing submissions")

    p = sub.add_parser("autograde", help="execute and score submissions")
    p.add_argument("lesson")
    p.add_argument("--student", help="one student (default: every submission)")
    p.add_argument("--force", action="store_true", help="grade again even if already graded")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="grade N submissions at once (one GPU each when there are several; "
                   "needs --db postgresql://...)")
    p.add_argument("--unsandboxed", action="store_true",
                   help="grade even though this machine cannot isolate submissions (UNSAFE: "
                   "student code runs with your permissions)")

    p = sub.add_parser("feedback", help="write HTML feedback for autograded submissions")
    p.add_argument("lesson")
    p.add_argument("--student", help="one student (default: all)")

    p = sub.add_parser("export", help="write every score to a CSV file")
    p.add_argument("--csv", required=True, metavar="PATH")

    sub.add_parser("status", help="what is released, submitted, graded")

    p = sub.add_parser("similarity", help="similarity of answer cells for plagiarism review "
                       "(HTML/JSON/CSV in grading/reports/LESSON/; never scored)")
    p.add_argument("lesson")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="share of an answer found elsewhere that lists a pair for review "
                   "(default: 0.6)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="pairs to print")
    return parser


def _print_status(course: Course) -> None:
    rows = commands.status(course)
    print(f"course: {course.root}")
    if not rows:
        print("no lessons in", course.source_dir)
    for row in rows:
        flags = [
            "released" if row.released else "NOT released",
            "in gradebook" if row.in_gradebook else "not in gradebook (yet)",
        ]
        print(f"{row.lesson}: {', '.join(flags)}; {len(row.submitted)} submitted, "
              f"{len(row.autograded)} autograded, {len(row.feedback)} with feedback")
        for student, total in sorted(row.totals.items()):
            print(f"    {student:20s} {total:g} / {row.max_score:g}")
        for student, reason in sorted(row.failed.items()):
            print(f"    {student:20s} graded 0 / {row.max_score:g}, needs a look: {reason}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nfcourse grade``; returns the exit status: 0, 1 for an error that
    stopped the command, 2 when ``autograde`` could not grade some submissions (every other
    one is graded and printed)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("nfcourse.grade").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        course = Course(args.course_root, db_url=args.db)
        if args.command == "release":
            for lesson in commands.release(course, args.lesson):
                print(f"released {course.release_dir / lesson}")
        elif args.command == "collect":
            collected = commands.collect(
                course, args.lesson, args.source, pattern=args.pattern, overwrite=not args.keep
            )
            for student, path in collected.items():
                print(f"{student}: {path}")
            for student in collected.kept:
                print(f"{student}: kept the earlier submission (--keep)")
            for entry, why in collected.skipped.items():
                print(f"skipped {entry}: {why}", file=sys.stderr)
            if not collected.copied and not collected.kept:
                print("nothing collected", file=sys.stderr)
                return 1
        elif args.command == "autograde":
            result = commands.autograde(course, args.lesson, args.student, force=args.force,
                                        workers=args.workers, unsandboxed=args.unsandboxed)
            if not result.graded and not result.failed:
                print(f"no submissions of {args.lesson}", file=sys.stderr)
                return 1
            for student in result.graded:
                try:
                    cells = commands.scores(course, args.lesson, student)
                except Exception:  # noqa: BLE001  (nbgrader skipped an already graded one)
                    continue
                got = sum(c.score for c in cells.values())
                total = sum(c.max_score for c in cells.values())
                print(f"{student}: {got:g} / {total:g}")
                record = commands.verification(course, args.lesson, student) or {}
                for note in record.get("review", [])[:5]:
                    print(f"    to review: {note}")
            for student, reason in result.failed.items():
                print(f"{student}: NOT GRADED (graded 0, needs a look): {reason}")
            if result.failed:
                print(f"{len(result.failed)} of {len(result.graded) + len(result.failed)} "
                      "submissions could not be graded", file=sys.stderr)
                return 2
        elif args.command == "feedback":
            for path in commands.feedback(course, args.lesson, args.student):
                print(path)
        elif args.command == "export":
            print(commands.export_csv(course, args.csv))
        elif args.command == "status":
            _print_status(course)
        elif args.command == "similarity":
            from nfcourse.grade.similarity import similarity_report, summary_lines

            report = similarity_report(course, args.lesson, threshold=args.threshold)
            print("\n".join(summary_lines(report, top=args.top)))
    except (GradeError, FileNotFoundError) as error:
        print(f"nfcourse grade: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
