"""The caps of issue 16 (part B) hold against a class of hostile lesson-01 submissions.

One class, graded with one ``commands.autograde`` call: an honest control and every attack
of ``hardening_caps.py``, each its own student. The grader's environment holds canary
secrets, its temporary folder is a private one watched during the run (what a submission
puts on the host's disk), and the grading workers' peak memory is recorded. Then feedback
is generated for everyone.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from hardening_caps import CANARIES, DISK_ATTEMPT_MB, XSS, caps_attacks
from harness import _diff, make_course, max_points, student_notebook, submit
from hostile import LESSON

from nfcourse.grade import Course, commands
from nfcourse.grade.config import setenv
from nfcourse.grade.sandbox import isolation_problems

pytestmark = [pytest.mark.notebook, pytest.mark.xdist_group("caps")]

TEST_LIMITS = """
c.NfcourseGrade.lesson_timeouts = {"01_two_moons_realnvp": 25}
c.SandboxedKernelManager.memory_mb = 1536
c.GradingExecute.notebook_timeout = 600
"""
WORK_CAP_MB = 256  # SandboxedKernelManager.work_mb in the course's config
#: the grading workers' peak resident memory must stay under this with the flood in the
#: class (the flood, unbounded, queues 12 x 128 MB = 1.5 GB in the grader)
GRADER_PEAK_MB = 1024


#: the folders the kernel manager makes for a submission (sockets; once, its working copy)
KERNEL_FOLDERS = ("nfcourse-kernel-", "nfcourse-work-")


def _folder_bytes(folder: Path) -> int:
    """Bytes in the submissions' folders under ``folder`` (not the grader's own caches)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        if not Path(dirpath).relative_to(folder).parts[:1] or not \
                Path(dirpath).relative_to(folder).parts[0].startswith(KERNEL_FOLDERS):
            continue
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


class DiskWatch:
    """Polls the bytes under ``folder`` (the grader's temporary folder) and keeps the
    largest value seen, and the names of the folders seen in it."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self._stop, self.seen = folder, 0, False, set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _folder_bytes(self.folder))
            self.seen.update(p.name for p in self.folder.iterdir())
            time.sleep(0.2)

    def close(self):
        self._stop = True
        self.thread.join()


@pytest.fixture(scope="session")
def caps_graded(tmp_path_factory):
    if isolation_problems():
        pytest.fail("this machine cannot sandbox submissions: " + "; ".join(isolation_problems()))
    root = tmp_path_factory.mktemp("caps-course")
    make_course(root, [LESSON])
    with open(root / "grading" / "nbgrader_config.py", "a") as handle:
        handle.write(TEST_LIMITS)
    private_tmp = tmp_path_factory.mktemp("caps-grader-tmp")
    attacks = caps_attacks(Course(root), 0)
    course = Course(root)
    submit(course, LESSON, "control", student_notebook(course, LESSON))
    for name, attack in attacks.items():
        submit(course, LESSON, name, attack.notebook)
    old_tempdir = tempfile.tempdir
    watch = DiskWatch(private_tmp)
    started = time.monotonic()
    try:
        # the grader (and its worker processes) make their temporary folders in private_tmp
        with setenv({**CANARIES, "TMPDIR": str(private_tmp)}):
            tempfile.tempdir = str(private_tmp)
            result = commands.autograde(course, LESSON)
            feedback = commands.feedback(course, LESSON)
    finally:
        tempfile.tempdir = old_tempdir
        watch.close()
    scores = {s: {k: v.score for k, v in commands.scores(course, LESSON, s).items()}
              for s in course.students(LESSON)}
    peak = getattr(result, "peak_mb", None)
    print(f"\ncaps class: {len(scores)} submissions in {time.monotonic() - started:.0f} s; "
          f"grader peak {peak} MB; host temp peak {watch.peak / 1e6:.1f} MB")
    return {"course": course, "attacks": attacks, "scores": scores, "result": result,
            "feedback": feedback, "peak_mb": peak, "disk_peak": watch.peak,
            "disk_seen": watch.seen,
            "private_tmp": private_tmp}


def _graded(course: Course, student: str):
    return nbformat.read(course.autograded_dir / student / LESSON / f"{LESSON}.ipynb",
                         as_version=4)


def _feedback_html(course: Course, student: str) -> str:
    return (course.feedback_dir / student / LESSON / f"{LESSON}.html").read_text()


def test_control_gets_full_marks(caps_graded):
    points = max_points(caps_graded["course"], LESSON)
    assert caps_graded["scores"]["control"] == points, _diff(caps_graded["scores"]["control"],
                                                             points)


@pytest.mark.parametrize("name", ["env_canary", "html_script", "disk_fill", "iopub_flood",
                                  "check_sleeper"])
def test_attack_scores_what_its_honest_work_deserves(caps_graded, name):
    attack = caps_graded["attacks"][name]
    expected = attack.expected(max_points(caps_graded["course"], LESSON))
    got = caps_graded["scores"][name]
    assert got == expected, f"{name} ({attack.what}):\n" + _diff(got, expected)


def test_no_canary_in_any_graded_notebook_or_feedback(caps_graded):
    course = caps_graded["course"]
    files = [p for d in (course.autograded_dir, course.feedback_dir) for p in d.rglob("*")
             if p.is_file()]
    assert len(files) >= 2 * len(caps_graded["scores"])
    for path in files:
        text = path.read_bytes().decode(errors="replace")
        for secret in CANARIES.values():
            assert secret not in text, f"{secret} leaked into {path}"
    # the dump itself ran and shows the environment the kernel did get
    text = json.dumps(_graded(course, "env_canary").cells, default=str)
    assert "ENVIRONMENT" in text and "NFCOURSE_FAST" in text


class _Text(HTMLParser):
    """The text of an HTML page, and every script body and tag attribute in it."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text, self.scripts, self.attrs, self._in_script = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.text).append(data)


