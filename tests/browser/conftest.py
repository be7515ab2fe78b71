"""Fixtures of the browser tests: a JupyterLab server over a copy of the course, Chromium through
Playwright, and a fresh page per test (see ``browserkit.py``).

Without Chromium or Playwright the tests skip with the reason, except under ``CI=true``, where
they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# `import browserkit` in this folder's test modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import browserkit as bk  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "browser: drives JupyterLab in Chromium (Playwright); needs chromium installed"
    )
    # Registered by pytest-xdist when it is loaded; here too for runs with -p no:xdist.
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one xdist worker")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    # Remember each phase's report, so the page fixture can screenshot a failed test.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bk.LabServer]:
    """One ``jupyter lab`` per xdist worker, over a temporary copy of solutions/ and lessons/."""
    bk.require_browser()
    tmp = tmp_path_factory.mktemp("lab")
    server = bk.LabServer(bk.course_copy(tmp / "course"), tmp / "server").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless (one per test module: Playwright's sync API keeps its own
    event loop, and a short-lived one never meets another test's asyncio loop)."""
    bk.require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = bk.launch_browser(playwright)
        yield chromium
        chromium.close()


@dataclass
class Tab:
    """A fresh browser page for one test, with where its screenshots go."""

    page: Any
    shots: Path
    blocked: list[str] = field(default_factory=list)  # requests to anything but 127.0.0.1

    def shot(self, name: str, target: Any = None) -> Path:
        """Save a screenshot of ``target`` (a locator) or of the window as ``<name>.png``."""
        path = self.shots / f"{name}.png"
        (target or self.page).screenshot(path=str(path))
        return path


@pytest.fixture
def tab(request: pytest.FixtureRequest, browser: Any) -> Iterator[Tab]:
    blocked: list[str] = []
    page = bk.new_page(browser, blocked)
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "_")
    shots = bk.artifacts_dir(name)
    for old in [*shots.glob("*.png"), *shots.glob("*.log")]:  # an earlier run's would mislead
        old.unlink()
    t = Tab(page=page, shots=shots, blocked=blocked)
    yield t
    rep = getattr(request.node, "rep_call", None)
    failed = rep is not None and rep.failed
    if failed:
        try:
            t.shot("FAILED")
        except Exception:  # the page may be gone; the failure itself is what matters
            pass
    page.context.close()
    for server_fixture in ("lab_server", "lab_without_widgets"):
        if server_fixture in request.fixturenames:
            server = request.getfixturevalue(server_fixture)
            if failed:  # the server's side of the story (kernel deaths, 500s)
                (shots / f"{server_fixture}.log").write_text(server.log_tail(50_000))
            try:
                server.shutdown_kernels(wait=False)  # the next notebook gets both cores
            except OSError:
                pass
