"""Driving the course in a real browser: a JupyterLab server, Chromium, and DOM checks.

The tests in this folder start ``jupyter lab`` on 127.0.0.1 (with a token, on a free port) over a
temporary copy of ``solutions/`` and ``lessons/``, open notebooks in Debian's Chromium through
Playwright, and check what a student sees: every cell ran, no traceback, the ipywidgets slider
redraws its figure, the GIF decodes, the self-checks print their verdicts.

Each ``check_*`` function raises ``AssertionError`` with a message in words (and returns what it
found), so the tests read as a list of checks and a broken lesson says what is wrong.

Example:
    >>> server = LabServer(course_copy(tmp / "course"), tmp / "lab").start()   # doctest: +SKIP
    >>> page = new_page(browser)                                               # doctest: +SKIP
    >>> open_notebook(page, server, "solutions/01_two_moons_realnvp/01_two_moons_realnvp.ipynb")
    >>> run_all_cells(page); check_all_ran(page, 27); check_sliders(page, 1)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("NFCOURSE_CHROMIUM", "/usr/bin/chromium")
# Headless, no sandbox (CI runs as root), and nothing that talks to the outside world.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
]
LESSONS = (
    "01_two_moons_realnvp",
    "02_dequantization",
    "03_coupling_layers",
    "04_multiscale",
    "05_glow",
    "06_ffjord_gifs",
)
WIDGET_MANAGER = "@jupyter-widgets/jupyterlab-manager"
# JupyterLab plugins that would reach the internet (news feed, PyPI extension manager).
OFFLINE_DISABLED = {
    "@jupyterlab/apputils-extension:announcements": True,
    "@jupyterlab/extensionmanager-extension": True,
}


# ------------------------------------------------------------------------------ requirements


def missing_requirement() -> str | None:
    """Why the browser tests cannot run here (``None`` when they can)."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return (
            f"Chromium not found at {CHROMIUM} (apt-get install chromium chromium-driver, "
            "or set NFCOURSE_CHROMIUM)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python Playwright is not installed (pip install playwright; no browser download)"
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return "JupyterLab is not installed (pip install -e '.[course]')"
    return None


def require_browser() -> None:
    """Skip the calling test when :func:`missing_requirement` finds a reason; under ``CI=true``
    fail instead, so that CI never passes by skipping the browser tests."""
    reason = missing_requirement()
    if reason is None:
        return
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def artifacts_dir(*parts: str) -> Path:
    """Where screenshots go: ``$NFCOURSE_ARTIFACTS`` or ``<repo>/build/browser-artifacts``."""
    root = Path(os.environ.get("NFCOURSE_ARTIFACTS") or REPO / "build" / "browser-artifacts")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------ notebooks


@dataclass
class NotebookFacts:
    """What the notebook file says the browser must show (code cells counted from 0)."""

    code_cells: int
    self_checks: list[int] = field(default_factory=list)  # code cells calling checks.check_*
    stubs: list[int] = field(default_factory=list)  # nbgrader answer cells (solution: true)
    locked: list[int] = field(default_factory=list)  # nbgrader test cells (locked)
    exercise_headings: int = 0  # markdown headings "Exercise ... (N points)"


_EXERCISE_HEADING = re.compile(r"^#+ .*Exercise.*\(\d+ points?\)", re.M)


def notebook_facts(path: Path) -> NotebookFacts:
    """Read the cells of ``path`` once, so the DOM checks know what to expect."""
    nb = json.loads(Path(path).read_text())
    facts = NotebookFacts(code_cells=0)
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            facts.exercise_headings += len(_EXERCISE_HEADING.findall(src))
            continue
        if cell["cell_type"] != "code":
            continue
        k = facts.code_cells
        facts.code_cells += 1
        grader = cell.get("metadata", {}).get("nbgrader", {})
        if grader.get("solution"):
            facts.stubs.append(k)
        if grader.get("locked") and grader.get("grade"):
            facts.locked.append(k)
        if re.search(r"^\s*checks\.check_\w+\(", src, re.M):
            facts.self_checks.append(k)
    return facts


