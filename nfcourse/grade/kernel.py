"""The grading kernel's manager: a normal IPython kernel, started inside a :class:`Sandbox`.

The kernel talks to the grader over Unix sockets (ZeroMQ's ``ipc`` transport) in a private
folder bound into the sandbox, because the sandbox has a network namespace of its own and
cannot reach the grader's loopback TCP ports.

Configured through nbgrader's config (see ``grading/nbgrader_config.py``)::

    c.SandboxedKernelManager.memory_mb = 3072
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from traitlets import Bool, Float, Integer, List, Unicode

from nfcourse.grade.sandbox import Limits, Sandbox

__all__ = ["SandboxedKernelManager", "PASSED_ENV_PREFIXES", "resolved_data_folder"]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


#: Environment variables the kernel keeps (everything else, secrets included, is dropped).
PASSED_ENV_PREFIXES = ("NFCOURSE_", "TQDM_", "MPLBACKEND", "PYTHONHASHSEED", "OMP_NUM_THREADS",
                       "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "JPY_")


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

    def limits(self) -> Limits:
        return Limits(memory_mb=self.memory_mb, processes=self.processes, cpus=self.cpus,
                      tmp_mb=self.tmp_mb,
                      file_mb=self.file_mb, output_mb=self.output_mb)

    async def _async_pre_start_kernel(self, **kw):
        if not self.enabled:
            return await super()._async_pre_start_kernel(**kw)
        # Sockets and the connection file live in a private folder the sandbox can see.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="nfcourse-kernel-"))
        os.chmod(self._socket_dir, 0o777)
        self.transport = "ipc"
        self.ip = str(self._socket_dir / "k")
        self.connection_file = str(self._socket_dir / "kernel.json")
        cmd, kw = await super()._async_pre_start_kernel(**kw)
        os.chmod(self.connection_file, 0o644)
        # The kernel works in a scratch copy of the submission's folder, bound over the
        # folder's path: what it writes (or a symlink it plants for the grader to follow)
        # never reaches the files nbgrader writes afterwards.
        workdir = Path(kw.get("cwd") or os.getcwd()).resolve()
        self._scratch = Path(tempfile.mkdtemp(prefix="nfcourse-work-"))
        os.chmod(self._scratch, 0o777)
        for item in workdir.iterdir():
            if item.is_file() and not item.is_symlink():
                shutil.copy(item, self._scratch / item.name)
        env = dict(kw.get("env") or os.environ)
        passed = {k: v for k, v in env.items() if k.startswith(PASSED_ENV_PREFIXES)}
        readonly = [str(Path(p).resolve()) for p in self.readonly_paths if p and Path(p).is_dir()]
        data = resolved_data_folder(passed)
        if data is not None:
            readonly.append(data)
            passed["NFCOURSE_DATA"] = data
        self._sandbox = Sandbox(workdir=workdir, readonly=readonly, scratch=self._scratch,
                                readwrite=[self._socket_dir], env=passed, limits=self.limits())
        # --quiet: no connection banner on the grader's terminal for every submission
        return self._sandbox.wrap([*cmd, "--quiet"]), kw

    async def _async_cleanup_resources(self, restart: bool = False) -> None:
        await super()._async_cleanup_resources(restart=restart)
        sandbox = getattr(self, "_sandbox", None)
        if sandbox is not None:
            sandbox.close()
            self._sandbox = None
        for attr in ("_socket_dir", "_scratch"):
            folder = getattr(self, attr, None)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
                setattr(self, attr, None)

    def _chain(self) -> list[int]:
        """PIDs of bubblewrap, its init in the new PID namespace and the kernel."""
        process = getattr(self.provisioner, "process", None) if self.provisioner else None
        if process is None:
            return []
        chain = [process.pid]
        for _ in range(2):
            chain += _children(chain[-1])[:1]
        return chain

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
