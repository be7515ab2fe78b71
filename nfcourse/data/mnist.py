"""MNIST (and anything else shipped as IDX image/label pairs): find, load, download.

Folders are searched for pairs of files named like the official distribution
(``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz``, raw or gzipped, also the
``train-images.idx3-ubyte`` spelling) or with a tag between kind and format
(``train-images-first19690-idx3-ubyte.gz``). Fashion-MNIST uses the same names, so
:func:`load_idx_pair` and :func:`load_idx_folder` read it too.

:func:`mnist` downloads the four official files on first use into
``nfcourse.config.data_root()/mnist``, trying each of :data:`MIRRORS` in turn and checking
:data:`MNIST_MD5`; a file appears in the cache only once it is complete and verified.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from nfcourse.config import data_root
from nfcourse.data.idx import IDXError, read_idx

__all__ = [
    "MIRRORS",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNISTDownloadError",
    "MNISTNotFoundError",
    "download_mnist",
    "find_idx_pair",
    "find_mnist",
    "find_idx_pairs",
    "load_idx_folder",
    "load_idx_pair",
    "mnist",
    "mnist_dirs",
]

#: Public mirrors of the official files, tried in order (override in tests or per call).
MIRRORS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]

#: split -> (images file, labels file), official names
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: md5 of the official files
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

_SPLIT_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}

_IDX_NAME = re.compile(
    r"^(?P<prefix>.+?)-(?P<kind>images|labels)(?P<tag>-[^.]*?)?[-.]idx(?P<nd>\d+)-ubyte"
    r"(?P<gz>\.gz)?$"
)


class MNISTNotFoundError(FileNotFoundError):
    """No MNIST files where they were looked for, and no download was allowed."""


class MNISTDownloadError(RuntimeError):
    """Every mirror failed for some file; the message lists each mirror's error."""


# ----------------------------------------------------------------------------- finding


def find_idx_pairs(folder: str | os.PathLike) -> dict[str, list[tuple[str, Path, Path]]]:
    """All image/label IDX pairs in ``folder``: ``{prefix: [(tag, images, labels), ...]}``.

    ``prefix`` is what comes before ``-images``/``-labels`` (``train``, ``t10k``), ``tag``
    what comes between the kind and ``-idxN-ubyte`` (``""`` for the official names,
    ``"-first19690"`` for a subset). Each prefix's list is ordered best first: untagged
    before tagged, and per name raw before ``.gz`` (faster to read).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found: dict[tuple[str, str, str], dict[str, Path]] = {}
    for p in sorted(folder.iterdir()):
        m = _IDX_NAME.match(p.name)
        if not m or not p.is_file():
            continue
        key = (m["prefix"], m["tag"] or "", m["kind"])
        # prefer the raw file over the gzipped one when both are there
        if key not in found or (found[key].get("gz") and not m["gz"]):
            found[key] = {"path": p, "gz": bool(m["gz"])}
    pairs: dict[str, list[tuple[str, Path, Path]]] = {}
    for (prefix, tag, kind), entry in found.items():
        if kind != "images":
            continue
        labels = found.get((prefix, tag, "labels"))
        if labels is not None:
            pairs.setdefault(prefix, []).append((tag, entry["path"], labels["path"]))
    for lst in pairs.values():
        lst.sort(key=lambda item: (item[0] != "", item[0]))
    return pairs


def find_idx_pair(folder: str | os.PathLike, prefix: str) -> tuple[Path, Path] | None:
    """The best (images, labels) pair for ``prefix`` in ``folder``, or None.

    ``prefix`` may also be a split name: ``"test"`` finds ``t10k-*`` files.
    """
    pairs = find_idx_pairs(folder)
    for p in _SPLIT_PREFIXES.get(prefix, (prefix,)):
        if p in pairs:
            _, images, labels = pairs[p][0]
            return images, labels
    return None


def _load_files(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise IDXError(f"{images_path}: expected images of shape (N, H, W), got {images.shape}")
    if labels.ndim != 1:
        raise IDXError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise IDXError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    return torch.from_numpy(images), torch.from_numpy(labels.astype("int64"))


def load_idx_pair(folder: str | os.PathLike, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``(images (N, 1, H, W), labels int64 (N,))`` for ``prefix`` from ``folder``.

    Example:
        >>> x, y = load_idx_pair("/data/fashion", "t10k")  # doctest: +SKIP
    """
    pair = find_idx_pair(folder, prefix)
    if pair is None:
        raise FileNotFoundError(
            f"no '{prefix}-images...-idx3-ubyte[.gz]' / '{prefix}-labels...-idx1-ubyte[.gz]' "
            f"pair in {folder}"
        )
    return _load_files(*pair)


