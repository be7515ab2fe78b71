"""The one training loop of the course: :func:`fit`.

``fit(model, data, steps=...)`` trains any model that has ``loss(x)`` (a :class:`FlowModel`)
or ``log_prob(x)``, shows a progress bar with the running loss and its unit, and returns a
:class:`History`. It

* puts the whole data set on the device once when it fits and draws batches by indexing a
  random permutation there (no per-batch copies);
* is deterministic given ``seed``: the batch order comes from its own ``torch.Generator``
  and the global RNG (dequantization noise, ...) is seeded at the start of a fresh run;
* stops with a :class:`NonFiniteLossError` naming the step and the first layer whose output
  or log-det went NaN/Inf, instead of training on garbage;
* writes checkpoints atomically and resumes from them bit for bit:
  ``fit(model, data, steps=5000, checkpoint="runs/moons.pt")`` picks up where an earlier,
  interrupted call stopped (Ctrl-C saves one too).

Example:
    >>> history = fit(model, x_train, steps=fast_steps(20_000, 300), lr=1e-3)   # doctest: +SKIP
    >>> history.loss[-1], history.unit                                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

import nfcourse.distributed as ddist
from nfcourse.config import fast_mode

__all__ = [
    "fit",
    "evaluate",
    "scaled_lr",
    "History",
    "NonFiniteLossError",
    "CheckpointError",
    "fast_steps",
    "lr_factor",
    "resolve_device",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_bytes",
    "atomic_write_json",
]

SCHEDULES = ("cosine", "onecycle", "constant", "step")
CHECKPOINT_VERSION = 1

NON_FINITE_HINTS = (
    "Usual causes: (1) the learning rate is too high (try lr / 10, warmup=..., or "
    "grad_clip=1.0); (2) an unbounded scale: exp(s) of a large s overflows (bound s, e.g. "
    "s = scale * tanh(s_raw), and zero-initialise the last layer so the flow starts as the "
    "identity); (3) the log of zero: log(x) or logit(x) at x = 0 or 1 (dequantize pixels into "
    "(0, 1) and squeeze them away from the ends, e.g. alpha + (1 - 2 alpha) x); (4) inputs "
    "that are not what the model expects (unstandardised data, pixels outside [0, 255])."
)


# --------------------------------------------------------------------------------- helpers


def fast_steps(full: int, fast: int) -> int:
    """``fast`` when ``NFCOURSE_FAST=1`` (see :func:`nfcourse.fast_mode`), else ``full``.

    Example:
        >>> fast_steps(20_000, 300) in (20_000, 300)
        True
    """
    return int(fast) if fast_mode() else int(full)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) picks CUDA when it is available, else the CPU; ``"cuda"`` becomes
    ``"cuda:<current device>"``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # compare equal to x.device
    return device


def lr_factor(
    schedule: str | Callable[[int, int], float], step: int, total: int, warmup: int = 0
) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based) of ``total`` steps.

    * ``"constant"``: 1 (after the warmup);
    * ``"cosine"``: half a cosine from 1 down to 0 over the steps after the warmup;
    * ``"onecycle"``: a linear rise from 1/25 to 1 over ``warmup`` steps (30 % of the run when
      ``warmup=0``), then a cosine down to 1/10^4 (Smith's one-cycle policy);
    * ``"step"``: 1, then 0.1 from half-way, 0.01 from three quarters;
    * a callable ``f(step, total) -> factor``.

    ``warmup`` steps of linear warm-up (from ``1/warmup`` to 1) come first for every schedule
    except ``"onecycle"``, which has its own.
    """
    total = max(int(total), 1)
    if callable(schedule):
        return float(schedule(step, total))
    if schedule == "onecycle":
        rise = warmup if warmup > 0 else max(1, int(0.3 * total))
        if step < rise:
            return 1 / 25 + (1 - 1 / 25) * step / rise
        t = (step - rise) / max(1, total - rise - 1)
        lo = 1e-4
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if schedule == "step":
        return 1.0 if t < 0.5 else (0.1 if t < 0.75 else 0.01)
    raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES} or a callable")


# --------------------------------------------------------------------------------- history


