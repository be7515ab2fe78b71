"""Autograding throughput: plain nbgrader against nfcourse's sandboxed, verified grading.

One run, one machine, the same submissions (a lesson's solution handed in N times, fast
mode; lesson 01 unless ``--lesson`` says otherwise), three ways:

1. ``nbgrader``: nbgrader's own Execute, no sandbox, no independent check, one worker,
   SQLite (what the course did before issue 8);
2. ``nfcourse x1``: every kernel in a sandbox plus the independent check, one worker, SQLite;
3. ``nfcourse xW``: the same with W workers into a PostgreSQL gradebook (a throwaway
   server from Debian's packages, started and stopped here).

Prints submissions per minute, per worker, the ratios, and the seconds the independent
check took per submission (from ``nfcourse_verification.json``). Needs bubblewrap and (for 3)
PostgreSQL: ``apt-get install bubblewrap postgresql``.

    python benchmarks/grading.py --submissions 8 --workers 2
    python benchmarks/grading.py --lesson 04_multiscale --submissions 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "grading"))

PLAIN = """
from nbgrader.preprocessors import Execute
c.Autograde.autograde_preprocessors = [Execute] + c.Autograde.autograde_preprocessors[1:]
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def grade(label: str, root: Path, lesson: str, n: int, workers: int, extra_config: str = "",
          db_url: str | None = None, unsandboxed: bool = False) -> dict:
    from harness import make_course, max_points, student_notebook, submit

    from nfcourse.grade import Course, commands
    from nfcourse.grade.execute import VERIFICATION_FILE

    make_course(root, [lesson])
    if extra_config:
        with open(root / "grading" / "nbgrader_config.py", "a") as handle:
            handle.write(extra_config)
    course = Course(root, db_url=db_url)
    notebook = student_notebook(course, lesson)
    students = [f"student{i:03d}" for i in range(n)]
    for student in students:
        submit(course, lesson, student, notebook)
    commands.ensure_gradebook(course, lesson)
    started = time.perf_counter()
    commands.autograde(course, lesson, workers=workers, unsandboxed=unsandboxed)
    seconds = time.perf_counter() - started
    full = sum(max_points(course, lesson).values())
    totals = [sum(c.score for c in commands.scores(course, lesson, s).values()) for s in students]
    check = []
    for student in students:
        record = course.autograded_dir / student / lesson / VERIFICATION_FILE
        if record.is_file():
            check.append(sum(v["seconds"] for v in json.loads(record.read_text())["verdicts"]))
    per_minute = n / seconds * 60
    return {"label": label, "workers": workers, "seconds": seconds, "per_minute": per_minute,
            "per_worker": per_minute / workers, "all_full_marks": all(t == full for t in totals),
            "check_seconds": sum(check) / len(check) if check else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submissions", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lesson", default="01_two_moons_realnvp",
                        help="the lesson whose solution is handed in (a folder of solutions/)")
    args = parser.parse_args(argv)
    os.environ.setdefault("NFCOURSE_FAST", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    data = REPO.parent / "shared" / "data" / "mnist"
    if data.is_dir():
        os.environ.setdefault("NFCOURSE_DATA", str(data))

    from postgres_server import PostgresUnavailable, postgres_server

    work = Path(tempfile.mkdtemp(prefix="nfcourse-bench-grading-"))
    rows = []
    try:
        rows.append(grade("nbgrader (no sandbox, no check)", work / "plain", args.lesson,
                          args.submissions, 1, PLAIN + "c.GradingExecute.verify = False\n",
                          unsandboxed=True))
        rows.append(grade("nfcourse x1 (sandbox + check)", work / "one", args.lesson,
                          args.submissions, 1))
        try:
            with postgres_server() as url:
                rows.append(grade(f"nfcourse x{args.workers} (PostgreSQL)", work / "many",
                                  args.lesson, args.submissions, args.workers, db_url=url))
        except PostgresUnavailable as error:
            print(f"(skipping {args.workers} workers: {error})")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import torch

    print(f"\nautograding {args.lesson} (fast mode), {args.submissions} submissions each")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"{datetime.date.today()}")
    print(f"{'grader':36s} {'workers':>7s} {'seconds':>8s} {'subs/min':>9s} "
          f"{'per worker':>10s} {'full marks':>10s} {'check s/sub':>11s}")
    for row in rows:
        check = "-" if row["check_seconds"] is None else f"{row['check_seconds']:.1f}"
        print(f"{row['label']:36s} {row['workers']:7d} {row['seconds']:8.1f} "
              f"{row['per_minute']:9.1f} {row['per_worker']:10.1f} "
              f"{str(row['all_full_marks']):>10s} {check:>11s}")
    base = rows[0]["per_minute"]
    for row in rows[1:]:
        print(f"ratio {row['label']} / nbgrader: {row['per_minute'] / base:.2f}x throughput")
    if len(rows) == 3:
        print(f"scaling 1 -> {args.workers} workers: "
              f"{rows[2]['per_minute'] / rows[1]['per_minute']:.2f}x")
    return 0 if all(r["all_full_marks"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
