"""The ``nfcourse`` command: every subcommand runs in fast mode with tiny step counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from nfcourse import cli

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setenv("NFCOURSE_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if not os.environ.get("NFCOURSE_DATA") and SHARED_DATA.is_dir():
        monkeypatch.setenv("NFCOURSE_DATA", str(SHARED_DATA))
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _have_mnist() -> bool:
    from nfcourse.data.mnist import find_mnist

    return find_mnist("train") is not None and find_mnist("test") is not None


@pytest.fixture
def image(tmp_path) -> Path:
    im = Image.new("RGB", (48, 48), "white")
    draw = ImageDraw.Draw(im)
    draw.ellipse((6, 6, 42, 42), outline="black", width=5)
    draw.rectangle((20, 14, 28, 34), fill="black")
    path = tmp_path / "logo.png"
    im.save(path)
    return path


def test_console_script_is_declared_and_runs():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("nfcourse") == "nfcourse.cli:main"
    done = subprocess.run(
        [sys.executable, "-m", "nfcourse.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "nfcourse" in done.stdout


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "doctor" in capsys.readouterr().out


def test_doctor_reports_versions_device_data_and_widgets(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for word in (
        "python",
        "torch",
        "nfcourse",
        "nbgrader",
        "jupyterlab",
        "device",
        "MNIST train",
        "widget extension",
        "grading sandbox",
    ):
        assert word in out


def test_doctor_names_what_the_grading_sandbox_lacks(capsys, monkeypatch):
    import nfcourse.grade.sandbox as sandbox

    monkeypatch.setattr(sandbox, "isolation_problems", lambda: ["bubblewrap is missing"])
    assert cli.main(["doctor"]) == 0  # a warning: students do not need it
    out = capsys.readouterr().out
    assert "NOT available" in out and "cannot sandbox submissions here: bubblewrap" in out


def test_doctor_fails_when_a_required_package_is_missing(capsys, monkeypatch):
    real = cli._version
    monkeypatch.setattr(cli, "_version", lambda d: None if d == "torchdiffeq" else real(d))
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "torchdiffeq is not installed" in out


def test_train_two_moons_writes_metrics_and_resumes(tmp_path, capsys):
    out = tmp_path / "moons"
    assert (
        cli.main(
            ["train", "two-moons", "--steps", "6", "--out", str(out), "--device", "cpu", "--quiet"]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["unit"] == "nats" and metrics["fast_mode"]
    assert (out / "checkpoint.pt").is_file() and (out / "samples.png").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json", "samples.png"]
    # the checkpoint is picked up: 4 more steps, the history keeps the first 6
    assert (
        cli.main(
            [
                "train",
                "two-moons",
                "--steps",
                "10",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--quiet",
                "--no-figure",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 10 and len(metrics["history"]["loss"]) == 10
    assert "resuming" in capsys.readouterr().out
    # a corrupt checkpoint is a clear error, --fresh starts over
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert cli.main(["train", "two-moons", "--steps", "2", "--out", str(out), "--quiet"]) == 1
    assert "corrupt" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "train",
                "two-moons",
                "--steps",
                "2",
                "--out",
                str(out),
                "--quiet",
                "--fresh",
                "--no-figure",
            ]
        )
        == 0
    )


@pytest.mark.parametrize("recipe", ["mnist-simple", "mnist-vardeq", "mnist-multiscale", "glow"])
def test_train_image_recipes(recipe, tmp_path):
    if not _have_mnist():
        pytest.skip("MNIST files not found (set NFCOURSE_DATA)")
    out = tmp_path / recipe
    args = [
        "train",
        recipe,
        "--steps",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        "--batch-size",
        "16",
    ]
    if recipe != "glow":
        args.append("--no-figure")
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unit"] == "bits/dim" and metrics["steps"] == 2
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2


def test_train_cnf_recipes(tmp_path, image):
    for recipe, extra in (("cnf-moons", []), ("cnf-image", ["--image", str(image)])):
        out = tmp_path / recipe
        assert (
            cli.main(
                [
                    "train",
                    recipe,
                    "--steps",
                    "2",
                    "--out",
                    str(out),
                    "--device",
                    "cpu",
                    "--quiet",
                    "--no-figure",
                    *extra,
                ]
            )
            == 0
        )
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == 2 and metrics["unit"] == "nats"


def test_train_cnf_image_without_the_image_is_a_clear_error(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "cnf-image",
            "--image",
            str(tmp_path / "nope.png"),
            "--out",
            str(tmp_path / "x"),
            "--quiet",
        ]
    )
    assert code == 2 and "not found" in capsys.readouterr().err


def test_image_points_come_from_the_image(image):
    pts = cli.image_points(image, 2000, seed=0)
    assert pts.shape == (2000, 2) and torch.isfinite(pts).all()
    assert torch.equal(pts, cli.image_points(image, 2000, seed=0))
    assert cli.default_image().is_file()


@pytest.mark.parametrize("layers", [False, True])
def test_gif(tmp_path, image, layers):
    out = tmp_path / "morph.gif"
    args = [
        "gif",
        "--image",
        str(image),
        "--out",
        str(out),
        "--steps",
        "3",
        "--frames",
        "8",
        "--points",
        "200",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert cli.main(args + (["--layers"] if layers else [])) == 0
    with Image.open(out) as im:
        assert im.format == "GIF"
        # the discrete flow has 4 layers in fast mode: 8 // 4 = 2 frames per layer, plus one
        assert im.n_frames == (2 * 4 + 1 if layers else 8)


def test_gif_with_a_missing_image(tmp_path, capsys):
    assert (
        cli.main(["gif", "--image", str(tmp_path / "none.png"), "--out", str(tmp_path / "m.gif")])
        == 2
    )
    assert "not found" in capsys.readouterr().err


def test_grade_delegates_every_argument(monkeypatch):
    import nfcourse.grade.cli as grade_cli

    seen = []
    monkeypatch.setattr(grade_cli, "main", lambda argv: seen.append(argv) or 3)
    assert cli.main(["grade", "autograde", "01_two_moons_realnvp", "--force", "-v"]) == 3
    assert seen == [["autograde", "01_two_moons_realnvp", "--force", "-v"]]


def test_grade_without_the_grading_package_is_a_clear_error(monkeypatch, capsys):
    def fail(name):
        raise ImportError("No module named 'nbgrader'")

    monkeypatch.setattr(cli.importlib, "import_module", fail)
    assert cli.main(["grade", "status"]) == 2
    assert "grading is unavailable" in capsys.readouterr().err