def _parse(page: str) -> _Text:
    parser = _Text()
    parser.feed(page)
    return parser


def _hidden_lines(course: Course) -> list[str]:
    """Each substantial line of every hidden-test region of the lesson's source."""
    nb = nbformat.read(course.source_notebook(LESSON), as_version=4)
    lines = []
    for cell in nb.cells:
        inside = False
        for line in cell.source.splitlines():
            if "BEGIN HIDDEN TESTS" in line:
                inside = True
            elif "END HIDDEN TESTS" in line:
                inside = False
            elif inside and len(line.strip()) >= 20:
                lines.append(line.strip())
    return lines


def test_no_feedback_contains_the_hidden_tests(caps_graded):
    course = caps_graded["course"]
    hidden = _hidden_lines(course)
    assert len(hidden) >= 5, hidden
    # the autograded notebook (the instructor's) has them: the search can find them
    graded_text = "\n".join(c.source for c in _graded(course, "control").cells)
    assert all(line in graded_text for line in hidden)
    assert len(caps_graded["feedback"]) == len(caps_graded["scores"])
    for path in caps_graded["feedback"]:
        text = "".join(_parse(path.read_text()).text)
        leaked = [line for line in hidden if line in text]
        assert not leaked, f"{path}: hidden test lines {leaked[:3]}"
        assert "BEGIN HIDDEN TESTS" not in text, path
    # a failed test still says why (check_sleeper lost everything to the check's budget)
    sleeper = "".join(_parse(_feedback_html(course, "check_sleeper")).text)
    assert "IndependentCheckFailed" in sleeper and "budget" in sleeper


def test_html_and_javascript_are_inert(caps_graded):
    course = caps_graded["course"]
    page = _feedback_html(course, "html_script")
    parsed = _parse(page)
    assert not [s for s in parsed.scripts if XSS in s], "a planted <script> survived"
    bad = [(t, k, v) for t, k, v in parsed.attrs
           if XSS in v and (k.startswith("on") or "javascript:" in v.lower() or t == "script")]
    assert not bad, bad
    assert "bold" in "".join(parsed.text)  # harmless HTML still renders
    nb = _graded(course, "html_script")
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            assert "application/javascript" not in data and "image/svg+xml" not in data
            for key in ("text/html", "text/markdown"):
                if key in data:
                    inner = _parse(data[key])
                    assert not inner.scripts and not any(
                        k.startswith("on") or "javascript:" in v.lower()
                        for _, k, v in inner.attrs), data[key]
        if cell.cell_type == "markdown" and XSS in cell.source:
            inner = _parse(cell.source)
            assert not [s for s in inner.scripts if XSS in s], cell.source
            assert not any(k.startswith("on") for _, k, _ in inner.attrs), cell.source


def test_disk_writes_stop_at_the_cap_and_leave_nothing_on_the_host(caps_graded):
    course = caps_graded["course"]
    text = "".join(out.get("text", "") for cell in _graded(course, "disk_fill").cells
                   for out in cell.get("outputs", []))
    match = re.search(r"DISK (\{.*\})", text)
    assert match, text[-2000:]
    report = json.loads(match.group(1))
    work_mb, work_error = report["work"]
    assert work_error is not None and work_mb <= WORK_CAP_MB < DISK_ATTEMPT_MB, report
    assert report["sockets"] == [0, "PermissionError"], report
    # on the host: the temporary folders never held more than a few MB (the kernel's
    # connection files and sockets), and nothing is left of them
    assert any(n.startswith("nfcourse-kernel-") for n in caps_graded["disk_seen"]), \
        caps_graded["disk_seen"]  # the watch did see the kernels' folders
    assert caps_graded["disk_peak"] < 8e6, caps_graded["disk_peak"]
    tmp = caps_graded["private_tmp"]
    leftovers = [p for p in tmp.iterdir() if p.name.startswith(KERNEL_FOLDERS)]
    assert not leftovers, leftovers[:5]
    assert not list(tmp.rglob("fill-*"))
    # and nothing the kernel wrote came back with the graded notebook
    folder = course.autograded_dir / "disk_fill" / LESSON
    assert not list(folder.glob("fill-*")), sorted(os.listdir(folder))


def test_iopub_flood_leaves_the_grader_small(caps_graded):
    cells = _graded(caps_graded["course"], "iopub_flood").cells
    text = "".join(out.get("text", "") for cell in cells for out in cell.get("outputs", []))
    assert "over the grader's 64 MB limit" in text  # the flood's cell says what happened
    peak = caps_graded["peak_mb"]
    if peak is None:
        pytest.skip("autograde reports no worker peak memory (part A's workers not there)")
    assert peak < GRADER_PEAK_MB, f"grader peak {peak:.0f} MB with the iopub flood in the class"
