"""Pictures for the lessons: matplotlib figures, GIFs (Pillow, no ffmpeg), widget explorers.

Every figure function returns a :class:`matplotlib.figure.Figure` (Jupyter shows it when it
ends a cell). GIF writers return a :class:`Gif`, which knows its path and frame count and
shows itself inline in a notebook.

Conventions: 2-D point clouds get equal axes and fixed limits across panels and frames; a
point keeps its colour from noise to data (coloured by where it started), so a picture shows
where each region of the base distribution goes.

Example:
    >>> fig = flow_panels(model, x_train)                              # doctest: +SKIP
    >>> gif = layer_morph_gif(model.flow.layers, 2000, "morph.gif")    # doctest: +SKIP
    >>> show_gif(gif)                                                  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from PIL import Image

__all__ = [
    "Gif",
    "flow_panels",
    "scatter",
    "density_heatmap",
    "loss_curve",
    "image_grid",
    "interpolation_grid",
    "layer_states",
    "layer_morph_gif",
    "ode_morph_gif",
    "side_by_side_gif",
    "write_gif",
    "read_gif",
    "show_gif",
    "explorer",
]

DATA_COLOR = "#1f77b4"
LATENT_LIMIT = 4.0


# ------------------------------------------------------------------------------- helpers


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _square_limits(*clouds: np.ndarray, margin: float = 0.08, clip: float = 20.0):
    """One pair of equal limits that holds (the bulk of) every cloud: 0.5 %-99.5 % quantiles."""
    pts = np.concatenate([c.reshape(-1, 2) for c in clouds], axis=0)
    pts = pts[np.isfinite(pts).all(1)]
    if len(pts) == 0:
        return (-LATENT_LIMIT, LATENT_LIMIT), (-LATENT_LIMIT, LATENT_LIMIT)
    lo = np.quantile(pts, 0.005, axis=0)
    hi = np.quantile(pts, 0.995, axis=0)
    center = (lo + hi) / 2
    half = min(max(float((hi - lo).max()) / 2 * (1 + 2 * margin), 1e-3), clip)
    return (center[0] - half, center[0] + half), (center[1] - half, center[1] + half)


def _style(ax, xlim=None, ylim=None, title: str | None = None) -> None:
    ax.set_aspect("equal")
    if xlim is not None:
        ax.set_xlim(*xlim)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_color("#bbbbbb")
    if title:
        ax.set_title(title, fontsize=10)


def _colors_by_angle(points: np.ndarray) -> np.ndarray:
    """A colour per point from its angle around the cloud's centre (hue) and radius."""
    p = points - points.mean(0)
    hue = (np.arctan2(p[:, 1], p[:, 0]) / (2 * np.pi)) % 1.0
    return plt.get_cmap("hsv")(hue)


def _colors_by_x(points: np.ndarray) -> np.ndarray:
    v = points[:, 0]
    v = (v - v.min()) / max(float(np.ptp(v)), 1e-9)
    return plt.get_cmap("viridis")(v)


def scatter(ax, points: Any, colors: Any = None, size: float = 3.0, **kw) -> Any:
    """A light scatter of ``(N, 2)`` points (the course's look)."""
    p = _np(points)
    return ax.scatter(
        p[:, 0],
        p[:, 1],
        s=size,
        c=colors if colors is not None else DATA_COLOR,
        linewidths=0,
        alpha=kw.pop("alpha", 0.7),
        **kw,
    )


def _flow_and_prior(model_or_flow: Any, prior: Any):
    flow = getattr(model_or_flow, "flow", model_or_flow)
    prior = prior if prior is not None else getattr(model_or_flow, "prior", None)
    return flow, prior


