"""Run a student's code where it can see, reach and use only what grading allows.

A :class:`Sandbox` turns a command into one that runs inside

* **bubblewrap** (``bwrap``, Debian package ``bubblewrap``): new mount, PID, network, IPC,
  UTS and user namespaces. The filesystem is empty except for what grading binds in: the
  interpreter, the virtual environment and the ``nfcourse`` package read-only, the data
  folder read-only, the submission's own folder (a size-limited tmpfs the sandbox fills with
  a copy of the submission's files when it starts: nothing it writes there reaches the host's
  disk), a size-limited ``/tmp``. The
  course (``solutions/``, the gradebook, other submissions) and the instructor's home are
  simply not there. The network namespace has only its own loopback: no connection leaves
  it. The environment is cleared and rebuilt from an allow-list.
* **control groups** (v1 or v2): a cap on memory and on the number of processes (a fork
  bomb stops at ``processes``), removed with everything left in them when the sandbox ends.
* **resource limits** (``prlimit``): largest file written, open files, no core dumps.

Wall time is the caller's job (the grading kernel's cell timeout and notebook budget).

Why not Docker or a library: no container engine runs on the machines this course is
graded on, and bubblewrap plus cgroups is what Linux offers without one.

Example:
    >>> box = Sandbox(workdir="/tmp/alice", readonly=[], limits=Limits())   # doctest: +SKIP
    >>> subprocess.run(box.wrap(["python", "-c", "print(1)"]))             # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Limits",
    "Sandbox",
    "SandboxUnavailable",
    "blocker_for",
    "isolation_problems",
    "python_paths",
]

#: Where a sandbox with a ``seed`` sees that folder (read-only) to copy it into its workdir.
SEED_MOUNT = "/run/nfcourse-seed"

# Files of /etc a Python process needs; /etc as a whole holds secrets (shadow, ssh keys).
ETC_FILES = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group",
    "nsswitch.conf", "hosts", "fonts", "alternatives", "matplotlibrc",
)
SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/sbin")
ENV_ALLOWED = ("LANG", "LC_ALL", "TZ", "PYTHONHASHSEED", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CUDA_VISIBLE_DEVICES")
NOBODY = 65534


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate a submission; the message says what is missing."""


@dataclass(frozen=True)
class Limits:
    """What one sandbox may use.

    ``memory_mb`` caps resident memory (the kernel is killed past it); ``processes`` caps
    processes and threads together; ``cpus`` is the CPU share (1.0 = one core); ``tmp_mb``
    is the size of ``/tmp``; ``file_mb`` the largest file it may write; ``output_mb`` what a
    notebook may print in all (enforced by the grading kernel's reader, not here);
    ``work_mb`` is the size of the working folder when it is a tmpfs (``Sandbox.seed``).
    tmpfs pages count against ``memory_mb`` too (the kernel's cgroup is charged for them).
    """

    memory_mb: int = 3072
    processes: int = 128
    cpus: float = 1.0
    tmp_mb: int = 256
    file_mb: int = 64
    open_files: int = 1024
    output_mb: float = 2.0
    work_mb: int = 256