@dataclass
class History:
    """What :func:`fit` recorded. Plain lists and numbers: picklable and JSON-able.

    Attributes:
        loss: training loss of every step (in ``unit``).
        lr: learning rate of every step.
        grad_norm: total gradient norm of every step (before clipping).
        val: validation loss (same unit) at each evaluation; ``val_step`` says after how
            many steps it was measured.
        unit: ``"nats"`` or ``"bits/dim"`` (the model's ``loss_unit``).
        steps: steps done (counting those of resumed runs).
        epochs: passes over the training data, ``steps * batch_size / N``.
        wall_time: seconds spent training (all runs together).
        world_size: processes that trained it data-parallel (the last run's).
    """

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    unit: str = "nats"
    steps: int = 0
    epochs: float = 0.0
    wall_time: float = 0.0
    batch_size: int = 0
    device: str = ""
    seed: int = 0
    world_size: int = 1

    def __len__(self) -> int:
        return self.steps

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 5 % of the steps (at least 1, at most 100)."""
        if not self.loss:
            return float("nan")
        k = min(100, max(1, len(self.loss) // 20))
        return sum(self.loss[-k:]) / k

    @property
    def best_val(self) -> float:
        return min(self.val) if self.val else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The history as JSON text; also written (atomically) to ``path`` when given."""
        text = json.dumps(_json_safe(self.to_dict()))
        if path is not None:
            atomic_write_bytes(path, text.encode())
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> History:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        val = f", best val {self.best_val:.4f}" if self.val else ""
        return (
            f"History({self.steps} steps, {self.epochs:.2f} epochs, final loss "
            f"{self.final_loss:.4f} {self.unit}{val}, {self.wall_time:.1f} s on {self.device})"
        )