def _sample_prior(prior: Any, n: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    if prior is not None and hasattr(prior, "sample"):
        z = prior.sample(n)
    else:
        z = torch.randn(n, dim)
    return z.to(device=like.device, dtype=like.dtype)


def _device_of(module: Any) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _figure_to_rgb(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# ------------------------------------------------------------------------------- figures


@torch.no_grad()
def flow_panels(
    model_or_flow: Any,
    data: Any,
    n: int = 1000,
    prior: Any = None,
    *,
    seed: int = 0,
    title: str | None = None,
    size: float = 3.0,
) -> Figure:
    """Two rows for a 2-D flow: data -> latent (forward) and noise -> samples (inverse).

    Top row: ``n`` data points and their images ``f(x)`` under the flow, coloured by their
    first coordinate so you can see where each part of the data lands. Bottom row: ``n`` draws
    from the prior and the flow's inverse of them, coloured by angle. Works before training
    (the flow is near the identity) and after.

    Args:
        model_or_flow: a FlowModel (uses ``.flow`` and ``.prior``) or a bare flow.
        data: ``(N, 2)`` points.
        prior: anything with ``sample(n)``; default: the model's prior or N(0, I).
    """
    flow, prior = _flow_and_prior(model_or_flow, prior)
    dev = _device_of(flow)
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(_np(data))
    x = x[torch.randperm(len(x), generator=gen)[:n]].to(dev)
    was_training = getattr(flow, "training", False)
    if hasattr(flow, "eval"):
        flow.eval()
    try:
        z_of_x = flow(x)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            z = _sample_prior(prior, len(x), x.shape[1], x)
        x_of_z = flow.inverse(z)[0]
    finally:
        if hasattr(flow, "train"):
            flow.train(was_training)
    x, z_of_x, z, x_of_z = map(_np, (x, z_of_x, z, x_of_z))
    data_lim = _square_limits(x)
    lat = (-LATENT_LIMIT, LATENT_LIMIT)
    fig, axes = plt.subplots(2, 2, figsize=(7, 7), constrained_layout=True)
    cx, cz = _colors_by_x(x), _colors_by_angle(z)
    scatter(axes[0, 0], x, cx, size)
    _style(axes[0, 0], *data_lim, "data x")
    scatter(axes[0, 1], z_of_x, cx, size)
    _style(axes[0, 1], lat, lat, "latent f(x)  (forward)")
    scatter(axes[1, 0], z, cz, size)
    _style(axes[1, 0], lat, lat, "noise z ~ prior")
    scatter(axes[1, 1], x_of_z, cz, size)
    _style(axes[1, 1], *data_lim, "samples f⁻¹(z)  (inverse)")
    if title:
        fig.suptitle(title)
    return fig


@torch.no_grad()
def density_heatmap(
    log_prob_fn: Any,
    extent: Sequence[float] = (-3, 3, -3, 3),
    grid: int = 200,
    *,
    ax=None,
    log: bool = False,
    batch: int = 8192,
    cmap: str = "magma",
    title: str | None = None,
) -> Figure:
    """The density ``exp(log_prob)`` of a 2-D model on a ``grid x grid`` lattice.

    Args:
        log_prob_fn: a callable ``(N, 2) tensor -> (N,)`` log-density, or a model with
            ``log_prob``.
        extent: ``(xmin, xmax, ymin, ymax)``.
        log: show the log-density instead of the density.
    """
    fn = log_prob_fn.log_prob if hasattr(log_prob_fn, "log_prob") else log_prob_fn
    module = log_prob_fn if isinstance(log_prob_fn, torch.nn.Module) else None
    dev = _device_of(module) if module is not None else torch.device("cpu")
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    x0, x1, y0, y1 = extent
    xs = torch.linspace(x0, x1, grid)
    ys = torch.linspace(y0, y1, grid)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    try:
        vals = torch.cat(
            [
                torch.as_tensor(fn(pts[i : i + batch].to(dev))).detach().float().cpu()
                for i in range(0, len(pts), batch)
            ]
        )
    finally:
        if module is not None:
            module.train(was_training)
    vals = vals.reshape(grid, grid).numpy()
    img = vals if log else np.exp(vals)
    img = np.where(np.isfinite(img), img, np.nan)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5), constrained_layout=True)
    else:
        fig = ax.figure
    ax.imshow(img, origin="lower", extent=(x0, x1, y0, y1), cmap=cmap, aspect="equal")
    _style(ax, (x0, x1), (y0, y1), title or ("log-density" if log else "density"))
    return fig


def _history_fields(history: Any):
    if isinstance(history, dict):
        get = history.get
    elif hasattr(history, "loss"):

        def get(k, d=None):
            return getattr(history, k, d)
    else:
        loss = list(history)
        return loss, [], [], "loss"
    return (
        list(get("loss", [])),
        list(get("val", []) or []),
        list(get("val_step", []) or []),
        get("unit", "loss") or "loss",
    )


