"""The grading kernel's manager: a normal IPython kernel, started inside a :class:`Sandbox`.

The kernel talks to the grader over Unix sockets (ZeroMQ's ``ipc`` transport) in a private
folder bound into the sandbox, because the sandbox has a network namespace of its own and
cannot reach the grader's loopback TCP ports.

What a submission can put on the host is capped:

* its working folder is a tmpfs of ``work_mb`` inside the sandbox (filled with a copy of the
  submission's files; nothing written there reaches the host's disk);
* the socket folder is writable only while the kernel starts: once its five sockets exist,
  the folder is handed to ``nobody`` with mode 0755 (as root; see :meth:`_lock_socket_dir`),
  so the kernel can neither add files nor swap a socket for a link;
* the grader's own sockets (this manager's and its clients') get a largest message
  (``max_message_mb``: a bigger frame drops the connection, so the kernel looks dead) and a
  short receive queue (``receive_queue`` messages), so what the kernel sends cannot grow the
  grader's memory without bound.

Configured through nbgrader's config (see ``grading/nbgrader_config.py``)::

    c.SandboxedKernelManager.memory_mb = 3072
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import zmq
from jupyter_client.manager import AsyncKernelManager
from traitlets import Bool, Float, Integer, List, Unicode

from nfcourse.grade.sandbox import NOBODY, Limits, Sandbox

__all__ = ["SandboxedKernelManager", "PASSED_ENV", "passed_env", "resolved_data_folder"]


#: Third-party libraries with flow layers a lesson's answer could be made of: normflows is in
#: the venv for a benchmark; the others are hidden too wherever they are installed.
HIDDEN_PACKAGES = ("normflows", "nflows", "zuko", "FrEIA", "pyro", "flowtorch", "survae")


def installed_locations(names: Sequence[str]) -> list[str]:
    """The folder (package) or file (module) each installed one of ``names`` is imported
    from, found without importing it; names not installed are skipped.

    Example:
        >>> installed_locations(["surely_not_installed_nfc"])
        []
    """
    out = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if spec.submodule_search_locations:
            out += [str(Path(p).resolve()) for p in spec.submodule_search_locations]
        elif spec.origin and os.path.isfile(spec.origin):
            out.append(str(Path(spec.origin).resolve()))
    return out


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


#: Environment variables the kernel keeps, by exact name, on top of the config's
#: ``NfcourseGrade.kernel_env`` names and ``SandboxedKernelManager.passed_env``. Everything
#: else is dropped: a prefix (``JPY_``, ``NFCOURSE_``) would also pass a JupyterHub token
#: (``JPY_API_TOKEN``) or an instructor's ``NFCOURSE_SECRET``. (``JPY_PARENT_PID``, which
#: jupyter_client sets, names a PID outside the sandbox's PID namespace: not needed.)
PASSED_ENV = frozenset({
    "NFCOURSE_FAST", "NFCOURSE_DATA", "TQDM_DISABLE", "MPLBACKEND", "PYTHONHASHSEED",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
})


def passed_env(env: dict[str, str], names: frozenset[str] = PASSED_ENV) -> dict[str, str]:
    """The part of ``env`` the grading kernel may see: exactly the variables ``names``.

    Example:
        >>> passed_env({"NFCOURSE_FAST": "1", "NFCOURSE_SECRET": "x", "JPY_API_TOKEN": "t"})
        {'NFCOURSE_FAST': '1'}
    """
    return {k: v for k, v in env.items() if k in names}


def resolved_data_folder(env: dict[str, str]) -> str | None:
    """The folder ``$NFCOURSE_DATA`` names, links followed, or None when there is none.

    The sandbox binds it at that real path and the kernel is told that path: a link's own
    path may not exist inside (one under ``/tmp`` is hidden by the sandbox's own ``/tmp``),
    and a lesson that finds no MNIST there trains on something else.

    Example:
        >>> resolved_data_folder({"NFCOURSE_DATA": "/nonexistent"}) is None
        True
    """
    data = env.get("NFCOURSE_DATA")
    if not data or not Path(data).is_dir():
        return None
    return str(Path(data).resolve())


def _is_socket(path: Path) -> bool:
    """True when ``path`` itself (not a link's target) is a Unix socket."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove(path: Path) -> None:
    """Remove a file, link or folder (not what a link points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


class SandboxedKernelManager(AsyncKernelManager):
    """Starts the kernel as ``sandbox.wrap(kernel_cmd)``; cleans the sandbox up after it."""

    enabled = Bool(True, help="Run the kernel in the sandbox (False only for the explicit "
                   "unsafe mode).").tag(config=True)
    memory_mb = Integer(Limits.memory_mb, help="Memory cap of the kernel (MB).").tag(config=True)
    processes = Integer(Limits.processes, help="Cap on processes and threads.").tag(config=True)
    cpus = Float(Limits.cpus, help="CPU share of the kernel (1.0 = one core).").tag(config=True)
    tmp_mb = Integer(Limits.tmp_mb, help="Size of the kernel's /tmp (MB).").tag(config=True)
    file_mb = Integer(Limits.file_mb, help="Largest file the kernel may write (MB).").tag(
        config=True)
    output_mb = Float(Limits.output_mb, help="Output a notebook may print in all (MB).").tag(
        config=True)
    readonly_paths = List(Unicode(), help="Extra folders visible read-only (data sets).").tag(
        config=True)
    work_mb = Integer(Limits.work_mb, help="Size of the kernel's working folder, a tmpfs "
                      "holding a copy of the submission (MB).").tag(config=True)
    max_message_mb = Float(64.0, help="Largest message frame the grader accepts from the "
                           "kernel (MB); a bigger one drops the connection.").tag(config=True)
    receive_queue = Integer(4, help="Messages each of the grader's sockets queues from the "
                            "kernel before the kernel has to wait.").tag(config=True)
    socket_wait = Float(120.0, help="Seconds to wait for the kernel's sockets before "
                        "locking the socket folder anyway.").tag(config=True)

    passed_env = List(Unicode(), help="More environment variables (exact names) the kernel "
                      "keeps besides PASSED_ENV and NfcourseGrade.kernel_env.").tag(config=True)

    lesson = Unicode("", help="The lesson being graded (set by GradingExecute): its grading "
                     "edition of nfcourse, without the lesson's answers, is bound over the "
                     "package inside the sandbox. Empty: the package as it is.")
    hidden_packages = List(Unicode(), list(HIDDEN_PACKAGES), help="Installed third-party "
                           "packages that implement flow layers, hidden from the kernel "
                           "(those not installed are skipped).").tag(config=True)

    def overlays(self) -> list[tuple[str, str]]:
        """``[(edition's nfcourse, the package's folder)]`` for the lesson, or ``[]``."""
        if not self.lesson:
            return []
        import nfcourse
        from nfcourse.grade.edition import edition_for

        package = Path(nfcourse.__file__).resolve().parent
        return [(str(edition_for(self.lesson) / "nfcourse"), str(package))]

    def hidden_paths(self) -> list[str]:
        """Where each installed package of ``hidden_packages`` lives (folder or file)."""
        return installed_locations(self.hidden_packages)

    def allowed_env(self) -> frozenset[str]:
        """Exact names of the variables the kernel keeps: :data:`PASSED_ENV`, the names the
        course config sets for it (``NfcourseGrade.kernel_env``) and ``passed_env``."""
        section = self.config.get("NfcourseGrade", {})
        course = dict(section.get("kernel_env", {})) if hasattr(section, "get") else {}
        return PASSED_ENV | set(course) | set(self.passed_env)

    def limits(self) -> Limits:
        return Limits(memory_mb=self.memory_mb, processes=self.processes, cpus=self.cpus,
                      tmp_mb=self.tmp_mb, work_mb=self.work_mb,
                      file_mb=self.file_mb, output_mb=self.output_mb)

    # -- the grader's sockets -------------------------------------------------------------
    def limit_sockets(self, context: zmq.Context) -> zmq.Context:
        """Make every socket ``context`` creates from now on refuse frames over
        ``max_message_mb`` (the connection drops) and queue at most ``receive_queue``
        messages: ZeroMQ's defaults (no size limit, 1000 messages) let a kernel that sends
        large frames fill the grader's memory before a single message is read."""
        context.setsockopt(zmq.MAXMSGSIZE, int(self.max_message_mb * 1024 * 1024))
        context.setsockopt(zmq.RCVHWM, int(self.receive_queue))
        return context

    def client(self, **kwargs):
        """A client whose sockets (shell, iopub, stdin, control, heartbeat) have the limits
        of :meth:`limit_sockets` (set on its own context before the channels start)."""
        kc = super().client(**kwargs)
        self.limit_sockets(kc.context)
        return kc

    async def _async_pre_start_kernel(self, **kw):
        if not self.enabled:
            return await super()._async_pre_start_kernel(**kw)
        # This manager's own control socket: the same limits as its clients'.
        self.limit_sockets(self.context)
        # Sockets and the connection file live in a private folder the sandbox can see
        # (locked once the sockets exist: _async_launch_kernel).
        self._socket_dir = Path(tempfile.mkdtemp(prefix="nfcourse-kernel-"))
        os.chmod(self._socket_dir, 0o777)
        self.transport = "ipc"
        self.ip = str(self._socket_dir / "k")
        self.connection_file = str(self._socket_dir / "kernel.json")
        cmd, kw = await super()._async_pre_start_kernel(**kw)
        os.chmod(self.connection_file, 0o644)
        # The kernel works in a tmpfs at the submission folder's path, which the sandbox
        # fills with a copy of the folder's files: what it writes (or a symlink it plants
        # for the grader to follow) never reaches the host's disk or the files nbgrader
        # writes afterwards, and is capped at work_mb.
        workdir = Path(kw.get("cwd") or os.getcwd()).resolve()
        env = dict(kw.get("env") or os.environ)
        passed = passed_env(env, self.allowed_env())
        readonly = [str(Path(p).resolve()) for p in self.readonly_paths if p and Path(p).is_dir()]
        data = resolved_data_folder(passed)
        if data is not None:
            readonly.append(data)
            passed["NFCOURSE_DATA"] = data
        self._sandbox = Sandbox(workdir=workdir, readonly=readonly, seed=workdir,
                                readwrite=[self._socket_dir], env=passed, limits=self.limits(),
                                overlays=self.overlays(), hidden=self.hidden_paths())
        # --quiet: no connection banner on the grader's terminal for every submission
        return self._sandbox.wrap([*cmd, "--quiet"]), kw

    async def _async_launch_kernel(self, kernel_cmd, **kw) -> None:
        await super()._async_launch_kernel(kernel_cmd, **kw)
        if getattr(self, "_sandbox", None) is not None and self.enabled:
            await self._lock_socket_dir()

    def _socket_paths(self) -> list[Path]:
        return [Path(f"{self.ip}-{port}") for port in self.ports]

    async def _lock_socket_dir(self) -> None:
        """Once the kernel has made its sockets, take the socket folder away from it.

        Inside the sandbox the grader's uid is the sandbox's own (bubblewrap maps it), so
        the kernel owns whatever the grader owns there. As root the folder goes to
        ``nobody`` (a uid the sandbox does not map) with mode 0755: the kernel can no
        longer create, remove or rename anything in it, so it can neither fill the host's
        disk through it nor swap a socket for a link the grader would follow. Anything but
        the sockets and the connection file found there is removed first. Without root
        (a delegated cgroup) the folder is made read-only, which the kernel could undo:
        only the per-file cap holds there.
        """
        folder = self._socket_dir
        deadline = time.monotonic() + self.socket_wait
        while time.monotonic() < deadline and await self._async_is_alive():
            if all(_is_socket(p) for p in self._socket_paths()):
                break
            await asyncio.sleep(0.05)
        keep = {p.name for p in self._socket_paths()} | {Path(self.connection_file).name}
        for entry in os.scandir(folder):
            if entry.name not in keep or not (entry.is_file(follow_symlinks=False)
                                              or _is_socket(Path(entry.path))):
                _remove(Path(entry.path))
        if os.geteuid() == 0:
            os.chown(folder, NOBODY, NOBODY)
            os.chmod(folder, 0o755)
        else:
            os.chmod(folder, 0o555)

    async def _async_cleanup_resources(self, restart: bool = False) -> None:
        await super()._async_cleanup_resources(restart=restart)
        sandbox = getattr(self, "_sandbox", None)
        if sandbox is not None:
            sandbox.close()
            self._sandbox = None
        folder = getattr(self, "_socket_dir", None)
        if folder is not None:
            if os.geteuid() != 0:
                try:
                    os.chmod(folder, 0o700)  # read-only since the kernel started
                except OSError:
                    pass
            shutil.rmtree(folder, ignore_errors=True)
            self._socket_dir = None

    def _chain(self) -> list[int]:
        """PIDs of bubblewrap, its init in the new PID namespace and the kernel."""
        process = getattr(self.provisioner, "process", None) if self.provisioner else None
        if process is None:
            return []
        chain = [process.pid]
        for _ in range(2):
            chain += _children(chain[-1])[:1]
        return chain

    def kill_sandbox(self) -> bool:
        """Kill every process in the sandbox, the kernel included (it may ignore SIGINT);
        False when there is no sandbox to kill."""
        sandbox = getattr(self, "_sandbox", None)
        if sandbox is None:
            return False
        sandbox.kill_strays(keep=())
        return True

    def kill_strays(self) -> int:
        """Kill the processes a cell left behind in the sandbox (not the kernel itself)."""
        sandbox = getattr(self, "_sandbox", None)
        chain = self._chain()
        if sandbox is None or len(chain) < 3:
            return 0
        return sandbox.kill_strays(chain)

    async def _async_interrupt_kernel(self) -> None:
        # The kernel sits in its own session inside the sandbox, out of reach of the
        # process-group signal jupyter_client sends: signal it directly.
        chain = self._chain() if getattr(self, "_sandbox", None) is not None else []
        if len(chain) == 3:
            try:
                os.kill(chain[-1], signal.SIGINT)
                return
            except ProcessLookupError:
                pass
        await super()._async_interrupt_kernel()

    interrupt_kernel = _async_interrupt_kernel

    cleanup_resources = _async_cleanup_resources
