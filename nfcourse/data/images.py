"""Image data for the lessons: digits, the lesson loader, densities drawn from images.

* :func:`digits`: scikit-learn's 8x8 digits as uint8 in ``[0, 255]``.
* :func:`lesson_images`: what the MNIST lessons train on (MNIST, or in fast mode MNIST
  from the data folder if present, else digits upscaled to 28x28), with a one-line
  description of what was used.
* :func:`image_density`: a 2-D density drawn from a picture (dark pixels carry the
  mass) that can be sampled and evaluated exactly, for lesson 06.
* :func:`logo_path`: the small logo nfcourse ships as a default picture.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from nfcourse.config import data_root, fast_mode
from nfcourse.data.mnist import find_mnist, mnist

__all__ = [
    "ImageData",
    "ImageDensity",
    "digits",
    "image_density",
    "lesson_images",
    "logo_path",
    "resize_images",
]


# ------------------------------------------------------------------------------ digits


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: ``(images uint8 (1797, 1, 8, 8) in [0, 255], labels int64)``.

    The original values ``0..16`` are scaled by ``255 / 16`` and rounded.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return torch.from_numpy(images[:, None]), torch.from_numpy(d.target.astype(np.int64))


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images ``(N, C, H, W)`` to ``(N, C, size, size)`` with PIL (bilinear)."""
    from PIL import Image

    if images.shape[-2:] == (size, size):
        return images
    arr = images.numpy()
    out = np.empty(arr.shape[:2] + (size, size), dtype=np.uint8)
    for i in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            img = Image.fromarray(arr[i, c]).resize((size, size), Image.Resampling.BILINEAR)
            out[i, c] = np.asarray(img)
    return torch.from_numpy(out)


# ------------------------------------------------------------------------ lesson images


@dataclass
class ImageData:
    """What a lesson trains and tests on: uint8 images ``(N, 1, size, size)`` in [0, 255].

    ``source`` is ``"mnist"`` or ``"digits"``; ``description`` is one line for the notebook
    to print.
    """

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    description: str
    source: str

    def __repr__(self) -> str:
        return (
            f"ImageData(train={tuple(self.train.shape)}, test={tuple(self.test.shape)}, "
            f"source={self.source!r})"
        )


FAST_N_TRAIN = 2000
FAST_N_TEST = 500
_DIGITS_TEST = 500  # the last 500 digits are the digits test split


def lesson_images(
    n_train: int | None = None,
    n_test: int | None = None,
    size: int = 28,
    *,
    root: str | os.PathLike | None = None,
) -> ImageData:
    """The images the MNIST lessons use, as :class:`ImageData`.

    * Full mode (``nfcourse.fast_mode()`` false): MNIST train and test
      (:func:`nfcourse.data.mnist`, downloading on first use), the first ``n_train`` /
      ``n_test`` when given.
    * Fast mode (``NFCOURSE_FAST=1``): MNIST from the data folder if its files are there
      (never downloads), the first ``n_train`` / ``n_test`` (default 2000 / 500);
      otherwise scikit-learn's digits upscaled to ``size x size`` so every shape matches
      (train: the first 1297 digits, test: the last 500).

    Images are resized to ``size`` when it is not 28.

    Example:
        >>> data = lesson_images()        # doctest: +SKIP
        >>> print(data.description)        # doctest: +SKIP
    """
    root = Path(root if root is not None else data_root()).expanduser()
    fast = fast_mode()
    if fast:
        n_train = FAST_N_TRAIN if n_train is None else n_train
        n_test = FAST_N_TEST if n_test is None else n_test
    use_mnist = not fast or (find_mnist("train", root) and find_mnist("test", root))
    if use_mnist:
        parts = {}
        for split, n in (("train", n_train), ("test", n_test)):
            x, y = mnist(split, root=root, download=not fast)
            total = len(x)
            if n is not None:
                x, y = x[:n], y[:n]
            parts[split] = (x, y, total)
        source, where = "mnist", f"MNIST from {find_mnist('train', root)[0].parent}"
        counts = ", ".join(
            f"{len(parts[s][0])} {s}"
            + (f" (first of {parts[s][2]})" if len(parts[s][0]) < parts[s][2] else "")
            for s in ("train", "test")
        )
    else:
        x, y = digits()
        split_at = len(x) - _DIGITS_TEST
        tr = (x[:split_at][:n_train], y[:split_at][:n_train])
        te = (x[split_at:][:n_test], y[split_at:][:n_test])
        parts = {"train": (*tr, split_at), "test": (*te, _DIGITS_TEST)}
        source = "digits"
        where = (
            f"scikit-learn digits (8x8 upscaled to {size}x{size}; fast mode and no MNIST files "
            f"in {root})"
        )
        counts = f"{len(tr[0])} train, {len(te[0])} test"
    train, train_labels = resize_images(parts["train"][0], size), parts["train"][1]
    test, test_labels = resize_images(parts["test"][0], size), parts["test"][1]
    size_note = "" if source == "digits" or size == 28 else f", resized to {size}x{size}"
    desc = f"{where}{size_note}: {counts} images"
    if source == "mnist" and parts["train"][2] < 60_000:
        desc += f" (the folder holds {parts['train'][2]} of the 60000 official training images)"
    desc += " [fast mode]" if fast else ""
    return ImageData(train, test, train_labels, test_labels, desc, source)