def _json_safe(obj: Any) -> Any:
    """NaN and Inf become strings ("nan", "inf") so that the JSON is standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only when the block finishes: written as a temporary
    file in the same folder, flushed to disk, then ``os.replace``-d over ``path``. Readers see
    the old file or the new one, never half of one; a failure leaves no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + ``os.replace``)."""
    with _atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``json.dump`` through :func:`atomic_write_bytes` (NaN/Inf written as strings)."""
    return atomic_write_bytes(path, (json.dumps(_json_safe(obj), indent=2) + "\n").encode())


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for is missing, unreadable or does not fit the model."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` written atomically (temporary file + ``os.replace``)."""
    with _atomic_file(path) as f:
        torch.save(state, f)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit`; a clear :class:`CheckpointError` when the file
    is missing, truncated or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (nothing to resume from)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is corrupt or "
            "was not written by nfcourse.train.fit. Delete it to start afresh."
        ) from err
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(
            f"{path} is not an nfcourse checkpoint (expected a dict with 'model' and 'step')"
        )
    return state


# ---------------------------------------------------------------------- non-finite guard


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or an infinite loss (or gradient).

    Attributes:
        step: the 0-based step at which it happened.
        layer: dotted name of the first flow layer (a module with ``inverse``) whose output
            or log-det was non-finite (``None`` when no layer was to blame).
        module: the innermost submodule that produced it (``layer`` itself, or e.g. a
            ``Linear`` of its network).
        module_type: that submodule's class name.
        where: ``"output"``, ``"log_det"``, ``"gradient"``, ``"input data"`` or ``"loss"``.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        layer: str | None = None,
        module: str | None = None,
        module_type: str | None = None,
        where: str | None = None,
    ):
        super().__init__(message)
        self.step = step
        self.layer = layer
        self.module = module if module is not None else layer
        self.module_type = module_type
        self.where = where


def _nonfinite_part(out: Any) -> str | None:
    """Which part of a module's output holds a NaN/Inf: None if none does."""
    if isinstance(out, Tensor):
        if out.is_floating_point() and not bool(torch.isfinite(out).all()):
            return "output"
        return None
    if isinstance(out, (tuple, list)):
        names = (
            ["output", "log_det"] if len(out) == 2 else [f"output[{i}]" for i in range(len(out))]
        )
        for name, part in zip(names, out, strict=False):
            if _nonfinite_part(part) is not None:
                return name
    return None


def _enclosing_flow_layer(model: nn.Module, name: str) -> str | None:
    """The innermost ancestor of submodule ``name`` (itself included) that is a flow layer
    (has ``inverse``) but not a container of layers."""
    modules = dict(model.named_modules())
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        mod = modules.get(cand)
        if mod is not None and hasattr(mod, "inverse") and not hasattr(mod, "layers"):
            return cand
    return None


def diagnose_non_finite(
    model: nn.Module, batch: Tensor, loss_of: Callable[[Tensor], Tensor], step: int
) -> NonFiniteLossError:
    """Re-run ``batch`` with forward hooks on every submodule and build the error that names
    the first one whose output or log-det went NaN/Inf."""
    if batch.is_floating_point() and not bool(torch.isfinite(batch).all()):
        return NonFiniteLossError(
            f"non-finite loss at step {step}: the training batch itself contains NaN or Inf. "
            "Clean the data set (torch.isfinite(data).all()).",
            step=step,
            where="input data",
        )
    bad_params = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    found: list[tuple[str, nn.Module, str]] = []

    def hook(name: str):
        def _hook(module, inputs, output):
            if found:
                return
            part = _nonfinite_part(output)
            if part is not None:  # "input": it was handed non-finite values already
                found.append((name, module, part if _nonfinite_part(inputs) is None else "input"))

        return _hook

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if n  # skip root
    ]
    err_text = None
    try:
        with torch.no_grad():
            loss_of(batch)
    except Exception as err:  # noqa: BLE001 - report it with the diagnosis
        err_text = f"{type(err).__name__}: {err}"
    finally:
        for h in handles:
            h.remove()

    if found:
        name, module, part = found[0]
        layer = _enclosing_flow_layer(model, name)
        inside = (
            f" inside flow layer '{layer}' ({type(dict(model.named_modules())[layer]).__name__})"
            if layer and layer != name
            else ""
        )
        if part == "input":
            what = (
                f"the first module to see non-finite values is '{name}' "
                f"({type(module).__name__}){inside}, whose input already held them: something "
                "outside a module (a log, a division, an exp in forward code) produced them"
            )
        else:
            what = (
                f"the first non-finite value came from layer '{name}' "
                f"({type(module).__name__}){inside}: its {part} holds NaN/Inf"
            )
        msg = f"non-finite loss at step {step}: {what}."
        if bad_params:
            msg += f" Parameters already non-finite: {', '.join(bad_params[:5])}."
        return NonFiniteLossError(
            msg + " " + NON_FINITE_HINTS,
            step=step,
            layer=layer or name,
            module=name,
            module_type=type(module).__name__,
            where=part,
        )
    detail = (
        f" (re-running the batch raised {err_text})"
        if err_text
        else " (re-running the batch gave finite layer outputs: the loss itself, e.g. the prior"
        " log-density or a log of zero in the model's log_prob, or a random draw went bad)"
    )
    if bad_params:
        detail += f"; parameters already non-finite: {', '.join(bad_params[:5])}"
    return NonFiniteLossError(
        f"non-finite loss at step {step}: no layer output was NaN/Inf{detail}. {NON_FINITE_HINTS}",
        step=step,
        where="loss",
    )


# ------------------------------------------------------------------------------------ fit


def _as_tensor(data: Any, float_dtype: torch.dtype) -> Tensor:
    if isinstance(data, Tensor):
        x = data
    elif hasattr(data, "tensors"):  # TensorDataset
        x = data.tensors[0]
    else:
        x = torch.as_tensor(data)
    x = x.detach()
    if x.is_floating_point() and x.dtype != float_dtype:
        x = x.to(float_dtype)
    return x


def _place(x: Tensor, device: torch.device) -> Tensor:
    """Move the whole data set to ``device`` when it fits in a quarter of the free memory;
    otherwise keep it on the CPU (pinned) and copy batch by batch."""
    if x.device == device:
        return x
    if device.type == "cpu":
        return x.cpu()
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except Exception:  # noqa: BLE001
            free = 0
        if x.numel() * x.element_size() <= 0.25 * free:
            return x.to(device)
        return x.pin_memory() if x.device.type == "cpu" else x.cpu().pin_memory()
    return x.to(device)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _default_loss(model: nn.Module) -> Callable[[Tensor], Tensor]:
    if hasattr(model, "loss"):
        return model.loss
    if hasattr(model, "log_prob"):
        return lambda x: -model.log_prob(x).mean()
    raise TypeError(f"{type(model).__name__} has neither loss(x) nor log_prob(x); pass loss_fn=...")


def _epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The batch order of one epoch: a function of (seed, epoch) only, so that a resumed run
    draws exactly the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps ``seed`` (so one process in a group trains as without one); the others get
    their own streams, so that their dequantization noise is independent."""
    return int(seed) + 1_000_003 * int(rank)


@torch.no_grad()
def _loss_sum(
    model: nn.Module,
    x: Tensor,
    loss_of: Callable[[Tensor], Tensor],
    batch_size: int,
    dev: torch.device,
    seed: int,
) -> tuple[float, int]:
    """``(sum of per-batch mean loss * batch length, count)`` over ``x`` in eval mode, the
    global RNG seeded with ``seed`` inside and restored after."""
    was_training = model.training
    model.eval()
    devices = (
        [dev.index if dev.index is not None else torch.cuda.current_device()]
        if dev.type == "cuda"
        else []
    )
    total, count = 0.0, 0
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for i in range(0, len(x), batch_size):
                b = x[i : i + batch_size].to(dev, non_blocking=True)
                total += float(loss_of(b)) * len(b)
                count += len(b)
    finally:
        model.train(was_training)
    return total, count


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 1024,
    loss_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    distributed: bool | None = None,
) -> float:
    """Mean loss (the unit of ``model.loss``) over ``data``, in eval mode, without gradients.

    The global RNG (dequantization noise) is seeded with ``seed`` inside and restored after,
    so the number is reproducible and training randomness is untouched. Under
    ``torch.distributed`` (``distributed=None`` follows the process group) every process scores
    its share of ``data`` and the mean is over all of it, the same on every rank.
    """
    param = next(model.parameters(), None)
    dev = (
        torch.device(device)
        if device is not None
        else (param.device if param is not None else torch.device("cpu"))
    )
    x = _as_tensor(data, param.dtype if param is not None else torch.float32)
    loss_of = (lambda b: loss_fn(model, b)) if loss_fn is not None else _default_loss(model)
    use_dist = ddist.is_distributed() if distributed is None else bool(distributed)
    if use_dist:
        r, w = ddist.rank(), ddist.world_size()
        lo, hi = ddist.shard_bounds(len(x), r, w)
        total, count = _loss_sum(model, x[lo:hi], loss_of, batch_size, dev, _rank_seed(seed, r))
        sums = ddist.all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64,
                                                 device=_collective_device(dev)))
        total, count = float(sums[0]), int(sums[1])
    else:
        total, count = _loss_sum(model, x, loss_of, batch_size, dev, seed)
    return total / max(count, 1)


def _collective_device(dev: torch.device) -> torch.device:
    """Where small tensors for collectives live: NCCL needs CUDA ones, gloo takes either."""
    if ddist.is_distributed() and torch.distributed.get_backend() == "nccl":
        return dev
    return torch.device("cpu")


def scaled_lr(
    lr: float, batch_size: int, base_batch_size: int = 128, rule: str = "sqrt"
) -> float:
    """The learning rate for ``batch_size`` when ``lr`` was tuned at ``base_batch_size``.

    ``"sqrt"``: ``lr * sqrt(B / B0)`` (the usual rule for Adam: the gradient noise falls as
    ``1/sqrt(B)``); ``"linear"``: ``lr * B / B0`` (Goyal et al. 2017, "Accurate, large
    minibatch SGD", for SGD). Pair a scaled rate with a warm-up (``fit(..., warmup=...)``):
    large rates on an untrained flow are what makes log-dets blow up.

    Example:
        >>> scaled_lr(1e-3, 512, 128)
        0.002
    """
    if batch_size <= 0 or base_batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got {batch_size} and {base_batch_size}")
    ratio = batch_size / base_batch_size
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "linear":
        return lr * ratio
    raise ValueError(f"unknown rule {rule!r}; use 'sqrt' or 'linear'")


@contextlib.contextmanager
def _tf32(enabled: bool, dev: torch.device) -> Iterator[None]:
    """TF32 matmuls and convolutions on or off for the block (CUDA only), restored after."""
    if dev.type != "cuda":
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _needs_data_init(model: nn.Module) -> bool:
    """True when some layer initialises itself from the first batch it sees (ActNorm's
    boolean ``initialized`` buffer still False)."""
    return any(
        name.rsplit(".", 1)[-1] == "initialized" and b.dtype == torch.bool and not bool(b.all())
        for name, b in model.named_buffers()
    )


def fit(
    model: nn.Module,
    data: Any,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    schedule: str | Callable[[int, int], float] = "cosine",
    warmup: int = 0,
    grad_clip: float | None = None,
    weight_decay: float = 0.0,
    device: str | torch.device = "auto",
    seed: int = 0,
    val_data: Any = None,
    val_every: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = 1000,
    resume: bool | None = None,
    progress: bool = True,
    loss_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    desc: str | None = None,
    callback: Callable[[int, History], bool | None] | None = None,
    distributed: bool | None = None,
    compile: bool | str | dict[str, Any] = False,
    channels_last: bool = False,
    fused: bool | None = None,
    tf32: bool = False,
) -> History:
    """Train ``model`` by minimising its loss on ``data`` with Adam(W); returns a History.

    Args:
        model: a module with ``loss(x) -> scalar`` and ``loss_unit`` (a FlowModel), or with
            ``log_prob(x) -> (B,)`` (then the loss is ``-log_prob(x).mean()`` in nats).
        data: a tensor ``(N, ...)`` (float vectors, or uint8 / integer-valued images), a
            NumPy array or a TensorDataset.
        steps / epochs: how long to train (give one; ``epochs`` may be fractional). Neither:
            one epoch.
        batch_size, lr, weight_decay: AdamW settings (``weight_decay=0`` is plain Adam).
            ``batch_size`` is the global batch: under ``torch.distributed`` it is shared out
            over the processes. For larger batches see :func:`scaled_lr`.
        schedule: ``"cosine"`` (default), ``"onecycle"``, ``"constant"``, ``"step"`` or a
            callable ``f(step, total) -> factor``; ``warmup`` linear warm-up steps. See
            :func:`lr_factor`.
        grad_clip: clip the gradient's total norm to this value.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ... The model is
            moved there and stays there. Under ``torch.distributed``, ``"auto"`` is the
            process's own GPU (``cuda:$LOCAL_RANK``).
        seed: fixes the batch order and the training randomness (the global torch RNG is
            seeded with it when a fresh run starts; rank ``r > 0`` of a process group uses a
            stream of its own).
        val_data, val_every: evaluate the mean loss on ``val_data`` every ``val_every``
            steps (default: once per epoch) and at the end.
        checkpoint, checkpoint_every: write model, optimizer, RNG states, step and history
            to this file every ``checkpoint_every`` steps, at the end, and on Ctrl-C (rank 0
            writes it; every rank reads it to resume).
        resume: ``None`` (default) resumes from ``checkpoint`` when that file exists;
            ``True`` demands it (a missing or corrupt file is a :class:`CheckpointError`);
            ``False`` starts afresh and overwrites it.
        progress: show a tqdm progress bar with the running loss (rank 0 only).
        loss_fn: ``loss_fn(model, batch) -> scalar`` to use instead of ``model.loss``. It
            must be a mean over the batch (data-parallel training weights it by share size).
        callback: ``callback(step, history)`` after every step (on every rank); returning
            True stops training there (rank 0's answer counts), e.g. for a wall-clock budget.
        distributed: ``None`` (default) trains data-parallel when a ``torch.distributed``
            process group is initialised (or torchrun's variables are set: see
            :func:`nfcourse.distributed.init_from_env`); ``False`` never does. See
            :mod:`nfcourse.distributed` for what is and is not the same as one process.
        compile: ``torch.compile`` the loss computation (``True``, or a mode such as
            ``"max-autotune"`` or ``"reduce-overhead"``, which adds CUDA graphs, or a dict of
            ``torch.compile`` keyword arguments). The first steps are slow while it compiles
            (about 45 s for a tiny flow on a 2-core CPU; the diagnosis of a NaN runs eagerly).
        channels_last: store the model's 4-D weights and the image batches channels-last
            (faster convolutions on tensor-core GPUs; the numbers are the same).
        fused: the fused (one-kernel) AdamW; ``None`` uses it on CUDA.
        tf32: allow TF32 matmuls and convolutions on CUDA during training (faster on Ampere
            and later GPUs, with 10-bit mantissas). Off by default: fit turns PyTorch's
            cuDNN TF32 default off for the run, because a 1x1 convolution evaluated in TF32
            no longer matches the ``slogdet`` of its weight to float32 precision.

    Raises:
        NonFiniteLossError: the loss or gradient went NaN/Inf; the message names the step and
            the first layer whose output or log-det was non-finite.
        CheckpointError: resuming was requested and the checkpoint is missing or unreadable.
    """
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if not callable(schedule) and schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES} or a callable")
    if distributed is None:
        distributed = ddist.init_from_env()
    elif distributed and not ddist.is_distributed():
        raise RuntimeError(
            "fit(distributed=True) needs an initialised torch.distributed process group "
            "(launch with torchrun, or nfcourse.distributed.launch)"
        )
    world = ddist.world_size() if distributed else 1
    rank = ddist.rank() if distributed else 0
    main = rank == 0
    if distributed and (device is None or device == "auto") and torch.cuda.is_available():
        device = f"cuda:{ddist.local_rank()}"
    dev = resolve_device(device)
    model.to(dev)
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError(f"{type(model).__name__} has no parameters to train")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = _as_tensor(data, param.dtype)
    n = len(x)
    if n == 0:
        raise ValueError("the training data is empty")
    batch_size = int(min(batch_size, n))
    per_epoch = math.ceil(n / batch_size)
    if steps is None:
        steps = max(1, round((epochs if epochs is not None else 1) * per_epoch))
    steps = int(steps)
    if val_data is not None and not val_every:
        val_every = per_epoch
    unit = getattr(loss_fn, "unit", None) or getattr(model, "loss_unit", "nats")
    loss_of = (lambda b: loss_fn(model, b)) if loss_fn is not None else _default_loss(model)

    params = [p for p in model.parameters() if p.requires_grad]
    if fused is None:
        fused = dev.type == "cuda" and all(p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {})
    )
    history = History(
        unit=unit, batch_size=batch_size, device=str(dev), seed=seed, world_size=world
    )
    start = 0

    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt_path is None:
        raise CheckpointError("resume=True needs checkpoint=<path>")
    if ckpt_path is not None and resume is not False and (resume or ckpt_path.exists()):
        state = load_checkpoint(ckpt_path, map_location=dev)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"checkpoint {ckpt_path} does not fit this model/optimizer: {err}"
            ) from err
        saved = state.get("config", {})
        now = {"batch_size": batch_size, "seed": seed, "n": n, "world_size": world}
        saved = {"world_size": 1, **saved}  # checkpoints from before world_size was saved
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
        ranks_rng = state.get("rng_ranks")
        if ranks_rng is not None and len(ranks_rng) == world:
            _set_rng_state(ranks_rng[rank], dev)
        elif world == 1 or rank == 0:
            _set_rng_state(state["rng"], dev)
        else:  # no saved stream for this rank: a fresh one that differs from rank 0's
            torch.manual_seed(_rank_seed(seed, rank) + int(state["step"]))
        if changed and main:
            warnings.warn(
                f"resuming {ckpt_path} with other settings than it was written with "
                f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); training "
                "goes on, but not as the uninterrupted run would have",
                stacklevel=2,
            )
        start = int(state["step"])
        history = History.from_dict(state["history"])
        history.device = str(dev)
        history.world_size = world
    else:
        torch.manual_seed(seed)

    val_x = _place(_as_tensor(val_data, param.dtype), dev) if val_data is not None else None
    x = _place(x, dev)
    on_device = x.device == dev

    def global_batch(step: int) -> Tensor:
        """Indices of the whole batch of ``step`` (the same on every rank)."""
        nonlocal perm, perm_epoch
        epoch, j = divmod(step, per_epoch)
        if epoch != perm_epoch:
            perm = _epoch_permutation(n, seed, epoch)
            perm = perm.to(dev) if on_device else perm
            perm_epoch = epoch
        return perm[j * batch_size : (j + 1) * batch_size]

    def fetch(idx: Tensor) -> Tensor:
        batch = x[idx] if on_device else x[idx].to(dev, non_blocking=True)
        if channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    perm: Tensor | None = None
    perm_epoch = -1

    if distributed and start == 0 and _needs_data_init(model):
        # Data-dependent layers (ActNorm) initialise from the first batch they see. One process
        # sees the whole first batch with the noise of `seed`; do exactly that on every rank
        # before DDP copies rank 0's parameters to all, so the start is the same as on one.
        was = model.training
        model.train()
        with torch.no_grad(), torch.random.fork_rng(
            devices=[dev.index] if dev.type == "cuda" and dev.index is not None else []
        ):
            torch.manual_seed(seed)
            loss_of(fetch(global_batch(0)))
        model.train(was)
    if distributed and start == 0 and rank > 0:
        torch.manual_seed(_rank_seed(seed, rank))

    # What a step calls: the loss itself, or a module around it (DDP needs its own forward
    # to be called to synchronise gradients; torch.compile compiles a module).
    step_fn: Callable[..., Tensor] | None = None
    wrapper: nn.Module | None = None
    if distributed or compile:
        wrapper = ddist.LossModule(model, loss_of)
        if distributed:
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            # Flows keep no running statistics: no buffer broadcast before every forward
            # (the one at construction stays). Newer torch calls the option forward_sync_buffers.
            no_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False}
            )
            wrapper = DistributedDataParallel(
                wrapper, device_ids=[dev.index] if dev.type == "cuda" else None, **no_sync
            )
        step_fn = wrapper
        if compile:
            options = (
                dict(compile)
                if isinstance(compile, dict)
                else {"mode": compile} if isinstance(compile, str) else {}
            )
            step_fn = torch.compile(wrapper, **options)

    def make_state(step: int, rng: dict[str, Any], rng_ranks: list | None) -> dict[str, Any]:
        state = {
            "version": CHECKPOINT_VERSION,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {
                "schedule": schedule if isinstance(schedule, str) else "callable",
                "total": steps,
                "warmup": warmup,
                "lr": lr,
            },
            "rng": rng,
            "history": history.to_dict(),
            "config": {"batch_size": batch_size, "seed": seed, "n": n, "world_size": world},
        }
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        return state

    def save(step: int, rng: dict[str, Any], collective: bool = True) -> None:
        """Rank 0 writes the checkpoint (with every rank's RNG state when ``collective``);
        the others wait until it is on disk."""
        rng_ranks = None
        if distributed and collective:
            rng_ranks = ddist.all_gather_objects({k: v.cpu() for k, v in rng.items()})
        if main:
            save_checkpoint(ckpt_path, make_state(step, rng, rng_ranks))
        if distributed and collective:
            ddist.barrier()

    bar = None
    if progress and main and start < steps:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=steps,
            initial=start,
            desc=desc or "training",
            unit="step",
            dynamic_ncols=True,
            leave=True,
        )

    was_training = model.training
    model.train()
    running = None
    t_start = time.perf_counter()
    wall_before = history.wall_time
    step = start
    rng_done = _rng_state(dev)  # the RNG state after the last completed step
    coll_dev = _collective_device(dev)
    try:
        with _tf32(tf32, dev):
            while step < steps:
                idx = global_batch(step)
                weight = 1.0
                if distributed:
                    lo, hi = ddist.shard_bounds(len(idx), rank, world)
                    # An empty share still runs (one example, weight 0) so that every rank
                    # joins the gradient all-reduce.
                    weight = world * (hi - lo) / len(idx)
                    idx = idx[lo:hi] if hi > lo else idx[:1]
                batch = fetch(idx)

                rate = lr * lr_factor(schedule, step, steps, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = rate
                optimizer.zero_grad(set_to_none=True)
                loss = step_fn(batch, weight) if step_fn is not None else loss_of(batch)
                if loss.dim() != 0:
                    raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
                loss.backward()
                max_norm = grad_clip if grad_clip is not None else float("inf")
                gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                loss_t = loss.detach().float()
                if distributed:
                    loss_t = ddist.all_reduce_sum(loss_t.to(coll_dev)).to(loss_t.device) / world
                loss_val, gnorm_val = torch.stack([loss_t, gnorm.float()]).tolist()
                if not math.isfinite(loss_val):
                    optimizer.zero_grad(set_to_none=True)
                    _set_rng_state(rng_done, dev)  # replay the same noise
                    raise diagnose_non_finite(model, batch, loss_of, step)
                if not math.isfinite(gnorm_val):
                    bad = [
                        name
                        for name, p in model.named_parameters()
                        if p.grad is not None and not bool(torch.isfinite(p.grad).all())
                    ]
                    layer = (
                        _enclosing_flow_layer(model, bad[0].rsplit(".", 1)[0]) if bad else None
                    )
                    raise NonFiniteLossError(
                        f"non-finite gradient at step {step} (the loss {loss_val:.4g} was "
                        f"finite): first parameter with a NaN/Inf gradient: "
                        f"{bad[0] if bad else '?'}"
                        + (f" in flow layer '{layer}'" if layer else "")
                        + ". "
                        + NON_FINITE_HINTS,
                        step=step,
                        layer=layer or (bad[0] if bad else None),
                        where="gradient",
                    )
                optimizer.step()
                step += 1
                rng_done = _rng_state(dev)
                history.loss.append(loss_val)
                history.lr.append(rate)
                history.grad_norm.append(gnorm_val)
                history.steps = step
                history.epochs = step * batch_size / n
                history.wall_time = wall_before + time.perf_counter() - t_start
                running = loss_val if running is None else 0.98 * running + 0.02 * loss_val

                if val_x is not None and (step % val_every == 0 or step == steps):
                    if not history.val_step or history.val_step[-1] != step:
                        history.val.append(
                            evaluate(
                                model,
                                val_x,
                                batch_size=max(batch_size, 1024),
                                loss_fn=loss_fn,
                                device=dev,
                                seed=seed,
                                distributed=distributed,
                            )
                        )
                        history.val_step.append(step)
                        model.train()
                if bar is not None:
                    post = f"loss {running:.4f} {unit}"
                    if history.val:
                        post += f", val {history.val[-1]:.4f}"
                    bar.set_postfix_str(post, refresh=False)
                    bar.update(1)
                stop = False
                if callback is not None:
                    stop = bool(callback(step, history))
                    if distributed:  # rank 0 decides, so every rank stops at the same step
                        flag = torch.tensor([float(stop and main)], device=coll_dev)
                        stop = bool(ddist.all_reduce_sum(flag).item() > 0)
                if (
                    ckpt_path is not None
                    and checkpoint_every
                    and step % checkpoint_every == 0
                    and step < steps
                    and not stop
                ):
                    history.wall_time = wall_before + time.perf_counter() - t_start
                    save(step, rng_done)
                if stop:
                    break
    except KeyboardInterrupt:
        if ckpt_path is not None and step > start:
            history.wall_time = wall_before + time.perf_counter() - t_start
            # No collectives here: the other ranks may already be gone.
            save(step, rng_done, collective=False)
            if bar is not None:
                bar.write(f"interrupted at step {step}; checkpoint saved to {ckpt_path}")
        raise
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
        # Drop DDP's gradient hooks with the wrapper, so that the model trains on as usual
        # (or under a new wrapper) afterwards.
        del step_fn, wrapper

    history.wall_time = wall_before + time.perf_counter() - t_start
    if ckpt_path is not None:
        save(step, _rng_state(dev))
    return history