def loss_curve(
    history: Any,
    *,
    smooth: int | None = None,
    ax=None,
    title: str | None = None,
    log_x: bool = False,
) -> Figure:
    """Training loss per step (raw and smoothed) and validation points, labelled with the unit.

    ``history``: a :class:`nfcourse.train.History`, its ``to_dict()``, or a list of losses.
    """
    loss, val, val_step, unit = _history_fields(history)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    else:
        fig = ax.figure
    steps = np.arange(1, len(loss) + 1)
    y = np.asarray(loss, dtype=float)
    ax.plot(steps, y, color="#9ecae1", lw=0.8, label="train (per step)")
    k = smooth or max(1, len(y) // 50)
    if k > 1 and len(y) >= k:
        ys = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], ys, color="#08519c", lw=1.8, label=f"train (mean of {k})")
    if val:
        ax.plot(val_step, val, "o-", color="#e6550d", ms=4, label="validation")
    finite = y[np.isfinite(y)]
    if len(finite) > 10:  # keep the first steps' huge losses from flattening the curve
        lo, hi = np.quantile(finite, 0.0), np.quantile(finite, 0.98)
        vals = [lo, hi] + [v for v in val if math.isfinite(v)]
        pad = 0.05 * (max(vals) - min(vals) + 1e-9)
        ax.set_ylim(min(vals) - pad, max(vals) + pad)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({unit})")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def _to_grid_array(images: Any, nrow: int, pad: int = 2) -> np.ndarray:
    """``(B, C, H, W)`` / ``(B, H, W)`` / ``(B, H, W, C)`` images -> one ``(H', W', 3)`` uint8
    array laid out ``nrow`` per row. Values in [0, 255] or [0, 1] (guessed from the max)."""
    x = _np(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise ValueError(f"image_grid expects (B, C, H, W) or (B, H, W) images, got {x.shape}")
    scale = 255.0 if np.nanmax(x) > 1.5 else 1.0
    x = np.clip(x / scale, 0, 1)
    b, c, h, w = x.shape
    if c == 1:
        x = np.repeat(x, 3, axis=1)
    elif c != 3:
        x = np.repeat(x[:, :1], 3, axis=1)
    ncol = min(nrow, b)
    nrows = math.ceil(b / ncol)
    out = np.ones((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(b):
        r, q = divmod(i, ncol)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = x[i].transpose(1, 2, 0)
    return (out * 255).round().astype(np.uint8)


def image_grid(
    images: Any, nrow: int = 8, *, title: str | None = None, scale: float = 0.9, ax=None
) -> Figure:
    """A grid of images (``nrow`` per row); pixels in [0, 255] or [0, 1]."""
    grid = _to_grid_array(images, nrow)
    if ax is None:
        h, w = grid.shape[:2]
        fig, ax = plt.subplots(
            figsize=(max(2.0, scale * w / 30), max(1.0, scale * h / 30)), constrained_layout=True
        )
    else:
        fig = ax.figure
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return fig


@torch.no_grad()
def interpolation_grid(
    model: Any, x_a: Any, x_b: Any, steps: int = 8, *, title: str | None = None
) -> Figure:
    """Decode straight lines between the latents of pairs of images: one row per pair.

    ``x_a`` and ``x_b`` are batches of images (the same number). Uses ``model.flow`` forward
    to encode and inverse to decode (a multi-scale flow resamples its split-off parts).
    """
    flow = getattr(model, "flow", model)
    dev = _device_of(flow)
    xa = torch.as_tensor(x_a).to(dev)
    xb = torch.as_tensor(x_b).to(dev)
    if xa.dim() == 3:
        xa, xb = xa[None], xb[None]
    was_training = flow.training
    flow.eval()
    try:
        za, zb = flow(xa.float())[0], flow(xb.float())[0]
        rows = []
        for w in torch.linspace(0, 1, steps):
            rows.append(flow.inverse((1 - w) * za + w * zb)[0])
    finally:
        flow.train(was_training)
    imgs = torch.stack(rows, 1).flatten(0, 1)  # pair-major
    return image_grid(imgs, nrow=steps, title=title or "latent interpolation")


# ---------------------------------------------------------------------------------- GIFs


class Gif(NamedTuple):
    """What a GIF writer made: ``path`` and the number of ``frames`` in the file.

    Shows itself in a notebook (``_repr_html_``); ``str(gif)`` is the path.
    """

    path: str
    frames: int

    def __str__(self) -> str:
        return self.path

    def __fspath__(self) -> str:
        return self.path

    def _repr_html_(self) -> str:
        data = base64.b64encode(Path(self.path).read_bytes()).decode()
        return f'<img src="data:image/gif;base64,{data}" alt="{Path(self.path).name}"/>'


def write_gif(
    frames: Sequence[Any],
    path: str | os.PathLike,
    *,
    fps: float = 12,
    hold_last: float = 1.0,
    durations: Sequence[float] | None = None,
) -> Gif:
    """Write RGB frames (``(H, W, 3)`` uint8 arrays or PIL images) as a looping GIF.

    Every frame lasts ``1/fps`` s (or ``durations[i]`` ms); the last one ``hold_last`` s more.
    Pillow would silently merge identical consecutive frames, so that is done here first and
    the returned frame count is what the file holds. Written atomically.
    """
    from nfcourse.train import atomic_write_bytes

    if not frames:
        raise ValueError("no frames to write")
    ims = [
        f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f, dtype=np.uint8))
        for f in frames
    ]
    ims = [im.convert("RGB") for im in ims]
    ms = list(durations) if durations is not None else [1000.0 / fps] * len(ims)
    ms[-1] += 1000.0 * hold_last
    # one palette for every frame keeps colours steady: built from a strip of up to 16 frames
    step = max(1, len(ims) // 16)
    sample = ims[::step]
    strip = Image.new("RGB", (max(im.width for im in sample), sum(im.height for im in sample)))
    y = 0
    for im in sample:
        strip.paste(im, (0, y))
        y += im.height
    palette = strip.quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    kept, kept_ms, last = [], [], None
    for im, d in zip(ims, ms, strict=True):
        q = im.quantize(palette=palette, dither=Image.Dither.NONE)
        arr = np.asarray(q)
        if last is not None and arr.shape == last.shape and np.array_equal(arr, last):
            kept_ms[-1] += d  # Pillow would merge it anyway; count what the file will hold
            continue
        kept.append(q)
        kept_ms.append(d)
        last = arr
    buf = io.BytesIO()
    kept[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=kept[1:],
        duration=[max(20, int(round(d))) for d in kept_ms],
        loop=0,
        disposal=1,
        optimize=False,
    )
    atomic_write_bytes(path, buf.getvalue())
    return Gif(str(path), _count_frames(path))


def _count_frames(path: str | os.PathLike) -> int:
    with Image.open(path) as im:
        return getattr(im, "n_frames", 1)


def read_gif(path: str | os.PathLike) -> tuple[list[np.ndarray], list[int]]:
    """The frames of a GIF as ``(H, W, 3)`` uint8 arrays, and their durations in ms."""
    frames, durations = [], []
    with Image.open(path) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
            durations.append(int(im.info.get("duration", 100)))
    return frames, durations


def _points_frames(
    states: Sequence[np.ndarray],
    labels: Sequence[str],
    *,
    colors: np.ndarray,
    limits=None,
    size: float = 4.0,
    figsize: float = 4.0,
    dpi: int = 80,
    title: str | None = None,
) -> list[np.ndarray]:
    """Render each ``(B, 2)`` state as one frame with the same axes limits and colours."""
    xlim, ylim = limits if limits is not None else _square_limits(*states)
    fig, ax = plt.subplots(figsize=(figsize, figsize), dpi=dpi)
    fig.subplots_adjust(0.02, 0.02, 0.98, 0.9)
    sc = ax.scatter(states[0][:, 0], states[0][:, 1], s=size, c=colors, linewidths=0, alpha=0.8)
    _style(ax, xlim, ylim)
    head = ax.set_title(title or "", fontsize=10)
    bar = ax.plot(
        [0, 0],
        [0, 0],
        transform=ax.transAxes,
        color="#444444",
        lw=3,
        solid_capstyle="butt",
        clip_on=False,
    )[0]
    frames = []
    try:
        for i, (s, label) in enumerate(zip(states, labels, strict=True)):
            sc.set_offsets(s)
            head.set_text(f"{title}\n{label}" if title else label)
            frac = i / max(1, len(states) - 1)
            bar.set_data([0, frac], [-0.012, -0.012])  # a progress bar under the axes
            frames.append(_figure_to_rgb(fig))
    finally:
        plt.close(fig)
    return frames


def _layer_list(layers: Any) -> list[Any]:
    """A FlowModel, a Compose or a sequence of layers -> the list of layers (forward order)."""
    layers = getattr(layers, "flow", layers)
    return list(getattr(layers, "layers", layers))


@torch.no_grad()
def layer_states(layers: Any, z: torch.Tensor, context: Any = None) -> list[torch.Tensor]:
    """Run noise ``z`` backward through a discrete flow: ``[z, f_K^-1(z), ..., x]``.

    ``layers`` is a sequence of layers in forward (data -> noise) order, a ``Compose``, or a
    model with ``.flow``; each layer's ``inverse`` is called, the last layer first.
    """
    states = [z]
    for layer in reversed(_layer_list(layers)):
        z = layer.inverse(z, context)[0] if context is not None else layer.inverse(z)[0]
        states.append(z)
    return states


def layer_morph_gif(
    layers: Any,
    z_or_points: Any,
    path: str | os.PathLike,
    frames_per_layer: int = 8,
    *,
    fps: float = 12,
    hold: float = 1.0,
    limits=None,
    seed: int = 0,
    title: str | None = "layer by layer",
    size: float = 4.0,
    dpi: int = 80,
) -> Gif:
    """A GIF of noise turning into data one discrete layer at a time.

    Noise is run backward through ``layers`` (see :func:`layer_states`); between the outputs
    of successive layers the points move along straight lines in ``frames_per_layer`` steps.
    The file has ``frames_per_layer * len(layers) + 1`` frames (identical consecutive frames,
    e.g. from an identity layer, are merged). Limits stay fixed across frames.

    Args:
        layers: the flow's layers in forward order, a Compose, or a FlowModel.
        z_or_points: ``(B, 2)`` noise, or an int: that many N(0, I) points (``seed``).
        path: where to write the GIF (Pillow; no ffmpeg needed).
    """
    if isinstance(z_or_points, int):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(z_or_points, 2, generator=gen)
    else:
        z = torch.as_tensor(z_or_points).float()
    seq = _layer_list(layers)
    mods = [m for m in seq if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        dev = next((p.device for m in mods for p in m.parameters()), torch.device("cpu"))
        states = [_np(s) for s in layer_states(seq, z.to(dev))]
    finally:
        for m, mode in zip(mods, modes, strict=True):
            m.train(mode)
    n_layers = len(states) - 1
    frames, labels = [states[0]], ["noise z ~ N(0, I)"]
    for k in range(n_layers):
        a, b = states[k], states[k + 1]
        for i in range(1, frames_per_layer + 1):
            w = i / frames_per_layer
            frames.append((1 - w) * a + w * b)
            labels.append(
                f"after {k + w:.2f} of {n_layers} layers"
                if i < frames_per_layer
                else (f"after layer {k + 1} of {n_layers}")
            )
    labels[-1] = f"data (all {n_layers} layers)"
    rgb = _points_frames(
        frames,
        labels,
        colors=_colors_by_angle(states[0]),
        limits=limits,
        size=size,
        dpi=dpi,
        title=title,
    )
    return write_gif(rgb, path, fps=fps, hold_last=hold)


def _states_from(states_or_cnf: Any, n: int, times: Any, seed: int):
    target = states_or_cnf
    if not hasattr(target, "sample_path") and hasattr(getattr(target, "flow", None), "sample_path"):
        target = target.flow  # a FlowModel around a CNF
    if hasattr(target, "sample_path"):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, 2, generator=gen)
        if times is None:  # from noise (t = T) to data (t = 0)
            times = torch.linspace(float(getattr(target, "T", 1.0)), 0.0, 41)
        t = torch.as_tensor(times, dtype=torch.float32)
        dev = _device_of(target)
        with torch.no_grad():
            states = target.sample_path(z.to(dev), t.to(dev))
        return _np(states), _np(t)
    states = _np(states_or_cnf)
    t = _np(times) if times is not None else np.linspace(0, 1, len(states))
    return states, t


def ode_morph_gif(
    states: Any,
    path: str | os.PathLike,
    *,
    times: Any = None,
    n: int = 2000,
    fps: float = 12,
    hold: float = 1.0,
    limits=None,
    seed: int = 0,
    title: str | None = "continuous flow",
    size: float = 4.0,
    dpi: int = 80,
) -> Gif:
    """A GIF of points flowing along an ODE: one frame per time.

    Args:
        states: ``(T, B, 2)`` points from noise to data (tensor or array), or an object with
            ``sample_path(z, times) -> (T, B, 2)`` (a :class:`nfcourse.cnf.CNF`, or a
            FlowModel around one), which then gets ``n`` N(0, I) points and ``times``
            (default: 41 times from the CNF's ``T``, noise, down to 0, data).
        times: the times of the states, for the frame labels.
    """
    pts, t = _states_from(states, n, times, seed)
    if pts.ndim != 3 or pts.shape[-1] != 2:
        raise ValueError(f"ode_morph_gif expects (T, B, 2) states, got {pts.shape}")
    labels = [f"t = {float(v):.2f}" for v in t]
    rgb = _points_frames(
        list(pts),
        labels,
        colors=_colors_by_angle(pts[0]),
        limits=limits,
        size=size,
        dpi=dpi,
        title=title,
    )
    return write_gif(rgb, path, fps=fps, hold_last=hold)


def side_by_side_gif(
    gif_a: Any,
    gif_b: Any,
    path: str | os.PathLike,
    *,
    fps: float = 12,
    hold: float = 1.0,
    gap: int = 8,
) -> Gif:
    """Put two GIFs next to each other. The shorter one is stretched in time so both start
    and finish together (the output has as many frames as the longer one)."""
    fa, _ = read_gif(str(gif_a))
    fb, _ = read_gif(str(gif_b))
    n = max(len(fa), len(fb))
    h = max(fa[0].shape[0], fb[0].shape[0])

    def pick(frames, i):
        j = round(i * (len(frames) - 1) / max(1, n - 1))
        f = frames[j]
        if f.shape[0] < h:
            f = np.concatenate([f, np.full((h - f.shape[0], *f.shape[1:]), 255, np.uint8)])
        return f

    spacer = np.full((h, gap, 3), 255, np.uint8)
    frames = [np.concatenate([pick(fa, i), spacer, pick(fb, i)], axis=1) for i in range(n)]
    return write_gif(frames, path, fps=fps, hold_last=hold)


def show_gif(path: Any):
    """Display a GIF inline in a notebook (returns an ``IPython.display.Image``)."""
    from IPython.display import Image as IPImage

    return IPImage(data=Path(str(path)).read_bytes(), format="gif")


# ------------------------------------------------------------------------------ explorer


def explorer(
    frames: Any,
    labels: Sequence[str] | None = None,
    *,
    draw: Callable[[Any, Any, int], None] | None = None,
    description: str = "layer",
    limits=None,
    size: float = 4.0,
):
    """An ipywidgets slider over frames (layers, or times t) that redraws a matplotlib figure.

    Args:
        frames: a sequence of ``(B, 2)`` point clouds (e.g. :func:`layer_states`, or a
            CNF's ``sample_path``), or of images ``(B, C, H, W)``.
        labels: one title per frame (``"t = 0.50"``, ``"after layer 3"``).
        draw: ``draw(ax, frame, index)`` to draw a frame yourself.
        description: the slider's label.

    Returns the widget (a VBox of the slider and the figure's output area); its
    ``.slider`` and ``.redraw(i)`` are there for scripting.
    """
    import ipywidgets as widgets

    frames = [_np(f) if not isinstance(f, np.ndarray) else f for f in frames]
    if not frames:
        raise ValueError("no frames to explore")
    labels = (
        list(labels) if labels is not None else [f"{description} {i}" for i in range(len(frames))]
    )
    points = frames[0].ndim == 2 and frames[0].shape[-1] == 2
    if points and limits is None:
        limits = _square_limits(*frames)
    colors = _colors_by_angle(frames[0]) if points else None
    out = widgets.Output()
    slider = widgets.IntSlider(
        value=0, min=0, max=len(frames) - 1, step=1, description=description, continuous_update=True
    )

    def redraw(i: int) -> Figure:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        if draw is not None:
            draw(ax, frames[i], i)
        elif points:
            scatter(ax, frames[i], colors, size)
            _style(ax, *limits)
        else:
            ax.imshow(_to_grid_array(frames[i], 8), interpolation="nearest")
            ax.axis("off")
        ax.set_title(labels[i])
        out.clear_output(wait=True)
        with out:
            try:
                from IPython.display import display

                display(fig)
            except ImportError:  # pragma: no cover - IPython is installed with ipywidgets
                pass
        plt.close(fig)
        return fig

    slider.observe(lambda change: redraw(change["new"]), names="value")
    box = widgets.VBox([slider, out])
    box.slider = slider
    box.redraw = redraw
    redraw(0)
    return box
