"""The ``nfcourse`` command.

* ``nfcourse doctor``: versions, device, data and the widget extension, one line per problem.
* ``nfcourse train RECIPE``: train a reference model (two-moons, mnist-simple, mnist-vardeq,
  mnist-multiscale, glow, cnf-moons, cnf-image) with a progress bar; writes a checkpoint,
  ``metrics.json`` and ``samples.png`` into ``--out`` and resumes from the checkpoint when
  it is there.
* ``nfcourse gif --image PATH --out morph.gif``: train a continuous flow on the density of an
  image (dark pixels carry the mass) and write the GIF of noise flowing into it.
* ``nfcourse grade ...``: grading (see ``nfcourse grade --help``).

``NFCOURSE_FAST=1`` shrinks models, data and steps so that every command runs in seconds.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfcourse import __version__
from nfcourse.config import data_root, fast_mode

__all__ = ["main", "build_parser", "RECIPES", "doctor"]


# ------------------------------------------------------------------------------- doctor


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


#: distribution -> (what it is for, required?)
PACKAGES: dict[str, tuple[str, bool]] = {
    "torch": ("models and training", True),
    "torchdiffeq": ("continuous flows (lesson 06)", True),
    "numpy": ("arrays", True),
    "matplotlib": ("figures", True),
    "pillow": ("GIFs", True),
    "tqdm": ("progress bars", True),
    "ipywidgets": ("sliders in the notebooks", True),
    "scikit-learn": ("two moons", True),
    "jupyterlab": ("opening the lessons (make lab)", False),
    "nbgrader": ("grading (nfcourse grade)", False),
}


def _widget_extension() -> Path | None:
    """Where JupyterLab's widget manager extension is installed, or None."""
    try:
        from jupyter_core.paths import jupyter_path
    except ImportError:
        return None
    for folder in jupyter_path("labextensions"):
        candidate = Path(folder) / "@jupyter-widgets" / "jupyterlab-manager" / "package.json"
        if candidate.is_file():
            return candidate.parent
    return None


def doctor(out=None) -> int:
    """Print what the course needs and what is missing; 1 when a required package is missing.

    Missing course extras (JupyterLab, nbgrader, the widget extension) and a missing MNIST
    are warnings: the package works without them (MNIST is downloaded on first use).
    """
    out = out or sys.stdout
    problems: list[str] = []
    missing_required = False

    def line(label: str, value: str) -> None:
        print(f"  {label:<22} {value}", file=out)

    print("nfcourse doctor", file=out)
    line("python", f"{platform.python_version()} ({sys.executable})")
    line("nfcourse", __version__)
    for dist, (purpose, required) in PACKAGES.items():
        version = _version(dist)
        line(dist, version or "MISSING")
        if version is None:
            missing_required |= required
            kind = "required" if required else "optional"
            problems.append(
                f"{dist} is not installed ({kind}: {purpose}); run `make venv` or "
                f"`pip install -e '.[course,dev]'`"
            )

    try:
        import torch

        if torch.cuda.is_available():
            device = f"cuda: {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})"
        else:
            device = f"cpu ({torch.get_num_threads()} threads); no CUDA device"
    except Exception as err:  # noqa: BLE001
        device = f"unknown ({err})"
    line("device", device)

    root = Path(data_root())
    line("data folder", f"{root} (NFCOURSE_DATA)")
    try:
        from nfcourse.data.mnist import find_mnist

        for split in ("train", "test"):
            pair = find_mnist(split)
            if pair is None:
                line(f"MNIST {split}", "not found")
                problems.append(
                    f"MNIST {split} files not found under {root}: they are downloaded on first "
                    "use, or copy the IDX files into <data folder>/mnist"
                )
            else:
                line(f"MNIST {split}", str(pair[0]))
    except ImportError as err:
        problems.append(f"nfcourse.data cannot be imported: {err}")

    ext = _widget_extension()
    line("widget extension", str(ext) if ext else "not found")
    if ext is None:
        problems.append(
            "the JupyterLab widget extension (@jupyter-widgets/jupyterlab-manager) is not "
            "installed: sliders will not show; `pip install jupyterlab_widgets`"
        )
    line("fast mode", "on (NFCOURSE_FAST)" if fast_mode() else "off")

    from nfcourse.grade.sandbox import isolation_problems

    isolation = isolation_problems()
    line("grading sandbox", "ready (bubblewrap + cgroups)" if not isolation else "NOT available")
    for problem in isolation:  # instructors only: students never need it
        problems.append(f"grading cannot sandbox submissions here: {problem}")

    if problems:
        print("\nproblems:", file=out)
        for p in problems:
            print(f"  - {p}", file=out)
    else:
        print("\nall good", file=out)
    return 1 if missing_required else 0


