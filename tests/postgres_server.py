"""A throwaway PostgreSQL server for tests, from the distribution's own binaries.

``postgres_server()`` runs ``initdb`` into a fresh temporary folder, starts the server on a
free port of 127.0.0.1 (trust authentication, no other address), creates one database and
yields its URL; on exit it stops the server and deletes the folder, also when the body
raised::

    from postgres_server import postgres_server

    with postgres_server() as url:  # 'postgresql://nfcourse@127.0.0.1:PORT/nfcourse'
        Gradebook(url, course_id="nfcourse")

The binaries are Debian's (``apt-get install postgresql``): the highest version under
``/usr/lib/postgresql/*/bin``, or the folder named by ``NFCOURSE_PG_BINDIR``. Without them,
:class:`PostgresUnavailable` says what to install; a server that does not come up raises
:class:`PostgresStartupError` with the tail of its log.

PostgreSQL refuses to run as root. Run as root (CI, containers), the helper runs the server
as the ``postgres`` system user that Debian's package creates and hands the temporary
folder to it; run as anyone else, the server runs as that user.

Durability is switched off (``fsync``, ``synchronous_commit``, ``full_page_writes``): the data
lives for one test session, and startup plus teardown stay around a second.

This module is plain Python (no pytest): ``tests/grading/pg_fixture.py`` wraps it in the
``postgres_url`` fixture.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "APT_INSTALL",
    "PostgresStartupError",
    "PostgresUnavailable",
    "create_database",
    "find_bindir",
    "postgres_server",
]

APT_INSTALL = "apt-get update && apt-get install -y postgresql"
SEARCH_ROOT = Path("/usr/lib/postgresql")
SERVICE_USER = "postgres"
# The settings every throwaway server gets; ``postgres_server(settings=...)`` adds to them.
BASE_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "'16MB'",
    "max_connections": "50",
}
LOG_TAIL_LINES = 30


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine (or no user to run them as)."""


class PostgresStartupError(RuntimeError):
    """``initdb``, the server or ``createdb`` failed; the message carries their output."""


def _version_key(path: Path) -> tuple[int, ...]:
    """``/usr/lib/postgresql/15`` -> ``(15,)``, ``.../9.6`` -> ``(9, 6)``: compare as numbers."""
    return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (-1,)


def find_bindir(search_root: Path = SEARCH_ROOT) -> Path:
    """The ``bin`` folder holding ``initdb`` and ``pg_ctl``: ``NFCOURSE_PG_BINDIR`` if set,
    else the highest version under ``search_root``.

    >>> find_bindir()  # doctest: +SKIP
    PosixPath('/usr/lib/postgresql/15/bin')
    """
    override = os.environ.get("NFCOURSE_PG_BINDIR")
    candidates = [Path(override)] if override else [
        version / "bin" for version in sorted(search_root.glob("*"), key=_version_key, reverse=True)
    ]
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "createdb")):
            return bindir
    where = f"NFCOURSE_PG_BINDIR={override}" if override else f"{search_root}/*/bin"
    raise PostgresUnavailable(
        f"no PostgreSQL server binaries (initdb, pg_ctl, createdb) in {where}; "
        f"install Debian's server package: {APT_INSTALL}"
    )


def _service_user() -> pwd.struct_passwd | None:
    """Whom to run the server as: ``postgres`` when we are root (the server refuses root),
    else nobody in particular (``None``: ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, and PostgreSQL refuses to run as root, but there is no "
            f"'{SERVICE_USER}' user to run it as (Debian's postgresql package creates one; "
            f"otherwise: useradd --system --user-group --no-create-home {SERVICE_USER})"
        ) from None


def _free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class _Runner:
    """Runs the PostgreSQL tools as the service user, with no ``PG*`` variables leaking in."""

    def __init__(self, bindir: Path, user: pwd.struct_passwd | None, cwd: Path):
        self.bindir, self.user, self.cwd = bindir, user, cwd
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env["LC_ALL"] = "C"
        if user is not None:
            self.env.update(HOME=str(cwd), USER=user.pw_name, LOGNAME=user.pw_name)

    def __call__(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        return subprocess.run(
            [str(self.bindir / tool), *args], cwd=self.cwd, env=self.env, timeout=timeout,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs,
        )


def _check(result: subprocess.CompletedProcess, what: str, log: Path | None = None) -> None:
    if result.returncode == 0:
        return
    message = f"{what} failed (exit {result.returncode}):\n{result.stdout.strip()}"
    if log is not None:
        message += f"\n--- last lines of the server log {log} ---\n{_tail(log)}"
    raise PostgresStartupError(message)


def create_database(url: str, dbname: str) -> str:
    """Create ``dbname`` on the throwaway server behind ``url``; return its URL.

    Only for servers from :func:`postgres_server` (it reuses their binaries and user).

    >>> create_database("postgresql://nfcourse@127.0.0.1:5433/nfcourse", "other")  # doctest: +SKIP
    'postgresql://nfcourse@127.0.0.1:5433/other'
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", dbname):
        raise ValueError(f"database name {dbname!r}: use lowercase letters, digits, underscores")
    m = re.fullmatch(r"postgresql://(\w+)@127\.0\.0\.1:(\d+)/\w+", url)
    if m is None:
        raise ValueError(f"{url!r} is not a URL from postgres_server()")
    user, port = m.groups()
    run = _Runner(find_bindir(), _service_user(), Path(tempfile.gettempdir()))
    _check(run("createdb", "-h", "127.0.0.1", "-p", port, "-U", user, dbname), "createdb")
    return f"postgresql://{user}@127.0.0.1:{port}/{dbname}"


