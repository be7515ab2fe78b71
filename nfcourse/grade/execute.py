"""nbgrader's Execute step, made safe for hostile notebooks.

:class:`GradingExecute` replaces nbgrader's ``Execute`` in the autograde pipeline
(``grading/nbgrader_config.py``). Compared with it, it

* starts the kernel in a :class:`~nfcourse.grade.sandbox.Sandbox` (through
  :class:`~nfcourse.grade.kernel.SandboxedKernelManager`);
* survives a kernel that dies (``os._exit``, a segfault, the memory cap): the cell that
  killed it gets an error saying so, a fresh kernel re-runs the earlier cells (not the
  tests) and grading goes on with the next cell, so the rest of the notebook still counts;
* stops running cells once the notebook's time budget is spent (each left gets an error);
* keeps at most ``output_mb`` of printed output (errors are always kept: dropping a test's
  error would turn a failure into full marks);
* runs the lesson's independent check (:mod:`nfcourse.grade.verify`) in the grader's own
  process and adds an error to every test cell whose check fails, so nbgrader scores it
  zero and its feedback shows why.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from jupyter_core.utils import ensure_async, run_sync
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat import NotebookNode
from nbgrader.preprocessors import Execute
from nbgrader.utils import is_grade
from traitlets import Bool, Float, Integer
from zmq.utils.monitor import recv_monitor_message

from nfcourse.grade.kernel import SandboxedKernelManager
from nfcourse.grade.verify import Oracle, OracleError, Verdict, verifier_for
from nfcourse.grade.verify.base import submission_seed

__all__ = ["GradingExecute", "VERIFICATION_FILE"]

VERIFICATION_FILE = "nfcourse_verification.json"
MAX_RESTARTS = 6


def _error(ename: str, message: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=message,
                        traceback=[f"\x1b[0;31m{ename}\x1b[0m: {message}"])


class GradingExecute(Execute):
    """Execute for autograding: sandboxed kernel, crash recovery, budget, verification."""

    notebook_timeout = Integer(
        0, help="Seconds for the whole notebook (0: no limit beyond the per-cell timeout)."
    ).tag(config=True)
    output_mb = Float(2.0, help="Printed output kept per notebook, in MB.").tag(config=True)
    verify = Bool(True, help="Run the lesson's independent check after the notebook.").tag(
        config=True)
    verify_timeout = Integer(120, help="Seconds for one query of the independent check.").tag(
        config=True)
    verify_budget = Integer(
        300, help="Seconds for the whole independent check (0: no limit). Past it the kernel "
        "is killed and every exercise not yet decided fails.").tag(config=True)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("kernel_manager_class", SandboxedKernelManager)
        super().__init__(*args, **kwargs)

    def create_kernel_manager(self):
        """nbclient's, plus the lesson being graded (its edition is bound in the sandbox)."""
        km = super().create_kernel_manager()
        if hasattr(km, "lesson"):
            km.lesson = getattr(self, "_lesson", "")
        return km

    # -- output cap ---------------------------------------------------------------------
    def output(self, outs, msg, display_id, cell_index):
        size = len(json.dumps(msg.get("content", {}), default=str))
        self._output_bytes = getattr(self, "_output_bytes", 0) + size
        limit = self.output_mb * 1e6
        if self._output_bytes > limit and msg["msg_type"] != "error":
            if cell_index not in self._truncated:
                self._truncated.add(cell_index)
                outs.append(NotebookNode(
                    output_type="stream", name="stderr",
                    text=f"[output cut: the notebook printed more than {self.output_mb:g} MB]\n"))
            return None
        return super().output(outs, msg, display_id, cell_index)

    # -- the run ------------------------------------------------------------------------
    def preprocess(self, nb, resources=None, km=None):
        from nbclient import NotebookClient

        NotebookClient.__init__(self, nb, km)
        # Nothing in a graded kernel is worth a graceful goodbye: kill it at once (saves
        # about 0.4 s a submission; the sandbox takes the rest down with it).
        self.shutdown_kernel = "immediate"
        self.reset_execution_trackers()
        self._check_assign_resources(resources)
        # the kernel gets the lesson's grading edition of nfcourse (no answers in it)
        self._lesson = (resources or {}).get("nbgrader", {}).get("assignment", "")
        if km is not None and hasattr(km, "lesson"):
            km.lesson = self._lesson
        self._output_bytes, self._truncated = 0, set()
        start = time.monotonic()
        cells = self.nb.cells
        survived: list[int] = []
        index, restarts, verdicts = 0, 0, None
        while True:
            died = False
            with self.setup_kernel():
                self._watch_iopub()
                info = self.wait_for_reply(self.kc.kernel_info())
                self.nb.metadata["language_info"] = info["content"]["language_info"]
                if restarts:
                    self._replay(survived, start)
                while index < len(cells):
                    cell = cells[index]
                    if cell.cell_type == "code" and self._out_of_time(start):
                        cell.outputs = [_error("GradingTimeLimit", (
                            f"not run: the notebook used up its {self.notebook_timeout} s of "
                            "grading time before this cell"))]
                        index += 1
                        continue
                    try:
                        self.preprocess_cell(cell, resources, index)
                    except (DeadKernelError, CellTimeoutError) as error:
                        what = ("died while running this cell (it exited, crashed, or went "
                                "over the memory limit)" if isinstance(error, DeadKernelError)
                                else "stopped answering while running this cell")
                        if self._iopub_dropped():
                            limit = getattr(self.km, "max_message_mb", 0)
                            cell.outputs.append(NotebookNode(
                                output_type="stream", name="stderr",
                                text=f"[output cut: the cell sent a message over the grader's "
                                     f"{limit:g} MB limit, which dropped its connection]\n"))
                        cell.outputs.append(_error("KernelDied", (
                            f"the kernel {what}. The cells after it ran in a fresh kernel "
                            "that first re-ran the cells above.")))
                        died = True
                        index += 1
                        break
                    if cell.cell_type == "code":
                        self._kill_strays()
                        if not is_grade(cell):
                            survived.append(index)
                    index += 1
                if not died:
                    verdicts = self._verify(resources)
            if not died:
                break
            restarts += 1
            if restarts > MAX_RESTARTS:
                for cell in cells[index:]:
                    if cell.cell_type == "code":
                        cell.outputs = [_error("KernelDied", "not run: the kernel kept dying")]
                verdicts = self._verify(resources, kernel=False)
                break
        self.set_widgets_metadata()
        if verdicts is not None:
            self._apply(verdicts)
        return self.nb, self.resources

    # -- the grader's sockets (limits set by SandboxedKernelManager.limit_sockets) -------
    def _watch_iopub(self) -> None:
        """Watch the iopub socket for a dropped connection: ZeroMQ drops it when a frame is
        over ``max_message_mb``, and the cell then only looks like a hung kernel."""
        self._iopub_monitor = None
        socket = getattr(getattr(self.kc, "iopub_channel", None), "socket", None)
        if socket is None:
            return
        monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        # a blocking shadow of the (asyncio) monitor socket, polled without waiting
        self._iopub_monitor = zmq.Socket.shadow(monitor.underlying)
        self._iopub_monitor_owner = monitor

    def _iopub_dropped(self) -> bool:
        """True when the iopub connection was dropped since :meth:`_watch_iopub`."""
        monitor = getattr(self, "_iopub_monitor", None)
        if monitor is None:
            return False
        dropped = False
        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            dropped = dropped or event["event"] == zmq.EVENT_DISCONNECTED
        return dropped

    def _kill_strays(self) -> None:
        kill = getattr(self.km, "kill_strays", None)
        if kill is not None:
            kill()

    def _out_of_time(self, start: float) -> bool:
        return bool(self.notebook_timeout) and time.monotonic() - start > self.notebook_timeout

    def _replay(self, indices: list[int], start: float) -> None:
        """Re-run earlier cells (outputs thrown away) in a fresh kernel."""
        for i in indices:
            if self._out_of_time(start):
                return
            scratch = copy.deepcopy(self.nb.cells[i])
            try:
                self.execute_cell(scratch, i, store_history=False)
            except (DeadKernelError, CellTimeoutError):
                return  # the next cell runs in whatever state there is

    # -- the independent check ----------------------------------------------------------
    def _query(self, code: str, timeout: float) -> str:
        return run_sync(self._async_query)(code, timeout)

    def _budget_spent(self) -> str:
        return (f"the independent check used up its {self.verify_budget} s budget (the "
                "kernel stopped answering; it was killed)")

    async def _kill_for_budget(self) -> None:
        """Kill the kernel outright (a kernel that ignores SIGINT outlives an interrupt):
        every later query then fails at once with :meth:`_budget_spent`."""
        self._budget_killed = True
        kill = getattr(self.km, "kill_sandbox", None)
        if kill is not None and kill():
            return
        await ensure_async(self.km.shutdown_kernel(now=True))

    async def _async_query(self, code: str, timeout: float) -> str:
        # The check's total budget: a query gets at most what is left of it.
        budget_end = getattr(self, "_budget_end", None)
        if getattr(self, "_budget_killed", False):
            raise OracleError(self._budget_spent())
        left = None if budget_end is None else budget_end - time.monotonic()
        if left is not None and left <= 0:
            await self._kill_for_budget()
            raise OracleError(self._budget_spent())
        by_budget = left is not None and left < timeout
        timeout = min(timeout, left) if by_budget else timeout
        kc = self.kc
        msg_id = kc.execute(code, silent=False, store_history=False, allow_stdin=False,
                            stop_on_error=False)
        deadline = time.monotonic() + timeout
        chunks, size = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if by_budget:
                    await self._kill_for_budget()
                    raise OracleError(self._budget_spent())
                await ensure_async(self.km.interrupt_kernel())
                raise OracleError(f"no answer within {timeout:.0f} s")
            try:
                msg = await ensure_async(kc.get_iopub_msg(timeout=min(remaining, 1.0)))
            except queue.Empty:
                if not await ensure_async(self.km.is_alive()):
                    raise OracleError("the kernel died while it was being checked") from None
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text = msg["content"].get("text", "")
                size += len(text)
                if size > 256e6:
                    raise OracleError("the kernel's answer is far too long")
                chunks.append(text)
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(chunks)

    def _verify(self, resources, kernel: bool = True) -> list[Verdict] | None:
        lesson = (resources or {}).get("nbgrader", {}).get("assignment", "")
        verifier = verifier_for(lesson) if self.verify else None
        if verifier is None:
            return None
        sources = [c.source for c in self.nb.cells
                   if c.cell_type == "code" and not is_grade(c)]
        # from the submission itself: grading it again gives the same inputs and verdict
        seed = submission_seed(lesson, sources)
        alive = kernel and self.kc is not None
        oracle = Oracle(self._query, timeout=self.verify_timeout) if alive else None
        started = time.monotonic()
        self._budget_killed = False
        self._budget_end = started + self.verify_budget if self.verify_budget else None
        verdicts = verifier.run(oracle, sources, np.random.default_rng(seed))
        self._record(resources, lesson, seed, verdicts, time.monotonic() - started,
                     verifier.review(sources))
        return verdicts

    def _record(self, resources, lesson, seed, verdicts, seconds, review) -> None:
        """The verdicts beside the graded notebook, for instructors (written atomically),
        with what in the student's cells an instructor should read (``review``)."""
        folder = (resources or {}).get("metadata", {}).get("path")
        if not folder:
            return
        path = Path(folder) / VERIFICATION_FILE
        record = {"lesson": lesson, "seed": seed, "seconds": round(seconds, 2),
                  "verdicts": [v.to_dict() for v in verdicts], "review": review}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".nfcourse-", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=1)
        os.replace(tmp, path)  # replaces the name itself, never a file a link points to

    def _apply(self, verdicts: list[Verdict]) -> None:
        by_id = {v.grade_id: v for v in verdicts}
        for cell in self.nb.cells:
            grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
            verdict = by_id.get(grade_id) if is_grade(cell) else None
            if verdict is None:
                continue
            if verdict.passed:
                cell.outputs.append(NotebookNode(
                    output_type="stream", name="stdout",
                    text=f"✓ independent check: {verdict.message}\n"))
            else:
                # First: nbgrader scores a cell by its first error or execute_result, so an
                # error after a result (a test ending in a bare expression) would be ignored.
                cell.outputs.insert(0, _error("IndependentCheckFailed", (
                    f"{verdict.message} (checked by the grader outside your notebook)")))