def course_copy(dest: Path, lessons: tuple[str, ...] = LESSONS) -> Path:
    """Copy ``solutions/NN`` and ``lessons/NN`` into ``dest`` (the lab's root and course root).

    The notebooks write GIFs and artifacts beside themselves; the copy keeps the repository
    untouched. ``dest/grading`` is where the formgrader keeps its gradebook.
    """
    for side in ("solutions", "lessons"):
        for name in lessons:
            shutil.copytree(REPO / side / name, dest / side / name)
    (dest / "grading").mkdir(parents=True, exist_ok=True)
    return dest


def write_notebook(path: Path, sources: list[str]) -> Path:
    """A minimal notebook of code cells (for probes that need no lesson)."""
    cells = [
        {"cell_type": "code", "execution_count": None, "id": f"probe-{i}", "metadata": {},
         "outputs": [], "source": src}
        for i, src in enumerate(sources)
    ]
    nb = {
        "cells": cells,
        "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                    "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1))
    return path


# ------------------------------------------------------------------------------ the server

# Straight to 127.0.0.1, whatever http_proxy says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LabServer:
    """``jupyter lab`` on 127.0.0.1 with a token, over ``root``, with its own config dirs.

    The kernel inherits fast mode and one BLAS thread; ``MPLBACKEND`` is dropped so figures go
    through the inline backend as they do for a student. ``grading/`` of the repository is on
    ``JUPYTER_CONFIG_PATH`` (as in ``make lab``) and ``NFCOURSE_COURSE_ROOT`` points the course
    at ``root``. ``disabled`` adds labextensions to switch off through ``page_config.json``.
    """

    def __init__(self, root: Path, workdir: Path, disabled: tuple[str, ...] = ()):
        self.root = Path(root)
        self.workdir = Path(workdir)
        self.disabled = disabled
        self.token = secrets.token_hex(16)
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "lab.log"

    # -- lifecycle
    def _env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if k not in ("MPLBACKEND", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH")
            and not k.startswith("PYTEST_")
        }
        w = self.workdir
        env.update(
            # nbgrader's gradebook runs `alembic` from PATH: the venv's scripts come first, as
            # in an activated environment (without them the formgrader's assignment list fails).
            PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
            NFCOURSE_FAST="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            NFCOURSE_COURSE_ROOT=str(self.root),
            JUPYTER_CONFIG_DIR=str(w / "config"),
            JUPYTER_CONFIG_PATH=str(REPO / "grading"),
            JUPYTER_DATA_DIR=str(w / "data"),
            JUPYTER_RUNTIME_DIR=str(w / "runtime"),
            IPYTHONDIR=str(w / "ipython"),
            PYDEVD_DISABLE_FILE_VALIDATION="1",
        )
        return env

    def _write_config(self) -> None:
        w = self.workdir
        disabled = dict(OFFLINE_DISABLED)
        disabled.update({name: True for name in self.disabled})
        labconfig = w / "config" / "labconfig"
        labconfig.mkdir(parents=True, exist_ok=True)
        (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": disabled}))
        # Every cell stays in the DOM (no virtual scrolling), so the checks see all outputs.
        settings = w / "settings"
        tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
        tracker.parent.mkdir(parents=True, exist_ok=True)
        tracker.write_text(json.dumps({"windowingMode": "none"}))
        notify = settings / "@jupyterlab" / "apputils-extension"
        notify = notify / "notification.jupyterlab-settings"
        notify.parent.mkdir(parents=True, exist_ok=True)
        notify.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        for d in ("data", "runtime", "ipython", "workspaces"):
            (w / d).mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 90.0) -> LabServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        w = self.workdir
        cmd = [
            sys.executable, "-m", "jupyterlab",
            "--no-browser", "--allow-root",
            "--ip=127.0.0.1", "--port=0", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            f"--LabApp.user_settings_dir={w / 'settings'}",
            f"--LabApp.workspaces_dir={w / 'workspaces'}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            "--LabApp.expose_app_in_browser=True",
        ]
        with open(self.log_path, "wb") as log:  # the server keeps its own copy of the fd
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        info = w / "runtime" / f"jpserver-{self.proc.pid}.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"jupyter lab exited ({code}):\n{self.log_tail()}")
            if info.exists():
                try:
                    self.port = int(json.loads(info.read_text())["port"])
                    self.api("GET", "/api/status")
                    return self
                except (ValueError, KeyError, OSError):
                    pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"jupyter lab did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.api("POST", "/api/shutdown")  # shuts its kernels down too
            self.proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this server leads
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    # -- talking to it
    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, timeout: float = 10.0) -> Any:
        req = urllib.request.Request(
            self.base + path, method=method, headers={"Authorization": f"token {self.token}"},
            data=b"" if method in ("POST", "PUT") else None,
        )
        with _DIRECT.open(req, timeout=timeout) as resp:  # 127.0.0.1 only
            body = resp.read()
        return json.loads(body) if body.strip() else None

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base}/{path.lstrip('/')}{sep}token={self.token}"

    def shutdown_kernels(self, wait: bool = True) -> None:
        """Stop every kernel (between tests: one notebook's training never slows the next).

        A kernel takes seconds to exit; with ``wait=False`` the requests go out from a thread
        while the next test loads its page.
        """
        ids = [session["id"] for session in self.api("GET", "/api/sessions") or []]

        def delete() -> None:
            for sid in ids:
                try:
                    self.api("DELETE", f"/api/sessions/{sid}", timeout=60.0)
                except OSError:  # already gone, or the server is stopping
                    pass

        if wait:
            delete()
        else:
            threading.Thread(target=delete, daemon=True).start()


