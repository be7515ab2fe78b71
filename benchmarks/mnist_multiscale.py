"""MNIST multi-scale flow: nfcourse's training path against the conventional recipe.

Both train lesson 04's three-scale flow with variational dequantization
(``nfcourse.flows.multiscale_flow()``, built from the same seed) on the same MNIST training
images and are scored on the same test images, one after the other in one process:

* conventional: fp32, batch 128, Adam 1e-3, StepLR(gamma 0.99) per epoch, gradient norm
  clipped to 1.0, a ``torch.utils.data.DataLoader`` over CPU tensors with every batch copied
  to the device, no compilation;
* nfcourse: ``nfcourse.train.fit`` with the data resident on the device (dequantized there),
  a larger batch (default 512) with the learning rate scaled by ``scaled_lr`` (square-root
  rule) and a warm-up, a cosine schedule over the wall-clock budget, fused AdamW, and on
  CUDA ``torch.compile`` and channels-last.

Each recipe trains for the same wall-clock budget; the test bpd (one dequantization sample
per image, fixed noise) is measured every ``--eval-every`` seconds with the training clock
stopped. Reported: training images/s, time to a fixed test bpd (default: the conventional
recipe's final one), test bpd after the budget, time to sample 64 images, time for the
8-sample importance-weighted bpd of 64 test images. Goal (issue 10): at least 5x faster to
the same test bpd, 64 samples in at most 5 ms on an H100.

Run: ``python benchmarks/mnist_multiscale.py`` on a CUDA machine (about 25 minutes with the
default 600 s budget per recipe); ``--smoke`` runs a tiny CPU configuration in seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
from bench_utils import (
    TrainClock,
    first_time_at_or_below,
    fmt,
    header,
    load_mnist,
    steady_images_per_s,
    table,
    test_bpd,
    time_call,
    warm_up_imports,
    write_json,
)
from torch.utils.data import DataLoader, TensorDataset

from nfcourse.flows import multiscale_flow
from nfcourse.train import fit, resolve_device, scaled_lr

FULL_MODEL: dict[str, Any] = {}  # the builder's defaults are lesson 04's sizes
SMOKE_MODEL: dict[str, Any] = {
    "hidden": (8, 8, 8), "num_couplings": (1, 1, 1), "num_layers": 1,
    "vardeq_hidden": 4, "vardeq_layers": 1, "vardeq_couplings": 1,
}
SMALL_MODEL: dict[str, Any] = {
    "hidden": (16, 16, 24), "num_couplings": (2, 2, 2), "num_layers": 1,
    "vardeq_hidden": 8, "vardeq_layers": 1, "vardeq_couplings": 2,
}
MODELS = {"full": FULL_MODEL, "small": SMALL_MODEL, "tiny": SMOKE_MODEL}
COLUMNS = ["recipe", "batch", "steps", "train images/s", "test bpd at budget",
           "time to target bpd (s)", "sample 64 (ms)", "importance bpd k=8, 64 images (ms)"]


def build(model_kwargs: dict[str, Any], seed: int, device: torch.device):
    torch.manual_seed(seed)
    return multiscale_flow(**model_kwargs).to(device)


def evaluate_into(curve, clock, model, test, device, images_seen, step, seed):
    """Stop the clock, score the test images, record the point, restart the clock."""
    seconds = clock.pause()
    was = model.training
    model.eval()
    bpd = test_bpd(model.log_prob, test, device, seed=seed)
    model.train(was)
    curve.append({"seconds": seconds, "images": images_seen, "step": step, "bpd": bpd})
    clock.resume()


def conventional(train, test, args, model_kwargs, device) -> dict[str, Any]:
    model = build(model_kwargs, args.seed, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.99)
    loader = DataLoader(
        TensorDataset(train), batch_size=128, shuffle=True, drop_last=False,
        generator=torch.Generator().manual_seed(args.seed), num_workers=args.loader_workers,
        pin_memory=device.type == "cuda",
    )
    curve: list[dict[str, float]] = []
    clock = TrainClock(device)
    next_eval, seen, step, done = args.eval_every, 0, 0, False
    model.train()
    while not done:
        for (batch,) in loader:
            batch = batch.to(device, non_blocking=True)
            loss = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            seen += len(batch)
            step += 1
            now = clock.now()
            if now >= next_eval or now >= args.budget:
                evaluate_into(curve, clock, model, test, device, seen, step, args.seed)
                next_eval += args.eval_every
                if now >= args.budget:
                    done = True
                    break
        sched.step()
    return {"model": model, "curve": curve, "batch": 128, "steps": step}


def nfcourse_recipe(train, test, args, model_kwargs, device) -> dict[str, Any]:
    model = build(model_kwargs, args.seed, device)
    lr = scaled_lr(1e-3, args.batch, 128, rule="sqrt")
    curve: list[dict[str, float]] = []
    clock: TrainClock | None = None
    state = {"next_eval": args.eval_every}

    def schedule(step: int, total: int) -> float:
        """Linear warm-up over steps, then a cosine over the wall-clock budget."""
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = min(clock.now() / args.budget, 1.0) if clock is not None else 0.0
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    def callback(step: int, history) -> bool:
        now = clock.now()
        if now >= state["next_eval"] or now >= args.budget:
            evaluate_into(curve, clock, model, test, device, step * args.batch, step, args.seed)
            state["next_eval"] += args.eval_every
        return now >= args.budget

    on_cuda = device.type == "cuda"
    compile_opt: bool | str = False
    if on_cuda and not args.no_compile:
        compile_opt = True if args.compile_mode == "default" else args.compile_mode
    clock = TrainClock(device)
    history = fit(
        model, train, steps=10**9, batch_size=args.batch, lr=lr, schedule=schedule,
        warmup=0, grad_clip=1.0, device=device, seed=args.seed, progress=False,
        callback=callback, compile=compile_opt, channels_last=on_cuda,
    )
    return {"model": model, "curve": curve, "batch": args.batch, "steps": history.steps,
            "lr": lr, "compile": compile_opt}


def inference_times(model, test, device, repeats: int) -> tuple[float, float]:
    model.eval()
    x64 = test[:64].to(device)
    with torch.no_grad():
        sample_s = time_call(lambda: model.sample(64), device, repeats)
        importance_s = time_call(lambda: model.importance_bpd(x64, k=8), device, repeats)
    return sample_s, importance_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU configuration that runs in seconds (checks the script)")
    parser.add_argument("--budget", type=float, help="training seconds per recipe (600)")
    parser.add_argument("--eval-every", type=float, help="seconds between test scores (20)")
    parser.add_argument("--target-bpd", type=float,
                        help="fixed test bpd to time (default: the conventional final bpd)")
    parser.add_argument("--batch", type=int, help="nfcourse's batch size (512)")
    parser.add_argument("--warmup", type=int, help="nfcourse's warm-up steps (200)")
    parser.add_argument("--n-train", type=int, help="training images (all 19,690)")
    parser.add_argument("--n-test", type=int, help="test images scored (all 10,000)")
    parser.add_argument("--size", choices=list(MODELS),
                        help="model size: full (lesson 04, default), small (for CPUs), tiny "
                        "(--smoke's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-compile", action="store_true", help="nfcourse without compile")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode for nfcourse on CUDA ('default', "
                        "'reduce-overhead' for CUDA graphs, 'max-autotune', ...)")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="DataLoader workers of the conventional recipe")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--repeats", type=int,
                        help="timed calls of sample / importance bpd (median; 20 on CUDA, else 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    defaults = (
        {"budget": 2.0, "eval_every": 0.5, "batch": 64, "warmup": 2, "n_train": 256,
         "n_test": 128, "threads": 1}
        if args.smoke
        else {"budget": 600.0, "eval_every": 20.0, "batch": 512, "warmup": 200,
              "n_train": None, "n_test": None, "threads": None}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device("cpu" if args.smoke and args.device == "auto" else args.device)
    if not args.smoke and device.type != "cuda":
        print("warning: this benchmark is meant for a CUDA GPU; on the CPU it takes hours at "
              "full size (use --smoke, or smaller --budget / --n-train)", file=sys.stderr)
    model_kwargs = MODELS[args.size or ("tiny" if args.smoke else "full")]
    train, test = load_mnist(args.n_train, args.n_test)
    warm_up_imports()

    ours = nfcourse_recipe(train, test, args, model_kwargs, device)
    theirs = conventional(train, test, args, model_kwargs, device)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    for result in (ours, theirs):
        result["sample_s"], result["importance_s"] = inference_times(
            result["model"], test, device, repeats
        )
        result["images_per_s"] = steady_images_per_s(result["curve"])
        result["final_bpd"] = result["curve"][-1]["bpd"]
    target = args.target_bpd if args.target_bpd is not None else theirs["final_bpd"]
    for result in (ours, theirs):
        result["time_to_target"] = first_time_at_or_below(result["curve"], target)

    params = sum(p.numel() for p in ours["model"].parameters())
    lines = header("MNIST multi-scale flow (lesson 04, variational dequantization): "
                   "nfcourse.train.fit vs the conventional recipe")
    lines += [
        f"data: {len(train)} training images, {len(test)} test images; "
        f"{args.size or ('tiny' if args.smoke else 'full')} model, {params:,} parameters; "
        f"budget {args.budget:g} s of training per recipe, test bpd "
        f"every {args.eval_every:g} s (clock stopped); target bpd {target:.4f}"
        + (" (the conventional final)" if args.target_bpd is None else ""),
        f"nfcourse: batch {ours['batch']}, AdamW lr {ours['lr']:.2e} (sqrt-scaled from 1e-3 "
        f"at 128), warm-up {args.warmup} steps, cosine over the budget, compile "
        f"{ours['compile']}, channels-last {device.type == 'cuda'}",
        "",
    ]
    rows = []
    for name, r in (("nfcourse", ours), ("conventional", theirs)):
        rows.append([
            name, str(r["batch"]), str(r["steps"]), fmt(r["images_per_s"], ".0f"),
            fmt(r["final_bpd"], ".4f"), fmt(r["time_to_target"], ".1f"),
            fmt(1e3 * r["sample_s"], ".2f"), fmt(1e3 * r["importance_s"], ".2f"),
        ])
    lines += table(COLUMNS, rows)
    speed = ours["images_per_s"] / theirs["images_per_s"]
    t_ours, t_theirs = ours["time_to_target"], theirs["time_to_target"]
    ratio = t_theirs / t_ours if t_ours and t_theirs else None
    lines += [
        "",
        f"ratios (nfcourse vs conventional): training images/s {speed:.2f}x; time to test bpd "
        f"{target:.4f}: {fmt(ratio, '.2f', 'n/a')}x faster; test bpd at the budget "
        f"{ours['final_bpd'] - theirs['final_bpd']:+.4f}",
        f"goals: >= 5x faster to the same test bpd: {fmt(ratio, '.2f', 'n/a')}x; sample 64 "
        f"<= 5 ms on an H100: {1e3 * ours['sample_s']:.2f} ms",
    ]
    print("\n".join(lines))
    result = {
        "benchmark": "mnist_multiscale", "header": lines[:3], "args": vars(args),
        "target_bpd": target, "speedup_images_per_s": speed, "speedup_to_target": ratio,
        "recipes": {
            name: {k: v for k, v in r.items() if k != "model"}
            for name, r in (("nfcourse", ours), ("conventional", theirs))
        },
    }
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