def load_idx_folder(folder: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load every image/label pair in ``folder``: ``{prefix: (images, labels)}``."""
    pairs = find_idx_pairs(folder)
    return {prefix: _load_files(lst[0][1], lst[0][2]) for prefix, lst in pairs.items()}


def mnist_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for MNIST, in order: ``root/mnist``, ``root/MNIST/raw``, ``root``."""
    root = Path(root if root is not None else data_root()).expanduser()
    return [root / "mnist", root / "MNIST" / "raw", root]


def find_mnist(split: str, root: str | os.PathLike | None = None) -> tuple[Path, Path] | None:
    """The (images, labels) files of ``split`` under ``root``, or None; never downloads."""
    _check_split(split)
    for d in mnist_dirs(root):
        pair = find_idx_pair(d, split)
        if pair is not None:
            return pair
    return None


def _check_split(split: str) -> None:
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# -------------------------------------------------------------------------- downloading


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, expected_md5: str | None, timeout: float) -> None:
    """Download ``url`` to ``dest`` atomically; raise with a short reason on any failure."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        n = 0
        req = urllib.request.Request(url, headers={"User-Agent": "nfcourse (python urllib)"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
        if length is not None and n != int(length):
            raise OSError(f"truncated download: got {n} of {length} bytes")
        digest = h.hexdigest()
        if expected_md5 is not None and digest != expected_md5:
            raise OSError(f"md5 mismatch: got {digest}, expected {expected_md5} ({n} bytes)")
        read_idx(tmp)  # a structurally valid IDX file, whatever the table says
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"cannot connect ({err.reason})"
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, IDXError):
        return f"not a valid IDX file ({err})"
    if isinstance(err, OSError) and str(err):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _manual_help(
    folder: Path, names: Iterable[str], md5: dict[str, str], mirrors: Sequence[str]
) -> str:
    lines = [
        f"To install MNIST by hand, download these files from any MNIST mirror and put them in "
        f"{folder} (keep the names; gzipped or not):"
    ]
    lines += [f"  {name}  (md5 {md5.get(name, '?')})" for name in names]
    lines.append(
        "or set NFCOURSE_DATA to a folder whose mnist/ subfolder holds them "
        f"(known mirrors: {', '.join(mirrors)})."
    )
    return "\n".join(lines)


def download_mnist(
    folder: str | os.PathLike | None = None,
    *,
    splits: Sequence[str] = ("train", "test"),
    mirrors: Sequence[str] | None = None,
    md5: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> list[Path]:
    """Download the official MNIST files of ``splits`` into ``folder`` (default
    ``data_root()/mnist``); files already there are kept. Returns the paths.

    Each file is fetched from the first of ``mirrors`` (default :data:`MIRRORS`) that
    serves it completely with the md5 of ``md5`` (default :data:`MNIST_MD5`). It is written
    to a temporary file in the same folder and renamed into place only when verified, so
    an interrupted or corrupt download never leaves a file behind. When every mirror
    fails, :class:`MNISTDownloadError` lists each mirror's error and how to place the
    files by hand.
    """
    folder = Path(folder) if folder is not None else Path(data_root()) / "mnist"
    mirrors = list(MIRRORS if mirrors is None else mirrors)
    md5 = MNIST_MD5 if md5 is None else md5
    for split in splits:
        _check_split(split)
    names = [name for split in splits for name in MNIST_FILES[split]]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        dest = folder / name
        paths.append(dest)
        if dest.exists():
            continue
        errors = []
        for mirror in mirrors:
            url = mirror if mirror.endswith("/") else mirror + "/"
            url += name
            try:
                _fetch(url, dest, md5.get(name), timeout)
                break
            except Exception as err:  # noqa: BLE001 - every failure is reported below
                errors.append(f"  {url}: {_describe(err)}")
        else:
            tried = "\n".join(errors) if errors else "  (no mirrors given)"
            raise MNISTDownloadError(
                f"could not download MNIST file {name}; every mirror failed:\n{tried}\n"
                + _manual_help(folder, names, md5, mirrors or MIRRORS)
            )
    return paths


# ------------------------------------------------------------------------------ loading


def mnist(
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = True,
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = 30.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` as ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``.

    Looks in ``root/mnist``, ``root/MNIST/raw`` and ``root`` (``root`` defaults to
    ``nfcourse.config.data_root()``: ``$NFCOURSE_DATA`` or ``~/.cache/nfcourse``) for the
    official file names or tagged ones such as ``train-images-first19690-idx3-ubyte.gz``
    (whatever is there is used: check ``len`` if the full split matters). When nothing
    is found and ``download`` is true, downloads the official files into ``root/mnist``
    (see :func:`download_mnist`).

    Example:
        >>> x, y = mnist("test")   # doctest: +SKIP
        >>> x.shape, y[:3]         # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), tensor([7, 2, 1]))
    """
    _check_split(split)
    pair = find_mnist(split, root)
    if pair is None:
        folder = mnist_dirs(root)[0]
        if not download:
            raise MNISTNotFoundError(
                f"MNIST {split} files not found in {', '.join(map(str, mnist_dirs(root)))} "
                "and download=False.\n"
                + _manual_help(folder, MNIST_FILES[split], MNIST_MD5, mirrors or MIRRORS)
            )
        download_mnist(folder, splits=[split], mirrors=mirrors, timeout=timeout)
        pair = tuple(folder / name for name in MNIST_FILES[split])
    return _load_files(*pair)
