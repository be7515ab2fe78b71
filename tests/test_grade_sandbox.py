"""The sandbox on its own: what a process inside sees, reaches and may use.

Each test runs a short Python program through ``Sandbox.wrap`` and reads what it printed.
Without bubblewrap or writable cgroups these tests skip (CI installs bubblewrap and runs
as root, so there they run; ``CI=true`` turns the skip into a failure).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nfcourse.grade import commands
from nfcourse.grade.sandbox import Limits, Sandbox, SandboxUnavailable, isolation_problems

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _need_isolation():
    problems = isolation_problems()
    if problems:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but no sandbox: " + "; ".join(problems))
        pytest.skip("no sandbox here: " + "; ".join(problems))


def run(tmp_path: Path, code: str, limits: Limits | None = None, timeout: float = 60, **kw):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    with Sandbox(workdir=work, limits=limits or Limits(), **kw) as box:
        return subprocess.run(box.wrap([sys.executable, "-c", textwrap.dedent(code)]),
                              capture_output=True, text=True, timeout=timeout)


def test_sees_only_what_it_needs(tmp_path):
    result = run(tmp_path, f"""
        import os
        print(os.getuid(), os.getcwd())
        for path in [{str(REPO / 'solutions')!r}, {str(REPO / 'grading')!r},
                     {str(tmp_path)!r} + '/secret.txt', '/etc/shadow', '/root/.ssh']:
            print(path, os.path.exists(path))
        import nfcourse, torch  # the package and the environment are there
        print('imports ok')
    """)
    (tmp_path / "secret.txt").write_text("x")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"65534 {tmp_path / 'work'}"
    assert all(line.endswith("False") for line in lines[1:6]), lines
    assert lines[6] == "imports ok"


def test_environment_is_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTOR_TOKEN", "hunter2")
    result = run(tmp_path, "import os; print(sorted(os.environ))", env={"NFCOURSE_FAST": "1"})
    assert "INSTRUCTOR_TOKEN" not in result.stdout and "NFCOURSE_FAST" in result.stdout


def test_no_network(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        result = run(tmp_path, f"""
            import socket
            try:
                socket.create_connection(('127.0.0.1', {port}), timeout=2)
                print('connected')
            except OSError as error:
                print('refused', type(error).__name__)
        """)
    finally:
        server.close()
    assert result.stdout.startswith("refused"), result.stdout + result.stderr


def test_writes_stay_in_scratch_and_cannot_escape(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = run(tmp_path, f"""
        open('mine.txt', 'w').write('ok')
        for path in [{str(tmp_path / 'escape.txt')!r}, '/usr/escape.txt']:
            try:
                open(path, 'w').write('x')
                print('WROTE', path)
            except OSError as error:
                print('no', type(error).__name__)
    """, scratch=scratch)
    # (a path under /tmp may be "written" into the sandbox's own /tmp: the real one is not)
    assert "WROTE /usr" not in result.stdout, result.stdout
    assert (scratch / "mine.txt").read_text() == "ok"
    assert not (tmp_path / "work" / "mine.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_process_cap_stops_a_fork_bomb(tmp_path):
    result = run(tmp_path, """
        import os, time
        children = 0
        try:
            for _ in range(500):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
        except OSError as error:
            print('stopped after', children, type(error).__name__)
    """, limits=Limits(processes=40))
    assert "stopped after" in result.stdout, result.stdout + result.stderr
    assert int(result.stdout.split()[2]) < 40


def test_memory_cap_kills_a_memory_bomb(tmp_path):
    result = run(tmp_path, "hog = b'x' * (2 * 1024**3)\nprint('survived')",
                 limits=Limits(memory_mb=256))
    assert result.returncode != 0 and "survived" not in result.stdout


def test_file_size_cap(tmp_path):
    result = run(tmp_path, """
        try:
            with open('big', 'wb') as f:
                f.write(b'x' * (3 * 1024 * 1024))
            print('wrote')
        except OSError as error:
            print('capped', type(error).__name__)
    """, limits=Limits(file_mb=1))
    assert "wrote" not in result.stdout


def test_cgroups_are_removed(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    box = Sandbox(workdir=work)
    subprocess.run(box.wrap(["true"]), check=True)
    dirs = list(box._cgroups.dirs)
    assert all(d.exists() for d in dirs)
    box.close()
    assert not any(d.exists() for d in dirs)


def test_grading_refuses_without_isolation(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "sandbox_problems", lambda course: ["no bubblewrap"])
    course = commands.Course(REPO)
    with pytest.raises(commands.GradeError, match="--unsandboxed"):
        commands._check_isolation(course, unsandboxed=False)
    config = commands._check_isolation(course, unsandboxed=True)
    assert config.SandboxedKernelManager.enabled is False


def test_wrap_says_what_is_missing(monkeypatch, tmp_path):
    import nfcourse.grade.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_bwrap", lambda: None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        Sandbox(workdir=tmp_path).wrap(["true"])


def test_kernel_sees_a_data_folder_reached_through_a_link(tmp_path):
    """NFCOURSE_DATA may be a link, even one under /tmp (which the sandbox replaces): the
    kernel is told the real folder and can read it, or a lesson would train on other data."""
    import asyncio

    from nfcourse.grade.kernel import SandboxedKernelManager, resolved_data_folder

    real = tmp_path / "real"
    real.mkdir()
    (real / "t10k-images-idx3-ubyte.gz").write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert resolved_data_folder({"NFCOURSE_DATA": str(link)}) == str(real.resolve())
    work = tmp_path / "work"
    work.mkdir()

    async def ask() -> str:
        km = SandboxedKernelManager(kernel_name="python3")
        await km.start_kernel(cwd=str(work), env={**os.environ, "NFCOURSE_DATA": str(link)})
        kc = km.client()
        kc.start_channels()
        printed: list[str] = []
        try:
            await kc.wait_for_ready(timeout=60)
            await kc.execute_interactive(
                "import os\nroot = os.environ['NFCOURSE_DATA']\nprint(root, os.listdir(root))",
                timeout=60, output_hook=lambda msg: printed.append(
                    msg["content"].get("text", "") if msg["msg_type"] == "stream" else ""))
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
        return "".join(printed)

    assert asyncio.run(ask()).strip() == f"{real.resolve()} ['t10k-images-idx3-ubyte.gz']"


def test_seeded_workdir_is_a_capped_tmpfs(tmp_path):
    """With ``seed`` the workdir is a tmpfs holding a copy of the seed's regular files:
    writes stop at ``work_mb`` and none of them reaches the host folder."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notebook.ipynb").write_text("{}")
    (work / "link").symlink_to("/etc/passwd")
    with Sandbox(workdir=work, seed=work, limits=Limits(work_mb=8)) as box:
        result = subprocess.run(box.wrap([sys.executable, "-c", textwrap.dedent("""
            import os
            print(sorted(os.listdir('.')))
            written = 0
            try:
                for i in range(10):
                    with open(f'fill-{i}', 'wb') as f:
                        f.write(b'x' * (2 * 1024 * 1024))
                    written += 2
            except OSError as error:
                print('stopped', written, type(error).__name__)
        """)]), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "['notebook.ipynb']", lines
    assert lines[1].startswith("stopped") and int(lines[1].split()[1]) <= 8, lines
    assert sorted(os.listdir(work)) == ["link", "notebook.ipynb"]


def test_seed_and_scratch_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        Sandbox(workdir=tmp_path, seed=tmp_path, scratch=tmp_path)


def test_kernel_environment_is_an_exact_allow_list():
    from nfcourse.grade.kernel import SandboxedKernelManager, passed_env

    env = {"NFCOURSE_FAST": "1", "NFCOURSE_SECRET": "s", "JPY_API_TOKEN": "t",
           "TQDM_DISABLE": "1", "TQDM_MININTERVAL": "9", "MY_VAR": "v"}
    assert passed_env(env) == {"NFCOURSE_FAST": "1", "TQDM_DISABLE": "1"}
    km = SandboxedKernelManager(kernel_name="python3", passed_env=["MY_VAR"])
    assert passed_env(env, km.allowed_env()) == {"NFCOURSE_FAST": "1", "TQDM_DISABLE": "1",
                                                 "MY_VAR": "v"}


def test_kernel_socket_folder_is_locked_and_sockets_are_limited(tmp_path):
    """Once the kernel is up its socket folder takes no new file (as root it belongs to
    nobody), and the grader's sockets refuse large frames and queue few messages."""
    import asyncio

    import zmq

    from nfcourse.grade.kernel import SandboxedKernelManager

    work = tmp_path / "work"
    work.mkdir()

    async def probe() -> tuple[str, dict, int]:
        km = SandboxedKernelManager(kernel_name="python3", max_message_mb=3, receive_queue=2)
        await km.start_kernel(cwd=str(work), env=dict(os.environ))
        kc = km.client()
        kc.start_channels()
        printed: list[str] = []
        folder = km._socket_dir
        try:
            await kc.wait_for_ready(timeout=60)
            sockets = {name: (getattr(kc, f"{name}_channel").socket.getsockopt(zmq.MAXMSGSIZE),
                              getattr(kc, f"{name}_channel").socket.getsockopt(zmq.RCVHWM))
                       for name in ("shell", "iopub", "stdin", "control")}
            owner = folder.stat().st_uid
            await kc.execute_interactive(
                f"import os\ntry:\n    open({str(folder / 'x')!r}, 'w').write('x')\n"
                "    print('wrote')\nexcept OSError as e:\n    print(type(e).__name__)\n",
                timeout=60, output_hook=lambda msg: printed.append(
                    msg["content"].get("text", "") if msg["msg_type"] == "stream" else ""))
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
        assert not folder.exists()
        return "".join(printed).strip(), sockets, owner

    printed, sockets, owner = asyncio.run(probe())
    assert printed == "PermissionError", printed
    assert set(sockets.values()) == {(3 * 1024 * 1024, 2)}, sockets
    if os.geteuid() == 0:
        assert owner == 65534