# ------------------------------------------------------------------------------ the browser


def launch_browser(playwright: Any) -> Any:
    """Debian's Chromium, headless, with a fresh profile (Playwright's launch makes one)."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000
    )


def new_page(browser: Any, blocked: list[str]) -> Any:
    """A page in a fresh context; any request not to 127.0.0.1 is aborted and listed."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})

    def gate(route: Any) -> None:
        url = route.request.url
        local = re.match(r"^(https?|wss?)://127\.0\.0\.1[:/]", url)
        if local or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", gate)
    page = context.new_page()
    page.set_default_timeout(30_000)
    return page


def open_notebook(
    page: Any, server: LabServer, relpath: str, timeout: float = 90.0, kernel: bool = True
) -> None:
    """Open ``relpath`` in a fresh JupyterLab workspace; with ``kernel``, wait until its kernel
    is idle (to look at a notebook without running it, ``kernel=False`` saves that wait)."""
    workspace = f"t{uuid.uuid4().hex[:8]}"
    page.goto(server.url(f"lab/workspaces/{workspace}/tree/{relpath}?reset"))
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=timeout * 1000)
    if not kernel:
        return
    page.wait_for_function(
        """() => {
            const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
            const s = w && w.sessionContext;
            return !!(s && s.isReady && s.session && s.session.kernel
                      && s.session.kernel.status === 'idle');
        }""",
        timeout=timeout * 1000,
    )


_PROMPTS_JS = """() => [...document.querySelectorAll(
    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')].map(
    c => (c.querySelector('.jp-InputArea-prompt') || {textContent: ''}).textContent.trim())"""


def prompts(page: Any) -> list[str]:
    """The input prompts of the code cells, in order (``[3]:``, ``[*]:``, ``[ ]:``)."""
    return page.evaluate(_PROMPTS_JS)


