"""Persistent, memory-capped worker processes that run one grading job after another.

Each submission is graded in a worker process, never in the process that drives the class:
if a submission makes the grader's own code blow up (memory, a crash, a hang), only that
worker dies. :class:`Pool` notices, reports the job as failed with the reason, starts a
fresh worker and goes on with the next job.

Why not ``concurrent.futures.ProcessPoolExecutor`` or ``multiprocessing.Pool``: the first
marks the whole pool broken when one worker dies (every pending job fails), the second
hangs on a dead worker; what we need is "this job failed, the others go on".

The memory cap (:class:`MemoryCap`):

* cgroup v1 (this project's machines): a memory cgroup per worker, created beside the
  grader's own. The kernel sandboxes a worker starts (``sandbox.py``) create their cgroups
  inside the worker's one (they nest under the cgroup of the process that makes them), and
  v1 memory accounting is hierarchical, so the cap is the grader's own share plus the
  kernel's cap: a kernel that blows up hits its own, smaller cap first; a grader that blows
  up is killed at the worker's.
* cgroup v2: a cgroup holding a process cannot delegate controllers to children (the
  "no internal processes" rule), so moving the worker into one would break the kernel
  sandboxes. There the worker gets ``RLIMIT_DATA`` instead (writable private memory, not
  address space: torch reserves far more address space than it uses). Kernels inherit
  it, which is why it is set to the whole cap and not the grader's share.

Example:
    >>> with Pool(1, MemoryCap(256)) as pool:                            # doctest: +SKIP
    ...     [o.value for o in pool.run([Job("a", "math:sqrt", {"x": 4.0})])]
    [2.0]
"""

from __future__ import annotations

import atexit
import importlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

__all__ = ["Job", "Outcome", "MemoryCap", "Pool", "shared_pool", "close_shared_pool"]


@dataclass(frozen=True)
class Job:
    """``target`` (``"module:function"``) called with ``kwargs`` in a worker; ``key`` names
    the job in its :class:`Outcome` (a student id)."""

    key: str
    target: str
    kwargs: Mapping = field(default_factory=dict)


@dataclass
class Outcome:
    """What became of a :class:`Job`: ``value`` returned, or ``error`` (why it failed:
    an exception in the job, or the worker died or ran out of time). ``peak_mb`` is the
    worker's peak resident memory so far (its own, not its kernels')."""

    key: str
    value: object = None
    error: str | None = None
    peak_mb: float = 0.0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- the cap
class MemoryCap:
    """A memory cap for one worker process (see the module docstring for how)."""

    def __init__(self, memory_mb: int):
        if memory_mb < 64:
            raise ValueError(f"a grading worker needs at least 64 MB, not {memory_mb} MB")
        self.memory_mb = int(memory_mb)
        self.cgroup: Path | None = None
        self.kind = "rlimit"
        from nfcourse.grade.sandbox import _own_cgroup_v1, _own_cgroup_v2

        parent = None if _own_cgroup_v2() is not None else _own_cgroup_v1("memory")
        if parent is not None:
            d = parent / f"nfcourse-grader-{uuid.uuid4().hex[:12]}"
            try:
                d.mkdir()
                (d / "memory.limit_in_bytes").write_text(str(self.memory_mb * 1024 * 1024))
                swap = d / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    try:
                        swap.write_text(str(self.memory_mb * 1024 * 1024))
                    except OSError:
                        pass  # swap accounting off: nothing to cap
                self.cgroup, self.kind = d, "cgroup"
            except OSError:
                _remove_tree(d)

    def worker_args(self) -> list[str]:
        """What the worker needs to put itself under the cap (see :func:`_enter_cap`)."""
        if self.cgroup is not None:
            return ["--cgroup", str(self.cgroup)]
        return ["--rlimit-mb", str(self.memory_mb)]

    def hit(self) -> bool:
        """True when the cgroup's limit was reached at some point (v1 ``memory.failcnt``)."""
        if self.cgroup is None:
            return False
        try:
            return int((self.cgroup / "memory.failcnt").read_text()) > 0
        except (OSError, ValueError):
            return False

    def reset(self) -> None:
        """Kill whatever is left under the cap (a dead worker's kernel) and reset the count."""
        if self.cgroup is None:
            return
        for d in _subtree(self.cgroup):
            _kill_all(d)
        for d in _subtree(self.cgroup)[:-1]:  # nested kernel cgroups, deepest first
            _remove_tree(d)
        for name in ("memory.failcnt", "memory.max_usage_in_bytes"):
            try:
                (self.cgroup / name).write_text("0")
            except OSError:
                pass

    def close(self) -> None:
        if self.cgroup is not None:
            self.reset()
            _remove_tree(self.cgroup)
            self.cgroup = None


