"""Every lesson as a student sees it: JupyterLab in Chromium, run from the menu, checked in the DOM.

Solutions run top to bottom (fast mode) and must show no traceback, a report under every
self-check with only ✓, the ipywidgets slider redrawing its figure, and the GIF decoded. Released
lessons must show their exercise headings, the stubs and read-only test cells; run as they are,
they stop at the first stub with NotImplementedError, which the error check must see.
Screenshots go to ``$NFCOURSE_ARTIFACTS`` (default ``build/browser-artifacts/``).
"""

from __future__ import annotations

import browserkit as bk
import pytest

# What each solution shows beyond self-checks: (ipywidgets sliders, GIFs) once it has run.
EXPECTED = {
    "01_two_moons_realnvp": (1, 1),
    "02_dequantization": (0, 0),
    "03_coupling_layers": (0, 0),
    "04_multiscale": (0, 0),
    "05_glow": (0, 0),
    "06_ffjord_gifs": (1, 1),
}
# Two xdist groups of about equal time (fast mode, 2 cores): 06 + 03 + 05 and the untouched
# lesson against 04 + 02 + 01, the formgrader and the widget tests (test_widgets_missing.py).
GROUP = {
    "01_two_moons_realnvp": "browser-b",
    "02_dequantization": "browser-b",
    "03_coupling_layers": "browser-a",
    "04_multiscale": "browser-b",
    "05_glow": "browser-a",
    "06_ffjord_gifs": "browser-a",
}
assert set(EXPECTED) == set(GROUP) == set(bk.LESSONS)

pytestmark = pytest.mark.browser


def _lessons():
    return [pytest.param(n, marks=pytest.mark.xdist_group(GROUP[n]), id=n[:2]) for n in bk.LESSONS]


@pytest.mark.parametrize("lesson", _lessons())
def test_solution_runs_in_jupyterlab(lesson: str, lab_server: bk.LabServer, tab) -> None:
    rel = f"solutions/{lesson}/{lesson}.ipynb"
    facts = bk.notebook_facts(lab_server.root / rel)
    page = tab.page
    bk.open_notebook(page, lab_server, rel)
    bk.run_all_cells(page)

    bk.check_all_ran(page, facts.code_cells)
    reports = bk.check_self_checks(page, facts.self_checks)
    assert len(reports) >= 4, f"only {len(reports)} self-check reports"
    longest = max(range(len(reports)), key=lambda i: len(reports[i]))
    tab.shot("self_check", bk.code_cell(page, facts.self_checks[longest]))

    n_sliders, n_gifs = EXPECTED[lesson]
    gifs = bk.check_gifs(page, n_gifs)
    if gifs:
        gif_cell = page.locator(f"{bk.CELLS}:has(img[src^='data:image/gif'])").first
        tab.shot("gif", gif_cell)
    if n_sliders:
        box = page.locator(f"{bk.CELLS} .widget-vbox:has(.widget-slider)").first
        tab.shot("slider_before", box)
    sliders = bk.check_sliders(page, n_sliders)
    for i, s in enumerate(sliders):
        assert s.before != s.after and s.readouts[0] != s.readouts[1]
        tab.shot(f"slider_after_{i}", s.locator)
    tab.shot("end")
    assert not tab.blocked, f"the page asked for outside resources: {tab.blocked[:5]}"


@pytest.mark.parametrize("lesson", _lessons())
def test_released_lesson_shows_exercises(lesson: str, lab_server: bk.LabServer, tab) -> None:
    rel = f"lessons/{lesson}/{lesson}.ipynb"
    facts = bk.notebook_facts(lab_server.root / rel)
    assert facts.stubs and facts.locked, f"{rel}: no answer or test cells in the file"
    bk.open_notebook(tab.page, lab_server, rel, kernel=False)
    bk.check_stubs(tab.page, facts)
    first = bk.code_cell(tab.page, facts.stubs[0])
    first.scroll_into_view_if_needed()
    tab.shot("first_exercise")
    assert not tab.blocked, f"the page asked for outside resources: {tab.blocked[:5]}"


@pytest.mark.xdist_group("browser-a")
def test_untouched_lesson_stops_at_first_stub(lab_server: bk.LabServer, tab) -> None:
    """The error check sees a real traceback: Run All on the released lesson 01 raises
    NotImplementedError in the first answer cell and runs nothing after it."""
    lesson = "01_two_moons_realnvp"
    rel = f"lessons/{lesson}/{lesson}.ipynb"
    facts = bk.notebook_facts(lab_server.root / rel)
    page = tab.page
    bk.open_notebook(page, lab_server, rel)
    bk.run_all_cells(page)
    with pytest.raises(AssertionError, match="NotImplementedError") as err:
        bk.check_all_ran(page, facts.code_cells)
    assert f"code cell {facts.stubs[0]}:" in str(err.value)
    errors = bk.find_errors(page)
    assert [k for k, _ in errors] == [facts.stubs[0]]
    ran = [k for k, p in enumerate(bk.prompts(page)) if any(ch.isdigit() for ch in p)]
    assert ran == list(range(facts.stubs[0] + 1)), f"cells that ran: {ran}"
    tab.shot("stopped_at_stub", bk.code_cell(page, facts.stubs[0]))


@pytest.mark.xdist_group("browser-b")
def test_formgrader_loads_the_course(lab_server: bk.LabServer, tab) -> None:
    """The instructor's view: nbgrader's formgrader finds the course (grading/ on
    JUPYTER_CONFIG_PATH, as ``make lab`` sets it) and lists every lesson in solutions/."""
    page = tab.page
    page.goto(lab_server.url("formgrader"))
    page.wait_for_selector("td.name", timeout=30_000)
    page.wait_for_function(
        "n => document.querySelectorAll('td.name').length >= n", arg=len(bk.LESSONS)
    )
    names = sorted(t.strip() for t in page.locator("td.name").all_inner_texts())
    assert names == sorted(bk.LESSONS), names
    assert page.locator("#warning-course-id").count() == 0, "formgrader: no course id"
    config = page.locator("#collapseConfig pre").text_content() or ""
    assert "nfcourse" in config and str(lab_server.root) in config, config[:800]
    tab.shot("formgrader")
    assert not tab.blocked, f"the page asked for outside resources: {tab.blocked[:5]}"
