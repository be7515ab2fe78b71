"""Shared pieces of the GPU benchmarks: machine description, MNIST, clocks, scoring, tables.

Imported by ``mnist_multiscale.py`` and ``glow_vs_normflows.py`` (run as scripts, so this
folder is on ``sys.path``).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nfcourse.data import mnist
from nfcourse.train import atomic_write_json

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def machine() -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo, with the thread count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def header(title: str) -> list[str]:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        title,
        f"machine: {machine()}",
        f"date: {now}; torch {torch.__version__}; python {platform.python_version()}",
    ]


def load_mnist(n_train: int | None, n_test: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST train and test images (uint8, N x 1 x 28 x 28), through ``nfcourse.data``.

    ``$NFCOURSE_DATA`` decides where; without it the shared copy next to the repository is
    used when present (19,690 training and 10,000 test images). Never downloads.
    """
    root = os.environ.get("NFCOURSE_DATA")
    if root is None and SHARED_MNIST.is_dir():
        root = str(SHARED_MNIST)
    train = mnist("train", root, download=False)[0]
    test = mnist("test", root, download=False)[0]
    return train[:n_train], test[:n_test]


def warm_up_imports() -> None:
    """Pay PyTorch's one-off lazy imports (the first optimizer imports torch._dynamo: about
    2 s on a CPU) before any clock starts, so the recipe that runs first is not charged."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 10) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after two untimed warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class TrainClock:
    """Training time that leaves out the time spent scoring the model.

    ``now()`` is seconds of training so far; ``paused()`` brackets evaluations.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()
        self.excluded = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def pause(self) -> float:
        sync(self.device)
        self._paused_at = time.perf_counter()
        return self.now()

    def resume(self) -> None:
        self.excluded += time.perf_counter() - self._paused_at


@torch.no_grad()
def test_bpd(
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    device: torch.device,
    batch: int = 1000,
    seed: int = 0,
) -> float:
    """Mean bits per dimension of ``images`` (one dequantization sample each, fixed seed):
    ``-log2 p(x) / D`` with ``log_prob`` the model's log-likelihood of integer pixels."""
    dims = images[0].numel()
    total = 0.0
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(0, len(images), batch):
            x = images[i : i + batch].to(device)
            total += float(-log_prob(x).double().sum())
    return total / (len(images) * dims * math.log(2))


def first_time_at_or_below(curve: Sequence[dict[str, float]], bpd: float) -> float | None:
    for point in curve:
        if point["bpd"] <= bpd:
            return point["seconds"]
    return None


def steady_images_per_s(curve: Sequence[dict[str, float]]) -> float:
    """Images per second between the first and the last evaluation (leaves out start-up:
    compilation, cuDNN's algorithm search, the first DataLoader workers)."""
    if len(curve) < 2 or curve[-1]["seconds"] <= curve[0]["seconds"]:
        last = curve[-1]
        return last["images"] / max(last["seconds"], 1e-9)
    a, b = curve[0], curve[-1]
    return (b["images"] - a["images"]) / (b["seconds"] - a["seconds"])


def fmt(value: float | None, spec: str, missing: str = "not reached") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table (pastes into benchmarks/README.md as it is)."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [
        line(r) for r in rows
    ]


def write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        atomic_write_json(path, result)
        print(f"results written to {path}")
