"""Glow on MNIST: lesson 05's multi-scale Glow (nfcourse) against normflows' Glow.

Both models have the same layout on 1x28x28 images (Kingma & Dhariwal 2018, "Glow"): squeeze
to 4x14x14, K steps of ActNorm, LU-decomposed 1x1 convolution and affine coupling, split off
half the channels, squeeze to 8x7x7, K more steps; uniform dequantization and a logit with
alpha = 1e-5 in front. nfcourse's is ``nfcourse.flows.glow(steps_per_scale=K)``; normflows'
is a ``MultiscaleFlow`` of ``GlowBlock`` s built as in its Glow example, with the coupling
networks' width chosen so that the two have about the same number of parameters (printed).

Same data, same optimisation (Adam, batch, learning rate, linear warm-up then constant, grad
norm clipped to 1.0, data resident on the device, dequantization noise drawn there), same
wall-clock budget each. nfcourse trains through ``nfcourse.train.fit`` (on CUDA with
``torch.compile`` and channels-last); normflows through a plain loop, as its examples do.
Reported side by side: test bpd (one dequantization sample per image) at the budget and
training images/s.

normflows is not a dependency of nfcourse. Install it without its dependencies, so that pip
cannot replace the CPU/CUDA torch you have (it needs only torch and numpy):
``pip install --no-deps normflows``. Without it this script says so and exits with status 2.

Run: ``python benchmarks/glow_vs_normflows.py`` on a CUDA machine (about 25 minutes);
``--smoke`` runs a tiny CPU configuration in seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from typing import Any

import torch
from bench_utils import (
    TrainClock,
    fmt,
    header,
    load_mnist,
    steady_images_per_s,
    table,
    test_bpd,
    warm_up_imports,
    write_json,
)
from torch import nn

from nfcourse.flows import glow
from nfcourse.train import fit, resolve_device

COLUMNS = ["implementation", "parameters", "steps", "train images/s", "test bpd at budget",
           "best test bpd"]
ALPHA = 1e-5


def import_normflows():
    try:
        import normflows
    except ImportError:
        return None
    # normflows' LU layer calls the deprecated torch.lu; say so once here, not every step
    warnings.filterwarnings("ignore", message=r"(?s).*torch\.lu is deprecated")
    return normflows


def normflows_glow(nf, k: int, hidden: int, shape=(1, 28, 28)) -> nn.Module:
    """normflows' multi-scale Glow with two levels, laid out like ``nfcourse.flows.glow``."""
    c, h, w = shape
    levels = 2
    q0, merges, flows = [], [], []
    for i in range(levels):
        blocks = [nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, split_mode="channel",
                                     scale=True) for _ in range(k)]
        flows.append(blocks + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        else:
            latent = (c * 2 ** (levels + 1), h // 2**levels, w // 2**levels)
        q0.append(nf.distributions.DiagGaussian(latent, trainable=False))
    return nf.MultiscaleFlow(q0, flows, merges, transform=nf.transforms.Logit(alpha=ALPHA),
                             class_cond=False)


def normflows_log_prob(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``log p(pixels)`` with uniform dequantization: ``log q((x + u) / 256) - D log 256``."""
    x = (pixels.float() + torch.rand(pixels.shape, device=pixels.device)) / 256
    dims = pixels[0].numel()
    return model.log_prob(x, None) - dims * math.log(256)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matching_hidden(nf, k: int, target: int) -> int:
    """normflows' coupling width (a multiple of 8) whose model is closest to ``target``
    parameters."""
    best = min(range(8, 1025, 8), key=lambda h: abs(count(normflows_glow(nf, k, h)) - target))
    return best


def warmup_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def score(curve, clock, log_prob, model, test, device, step, batch, seed) -> None:
    seconds = clock.pause()
    was = model.training
    model.eval()
    bpd = test_bpd(log_prob, test, device, seed=seed)
    model.train(was)
    curve.append({"seconds": seconds, "images": step * batch, "step": step, "bpd": bpd})
    clock.resume()


def train_nfcourse(train, test, args, device) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = glow(steps_per_scale=args.k, hidden=args.hidden, num_layers=args.num_layers).to(device)
    curve: list[dict[str, float]] = []
    state = {"next": args.eval_every}
    clock: TrainClock | None = None

    def callback(step: int, history) -> bool:
        now = clock.now()
        if now >= state["next"] or now >= args.budget:
            score(curve, clock, model.log_prob, model, test, device, step, args.batch, args.seed)
            state["next"] += args.eval_every
        return now >= args.budget

    on_cuda = device.type == "cuda"
    clock = TrainClock(device)
    history = fit(
        model, train, steps=10**9, batch_size=args.batch, lr=args.lr, schedule="constant",
        warmup=args.warmup, grad_clip=1.0, device=device, seed=args.seed, progress=False,
        callback=callback, compile=on_cuda and not args.no_compile, channels_last=on_cuda,
    )
    return {"params": count(model), "curve": curve, "steps": history.steps}


def train_normflows(nf, train, test, args, device) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = normflows_glow(nf, args.k, args.hidden_normflows).to(device)
    data = train.to(device)
    with torch.no_grad():  # ActNorm's data-dependent init on a training batch
        normflows_log_prob(model, data[: args.batch])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    curve: list[dict[str, float]] = []
    skipped, step, next_eval = 0, 0, args.eval_every
    clock = TrainClock(device)
    model.train()
    while True:
        perm = torch.randperm(len(data), generator=gen).to(device)
        for i in range(0, len(data), args.batch):
            batch = data[perm[i : i + args.batch]]
            for group in opt.param_groups:
                group["lr"] = args.lr * warmup_factor(step, args.warmup)
            loss = -normflows_log_prob(model, batch).mean() / (
                batch[0].numel() * math.log(2)
            )
            opt.zero_grad(set_to_none=True)
            if torch.isfinite(loss):  # normflows' examples skip non-finite steps the same way
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            else:
                skipped += 1
            step += 1
            now = clock.now()
            if now >= next_eval or now >= args.budget:
                score(curve, clock, lambda x: normflows_log_prob(model, x), model, test, device,
                      step, args.batch, args.seed)
                next_eval += args.eval_every
                if now >= args.budget:
                    return {"params": count(model), "curve": curve, "steps": step,
                            "skipped_steps": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU configuration that runs in seconds (checks the script)")
    parser.add_argument("--budget", type=float, help="training seconds per model (600)")
    parser.add_argument("--eval-every", type=float, help="seconds between test scores (20)")
    parser.add_argument("--k", type=int, help="Glow steps per scale (8)")
    parser.add_argument("--hidden", type=int, help="nfcourse coupling width (64)")
    parser.add_argument("--num-layers", type=int, help="nfcourse coupling depth (2)")
    parser.add_argument("--hidden-normflows", type=int,
                        help="normflows coupling width (default: matched parameter count)")
    parser.add_argument("--batch", type=int, help="batch size of both (256)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, help="warm-up steps of both (100)")
    parser.add_argument("--n-train", type=int, help="training images (all 19,690)")
    parser.add_argument("--n-test", type=int, help="test images scored (all 10,000)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    nf = import_normflows()
    if nf is None:
        print("normflows is not installed: pip install --no-deps normflows (it needs only "
              "torch and numpy; --no-deps keeps pip from touching torch)", file=sys.stderr)
        return 2
    defaults = (
        {"budget": 2.0, "eval_every": 0.5, "k": 1, "hidden": 8, "num_layers": 1, "batch": 64,
         "warmup": 2, "n_train": 256, "n_test": 128, "threads": 1}
        if args.smoke
        else {"budget": 600.0, "eval_every": 20.0, "k": 8, "hidden": 64, "num_layers": 2,
              "batch": 256, "warmup": 100, "n_train": None, "n_test": None, "threads": None}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device("cpu" if args.smoke and args.device == "auto" else args.device)
    if args.hidden_normflows is None:
        torch.manual_seed(args.seed)
        ours_params = count(glow(steps_per_scale=args.k, hidden=args.hidden,
                                 num_layers=args.num_layers))
        args.hidden_normflows = matching_hidden(nf, args.k, ours_params)
    train, test = load_mnist(args.n_train, args.n_test)
    warm_up_imports()

    ours = train_nfcourse(train, test, args, device)
    theirs = train_normflows(nf, train, test, args, device)
    for r in (ours, theirs):
        r["images_per_s"] = steady_images_per_s(r["curve"])
        r["final_bpd"] = r["curve"][-1]["bpd"]
        r["best_bpd"] = min(p["bpd"] for p in r["curve"])

    lines = header(f"Glow on MNIST: nfcourse.flows.glow vs normflows {nf.__version__}")
    lines += [
        f"data: {len(train)} training images, {len(test)} test images; K = {args.k} steps per "
        f"scale, 2 scales; coupling width nfcourse {args.hidden} (GatedConvNet, "
        f"{args.num_layers} blocks), normflows {args.hidden_normflows} (3 convolutions)",
        f"both: Adam lr {args.lr:g}, batch {args.batch}, warm-up {args.warmup} steps then "
        f"constant, clip 1.0, {args.budget:g} s of training each, test bpd every "
        f"{args.eval_every:g} s (clock stopped); nfcourse compile "
        f"{device.type == 'cuda' and not args.no_compile}",
        "",
    ]
    rows = [
        [name, f"{r['params']:,}", str(r["steps"]), fmt(r["images_per_s"], ".0f"),
         fmt(r["final_bpd"], ".4f"), fmt(r["best_bpd"], ".4f")]
        for name, r in (("nfcourse", ours), ("normflows", theirs))
    ]
    lines += table(COLUMNS, rows)
    speed = ours["images_per_s"] / theirs["images_per_s"]
    lines += [
        "",
        f"ratios (nfcourse vs normflows): training images/s {speed:.2f}x; test bpd at the "
        f"budget {ours['final_bpd'] - theirs['final_bpd']:+.4f}; normflows skipped "
        f"{theirs['skipped_steps']} non-finite steps",
    ]
    print("\n".join(lines))
    write_json(args.json, {
        "benchmark": "glow_vs_normflows", "header": lines[:3], "args": vars(args),
        "normflows_version": nf.__version__, "speedup_images_per_s": speed,
        "recipes": {"nfcourse": ours, "normflows": theirs},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