# ------------------------------------------------------------------------ image density


class ImageDensity:
    """A piecewise-constant 2-D density drawn from a grayscale picture.

    Pixel ``(row, col)`` is a square of side ``pixel`` in the plane; the image is centred
    at the origin with its longer side spanning ``[-half_width, half_width]`` and the y
    axis pointing up (row 0 is the top). The density inside a pixel is the pixel's mass
    divided by the total mass and by the pixel's area; outside the picture it is zero.

    Attributes:
        weights: ``(H, W)`` float64 probabilities of the pixels (sum to 1).
        extent: ``(xmin, xmax, ymin, ymax)``, ready for ``plt.imshow(..., extent=...)``.
        pixel: side of one pixel in the plane.
    """

    def __init__(self, mass: np.ndarray, half_width: float = 2.0):
        mass = np.asarray(mass, dtype=np.float64)
        if mass.ndim != 2:
            raise ValueError(f"mass must be a 2-D array, got shape {mass.shape}")
        if (mass < 0).any() or not np.isfinite(mass).all():
            raise ValueError("mass must be finite and non-negative")
        total = mass.sum()
        if total <= 0:
            raise ValueError("the image carries no mass (all pixels are background)")
        self.height, self.width = mass.shape
        self.weights = torch.from_numpy(mass / total)
        self.pixel = 2.0 * half_width / max(self.height, self.width)
        self.x0 = -self.width * self.pixel / 2
        self.y_top = self.height * self.pixel / 2
        self.extent = (self.x0, -self.x0, -self.y_top, self.y_top)
        area = self.pixel**2
        with np.errstate(divide="ignore"):
            self._log_density = torch.from_numpy(np.log(mass / total) - math.log(area))

    def __repr__(self) -> str:
        return f"ImageDensity({self.height}x{self.width} pixels, extent={self.extent})"

    def sample(self, n: int, *, seed: int | None = None, generator=None) -> torch.Tensor:
        """``n`` points ``(n, 2)`` float32: a pixel by its weight, then uniform inside it."""
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        idx = torch.multinomial(self.weights.flatten(), n, replacement=True, generator=generator)
        row = (idx // self.width).double()
        col = (idx % self.width).double()
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        x = self.x0 + (col + u[:, 0]) * self.pixel
        y = self.y_top - (row + u[:, 1]) * self.pixel
        return torch.stack([x, y], 1).float()

    def log_prob(self, points: torch.Tensor, floor: float | None = None) -> torch.Tensor:
        """Exact log-density at ``points`` (``(B, 2)``): ``(B,)`` in the points' float dtype.

        ``-inf`` outside the picture and on pixels without mass, or ``floor`` there when
        given (e.g. ``-30`` to keep a plot finite).
        """
        pts = torch.as_tensor(points)
        dtype = pts.dtype if pts.is_floating_point() else torch.float32
        p = pts.detach().double().cpu()
        col = torch.floor((p[:, 0] - self.x0) / self.pixel)
        row = torch.floor((self.y_top - p[:, 1]) / self.pixel)
        # a point exactly on the right / bottom edge belongs to the last pixel
        col = torch.where(p[:, 0] == -self.x0, col - 1, col)
        row = torch.where(p[:, 1] == -self.y_top, row - 1, row)
        inside = (col >= 0) & (col < self.width) & (row >= 0) & (row < self.height)
        out = torch.full((len(p),), -math.inf, dtype=torch.float64)
        r, c = row[inside].long(), col[inside].long()
        out[inside] = self._log_density[r, c]
        if floor is not None:
            out = out.clamp_min(floor)
        return out.to(dtype=dtype, device=pts.device)

    def entropy(self) -> float:
        """Exact differential entropy in nats: ``-sum w log(w / area)``."""
        w = self.weights
        ld = self._log_density
        return float(-(w[w > 0] * ld[w > 0]).sum())

    @torch.no_grad()
    def kl_to_model(
        self,
        model_log_prob,
        n: int = 10_000,
        *,
        seed: int | None = 0,
        batch_size: int = 4096,
        device: torch.device | str | None = None,
    ) -> float:
        """Monte Carlo ``KL(p || q) = E_p[log p(x) - log q(x)]`` in nats, ``p`` this density.

        ``model_log_prob`` maps points ``(B, 2)`` (float32, on ``device``) to ``(B,)``
        log-densities, e.g. ``model.log_prob``. Uses ``n`` samples of ``p``.
        """
        x = self.sample(n, seed=seed)
        total = 0.0
        for xb in x.split(batch_size):
            logq = torch.as_tensor(model_log_prob(xb.to(device) if device else xb))
            total += float((self.log_prob(xb).double() - logq.detach().double().cpu()).sum())
        return total / n


def _to_gray(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        with Image.open(image) as im:
            image = im.copy()
    if isinstance(image, Image.Image):
        transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        if transparent:
            # transparent pixels count as white background
            rgba = image.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(bg, rgba)
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    arr = np.squeeze(arr)
    integer = np.issubdtype(arr.dtype, np.integer)
    if arr.ndim == 3:
        if arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
        rgb = arr[..., :3].astype(np.float64)
        arr = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, as PIL's "L"
    if arr.ndim != 2:
        raise ValueError(f"expected a grayscale or RGB image, got an array of shape {arr.shape}")
    arr = arr.astype(np.float64)
    scale = 255.0 if integer or arr.max() > 1 else 1.0
    return arr / scale


def image_density(
    image,
    n: int,
    *,
    seed: int | None = None,
    size: int | None = None,
    invert: bool = True,
    half_width: float = 2.0,
) -> tuple[torch.Tensor, ImageDensity]:
    """Draw ``n`` points from the density an image defines; return them and the density.

    ``image`` is a path, a PIL image, or an array / tensor (grayscale ``(H, W)`` or RGB;
    integers in [0, 255] or floats in [0, 1]). It is converted to grayscale (transparent
    pixels count as white); with ``invert`` dark pixels carry the mass (``1 - gray``),
    otherwise bright ones do. ``size`` first resizes the image so its longer side has
    ``size`` pixels. The picture is centred in ``[-half_width, half_width]^2``, y up.

    Example:
        >>> x, density = image_density(logo_path(), 5000, seed=0)
        >>> x.shape, round(density.kl_to_model(density.log_prob, 1000), 6)
        (torch.Size([5000, 2]), 0.0)
    """
    from PIL import Image

    gray = _to_gray(image)
    if size is not None:
        h, w = gray.shape
        scale = size / max(h, w)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = Image.fromarray(np.rint(gray * 255).astype(np.uint8))
        gray = np.asarray(img.resize(new, Image.Resampling.LANCZOS), dtype=np.float64) / 255
    mass = 1.0 - gray if invert else gray
    density = ImageDensity(np.clip(mass, 0.0, None), half_width=half_width)
    return density.sample(n, seed=seed), density


# -------------------------------------------------------------------------------- logo


def logo_path() -> str:
    """Path of ``nfcourse/assets/logo.png``, the small picture nfcourse ships (dark "NF"
    letters on white; ``tools/make_logo.py`` draws it)."""
    return str(resources.files("nfcourse") / "assets" / "logo.png")
