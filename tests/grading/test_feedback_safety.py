"""The feedback and display preprocessors on hand-made notebooks (no kernel, no grading).

``HideHiddenTests`` cuts the hidden tests out of the feedback and reduces test tracebacks
to the error; ``SanitizeOutputs`` and ``clean_html`` leave nothing a browser would run.
The class test ``test_hostile_caps.py`` checks the same on real graded notebooks.
"""

from __future__ import annotations

import nbformat
import pytest

from nfcourse.grade.preprocessors import HideHiddenTests, SanitizeOutputs, clean_html


def _test_cell(source: str, outputs=()):
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["nbgrader"] = {"grade": True, "grade_id": "t", "locked": True,
                                 "points": 1, "schema_version": 3, "solution": False}
    cell.outputs = list(outputs)
    return cell


def _run(preprocessor, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb, _ = preprocessor.preprocess(nb, {})
    return nb


def test_hidden_tests_and_their_tracebacks_are_removed():
    error = nbformat.v4.new_output("error", ename="AssertionError", evalue="log_det is off",
                                   traceback=["Cell In[3], line 4",
                                              "----> 4 assert secret_check(x)"])
    cell = _test_cell("assert visible()\n### BEGIN HIDDEN TESTS\nassert secret_check(x)\n"
                      "### END HIDDEN TESTS\n", [error])
    student = nbformat.v4.new_code_cell("x = 1  # ### BEGIN HIDDEN TESTS, never closed\ny = 2")
    nb = _run(HideHiddenTests(), [cell, student])
    assert "secret_check" not in nb.cells[0].source and "visible" in nb.cells[0].source
    trace = "\n".join(nb.cells[0].outputs[0]["traceback"])
    assert "secret_check" not in trace and "AssertionError: log_det is off" in trace
    assert nb.cells[1].source == ""  # cut from the marker on, instead of failing


@pytest.mark.parametrize("payload", [
    '<script>alert("nfcxss")</script>', '<img src=x onerror="nfcxss()">',
    '<a href="javascript:nfcxss()">x</a>', '<svg onload="nfcxss()"></svg>',
    '<iframe src="javascript:nfcxss()"></iframe>', '<a href="data:text/html,nfcxss">x</a>',
])
def test_clean_html_removes_what_runs(payload):
    cleaned = clean_html("<p>kept</p>" + payload)
    assert "<p>kept</p>" in cleaned
    for bad in ("<script", "onerror", "onload", "javascript:", "<svg", "<iframe", "data:"):
        assert bad not in cleaned.lower(), cleaned


def test_clean_html_keeps_tables_and_headings():
    table = "<h2>Results</h2><table><thead><tr><th>bpd</th></tr></thead>" \
            "<tbody><tr><td>1.05</td></tr></tbody></table>"
    assert clean_html(table) == table


def test_sanitize_outputs_drops_scripts_svg_and_widgets():
    outputs = [nbformat.v4.new_output("display_data", data={
        "text/html": "<b>ok</b><script>x()</script>", "text/plain": "ok"}),
        nbformat.v4.new_output("display_data", data={"application/javascript": "x()"}),
        nbformat.v4.new_output("display_data", data={"image/svg+xml": "<svg onload=x()/>",
                                                     "image/png": "iVBOR"})]
    md = nbformat.v4.new_markdown_cell("Hi <img src=x onerror=x()>")
    code = nbformat.v4.new_code_cell("x")
    code.outputs = outputs
    nb = nbformat.v4.new_notebook()
    nb.cells = [md, code]
    nb.metadata["widgets"] = {"state": {"html": "<img src=x onerror=x()>"}}
    nb, _ = SanitizeOutputs().preprocess(nb, {})
    assert "widgets" not in nb.metadata
    assert "onerror" not in nb.cells[0].source and "Hi" in nb.cells[0].source
    first, second, third = (o["data"] for o in nb.cells[1].outputs)
    assert first == {"text/html": "<b>ok</b>x()", "text/plain": "ok"}
    assert "application/javascript" not in second and "removed by the grader" in \
        second["text/plain"]
    assert third == {"image/png": "iVBOR"}
