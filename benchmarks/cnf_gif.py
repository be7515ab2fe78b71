"""Continuous flows on the logo density: nfcourse's fast CNF recipe against FFJORD's 2-D recipe.

Run:  .venv/bin/python benchmarks/cnf_gif.py            (CPU, about 10 minutes)
      .venv/bin/python benchmarks/cnf_gif.py --quick    (a smoke run, about 2 minutes)

Both recipes learn the density that ``nfcourse.data.image_density(logo_path())`` defines
(dark pixels carry the mass), in the same run, with fresh samples every iteration:

* nfcourse: ``cnf_2d()`` (3x64 tanh MLP, exact trace, direct backprop, RK4 with 8 steps)
  trained with the settings of ``nfcourse.cnf.CNF_2D_TRAINING``;
* FFJORD (Grathwohl et al. 2019, ``train_toy.py``): ``cnf_2d(**ffjord_2d_defaults())`` (the
  same 64-64-64 size, concatsquash layers, learned T from 0.5, dopri5 at rtol = atol = 1e-5,
  adjoint, exact divergence by one autograd pass per dimension), Adam lr 1e-3, weight decay
  1e-5, batch 1000. It trains for a wall-clock budget; the table reports what it reached.

Each model is scored the same way at checkpoints: ``KL(p || q)``, Monte Carlo over fresh
samples of the exact image density ``p`` (``ImageDensity.kl_to_model``), with ``log q``
solved by dopri5 at rtol = atol = 1e-6 (not the training solver). Evaluation time is not
counted as training time. The table gives time per iteration, function evaluations per
iteration (forward solve, and the adjoint's backward solve), the KL over wall time, and the
ratio of wall time each needs to reach the best KL FFJORD's recipe reached.

Finally it times the whole lesson path "logo -> GIF" in fast mode: sample the logo,
``nfcourse.train.fit`` the fast recipe, render ``nfcourse.viz.ode_morph_gif``.

Threads: ``--threads`` (default 1). On a shared 2-core machine two intra-op threads per
process spin against other processes and made single iterations 10-60 times slower here;
one thread of the two cores is the conservative, reproducible setting.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from nfcourse.cnf import (
    CNF_2D_TRAINING,
    FFJORD_2D_OPTIMIZER,
    cnf_2d,
    ffjord_2d_defaults,
    validate_log_density,
)

EVAL_SOLVER = dict(method="dopri5", rtol=1e-6, atol=1e-6, adjoint=False, exact_trace="analytic")


@dataclass
class Run:
    name: str
    iterations: int = 0
    train_time: float = 0.0  # process CPU seconds (one thread): robust to a busy machine
    wall_time: float = 0.0
    nfe_forward: list[int] = field(default_factory=list)
    nfe_backward: list[int] = field(default_factory=list)
    curve: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, iter, KL)

    @property
    def sec_per_iter(self) -> float:
        return self.train_time / max(self.iterations, 1)

    def best_kl(self) -> float:
        return min(kl for _, _, kl in self.curve)

    def time_to(self, target: float) -> float | None:
        """First training time at which the KL was at or below ``target`` (None: never)."""
        for seconds, _, kl in self.curve:
            if kl <= target:
                return seconds
        return None


def kl_of(model, density, n: int, seed: int) -> float:
    cnf = model.flow
    with torch.no_grad(), cnf.settings(**EVAL_SOLVER):
        return density.kl_to_model(model.log_prob, n=n, seed=seed, batch_size=n)


def train(
    name: str,
    model,
    density,
    *,
    lr: float,
    batch_size: int,
    weight_decay: float,
    budget_s: float,
    max_iters: int | None,
    eval_at,
    eval_n: int,
    schedule_iters: int | None = None,
    seed: int = 0,
) -> Run:
    """Adam on fresh samples; KL checkpoints at iterations where ``eval_at(i)`` (not timed).

    Stops after ``max_iters`` iterations or ``budget_s`` seconds of CPU time (or twice that
    in wall time, so a very busy machine cannot stretch the run without end).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = None
    if schedule_iters:
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i / schedule_iters, 1.0)))
        )
    run = Run(name)
    cnf = model.flow
    run.curve.append((0.0, 0, kl_of(model, density, eval_n, seed=1)))
    print(f"  {name}: iter 0  KL {run.curve[-1][2]:.3f}", flush=True)
    while True:
        start, start_wall = time.process_time(), time.perf_counter()
        x = density.sample(batch_size, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x)
        nfe_f = cnf.nfe
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        run.train_time += time.process_time() - start
        run.wall_time += time.perf_counter() - start_wall
        run.iterations += 1
        run.nfe_forward.append(nfe_f)
        run.nfe_backward.append(cnf.nfe_backward)
        done = (
            run.train_time >= budget_s
            or run.wall_time >= 2 * budget_s
            or (max_iters is not None and run.iterations >= max_iters)
        )
        if eval_at(run.iterations) or done:
            kl = kl_of(model, density, eval_n, seed=1)
            run.curve.append((run.train_time, run.iterations, kl))
            print(
                f"  {name}: iter {run.iterations}  {run.train_time:6.1f} s  loss {loss.item():.3f}"
                f"  NFE {nfe_f}+{run.nfe_backward[-1]}  KL {kl:.3f}",
                flush=True,
            )
        if done:
            return run