# ------------------------------------------------------------------------ what is available
@functools.lru_cache(maxsize=1)
def _bwrap() -> str | None:
    path = shutil.which("bwrap")
    if path is None:
        return None
    probe = [path, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return path if ok else None


def _own_cgroup_v1(controller: str) -> Path | None:
    """This process's cgroup folder for a v1 ``controller``, when we may create children."""
    base = Path("/sys/fs/cgroup") / controller
    if not (base / "cgroup.procs").exists():
        return None
    rel = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            rel = path
    here = base / rel.lstrip("/")
    return here if os.access(here, os.W_OK) else (base if os.access(base, os.W_OK) else None)


def _own_cgroup_v2() -> Path | None:
    root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.controllers").exists():
        return None
    rel = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            rel = line[3:]
    here = root / rel.lstrip("/")
    controllers = (here / "cgroup.subtree_control")
    try:
        enabled = controllers.read_text().split()
    except OSError:
        return None
    if {"memory", "pids"} <= set(enabled) and os.access(here, os.W_OK):
        return here
    return None


def isolation_problems() -> list[str]:
    """What is missing for full isolation on this machine (empty when nothing is)."""
    problems = []
    if sys.platform != "linux":
        return [f"sandboxed grading needs Linux (this is {sys.platform})"]
    if _bwrap() is None:
        problems.append(
            "bubblewrap is missing or cannot create namespaces here "
            "(install it: `apt-get install bubblewrap`; as a non-root user it also needs "
            "unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1)"
        )
    if _own_cgroup_v2() is None and not (_own_cgroup_v1("pids") and _own_cgroup_v1("memory")):
        problems.append(
            "no writable control group for memory and process limits (grade as root, or in "
            "a systemd scope with Delegate=yes so /sys/fs/cgroup has a writable subtree with "
            "the memory and pids controllers)"
        )
    if shutil.which("prlimit") is None:
        problems.append("prlimit (util-linux) is missing")
    return problems


# ----------------------------------------------------------------------------- cgroups
class _CGroups:
    """One cgroup per sandbox (v2, or v1 pids + memory); ``enter`` is a shell prefix."""

    def __init__(self, name: str, limits: Limits):
        self.dirs: list[Path] = []
        memory = limits.memory_mb * 1024 * 1024
        v2 = _own_cgroup_v2()
        if v2 is not None:
            d = v2 / name
            d.mkdir()
            (d / "memory.max").write_text(str(memory))
            (d / "memory.swap.max").write_text("0") if (d / "memory.swap.max").exists() else None
            (d / "pids.max").write_text(str(limits.processes))
            if (d / "cpu.max").exists():
                (d / "cpu.max").write_text(f"{int(limits.cpus * 100_000)} 100000")
            self.dirs = [d]
            return
        pids, mem = _own_cgroup_v1("pids"), _own_cgroup_v1("memory")
        if pids is None or mem is None:
            raise SandboxUnavailable("; ".join(isolation_problems()))
        for base in (pids, mem):
            (base / name).mkdir()
            self.dirs.append(base / name)
        (pids / name / "pids.max").write_text(str(limits.processes))
        (mem / name / "memory.limit_in_bytes").write_text(str(memory))
        cpu = _own_cgroup_v1("cpu")
        if cpu is not None and (cpu / "cpu.cfs_quota_us").exists():
            (cpu / name).mkdir()
            self.dirs.append(cpu / name)
            (cpu / name / "cpu.cfs_period_us").write_text("100000")
            (cpu / name / "cpu.cfs_quota_us").write_text(str(int(limits.cpus * 100_000)))
        swap = mem / name / "memory.memsw.limit_in_bytes"
        if swap.exists():
            try:
                swap.write_text(str(memory))
            except OSError:
                pass  # swap accounting off: nothing to cap

    def enter_prefix(self) -> list[str]:
        """``sh -c`` that moves itself into the cgroups, then execs the rest of argv."""
        moves = " && ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}" for d in self.dirs)
        return ["/bin/sh", "-c", f'{moves} && exec "$@"', "nfcourse-sandbox"]

    def pids(self) -> list[int]:
        return _procs(self.dirs[0]) if self.dirs else []

    def kill_and_remove(self) -> None:
        for d in self.dirs:
            for _ in range(50):  # a dying process can fork once more: repeat until empty
                pids = _procs(d)
                if not pids:
                    break
                _kill(pids)
                time.sleep(0.05)
            try:
                d.rmdir()
            except OSError:
                pass


def _procs(cgroup: Path) -> list[int]:
    """The processes in a cgroup (none when it is gone)."""
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _kill(pids: Sequence[int]) -> int:
    """SIGKILL each of ``pids``; returns how many were still there."""
    killed = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


