"""Hostile lesson-01 submissions against the caps of issue 16 (part B).

:func:`caps_attacks` returns ``{name: Attack}`` (``hardening_attacks.Attack``): each is the solution
plus one attack, so each must keep the points its honest work earns. A class fixture grades
them beside an honest control (``test_hostile_caps.py``; ``test_hostile_hardening.py`` adds
them to its class when this file is there). :func:`caps_attacks` appends
:data:`CAPS_CONFIG` (a short check budget) to the course's config file; a fixture that wants
the canary checked puts :data:`CANARIES` in the grader's environment while it grades.

Example:
    >>> attacks = caps_attacks(course, port)          # doctest: +SKIP
    >>> sorted(attacks)                               # doctest: +SKIP
    ['check_sleeper', 'disk_fill', 'env_canary', 'html_script', 'iopub_flood']
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from hardening_attacks import Attack
from harness import student_notebook
from hostile import ALL, LESSON, add_cell_after

from nfcourse.grade import Course

#: secrets the grader's environment holds while grading; no graded notebook or feedback
#: file may contain them (the names the old prefix allow-list passed: JPY_, NFCOURSE_)
CANARIES = {"JPY_API_TOKEN": "canary-jpy-5d1e9a", "NFCOURSE_SECRET": "canary-nfc-77b3c2"}

#: a short check budget so the sleeper costs seconds, not the real 300 s
CAPS_CONFIG = """
c.GradingExecute.verify_budget = 25
"""

#: what the disk attack tries to write in each place (MB); the caps are 256 MB and 0
DISK_ATTEMPT_MB = 1024

#: a marker in every piece of script the HTML attack plants
XSS = "nfcxss"

ENV_DUMP = """
import os
print('ENVIRONMENT', dict(os.environ))
"""

HTML_ATTACK = f"""
from IPython.display import HTML, SVG, Javascript, Markdown, display
display(HTML('<b>bold</b><script>window.{XSS}=1</script>'
             '<img src="x" onerror="window.{XSS}=2"><a href="javascript:{XSS}()">link</a>'))
display(SVG('<svg xmlns="http://www.w3.org/2000/svg" onload="window.{XSS}=3">'
            '<script>window.{XSS}=4</script><circle r="3"/></svg>'))
display(Javascript('window.{XSS}=5'))
display(Markdown('<img src=x onerror="window.{XSS}=6">'))
"""

HTML_MARKDOWN_CELL = f'Notes <script>window.{XSS}=7</script><img src=x onerror="window.{XSS}=8">'

DISK_ATTACK = f"""
import json, os
import ipykernel.connect
def _fill(folder, mb):
    written = 0
    try:
        for i in range(mb // 32):
            with open(os.path.join(folder, f'fill-{{i}}.bin'), 'wb') as f:
                f.write(b'x' * (32 * 1024 * 1024))
            written += 32
    except OSError as error:
        return written, type(error).__name__
    return written, None
sockets = os.path.dirname(ipykernel.connect.get_connection_file())
print('DISK', json.dumps({{'work': _fill('.', {DISK_ATTEMPT_MB}),
                          'sockets': _fill(sockets, {DISK_ATTEMPT_MB})}}))
for name in os.listdir('.'):
    if name.startswith('fill-'):
        os.remove(name)   # room for the rest of the notebook; the cap was reached above
"""

#: iopub messages the flood sends, each carrying the same zero-copy frame of FLOOD_MB
FLOOD_MESSAGES = 12
FLOOD_MB = 128

IOPUB_FLOOD = f"""
k = get_ipython().kernel
big = memoryview(bytearray({FLOOD_MB} * 1024 * 1024))   # one buffer, sent zero-copy
for _ in range({FLOOD_MESSAGES}):
    k.session.send(k.iopub_socket, 'stream', {{'name': 'stdout', 'text': 'flood\\n'}},
                   parent=k.get_parent(), buffers=[big])
del big
"""

CHECK_SLEEPER = """
import signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
def _stall(info):
    # the grader's queries name its _nfv helpers; the notebook's own cells do not
    if '_nfv' in (info.raw_cell or ''):
        while True:
            time.sleep(1)
get_ipython().events.register('pre_run_cell', _stall)
"""


def caps_attacks(course: Course, port: int) -> dict[str, Attack]:
    """The attacks on the caps, each in the solution (``port``: unused, the same signature
    as ``hostile.hostile_submissions``). Appends :data:`CAPS_CONFIG` to the course's config
    file (grading processes load it from there)."""
    del port
    config = Path(course.root) / "grading" / "nbgrader_config.py"
    if CAPS_CONFIG not in config.read_text():
        with open(config, "a") as handle:
            handle.write(CAPS_CONFIG)
    good = student_notebook(course, LESSON)
    out = [
        Attack("env_canary", add_cell_after(good, "warmup_test", ENV_DUMP),
               what="prints the kernel's environment (the grader's secrets must not be there)"),
        Attack("html_script", _with_markdown(add_cell_after(good, "warmup_test", HTML_ATTACK)),
               what="script, onerror, javascript: and SVG in outputs and Markdown"),
        Attack("disk_fill", add_cell_after(good, "warmup_test", DISK_ATTACK),
               what=f"writes {DISK_ATTEMPT_MB} MB into its working and socket folders"),
        Attack("iopub_flood", add_cell_after(good, "warmup_test", IOPUB_FLOOD),
               what=f"{FLOOD_MESSAGES} signed iopub messages sharing one {FLOOD_MB} MB frame"),
        Attack("check_sleeper", add_cell_after(good, "train_test", CHECK_SLEEPER), loses=ALL,
               what="ignores SIGINT and sleeps when the independent check's first query comes"),
    ]
    return {h.name: h for h in out}


def _with_markdown(nb):
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(HTML_MARKDOWN_CELL))
    return nb
