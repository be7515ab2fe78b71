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

from nfcourse.config import fast_mode

__all__ = [
    "fit",
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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 1024,
    loss_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> float:
    """Mean loss (the unit of ``model.loss``) over ``data``, in eval mode, without gradients.

    The global RNG (dequantization noise) is seeded with ``seed`` inside and restored after,
    so the number is reproducible and training randomness is untouched.
    """
    param = next(model.parameters(), None)
    dev = (
        torch.device(device)
        if device is not None
        else (param.device if param is not None else torch.device("cpu"))
    )
    x = _as_tensor(data, param.dtype if param is not None else torch.float32)
    loss_of = (lambda b: loss_fn(model, b)) if loss_fn is not None else _default_loss(model)
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
    return total / max(count, 1)


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
        schedule: ``"cosine"`` (default), ``"onecycle"``, ``"constant"``, ``"step"`` or a
            callable ``f(step, total) -> factor``; ``warmup`` linear warm-up steps. See
            :func:`lr_factor`.
        grad_clip: clip the gradient's total norm to this value.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ... The model is
            moved there and stays there.
        seed: fixes the batch order and the training randomness (the global torch RNG is
            seeded with it when a fresh run starts).
        val_data, val_every: evaluate the mean loss on ``val_data`` every ``val_every``
            steps (default: once per epoch) and at the end.
        checkpoint, checkpoint_every: write model, optimizer, RNG states, step and history
            to this file every ``checkpoint_every`` steps, at the end, and on Ctrl-C.
        resume: ``None`` (default) resumes from ``checkpoint`` when that file exists;
            ``True`` demands it (a missing or corrupt file is a :class:`CheckpointError`);
            ``False`` starts afresh and overwrites it.
        progress: show a tqdm progress bar with the running loss.
        loss_fn: ``loss_fn(model, batch) -> scalar`` to use instead of ``model.loss``.

    Raises:
        NonFiniteLossError: the loss or gradient went NaN/Inf; the message names the step and
            the first layer whose output or log-det was non-finite.
        CheckpointError: resuming was requested and the checkpoint is missing or unreadable.
    """
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if not callable(schedule) and schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES} or a callable")
    dev = resolve_device(device)
    model.to(dev)
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError(f"{type(model).__name__} has no parameters to train")
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
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    history = History(unit=unit, batch_size=batch_size, device=str(dev), seed=seed)
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
        _set_rng_state(state["rng"], dev)
        saved = state.get("config", {})
        now = {"batch_size": batch_size, "seed": seed, "n": n}
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
        if changed:
            warnings.warn(
                f"resuming {ckpt_path} with other settings than it was written with "
                f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); training "
                "goes on, but not as the uninterrupted run would have",
                stacklevel=2,
            )
        start = int(state["step"])
        history = History.from_dict(state["history"])
        history.device = str(dev)
    else:
        torch.manual_seed(seed)

    val_x = _place(_as_tensor(val_data, param.dtype), dev) if val_data is not None else None
    x = _place(x, dev)
    on_device = x.device == dev

    def make_state(step: int, rng: dict[str, Any]) -> dict[str, Any]:
        return {
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
            "config": {"batch_size": batch_size, "seed": seed, "n": n},
        }

    bar = None
    if progress and start < steps:
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
    perm: Tensor | None = None
    perm_epoch = -1
    running = None
    t_start = time.perf_counter()
    wall_before = history.wall_time
    step = start
    rng_done = _rng_state(dev)  # the RNG state after the last completed step
    try:
        while step < steps:
            epoch, j = divmod(step, per_epoch)
            if epoch != perm_epoch:
                perm = _epoch_permutation(n, seed, epoch)
                perm = perm.to(dev) if on_device else perm
                perm_epoch = epoch
            idx = perm[j * batch_size : (j + 1) * batch_size]
            batch = x[idx] if on_device else x[idx].to(dev, non_blocking=True)

            rate = lr * lr_factor(schedule, step, steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(batch)
            if loss.dim() != 0:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
            loss.backward()
            max_norm = grad_clip if grad_clip is not None else float("inf")
            gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            loss_val, gnorm_val = torch.stack([loss.detach().float(), gnorm.float()]).tolist()
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
                layer = _enclosing_flow_layer(model, bad[0].rsplit(".", 1)[0]) if bad else None
                raise NonFiniteLossError(
                    f"non-finite gradient at step {step} (the loss {loss_val:.4g} was finite): "
                    f"first parameter with a NaN/Inf gradient: {bad[0] if bad else '?'}"
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
            if (
                ckpt_path is not None
                and checkpoint_every
                and step % checkpoint_every == 0
                and step < steps
            ):
                history.wall_time = wall_before + time.perf_counter() - t_start
                save_checkpoint(ckpt_path, make_state(step, rng_done))
    except KeyboardInterrupt:
        if ckpt_path is not None and step > start:
            history.wall_time = wall_before + time.perf_counter() - t_start
            save_checkpoint(ckpt_path, make_state(step, rng_done))
            if bar is not None:
                bar.write(f"interrupted at step {step}; checkpoint saved to {ckpt_path}")
        raise
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)

    history.wall_time = wall_before + time.perf_counter() - t_start
    if ckpt_path is not None:
        save_checkpoint(ckpt_path, make_state(step, _rng_state(dev)))
    return history