def _subtree(d: Path) -> list[Path]:
    """``d`` and the cgroups below it, deepest first (``d`` last)."""
    out = []
    for root, _dirs, _files in os.walk(d, topdown=False):
        out.append(Path(root))
    return out or [d]


def _kill_all(cgroup: Path) -> None:
    for _ in range(50):
        try:
            pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _remove_tree(d: Path) -> None:
    for sub in _subtree(d):
        try:
            sub.rmdir()
        except OSError:
            pass


def _enter_cap(argv: list[str]) -> None:
    """In the worker, first thing: move into the cgroup, or set ``RLIMIT_DATA``."""
    if argv[0] == "--cgroup":
        Path(argv[1], "cgroup.procs").write_text(str(os.getpid()))
    elif argv[0] == "--rlimit-mb":
        limit = int(argv[1]) * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


# --------------------------------------------------------------------------- one worker
class _Worker:
    """One worker process and the socket the jobs and outcomes travel on."""

    def __init__(self, cap: MemoryCap, env: Mapping[str, str]):
        self.cap = cap
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "nfcourse.grade.workers", str(theirs.fileno()),
               *cap.worker_args()]
        self.process = subprocess.Popen(cmd, pass_fds=[theirs.fileno()],
                                        env={**os.environ, **env}, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.env = dict(env)
        self.job: Job | None = None
        self.started = 0.0

    def send(self, job: Job) -> None:
        self.job, self.started = job, time.monotonic()
        # The parent's environment and paths as they are now: a worker outlives one call.
        self.conn.send((job.target, dict(job.kwargs), {**os.environ, **self.env},
                        list(sys.path), os.getcwd()))

    def receive(self) -> tuple[object, str | None, float]:
        return self.conn.recv()

    def death(self) -> str:
        """Why the process is gone, in words."""
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.process.returncode
        over = self.cap.hit()
        if code is not None and code < 0:
            try:
                what = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                what = f"killed by signal {-code}"
        else:
            what = f"exited with status {code}"
        if over:
            return (f"the grading process went over its {self.cap.memory_mb} MB memory cap "
                    f"and was {what}")
        if code == -signal.SIGKILL:
            return (f"the grading process was {what} (most likely it went over its "
                    f"{self.cap.memory_mb} MB memory cap)")
        return f"the grading process {what}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.conn.close()
        self.cap.reset()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


# ----------------------------------------------------------------------------- the pool
class Pool:
    """``size`` workers, each under its own :class:`MemoryCap` of ``memory_mb``.

    ``slot_env[k]`` is extra environment of worker ``k`` (one GPU each); a replacement
    worker gets its predecessor's.
    """

    def __init__(self, size: int, memory_mb: int, slot_env: list[dict[str, str]] | None = None):
        if size < 1:
            raise ValueError(f"a pool needs at least one worker, not {size}")
        self.size, self.memory_mb = size, memory_mb
        self.slot_env = list(slot_env or [{} for _ in range(size)])
        self._caps = [MemoryCap(memory_mb) for _ in range(size)]
        self._workers: list[_Worker | None] = [None] * size
        self.restarts = 0

    def _worker(self, k: int) -> _Worker:
        worker = self._workers[k]
        if worker is None or worker.process.poll() is not None:
            worker = self._workers[k] = _Worker(self._caps[k], self.slot_env[k])
        return worker

    def run(self, jobs: Iterable[Job], timeout: float | None = None) -> Iterator[Outcome]:
        """Run ``jobs``, at most ``size`` at once; yield each one's :class:`Outcome` as it
        finishes. A job that kills its worker, or takes longer than ``timeout`` seconds,
        yields an error and a fresh worker takes the next job."""
        pending = list(jobs)[::-1]
        busy: dict[int, _Worker] = {}
        while pending or busy:
            for k in range(self.size):
                if k not in busy and pending:
                    worker = self._worker(k)
                    job = pending.pop()
                    try:
                        worker.send(job)
                    except OSError:  # died between jobs: a fresh one takes it
                        worker.kill()
                        self._workers[k] = None
                        worker = self._worker(k)
                        worker.send(job)
                    busy[k] = worker
            wait_for = None
            if timeout is not None:
                now = time.monotonic()
                wait_for = max(0.0, min(w.started + timeout - now for w in busy.values()))
            ready = wait([w.conn for w in busy.values()], timeout=wait_for)
            for k, worker in list(busy.items()):
                job = worker.job
                seconds = time.monotonic() - worker.started
                if worker.conn in ready:
                    try:
                        value, error, peak = worker.receive()
                    except (EOFError, OSError):
                        reason = worker.death()
                        yield self._replace(k, job, reason, seconds)
                    else:
                        yield Outcome(job.key, value, error, peak, seconds)
                    busy.pop(k)
                elif timeout is not None and seconds > timeout:
                    worker.kill()
                    reason = f"grading took longer than {timeout:.0f} s and was stopped"
                    yield self._replace(k, job, reason, seconds)
                    busy.pop(k)

    def _replace(self, k: int, job: Job, reason: str, seconds: float) -> Outcome:
        self._workers[k].kill()
        self._workers[k] = None
        self.restarts += 1
        return Outcome(job.key, None, reason, 0.0, seconds)

    def close(self) -> None:
        for k, worker in enumerate(self._workers):
            if worker is not None:
                worker.stop()
                self._workers[k] = None
        for cap in self._caps:
            cap.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHARED: Pool | None = None


def shared_pool(size: int, memory_mb: int, slot_env: list[dict[str, str]] | None = None) -> Pool:
    """A pool kept between calls in this process (the test suite grades one submission per
    call; starting a worker costs about 1.5 s of imports), replaced when the size, cap or
    slot environment asked for differ."""
    global _SHARED
    slot_env = list(slot_env or [{} for _ in range(size)])
    pool = _SHARED
    if pool is not None and (pool.size, pool.memory_mb, pool.slot_env) == (
            size, memory_mb, slot_env):
        return pool
    close_shared_pool()
    _SHARED = Pool(size, memory_mb, slot_env)
    return _SHARED


def close_shared_pool() -> None:
    global _SHARED
    if _SHARED is not None:
        _SHARED.close()
        _SHARED = None


atexit.register(close_shared_pool)


# --------------------------------------------------------------------- the worker's side
def _peak_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` first: ``ru_maxrss`` survives
    ``fork`` + ``exec`` on Linux, so a fresh worker would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _call(target: str, kwargs: dict):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _serve(fd: int) -> None:
    conn = Connection(fd)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message is None:
            return
        target, kwargs, env, path, cwd = message
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = path
        try:
            os.chdir(cwd)
        except OSError:
            pass
        try:
            value, error = _call(target, kwargs), None
        except Exception as exc:  # noqa: BLE001  (reported to the parent, per job)
            value = None
            error = f"{type(exc).__name__}: {exc}"
        conn.send((value, error, _peak_mb()))


if __name__ == "__main__":
    _enter_cap(sys.argv[2:])
    # The parent stops a worker by closing its socket; a Ctrl-C is the parent's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve(int(sys.argv[1]))
