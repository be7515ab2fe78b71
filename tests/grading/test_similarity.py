"""The similarity report (nfcourse/grade/similarity.py): fast, no kernels.

A temporary course of lesson 01 with the class of ``similarity_class.py`` handed in: the
copied reference is flagged against the reference, the two students sharing code against
each other, honest answers are not flagged, the HTML holds no live markup from a hostile
cell or student id, and writing the report changes no file outside its own folder (the
gradebook included), so it changes no score.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

import nbformat
import pytest
from harness import make_course
from similarity_class import (
    CELL,
    COPIED_REFERENCE,
    HONEST_A,
    HOSTILE_ID,
    LESSON,
    REFERENCE,
    SHARED,
    SHARED_EDITED,
    submit_class,
)

from nfcourse.grade import Course, GradeError
from nfcourse.grade.cli import main as grade_main
from nfcourse.grade.similarity import ADDED, compare_code, report_dir, similarity_report
from nfcourse.grade.similarity_html import highlight


def _tree(root: Path, skip: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.parents}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("similarity-course")
    course = make_course(root, [LESSON])
    answers = submit_class(course)
    # an autograded copy and a gradebook with something in it, to show neither changes
    (course.autograded_dir / "alice" / LESSON).mkdir(parents=True)
    (course.autograded_dir / "alice" / LESSON / f"{LESSON}.ipynb").write_bytes(
        (course.submitted_dir / "alice" / LESSON / f"{LESSON}.ipynb").read_bytes())
    assert course.db_path.is_file(), "make_course should have written the gradebook"
    before = _tree(root, report_dir(course, LESSON))
    report = similarity_report(course, LESSON)
    return {"course": course, "report": report, "answers": answers, "before": before}


def _match(report, student, other, cell=CELL):
    found = [m for m in report.matches if m.cell == cell and {m.student, m.other} == {
        student, other}]
    assert len(found) == 1, f"{len(found)} matches for {student} ~ {other} in {cell}"
    return found[0]


def test_copied_reference_is_flagged_against_the_reference(graded):
    # the copy really was disguised: no line of it is a line of the reference
    import inspect

    from nfcourse.flows.coupling import MaskedAffineCoupling

    reference = {line.strip() for line in inspect.getsource(MaskedAffineCoupling).splitlines()}
    body = [line.strip() for line in COPIED_REFERENCE.splitlines()[3:] if line.strip()]
    assert sum(line in reference for line in body) <= 2
    match = _match(graded["report"], "carol", REFERENCE)
    assert match.kind == "reference" and match.flagged, match
    # the copy is adapted too (the stub's signature, the context branch dropped, its own
    # error messages), so not all of it is the reference's: about three quarters is
    assert match.similarity >= 0.7 and match.spans and match.other_spans
    assert match in graded["report"].flagged[:10]


def test_a_copy_in_an_added_cell_is_flagged(graded):
    match = _match(graded["report"], "frank", REFERENCE, cell=ADDED)
    assert match.flagged and match.similarity >= 0.7, match
    # his one-line answer cell is too short to judge, and is not flagged
    assert not [m for m in graded["report"].flagged if m.student == "frank" and m.cell == CELL]


def test_students_sharing_code_are_flagged_against_each_other(graded):
    match = _match(graded["report"], "dave", "erin")
    assert match.kind == "student" and match.flagged and match.score >= 0.9, match
    # and mallory's copy of dave's code, hostile comments and all
    assert _match(graded["report"], "dave", HOSTILE_ID).flagged


def test_honest_distinct_answers_are_not_flagged(graded):
    report = graded["report"]
    for student in ("alice", "bob"):
        flagged = [m for m in report.flagged if student in (m.student, m.other)]
        assert not flagged, f"{student}'s own answer is flagged: {flagged}"
    # compared all the same: against the solution, the reference and every classmate
    pairs = [m for m in report.matches if m.cell == CELL and "alice" in (m.student, m.other)]
    references = [m for m in pairs if m.kind == "reference"]
    assert REFERENCE in {m.other for m in references}
    assert len(pairs) == 1 + len(references) + (len(report.students) - 1)
    assert max(m.score for m in pairs) < 0.5


def test_the_solution_handed_in_is_flagged_against_the_solution(graded):
    assert _match(graded["report"], "solution", "solution").similarity == 1.0


def test_stub_cells_are_never_flagged(graded):
    # every student but "solution" left warmup/realnvp/density/train as released
    stubbed = [m for m in graded["report"].matches
               if m.cell not in (CELL, ADDED) and "solution" not in (m.student, m.other)]
    assert stubbed and not [m for m in stubbed if m.flagged or m.similarity > 0]


def test_html_holds_no_live_markup_from_hostile_code(graded):
    html = graded["report"].paths["html"].read_text()
    assert not re.search(r"<\s*script", html, re.IGNORECASE)
    assert not re.search(r"<img|onerror=alert\(1\)>", html, re.IGNORECASE)
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in html
    assert "&lt;SCRIPT&gt;" in html
    assert "mallory&lt;script&gt;alert(2)&lt;img" in html  # the student id too
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    # the flagged pairs come first, and their code is shown with the matches marked
    assert html.index("To review") < html.index("Below the threshold")
    assert "<mark>" in html


def test_report_changes_no_score_and_no_file(graded):
    course = graded["course"]
    assert _tree(course.root, report_dir(course, LESSON)) == graded["before"]
    written = sorted(p.name for p in report_dir(course, LESSON).iterdir())
    assert written == ["similarity.csv", "similarity.html", "similarity.json"]
    data = json.loads(graded["report"].paths["json"].read_text())
    assert data["scored"] is False


def test_json_and_csv_list_every_pair(graded):
    report = graded["report"]
    data = json.loads(report.paths["json"].read_text())
    assert len(data["pairs"]) == len(report.matches)
    top = data["pairs"][0]
    assert top["flagged"] and set(top) >= {"cell", "student", "kind", "other", "similarity",
                                           "other_similarity", "spans", "other_spans"}
    rows = list(csv.DictReader(io.StringIO(report.paths["csv"].read_text())))
    assert len(rows) == len(report.matches)
    assert sum(int(r["flagged"]) for r in rows) == len(report.flagged)


def test_disguises_do_not_hide_a_copy():
    original = ("def scale_shift(self, h):\n    out = self.net(h)\n"
                "    s, t = out.chunk(2, dim=1)\n    s = torch.tanh(s / self.b) * self.b\n"
                "    return s * (1 - self.mask), t * (1 - self.mask)\n")
    disguised = ("def st(me, inp):  # written by me\n    o = me.network(inp)\n"
                 "    a, b = o.chunk(2,\n                   dim=1)\n"
                 "    a = torch.tanh(a / me.lim) * me.lim  # bounded\n"
                 "    return a * (1 - me.m), \\\n           b * (1 - me.m)\n")
    assert compare_code(disguised, original)[0] == 1.0
    assert compare_code(HONEST_A, SHARED)[0] < 0.5
    assert compare_code(SHARED_EDITED, SHARED)[0] > 0.9


def test_highlight_escapes_everything():
    text = "<b>x</b> & '\""
    assert highlight(text, ()) == "&lt;b&gt;x&lt;/b&gt; &amp; &#x27;&quot;"
    assert highlight(text, ((0, 3), (2, 5))) == "<mark>&lt;b&gt;</mark><mark>x&lt;</mark>" \
        "/b&gt; &amp; &#x27;&quot;"


def test_cli_prints_top_pairs_and_the_report(graded, capsys):
    course = graded["course"]
    rc = grade_main(["--course-root", str(course.root), "similarity", LESSON,
                     "--threshold", "0.7", "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "pairs to review (threshold 70%; never scored)" in out
    assert f"html: {report_dir(course, LESSON) / 'similarity.html'}" in out
    assert len([line for line in out.splitlines() if " ~ " in line]) == 3
    assert "\x1b" not in out


def test_bad_threshold_and_lesson_are_clear_errors(graded, capsys):
    course = graded["course"]
    rc = grade_main(["--course-root", str(course.root), "similarity", LESSON,
                     "--threshold", "1.5"])
    assert rc == 1 and "threshold must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(GradeError, match="no lesson"):
        similarity_report(course, "99_nothing")


def test_unreadable_or_stripped_notebooks_are_noted(tmp_path):
    course = make_course(tmp_path / "c", [LESSON])
    broken = course.submitted_dir / "broken" / LESSON
    broken.mkdir(parents=True)
    (broken / f"{LESSON}.ipynb").write_text("{ not json")
    stripped = nbformat.read(course.release_dir / LESSON / f"{LESSON}.ipynb", as_version=4)
    for cell in stripped.cells:
        cell.metadata.pop("nbgrader", None)
    (course.submitted_dir / "stripped" / LESSON).mkdir(parents=True)
    nbformat.write(stripped, course.submitted_dir / "stripped" / LESSON / f"{LESSON}.ipynb")
    report = similarity_report(Course(course.root), LESSON)
    assert any(n.startswith("broken: notebook not readable") for n in report.notes)
    assert f"stripped: no answer cell {CELL}" in report.notes
    assert "not readable" in report.paths["html"].read_text()