def logo_to_gif(out_dir: str, seed: int = 0) -> dict[str, float]:
    """The lesson's path in fast mode, timed end to end: data, fit, GIF."""
    os.environ["NFCOURSE_FAST"] = "1"
    from nfcourse.data import image_density, logo_path
    from nfcourse.train import fit
    from nfcourse.viz import ode_morph_gif

    times = {}
    t0, cpu0 = time.perf_counter(), time.process_time()
    points, density = image_density(logo_path(), CNF_2D_TRAINING["n_points"], seed=seed)
    model = cnf_2d()
    times["data"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    fit(
        model,
        points,
        steps=CNF_2D_TRAINING["steps"],
        batch_size=CNF_2D_TRAINING["batch_size"],
        lr=CNF_2D_TRAINING["lr"],
        device="cpu",
        seed=seed,
        progress=False,
        checkpoint=None,
    )
    times["train"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    path = os.path.join(out_dir, "logo_cnf.gif")
    ode_morph_gif(model, path, seed=seed)
    times["gif"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0
    times["cpu"] = time.process_time() - cpu0
    times["kl"] = kl_of(model, density, 4000, seed=1)
    times["gif_bytes"] = os.path.getsize(path)
    return times


def fmt_time(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ffjord-budget", type=float, default=200.0,
                        help="CPU seconds of training for FFJORD's recipe")
    parser.add_argument("--fast-budget", type=float, default=120.0,
                        help="CPU seconds at most for nfcourse's recipe (it stops after its steps)")
    parser.add_argument("--eval-n", type=int, default=4000, help="samples per KL estimate")
    parser.add_argument("--gif-dir", default=None, help="where to write the GIF (default: temp)")
    parser.add_argument("--skip-gif", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.ffjord_budget, args.fast_budget, args.eval_n = 20.0, 10.0, 1000
    torch.set_num_threads(args.threads)

    from nfcourse.data import image_density, logo_path

    _, density = image_density(logo_path(), 1, seed=0)
    print(f"logo density: {density}, entropy {density.entropy():.3f} nats")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}")
    recipe = CNF_2D_TRAINING
    fast_iters = recipe["steps"]  # the fast-mode recipe, as the lesson and the GIF path use it
    early = {5, 10, 15, 20, 30, 40, 50, 75, 100}

    print("\n[1/3] nfcourse fast recipe")
    torch.manual_seed(0)
    fast_model = cnf_2d()
    fast = train(
        "nfcourse", fast_model, density, lr=recipe["lr"], batch_size=recipe["batch_size"],
        weight_decay=0.0, budget_s=args.fast_budget, max_iters=fast_iters,
        eval_at=lambda i: i in early or i % 50 == 0, eval_n=args.eval_n,
        schedule_iters=fast_iters,
    )
    check = validate_log_density(fast_model, density.sample(args.eval_n, seed=2))
    print(f"  RK4-8 vs dopri5 1e-7 on fresh samples: mean log-density gap {check['gap']:+.4f}"
          f" nats (max |gap| {check['max_abs_gap']:.4f}); NFE {check['nfe_train']} vs "
          f"{check['nfe_tight']}")
    print(f"\n[2/3] FFJORD 2-D recipe ({args.ffjord_budget:.0f} s CPU budget)")
    torch.manual_seed(0)
    opt = FFJORD_2D_OPTIMIZER
    ffjord = train(
        "FFJORD", cnf_2d(**ffjord_2d_defaults()), density, lr=opt["lr"],
        batch_size=opt["batch_size"], weight_decay=opt["weight_decay"],
        budget_s=args.ffjord_budget, max_iters=None, eval_at=lambda i: i % 25 == 0,
        eval_n=args.eval_n,
    )

    gif = None
    if not args.skip_gif:
        print("\n[3/3] logo -> GIF (fast mode: data + fit + ode_morph_gif)")
        out_dir = args.gif_dir or tempfile.mkdtemp(prefix="nfcourse_cnf_gif_")
        os.makedirs(out_dir, exist_ok=True)
        gif = logo_to_gif(out_dir)
        print(f"  wrote {os.path.join(out_dir, 'logo_cnf.gif')}")

    # ------------------------------------------------------------------ table
    target = ffjord.best_kl()
    t_ff, t_fast = ffjord.time_to(target), fast.time_to(target)
    rows = []
    for run in (fast, ffjord):
        nb = sum(run.nfe_backward) / len(run.nfe_backward)
        nf = sum(run.nfe_forward) / len(run.nfe_forward)
        rows.append((
            run.name, f"{run.iterations}", f"{run.sec_per_iter:.3f}",
            f"{nf:.0f} / {max(run.nfe_forward)}", f"{nb:.0f} / {max(run.nfe_backward)}",
            f"{run.train_time:.0f} s / {run.wall_time:.0f} s", f"{run.curve[-1][2]:.3f}",
            f"{run.best_kl():.3f}", fmt_time(run.time_to(target)),
        ))
    header = ("recipe", "iters", "CPU s/iter", "NFE fwd mean/max", "NFE bwd mean/max",
              "train CPU / wall", "final KL", "best KL", f"CPU time to KL {target:.3f}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print("\n" + line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))

    print("\nKL (nats) over training CPU time:")
    for run in (fast, ffjord):
        pts = ", ".join(f"{s:.0f}s:{kl:.3f}" for s, _, kl in run.curve)
        print(f"  {run.name}: {pts}")

    print("\nratios (FFJORD / nfcourse):")
    print(f"  CPU time per iteration: {ffjord.sec_per_iter / fast.sec_per_iter:.2f}x")
    nfe_ff = (sum(ffjord.nfe_forward) + sum(ffjord.nfe_backward)) / ffjord.iterations
    nfe_fast = (sum(fast.nfe_forward) + sum(fast.nfe_backward)) / fast.iterations
    print(f"  function evaluations per iteration (fwd + adjoint bwd): {nfe_ff / nfe_fast:.2f}x")
    if t_ff is not None and t_fast is not None and t_fast > 0:
        print(f"  training time to FFJORD's best KL ({target:.3f} nats): {t_ff:.1f} s / "
              f"{t_fast:.1f} s = {t_ff / t_fast:.1f}x  (FFJORD stopped at its budget; longer "
              "training would lower its KL further)")
    else:
        print(f"  training time to FFJORD's best KL ({target:.3f} nats): nfcourse "
              f"{fmt_time(t_fast)}, FFJORD {fmt_time(t_ff)}")
    if gif is not None:
        print(f"\nlogo -> GIF (fast mode): data {gif['data']:.1f} s + fit {gif['train']:.1f} s "
              f"+ GIF {gif['gif']:.1f} s = {gif['total']:.1f} s wall, {gif['cpu']:.1f} s CPU "
              f"(goal <= 60 s); "
              f"KL {gif['kl']:.3f} nats; {gif['gif_bytes'] / 1e6:.2f} MB")
    print(f"\nentropy of the logo density: {density.entropy():.3f} nats (KL 0 = exact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
