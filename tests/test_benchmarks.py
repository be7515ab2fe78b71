"""The GPU benchmarks' --smoke mode: each script runs a tiny CPU configuration end to end and
prints its whole table, so the scripts cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nfcourse.data.mnist import find_mnist

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"

pytestmark = pytest.mark.xdist_group("benchmarks")


def _data_root() -> str:
    root = os.environ.get("NFCOURSE_DATA") or str(SHARED_MNIST)
    if not (find_mnist("train", root) and find_mnist("test", root)):
        pytest.skip(f"no MNIST files in {root} (set NFCOURSE_DATA)")
    return root


def _run(script: str, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "result.json"
    env = {**os.environ, "NFCOURSE_DATA": _data_root(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out),
         *extra],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def _table(stdout: str) -> tuple[list[str], list[list[str]]]:
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("|") and not line.startswith("|-")
    ]
    return rows[0], rows[1:]


def _check_header(stdout: str) -> None:
    assert "machine: " in stdout and "date: " in stdout and "torch " in stdout
    assert "ratios (nfcourse vs " in stdout


def test_mnist_multiscale_smoke(tmp_path):
    proc, result = _run("mnist_multiscale.py", tmp_path)
    _check_header(proc.stdout)
    columns, rows = _table(proc.stdout)
    assert columns == ["recipe", "batch", "steps", "train images/s", "test bpd at budget",
                       "time to target bpd (s)", "sample 64 (ms)",
                       "importance bpd k=8, 64 images (ms)"]
    assert [r[0] for r in rows] == ["nfcourse", "conventional"]
    for row in rows:
        assert all(cell for cell in row), row
        assert float(row[3]) > 0 and float(row[4]) > 0 and float(row[6]) > 0
    for name in ("nfcourse", "conventional"):
        recipe = result["recipes"][name]
        assert recipe["steps"] > 0 and recipe["curve"], name
        assert recipe["sample_s"] > 0 and recipe["importance_s"] > 0
    # the conventional recipe reaches its own final bpd by definition of the default target
    assert result["recipes"]["conventional"]["time_to_target"] is not None
    assert result["speedup_images_per_s"] > 0


def test_glow_vs_normflows_smoke(tmp_path):
    pytest.importorskip("normflows")
    proc, result = _run("glow_vs_normflows.py", tmp_path)
    _check_header(proc.stdout)
    columns, rows = _table(proc.stdout)
    assert columns == ["implementation", "parameters", "steps", "train images/s",
                       "test bpd at budget", "best test bpd"]
    assert [r[0] for r in rows] == ["nfcourse", "normflows"]
    for row in rows:
        assert float(row[3]) > 0 and float(row[4]) > 0
    ours, theirs = (int(r[1].replace(",", "")) for r in rows)
    assert abs(ours - theirs) <= 0.2 * ours  # "of similar size"
    assert result["recipes"]["normflows"]["steps"] > 0


def test_glow_vs_normflows_without_normflows_exits_2(tmp_path):
    # A sitecustomize-free way to hide the package: a module of that name that fails to import
    (tmp_path / "normflows.py").write_text("raise ImportError('hidden for the test')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "glow_vs_normflows.py"), "--smoke"],
        capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "pip install --no-deps normflows" in proc.stderr
