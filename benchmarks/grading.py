"""Autograding throughput: plain nbgrader against nfcourse's sandboxed, verified grading.

One run, one machine, the same submissions (lesson 01's solution handed in N times, fast
mode), three ways:

1. ``nbgrader``: nbgrader's own Execute, no sandbox, no independent check, one worker,
   SQLite (what the course did before issue 8);
2. ``nfcourse x1``: every kernel in a sandbox plus the independent check, one worker, SQLite;
3. ``nfcourse xW``: the same with W workers into a PostgreSQL gradebook (a throwaway
   server from Debian's packages, started and stopped here).

Prints submissions per minute, per worker, and the ratios. Needs bubblewrap and (for 3)
PostgreSQL: ``apt-get install bubblewrap postgresql``.

    python benchmarks/grading.py --submissions 8 --workers 2
"""

from __future__ import annotations

import argparse
import datetime
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

LESSON = "01_two_moons_realnvp"
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


def grade(label: str, root: Path, n: int, workers: int, extra_config: str = "",
          db_url: str | None = None, unsandboxed: bool = False) -> dict:
    from harness import make_course, student_notebook, submit

    from nfcourse.grade import Course, commands

    make_course(root, [LESSON])
    if extra_config:
        with open(root / "grading" / "nbgrader_config.py", "a") as handle:
            handle.write(extra_config)
    course = Course(root, db_url=db_url)
    notebook = student_notebook(course, LESSON)
    for i in range(n):
        submit(course, LESSON, f"student{i:03d}", notebook)
    commands.ensure_gradebook(course, LESSON)
    started = time.perf_counter()
    commands.autograde(course, LESSON, workers=workers, unsandboxed=unsandboxed)
    seconds = time.perf_counter() - started
    totals = [sum(c.score for c in commands.scores(course, LESSON, f"student{i:03d}").values())
              for i in range(n)]
    per_minute = n / seconds * 60
    return {"label": label, "workers": workers, "seconds": seconds, "per_minute": per_minute,
            "per_worker": per_minute / workers, "all_full_marks": all(t == 15 for t in totals)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submissions", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
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
        rows.append(grade("nbgrader (no sandbox, no check)", work / "plain", args.submissions,
                          1, PLAIN + "c.GradingExecute.verify = False\n", unsandboxed=True))
        rows.append(grade("nfcourse x1 (sandbox + check)", work / "one", args.submissions, 1))
        try:
            with postgres_server() as url:
                rows.append(grade(f"nfcourse x{args.workers} (PostgreSQL)", work / "many",
                                  args.submissions, args.workers, db_url=url))
        except PostgresUnavailable as error:
            print(f"(skipping {args.workers} workers: {error})")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import torch

    print(f"\nautograding lesson 01 (fast mode), {args.submissions} submissions each")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"{datetime.date.today()}")
    print(f"{'grader':36s} {'workers':>7s} {'seconds':>8s} {'subs/min':>9s} "
          f"{'per worker':>10s} {'full marks':>10s}")
    for row in rows:
        print(f"{row['label']:36s} {row['workers']:7d} {row['seconds']:8.1f} "
              f"{row['per_minute']:9.1f} {row['per_worker']:10.1f} "
              f"{str(row['all_full_marks']):>10s}")
    base = rows[0]["per_minute"]
    for row in rows[1:]:
        print(f"ratio {row['label']} / nbgrader: {row['per_minute'] / base:.2f}x throughput")
    if len(rows) == 3:
        print(f"scaling 1 -> {args.workers} workers: "
              f"{rows[2]['per_minute'] / rows[1]['per_minute']:.2f}x")
    return 0 if all(r["all_full_marks"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