def run_all_cells(page: Any, timeout: float = 240.0) -> float:
    """Run > Run All Cells through the menu, as a student would; seconds until it is done.

    Done means: no cell is queued or running (``[*]``) and the kernel is idle, twice in a row.
    """
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    start = time.monotonic()
    page.wait_for_function(
        f"""() => {{
            const p = ({_PROMPTS_JS})();
            const w = window.jupyterapp.shell.currentWidget;
            const k = w.sessionContext.session && w.sessionContext.session.kernel;
            const done = p.length > 0 && !p.some(x => x.includes('*'))
                         && p.some(x => /\\d/.test(x)) && k && k.status === 'idle';
            if (!done) {{ window.__nfDoneSince = null; return false; }}
            window.__nfDoneSince = window.__nfDoneSince || Date.now();
            return Date.now() - window.__nfDoneSince > 1000;
        }}""",
        timeout=timeout * 1000,
        polling=250,
    )
    return time.monotonic() - start


# ------------------------------------------------------------------------------ DOM checks

CELLS = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell"


def code_cell(page: Any, k: int) -> Any:
    return page.locator(CELLS).nth(k)


def output_texts(page: Any) -> list[str]:
    """The rendered text of each code cell's output area, in order."""
    return page.evaluate(
        """(sel) => [...document.querySelectorAll(sel)].map(c => {
            const o = c.querySelector('.jp-OutputArea'); return o ? o.innerText : ''; })""",
        CELLS,
    )


# IPython's tracebacks, and the last line of a plain one ("ValueError: ...").
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\w+(Error|Exception): ", re.M)


def find_errors(page: Any) -> list[tuple[int, str]]:
    """``(code cell, text)`` for every output that shows a Python error (traceback)."""
    found = page.evaluate(
        """(sel) => [...document.querySelectorAll(sel)].flatMap((c, k) =>
            [...c.querySelectorAll('.jp-OutputArea-output')]
              .filter(o => (o.getAttribute('data-mime-type') || '').includes('stderr')
                           || o.querySelector('[data-mime-type*="stderr"]'))
              .map(o => [k, o.innerText]))""",
        CELLS,
    )
    return [(k, text) for k, text in found if _TRACEBACK.search(text)]


def check_all_ran(page: Any, expected_cells: int) -> list[str]:
    """Every code cell shows an execution count and no output shows a traceback."""
    ps = prompts(page)
    assert len(ps) == expected_cells, (
        f"{len(ps)} code cells in the page, the file has {expected_cells}"
    )
    errors = find_errors(page)
    assert not errors, "error output in the browser:\n" + "\n".join(
        f"code cell {k}: {text[-1500:]}" for k, text in errors
    )
    not_run = [k for k, p in enumerate(ps) if not re.search(r"\[\d+\]", p)]
    assert not not_run, f"code cells {not_run} did not run (prompts {[ps[k] for k in not_run]})"
    return ps


def check_self_checks(page: Any, cells: list[int], passed: bool = True) -> list[str]:
    """Each self-check cell shows a report; with ``passed``, every line it marks is a ✓."""
    assert cells, "the notebook has no self-check cell"
    texts = output_texts(page)
    reports = []
    for k in cells:
        text = texts[k].strip()
        assert text, f"self-check in code cell {k} rendered no report"
        if passed:
            assert "✓" in text and "✗" not in text, f"self-check in code cell {k} reports:\n{text}"
        reports.append(text)
    return reports


@dataclass
class SliderResult:
    before: str  # src of the figure before moving the slider
    after: str
    readouts: tuple[str, str]
    locator: Any = None


def check_sliders(page: Any, expected: int, timeout: float = 30.0) -> list[SliderResult]:
    """``expected`` ipywidgets sliders render, each with a figure, and moving one (the arrow key
    on its handle) changes its readout and redraws the figure below it."""
    sliders = page.locator(f"{CELLS} .jupyter-widgets.widget-slider")
    n = sliders.count()
    if n != expected:
        # Say what shows instead: without the widget manager, the widget's text repr.
        shown = [t for t in output_texts(page) if "IntSlider" in t or "Loading widget" in t]
        raise AssertionError(
            f"expected {expected} ipywidgets slider(s), the page renders {n}"
            + (f"; instead it shows: {shown[0][:300]!r}" if shown else "")
        )
    results = []
    for i in range(n):
        slider = sliders.nth(i)
        box = slider.locator("xpath=ancestor::div[contains(@class,'widget-vbox')][1]")
        figure = box.locator(".widget-output img")
        assert figure.count() >= 1, f"slider {i}: no figure drawn under it"
        before = figure.first.get_attribute("src")
        readout = slider.locator(".widget-readout")
        r0 = readout.inner_text().strip()
        slider.locator(".noUi-handle").first.focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function(
            """([el, old]) => { const img = el.querySelector('.widget-output img');
                return !!img && img.getAttribute('src') !== old && img.complete
                       && img.naturalWidth > 0; }""",
            arg=[box.element_handle(), before],
            timeout=timeout * 1000,
        )
        r1 = readout.inner_text().strip()
        assert r1 != r0, f"slider {i}: readout stayed at {r0!r} after the arrow key"
        results.append(SliderResult(before, figure.first.get_attribute("src"), (r0, r1), box))
    return results