# -------------------------------------------------------------------------------- train


@dataclass
class Run:
    """What a recipe builds: a model, training data and the settings ``fit`` gets."""

    model: Any
    data: Any
    val_data: Any = None
    steps: int = 1000
    fit_kwargs: dict[str, Any] = field(default_factory=dict)
    figure: Callable[[Any, Any, Path], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _moons(n: int, seed: int = 0):
    from nfcourse.data.toy import two_moons

    x, _ = two_moons(n, seed=seed)
    return x


def _images(fast: bool):
    """MNIST (train, test); in fast mode a small subset (scikit-learn's digits, upscaled, when
    the MNIST files are not there), see :func:`nfcourse.data.lesson_images`."""
    from nfcourse.data import lesson_images

    data = lesson_images(512, 256) if fast else lesson_images()
    print(data.description)
    return data.train, data.test


def _points_figure(model, data, path: Path) -> None:
    from nfcourse import viz

    viz.flow_panels(model, data, n=1000).savefig(path, dpi=90)


def _images_figure(model, data, path: Path) -> None:
    import torch

    from nfcourse import viz

    with torch.no_grad():
        model.eval()
        samples = model.sample(16 if fast_mode() else 64, temperature=0.7)
    viz.image_grid(samples, nrow=8, title="samples (temperature 0.7)").savefig(path, dpi=90)


def recipe_two_moons(args) -> Run:
    from nfcourse.flows import realnvp_2d

    fast = fast_mode()
    model = realnvp_2d(num_layers=4 if fast else 6, hidden=64 if fast else 256)
    data = _moons(1000 if fast else 3000, seed=args.seed)
    val = _moons(500 if fast else 3000, seed=args.seed + 1)
    return Run(
        model,
        data,
        val,
        steps=200 if fast else 4000,
        fit_kwargs=dict(lr=1e-3, batch_size=256),
        figure=_points_figure,
    )


def _image_recipe(builder: str, fast_kwargs: dict, full_kwargs: dict, steps: int):
    def recipe(args) -> Run:
        from nfcourse import flows

        fast = fast_mode()
        model = getattr(flows, builder)(**(fast_kwargs if fast else full_kwargs))
        data, val = _images(fast)
        return Run(
            model,
            data,
            val,
            steps=20 if fast else steps,
            fit_kwargs=dict(
                lr=1e-3, batch_size=64 if fast else 128, warmup=0 if fast else 200, grad_clip=1.0
            ),
            figure=_images_figure,
        )

    return recipe


def recipe_cnf_moons(args) -> Run:
    from nfcourse.cnf import cnf_2d

    fast = fast_mode()
    model = cnf_2d(hidden=32 if fast else 64, steps=4 if fast else 8)
    data = _moons(1000 if fast else 3000, seed=args.seed)
    val = _moons(500 if fast else 2000, seed=args.seed + 1)
    return Run(
        model,
        data,
        val,
        steps=50 if fast else 2000,
        fit_kwargs=dict(lr=2e-3, batch_size=256 if fast else 512),
        figure=_points_figure,
    )


def image_points(path: str | Path, n: int, seed: int = 0):
    """``n`` 2-D points from the density of an image (dark pixels carry the mass), see
    :func:`nfcourse.data.image_density`."""
    from nfcourse.data import image_density

    x, _ = image_density(path, n, seed=seed, size=128)
    return x


def default_image() -> Path:
    """The course's logo (:func:`nfcourse.data.logo_path`)."""
    from nfcourse.data import logo_path

    return Path(logo_path())


def recipe_cnf_image(args) -> Run:
    """The continuous flow on an image's density: the recipe measured by
    ``benchmarks/cnf_gif.py`` (:data:`nfcourse.cnf.CNF_2D_TRAINING`); ``nfcourse gif`` uses it too.
    """
    from nfcourse.cnf import CNF_2D_TRAINING, cnf_2d

    image = Path(args.image) if getattr(args, "image", None) else default_image()
    if not image.is_file():
        raise FileNotFoundError(f"image {image} not found (give one with --image PATH)")
    recipe = CNF_2D_TRAINING
    return Run(
        cnf_2d(),
        image_points(image, recipe["n_points"], seed=args.seed),
        None,
        steps=recipe["steps"] if fast_mode() else recipe["steps_full"],
        fit_kwargs=dict(lr=recipe["lr"], batch_size=recipe["batch_size"]),
        figure=_points_figure,
        info={"image": str(image)},
    )


RECIPES: dict[str, Callable[[argparse.Namespace], Run]] = {
    "two-moons": recipe_two_moons,
    "mnist-simple": _image_recipe(
        "simple_image_flow", dict(num_couplings=4, hidden=8, num_layers=1), {}, 20_000
    ),
    "mnist-vardeq": _image_recipe(
        "simple_image_flow",
        dict(
            num_couplings=4,
            hidden=8,
            num_layers=1,
            vardeq=True,
            vardeq_hidden=8,
            vardeq_couplings=2,
        ),
        dict(vardeq=True),
        20_000,
    ),
    "mnist-multiscale": _image_recipe(
        "multiscale_flow",
        dict(hidden=(8, 8, 8), num_couplings=(1, 1, 1), num_layers=1, vardeq=False),
        {},
        20_000,
    ),
    "glow": _image_recipe("glow", dict(steps_per_scale=1, hidden=8, num_layers=1), {}, 20_000),
    "cnf-moons": recipe_cnf_moons,
    "cnf-image": recipe_cnf_image,
}


def _missing_module_message(err: ImportError) -> str:
    return (
        f"this recipe needs {err.name or 'a module'} which cannot be imported ({err}); "
        "is the package installed and up to date?"
    )


def cmd_train(args) -> int:
    import torch

    from nfcourse.train import CheckpointError, NonFiniteLossError, atomic_write_json, fit

    out = Path(args.out or Path("runs") / args.recipe)
    torch.manual_seed(args.seed)  # the model's initialisation
    try:
        run = RECIPES[args.recipe](args)
    except ImportError as err:
        print(f"nfcourse train: {_missing_module_message(err)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, OSError, ValueError, RuntimeError) as err:
        print(f"nfcourse train {args.recipe}: {err}", file=sys.stderr)
        return 2
    kwargs = dict(run.fit_kwargs)
    if args.batch_size:
        kwargs["batch_size"] = args.batch_size
    if args.lr:
        kwargs["lr"] = args.lr
    steps = args.steps or run.steps
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not args.fresh:
        print(f"resuming from {ckpt} (--fresh to start over)")
    print(
        f"{args.recipe}: {sum(p.numel() for p in run.model.parameters()):,} parameters, "
        f"{len(run.data):,} training points, {steps} steps -> {out}"
        + (" (fast mode)" if fast_mode() else "")
    )
    try:
        history = fit(
            run.model,
            run.data,
            steps=steps,
            device=args.device,
            seed=args.seed,
            val_data=run.val_data,
            val_every=max(1, steps // 10),
            checkpoint=ckpt,
            checkpoint_every=max(1, min(1000, steps // 5)),
            resume=False if args.fresh else None,
            progress=not args.quiet,
            desc=args.recipe,
            **kwargs,
        )
    except CheckpointError as err:
        print(f"nfcourse train: {err}\n(use --fresh to start over)", file=sys.stderr)
        return 1
    except NonFiniteLossError as err:
        print(f"nfcourse train: {err}", file=sys.stderr)
        return 1
    metrics = {
        "recipe": args.recipe,
        "fast_mode": fast_mode(),
        "steps": history.steps,
        "unit": history.unit,
        "final_train_loss": history.final_loss,
        "val_loss": history.val[-1] if history.val else None,
        "best_val_loss": history.best_val if history.val else None,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "wall_time_s": history.wall_time,
        "device": history.device,
        "checkpoint": str(ckpt),
        **run.info,
        "history": history.to_dict(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    if run.figure is not None and not args.no_figure:
        try:
            run.figure(run.model, run.data, out / "samples.png")
        except Exception as err:  # noqa: BLE001 - a picture must not fail a finished run
            print(f"(no samples.png: {type(err).__name__}: {err})", file=sys.stderr)
    val = f", validation {metrics['val_loss']:.4f}" if history.val else ""
    print(
        f"done: {history.steps} steps, train loss {history.final_loss:.4f} {history.unit}"
        f"{val}; wrote {out / 'metrics.json'}"
    )
    return 0


# ---------------------------------------------------------------------------------- gif


def cmd_gif(args) -> int:
    import torch

    from nfcourse import viz
    from nfcourse.train import fit

    image = Path(args.image) if args.image else default_image()
    if not image.is_file():
        print(f"nfcourse gif: image {image} not found", file=sys.stderr)
        return 2
    fast = fast_mode()
    torch.manual_seed(args.seed)
    if not args.layers:
        # the same recipe as `nfcourse train cnf-image`: 300 steps already draw a
        # recognisable logo (KL ~0.2 nats) in about 20 s of CPU
        run = recipe_cnf_image(argparse.Namespace(image=str(image), seed=args.seed))
        model, data, kind = run.model, run.data, "continuous flow"
        steps = args.steps or run.steps
        lr, batch_size = run.fit_kwargs["lr"], run.fit_kwargs["batch_size"]
    else:
        from nfcourse.flows import realnvp_2d

        model = realnvp_2d(num_layers=4 if fast else 8, hidden=64 if fast else 256)
        kind = "RealNVP (layer by layer)"
        data = image_points(image, 2000 if fast else 20_000, seed=args.seed)
        steps = args.steps or (50 if fast else 3000)
        lr, batch_size = 2e-3, 256 if fast else 512
    print(f"training a {kind} on {image.name} ({len(data)} points, {steps} steps)")
    fit(
        model,
        data,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        device=args.device,
        seed=args.seed,
        progress=not args.quiet,
        desc="gif",
    )
    model.cpu().eval()
    n = args.points or (2000 if fast else 3000)
    out = Path(args.out)
    t0 = time.perf_counter()
    if hasattr(model.flow, "sample_path"):
        T = float(model.flow.T)
        frames = args.frames or (24 if fast else 60)
        times = torch.linspace(T, 0.0, frames)
        z = torch.randn(n, 2, generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            states = model.flow.sample_path(z, times)
        gif = viz.ode_morph_gif(
            states, out, times=times, title=f"noise (t = {T:g}) -> {image.stem} (t = 0)"
        )
    else:
        per_layer = max(1, (args.frames or (4 if fast else 64)) // len(model.flow.layers))
        gif = viz.layer_morph_gif(
            model.flow.layers,
            n,
            out,
            frames_per_layer=per_layer,
            seed=args.seed,
            title=f"noise -> {image.stem}",
        )
    print(f"wrote {gif.path} ({gif.frames} frames, {time.perf_counter() - t0:.1f} s)")
    return 0


# -------------------------------------------------------------------------------- grade


def cmd_grade(argv: list[str]) -> int:
    try:
        grade_cli = importlib.import_module("nfcourse.grade.cli")
    except ImportError as err:
        print(
            f"nfcourse grade: grading is unavailable ({err}); install the course extras: "
            "pip install -e '.[course]'",
            file=sys.stderr,
        )
        return 2
    return int(grade_cli.main(argv) or 0)


# --------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nfcourse",
        description="The companion command of the normalizing-flows course. "
        "NFCOURSE_FAST=1 makes every command small and quick.",
    )
    parser.add_argument("--version", action="version", version=f"nfcourse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser(
        "doctor",
        help="check the installation",
        description="Print versions, the device, whether MNIST and the JupyterLab widget "
        "extension are found, and one line per problem. Exit status 1 when a required "
        "package is missing; missing extras and data are warnings (status 0).",
    )

    train = sub.add_parser(
        "train",
        help="train a reference model",
        description="Train a reference model; resumes from --out's checkpoint.",
    )
    train.add_argument("recipe", choices=sorted(RECIPES))
    train.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    train.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1...")
    train.add_argument("--out", help="output folder (default runs/RECIPE)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--image", help="cnf-image: the image (default: the course logo)")
    train.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    train.add_argument("--no-figure", action="store_true", help="skip samples.png")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    gif = sub.add_parser(
        "gif",
        help="GIF of noise flowing into an image's density",
        description="Train a continuous flow on the density of an image (dark "
        "pixels carry the mass) and write a GIF of N(0, I) flowing into it.",
    )
    gif.add_argument("--image", help="a PNG/JPEG (default: the course logo)")
    gif.add_argument("--out", default="morph.gif")
    gif.add_argument("--steps", type=int, help="training steps")
    gif.add_argument("--frames", type=int, help="frames of the GIF")
    gif.add_argument("--points", type=int, help="points in the GIF")
    gif.add_argument("--device", default="auto")
    gif.add_argument("--seed", type=int, default=0)
    gif.add_argument(
        "--layers",
        action="store_true",
        help="use a discrete RealNVP and morph layer by layer instead",
    )
    gif.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("grade", help="grading (nbgrader): nfcourse grade --help", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "grade":
        return cmd_grade(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "doctor":
        return doctor()
    if args.command == "train":
        return cmd_train(args)
    if args.command == "gif":
        return cmd_gif(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # python -m nfcourse.cli
    sys.exit(main())