def _start(run: _Runner, data: Path, log: Path, attempts: int = 3) -> int:
    """Start the server on a free port; retry on another port when one was taken meanwhile.

    Returns the port."""
    for attempt in range(attempts):
        port = _free_port()
        result = run("pg_ctl", "start", "-w", "-t", "60", "-D", str(data), "-l", str(log),
                     "-o", f"-p {port}", timeout=90)
        if result.returncode == 0:
            return port
        taken = "could not bind" in _tail(log) or "already in use" in _tail(log)
        if not taken or attempt == attempts - 1:
            _check(result, "pg_ctl start", log)
    raise AssertionError("unreachable")


def _alive(pid: int) -> bool:
    """Is ``pid`` a running process (not gone, not a zombie waiting for its parent)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # The state follows the parenthesised command name: 'Z' is a zombie.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop(run: _Runner, data: Path, timeout: float = 30) -> None:
    """Fast shutdown, then wait until the postmaster process is gone; kill it if that does
    not happen in ``timeout`` seconds (the folder is deleted either way)."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return  # never started, or already stopped
    run("pg_ctl", "stop", "-w", "-t", str(int(timeout)), "-m", "fast", "-D", str(data),
        timeout=timeout + 30)
    # pg_ctl returns when the pid file is gone, a moment before the process itself.
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)  # its children exit when the postmaster is gone


@contextmanager
def postgres_server(
    dbname: str = "nfcourse",
    user: str = "nfcourse",
    base_dir: str | os.PathLike | None = None,
    settings: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """A running throwaway server; yields ``postgresql://USER@127.0.0.1:PORT/DBNAME``.

    ``user`` is the server's superuser (trust authentication, no password); ``base_dir`` is
    where the temporary folder goes (default: the system's temporary folder; when running as
    root the ``postgres`` user must be able to enter it); ``settings`` are extra
    ``postgresql.conf`` lines, values as PostgreSQL writes them (``{"work_mem": "'8MB'"}``).

    Everything is removed on exit: server stopped, temporary folder deleted.
    """
    for name, value in (("dbname", dbname), ("user", user)):
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
            raise ValueError(f"{name} {value!r}: use lowercase letters, digits, underscores")
    bindir = find_bindir()
    service_user = _service_user()
    root = Path(tempfile.mkdtemp(prefix="nfcourse-pg-", dir=base_dir))
    data, log = root / "data", root / "server.log"
    run = _Runner(bindir, service_user, root)
    try:
        if service_user is not None:
            os.chown(root, service_user.pw_uid, service_user.pw_gid)
        _check(run("initdb", "-D", str(data), "-U", user, "--auth=trust", "--no-sync",
                   "--encoding=UTF8", "--locale=C"), "initdb")
        conf = {**BASE_SETTINGS, "unix_socket_directories": f"'{root}'", **(settings or {})}
        with open(data / "postgresql.conf", "a") as f:
            f.write("\n# nfcourse test server\n")
            f.writelines(f"{key} = {value}\n" for key, value in conf.items())
        # Trust on 127.0.0.1 only: no socket logins, no other address.
        (data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        port = _start(run, data, log)
        _check(run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", user, dbname),
               "createdb", log)
        yield f"postgresql://{user}@127.0.0.1:{port}/{dbname}"
    finally:
        try:
            _stop(run, data)  # also after a failed or timed-out start: no orphan server
        finally:
            shutil.rmtree(root, ignore_errors=True)