def check_gifs(page: Any, expected: int, timeout: float = 15.0) -> list[dict]:
    """``expected`` GIF images render and decode (``naturalWidth > 0``)."""
    sel = f"{CELLS} .jp-OutputArea-output img[src^='data:image/gif']"
    if expected:
        page.wait_for_function(
            """([sel, n]) => { const imgs = [...document.querySelectorAll(sel)];
                return imgs.length >= n && imgs.every(i => i.complete); }""",
            arg=[sel, expected],
            timeout=timeout * 1000,
        )
    found = page.evaluate(
        """(sel) => [...document.querySelectorAll(sel)].map(
            i => ({w: i.naturalWidth, h: i.naturalHeight, complete: i.complete}))""",
        sel,
    )
    assert len(found) == expected, f"expected {expected} GIF(s), the page shows {len(found)}"
    for i, g in enumerate(found):
        assert g["complete"] and g["w"] > 0 and g["h"] > 0, f"GIF {i} did not load: {g}"
    return found


def _settle(page: Any, predicate_js: str, arg: Any, timeout: float = 20.0) -> None:
    """Wait until ``predicate_js(arg)`` holds in the page, or give up quietly: the assertion
    that follows then says what is missing."""
    try:
        page.wait_for_function(predicate_js, arg=arg, timeout=timeout * 1000)
    except Exception as exc:  # Playwright's TimeoutError; the assertion below reports
        if "Timeout" not in type(exc).__name__:
            raise


def check_stubs(page: Any, facts: NotebookFacts) -> None:
    """A released lesson shows every exercise heading, every answer cell as a stub, and the
    locked test cells read-only."""
    assert facts.stubs, "the lesson has no answer cell"
    markdown = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-MarkdownCell .jp-RenderedMarkdown"
    # Markdown and editors fill in just after the cells appear: wait for what the file has.
    _settle(
        page,
        """([md, cells, nh, ns]) =>
            [...document.querySelectorAll(md)]
              .filter(e => /Exercise.*\\(\\d+ points?\\)/.test(e.textContent)).length >= nh
            && [...document.querySelectorAll(cells + ' .cm-content')]
              .filter(e => e.textContent.includes('YOUR CODE HERE')).length >= ns""",
        [markdown, CELLS, facts.exercise_headings, len(facts.stubs)],
    )
    headings = page.locator(markdown).filter(has_text=re.compile(r"Exercise.*\(\d+ points?\)"))
    assert headings.count() >= facts.exercise_headings > 0, (
        f"{headings.count()} exercise headings rendered, the file has {facts.exercise_headings}"
    )
    for k in facts.stubs:
        content = code_cell(page, k).locator(".cm-content")
        text = content.inner_text()
        assert "YOUR CODE HERE" in text and "raise NotImplementedError()" in text, (
            f"answer cell {k} does not show the stub:\n{text[:400]}"
        )
        assert content.get_attribute("aria-readonly") != "true", f"answer cell {k} is read-only"
    for k in facts.locked:
        readonly = code_cell(page, k).locator(".cm-content").get_attribute("aria-readonly")
        assert readonly == "true", f"locked test cell {k} is editable in the browser"