# ----------------------------------------------------------------------------- the sandbox
def _seed_copy() -> list[str]:
    """A shell prefix, run inside the sandbox in its workdir, that copies the regular files
    (not links, not folders) of :data:`SEED_MOUNT` there, then execs the rest of argv. A copy
    that does not fit the tmpfs stops at its size; the kernel starts anyway (the grader sends
    the notebook's cells itself; only files the notebook opens are missing)."""
    script = (f'for f in {SEED_MOUNT}/* {SEED_MOUNT}/.[!.]*; do '
              'if [ -f "$f" ] && [ ! -L "$f" ]; then cp "$f" . 2>/dev/null || break; fi; '
              'done; exec "$@"')
    return ["/bin/sh", "-c", script, "nfcourse-seed"]


def blocker_for(path: Path) -> Path:
    """A read-only stand-in for a hidden package folder (or module file): a folder whose
    ``__init__.py`` (or a file that) raises ``ModuleNotFoundError`` when imported.

    An empty folder would not do: Python imports it as an empty namespace package.

    Example:
        >>> blocker_for(Path("/venv/site-packages/normflows")).joinpath("__init__.py").is_file()
        True
    """
    name = path.stem if path.suffix == ".py" else path.name
    text = (f"raise ModuleNotFoundError({name!r} + ' is not available in the grading sandbox: "
            f"write the layers yourself', name={name!r})\n")
    root = Path(tempfile.gettempdir()) / f"nfcourse-blockers-{os.getuid()}"
    root.mkdir(mode=0o755, exist_ok=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    if path.suffix == ".py" or path.is_file():
        target = root / f"{name}-{digest}.py"
        final = target
    else:
        target = root / f"{name}-{digest}"
        final = target / "__init__.py"
    if not final.is_file():
        tmp = Path(tempfile.mkdtemp(dir=root))
        (tmp / "__init__.py").write_text(text)
        try:
            if final == target:
                os.replace(tmp / "__init__.py", target)
                tmp.rmdir()
            else:
                tmp.chmod(0o755)
                os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another grader made it first
    return target


def python_paths() -> list[Path]:
    """Folders the interpreter and its packages live in (bound read-only)."""
    import site

    import nfcourse

    # Not every sys.path entry: a test runner or a notebook may have put the course root
    # itself there, and binding it would show solutions/ and the gradebook.
    paths = {Path(sys.base_prefix), Path(sys.prefix), Path(nfcourse.__file__).resolve().parent}
    paths.add(Path(sys.executable).resolve().parent.parent)
    paths.update(Path(p) for p in site.getsitepackages() if Path(p).exists())
    # keep the outermost folders only
    out: list[Path] = []
    for p in sorted(paths, key=lambda q: len(q.parts)):
        if not any(p == q or q in p.parents for q in out):
            out.append(p)
    return out


@dataclass
class Sandbox:
    """The command-line wrapper for one sandboxed process (see the module docstring).

    ``workdir`` is the working directory, bound read-write (``scratch``, when given, is the
    folder bound there instead: the sandbox sees the path, not the folder); with ``seed``,
    ``workdir`` is instead a tmpfs of ``limits.work_mb`` inside the sandbox, filled at start
    with a copy of the regular files of ``seed`` (bound read-only at :data:`SEED_MOUNT`), so
    nothing the sandbox writes there lands on the host's disk or is read back.
    ``readwrite`` adds other read-write folders (the kernel's sockets); ``readonly`` adds
    folders such as the data set. ``env`` is the whole environment inside, on top of a
    minimal one.

    Example:
        >>> box = Sandbox(workdir="/srv/alice", seed="/srv/alice")   # doctest: +SKIP
        >>> subprocess.run(box.wrap(["ls"]))   # the copy, in a 256 MB tmpfs  # doctest: +SKIP
    """

    workdir: Path
    scratch: Path | None = None
    readonly: Sequence[str | os.PathLike] = ()
    readwrite: Sequence[str | os.PathLike] = ()
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    gpu: bool | None = None  # None: bind the NVIDIA devices when this machine has them
    seed: Path | None = None
    #: (source, dest) folders bound read-only over ``dest`` after the python paths (a
    #: lesson's grading edition of ``nfcourse`` over the package's folder); later ones win
    overlays: Sequence[tuple[str | os.PathLike, str | os.PathLike]] = ()
    #: folders or files made unusable inside (third-party flow libraries): each is covered
    #: by a read-only stand-in whose import fails (see :func:`blocker_for`)
    hidden: Sequence[str | os.PathLike] = ()

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        if self.seed is not None:
            self.seed = Path(self.seed).resolve()
            if self.scratch is not None:
                raise ValueError("Sandbox: give seed (a tmpfs workdir) or scratch, not both")
            if not self.seed.is_dir():
                raise ValueError(f"Sandbox: seed {self.seed} is not a folder")
        self._cgroups: _CGroups | None = None

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command that runs inside the sandbox (creates its cgroups)."""
        bwrap = _bwrap()
        if bwrap is None:
            raise SandboxUnavailable("; ".join(isolation_problems()))
        if self._cgroups is None:
            self._cgroups = _CGroups(f"nfcourse-{uuid.uuid4().hex[:12]}", self.limits)
        args = [bwrap, "--unshare-all", "--die-with-parent", "--new-session",
                "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox",
                "--dev", "/dev", "--proc", "/proc",
                "--size", str(self.limits.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp",
                "--dir", "/tmp/home", "--clearenv"]
        for d in SYSTEM_DIRS:
            if os.path.islink(d):
                args += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                args += ["--ro-bind", d, d]
        for name in ETC_FILES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        for p in [*python_paths(), *self.readonly]:
            args += ["--ro-bind", str(p), str(p)]
        for src, dest in self.overlays:
            args += ["--ro-bind", str(src), str(dest)]
        for p in self.hidden:
            args += ["--ro-bind", str(blocker_for(Path(p))), str(p)]
        if self.seed is not None:
            # the copy happens inside (``_seed_copy``): the grader reads nothing back
            args += ["--ro-bind", str(self.seed), SEED_MOUNT,
                     "--size", str(self.limits.work_mb * 1024 * 1024),
                     "--tmpfs", str(self.workdir)]
        else:
            args += ["--bind", str(self.scratch or self.workdir), str(self.workdir)]
        for p in self.readwrite:
            args += ["--bind", str(p), str(p)]
        if self.gpu is not False:
            for dev in sorted(Path("/dev").glob("nvidia*")):
                args += ["--dev-bind", str(dev), str(dev)]
        # Everything not bound read-write above (the mount points bubblewrap made on its
        # own root) becomes read-only.
        args += ["--remount-ro", "/"]
        env = {k: os.environ[k] for k in ENV_ALLOWED if k in os.environ}
        env.update({
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp/home",
            "TMPDIR": "/tmp",
            "MPLCONFIGDIR": "/tmp/home/.matplotlib",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
        })
        env.update(self.env)
        for key, value in env.items():
            args += ["--setenv", key, str(value)]
        args += ["--chdir", str(self.workdir), "--"]
        limits = ["prlimit", f"--fsize={self.limits.file_mb * 1024 * 1024}",
                  f"--nofile={self.limits.open_files}", "--core=0", "--"]
        seed = _seed_copy() if self.seed is not None else []
        return [*self._cgroups.enter_prefix(), *args, *limits, *seed, *argv]

    def kill_strays(self, keep: Sequence[int]) -> int:
        """Kill every process in the sandbox but ``keep`` (the kernel and its launchers):
        nothing a cell started (a fork bomb's children) outlives it. Returns how many."""
        if self._cgroups is None:
            return 0
        return _kill([pid for pid in self._cgroups.pids() if pid not in keep])

    def close(self) -> None:
        """Kill whatever is left in the sandbox and remove its cgroups."""
        if self._cgroups is not None:
            self._cgroups.kill_and_remove()
            self._cgroups = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
