"""nfcourse.data: IDX reading, the MNIST downloader (against a local server), toy data,
digits, the lesson image loader and image densities. Never touches the network."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import math
import re
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nfcourse.data as D
from nfcourse.data import (
    IDXError,
    MNISTDownloadError,
    MNISTNotFoundError,
    Standardization,
    digits,
    download_mnist,
    entropy_two_moons,
    find_idx_pairs,
    image_density,
    lesson_images,
    load_idx_folder,
    load_idx_pair,
    logo_path,
    mnist,
    read_idx,
    two_moons,
    two_moons_log_prob,
    write_idx,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_MNIST = SHARED_DATA / "mnist"
needs_shared = pytest.mark.skipif(
    not (SHARED_MNIST / "README.md").is_file(),
    reason=f"the shared MNIST files are not at {SHARED_MNIST} (see CONTRIBUTING.md, Tests)",
)
OFFICIAL = [name for pair in D.MNIST_FILES.values() for name in pair]


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def readme_md5s() -> dict[str, str]:
    """The md5 table of the shared README (its first table: the files that are there)."""
    table = {}
    for line in (SHARED_MNIST / "README.md").read_text().splitlines():
        m = re.match(r"^\|\s*(\S+-ubyte\.gz)\s*\|.*\|\s*([0-9a-f]{32})\s*\|\s*$", line)
        if m:
            table[m[1]] = m[2]
    return table


# ------------------------------------------------------------------ real shared files


@needs_shared
def test_shared_files_md5_and_contents():
    table = readme_md5s()
    assert len(table) == 4, f"could not parse the md5 table of {SHARED_MNIST / 'README.md'}"
    for name, digest in table.items():
        assert md5_bytes((SHARED_MNIST / name).read_bytes()) == digest, name
    # the two test files are the official ones
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert table[name] == D.MNIST_MD5[name]

    images = read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.max() == 9 and labels.min() == 0
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert read_idx(SHARED_MNIST / "train-labels-first19690-idx1-ubyte.gz")[:5].tolist() == [
        5,
        0,
        4,
        1,
        9,
    ]


@needs_shared
def test_shared_folder_is_recognised():
    pairs = find_idx_pairs(SHARED_MNIST)
    assert set(pairs) == {"train", "t10k"}
    assert pairs["train"][0][0] == "-first19690"
    loaded = load_idx_folder(SHARED_MNIST)
    assert loaded["train"][0].shape == (19690, 1, 28, 28)
    x, y = load_idx_pair(SHARED_MNIST, "test")  # split name finds t10k-*
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    # mnist() looks in root/mnist, and in root itself; never downloads when files are there
    xt, yt = mnist("train", root=SHARED_DATA, download=True, mirrors=[])
    assert xt.shape == (19690, 1, 28, 28) and len(yt) == 19690
    xs, _ = mnist("test", root=SHARED_MNIST, download=False)
    assert torch.equal(xs, x)


def test_mnist_missing_without_download(tmp_path):
    with pytest.raises(MNISTNotFoundError, match="download=False") as info:
        mnist("test", root=tmp_path, download=False)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)
    with pytest.raises(ValueError, match="split"):
        mnist("validation", root=tmp_path, download=False)


# ------------------------------------------------------------------------ IDX format


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(5, 3, 2)) * 50).astype(dtype)
    path = write_idx(tmp_path / name, arr)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_idx_hand_written(tmp_path):
    # big-endian int16 values, 2x3
    values = [1, -2, 300, -400, 5, 32767]
    raw = bytes([0, 0, 0x0B, 2]) + struct.pack(">2i", 2, 3) + struct.pack(">6h", *values)
    (tmp_path / "h.idx").write_bytes(raw)
    (tmp_path / "h.idx.gz").write_bytes(gzip.compress(raw))
    for p in ("h.idx", "h.idx.gz"):
        arr = read_idx(tmp_path / p)
        assert arr.dtype == np.int16 and arr.tolist() == [[1, -2, 300], [-400, 5, 32767]]
    # 1-D labels file
    lab = bytes([0, 0, 8, 1]) + struct.pack(">i", 4) + bytes([3, 1, 4, 1])
    (tmp_path / "l").write_bytes(lab)
    assert read_idx(tmp_path / "l").tolist() == [3, 1, 4, 1]


def _header(code=8, dims=(2, 2)):
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}i", *dims)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">i", 1) + b"\x00", "bad magic"),
        (_header(code=0x42) + bytes(4), "unknown IDX dtype code 0x42"),
        (_header() + bytes(3), "truncated"),
        (_header() + bytes(5), "trailing bytes"),
        (_header(dims=(2, 2))[:9], "truncated header"),
        (b"\x00\x00", "too short"),
        (bytes([0, 0, 8, 0]), "0 dimensions"),
    ],
)
def test_idx_corrupt_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "broken-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(IDXError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_truncated_gzip(tmp_path):
    data = gzip.compress(_header(dims=(100, 28, 28)) + bytes(100 * 28 * 28))
    path = tmp_path / "cut-images-idx3-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IDXError, match="gzip stream is truncated or corrupt") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_pair_length_mismatch(tmp_path):
    write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8))
    write_idx(tmp_path / "x-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(IDXError, match="3 images but .* 2 labels"):
        load_idx_pair(tmp_path, "x")


def test_idx_pairs_naming_variants(tmp_path):
    """Official names, the dotted spelling, tags, raw before gz, untagged before tagged."""
    imgs, labs = np.zeros((2, 3, 3), np.uint8), np.arange(2, dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labs)
    write_idx(tmp_path / "train-images-idx3-ubyte", imgs)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labs)
    write_idx(tmp_path / "train-images-small-idx3-ubyte.gz", imgs[:1])
    write_idx(tmp_path / "train-labels-small-idx1-ubyte.gz", labs[:1])
    write_idx(tmp_path / "t10k-images.idx3-ubyte", imgs)
    write_idx(tmp_path / "t10k-labels.idx1-ubyte", labs)
    write_idx(tmp_path / "lonely-images-idx3-ubyte", imgs)  # no labels: not a pair
    pairs = find_idx_pairs(tmp_path)
    assert set(pairs) == {"train", "t10k"}
    assert [t for t, _, _ in pairs["train"]] == ["", "-small"]
    assert pairs["train"][0][1].name == "train-images-idx3-ubyte"
    assert load_idx_pair(tmp_path, "test")[0].shape == (2, 1, 3, 3)


# ------------------------------------------------------------------ download (local)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, int | None]] = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        status, body, length = self.routes.get(self.path, (404, b"not found", None))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def served(monkeypatch):
    """A local HTTP server with mirrors: /good/, /missing/ (404), /short/ (connection
    closed half way), /cut/ (a truncated file, served in full), /wrong/ (other bytes).

    Serves copies of the shared files under the official names (the first 19,690
    training images stand in for the full set) or, without them, small generated files;
    the md5 table is patched to the md5s of what /good/ serves.
    """
    files = {}
    if (SHARED_MNIST / "README.md").is_file():
        for split, (img, lab) in D.MNIST_FILES.items():
            src = "first19690-" if split == "train" else ""
            files[img] = (SHARED_MNIST / img.replace("images-", f"images-{src}")).read_bytes()
            files[lab] = (SHARED_MNIST / lab.replace("labels-", f"labels-{src}")).read_bytes()
    else:
        rng = np.random.default_rng(0)
        for split, (img, lab) in D.MNIST_FILES.items():
            n = 60 if split == "train" else 10
            x = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
            y = rng.integers(0, 10, n).astype(np.uint8)
            files[img] = gzip.compress(_header(dims=(n, 28, 28)) + x.tobytes(), mtime=0)
            files[lab] = gzip.compress(_header(dims=(n,)) + y.tobytes(), mtime=0)
    for name, data in files.items():
        monkeypatch.setitem(D.MNIST_MD5, name, md5_bytes(data))
    routes = {}
    for name, data in files.items():
        routes[f"/good/{name}"] = (200, data, None)
        routes[f"/short/{name}"] = (200, data[: len(data) // 2], len(data))
        routes[f"/cut/{name}"] = (200, data[: len(data) // 2], None)
        routes[f"/wrong/{name}"] = (200, data[:-9] + bytes(9), None)
    handler = type("Handler", (_Handler,), {"routes": routes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    yield {
        "files": files,
        "good": f"{base}/good/",
        "missing": f"{base}/missing/",
        "short": f"{base}/short/",
        "cut": f"{base}/cut/",
        "wrong": f"{base}/wrong",  # no trailing slash: the downloader adds it
        "closed": closed,
    }
    server.shutdown()
    server.server_close()


def test_download_falls_through_to_a_good_mirror(tmp_path, served):
    mirrors = [served["missing"], served["closed"], served["good"]]
    paths = download_mnist(tmp_path / "m", splits=["test"], mirrors=mirrors, timeout=5)
    assert [p.name for p in paths] == list(D.MNIST_FILES["test"])
    for p in paths:
        assert p.read_bytes() == served["files"][p.name]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(D.MNIST_FILES["test"])


def test_mnist_downloads_into_the_data_root(tmp_path, served, monkeypatch):
    monkeypatch.setenv("NFCOURSE_DATA", str(tmp_path))
    x, y = mnist("train", mirrors=[served["missing"], served["good"]], timeout=5)
    n = len(read_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"))
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8 and y.shape == (n,)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(D.MNIST_FILES["train"])
    # the second call reads the cache: no mirror needed
    x2, _ = mnist("train", mirrors=[])
    assert torch.equal(x, x2)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("short", r"truncated download: got \d+ of \d+ bytes"),
        ("cut", "md5 mismatch"),
        ("wrong", "md5 mismatch"),
        ("missing", "HTTP 404"),
        ("closed", "cannot connect"),
    ],
)
def test_download_failures_leave_nothing(tmp_path, served, kind, reason):
    folder = tmp_path / "m"
    with pytest.raises(MNISTDownloadError) as info:
        download_mnist(folder, splits=["test"], mirrors=[served[kind]], timeout=5)
    msg = str(info.value)
    assert re.search(reason, msg), msg
    assert served[kind].rstrip("/") in msg  # names the mirror that failed
    assert "by hand" in msg and str(folder) in msg and D.MNIST_MD5[OFFICIAL[2]] in msg
    assert list(folder.iterdir()) == []  # no partial or corrupt file stays


def test_download_error_lists_every_mirror(tmp_path, served):
    mirrors = [served["missing"], served["wrong"], served["short"]]
    with pytest.raises(MNISTDownloadError) as info:
        mnist("test", root=tmp_path, mirrors=mirrors, timeout=5)
    msg = str(info.value)
    for m in mirrors:
        assert m.rstrip("/") + "/t10k-images-idx3-ubyte.gz" in msg
    assert "HTTP 404" in msg and "md5 mismatch" in msg and "truncated download" in msg
    assert list((tmp_path / "mnist").iterdir()) == []


def test_default_mirrors_are_public_https_or_http():
    assert len(D.MIRRORS) >= 2
    assert all(m.startswith(("https://", "http://")) and m.endswith("/") for m in D.MIRRORS)
    assert set(D.MNIST_MD5) == set(OFFICIAL)


# --------------------------------------------------------------------------- two moons


def test_two_moons_standardized():
    x, st = two_moons(3000, seed=0)
    assert x.shape == (3000, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    raw, ident = two_moons(3000, seed=0, standardize=False)
    torch.testing.assert_close(st.invert(x), raw, atol=1e-5, rtol=0)
    torch.testing.assert_close(st.apply(raw), x)
    assert torch.equal(ident.apply(raw), raw)
    assert abs(st.log_det + float(torch.log(raw.std(0, unbiased=False)).sum())) < 1e-5
    assert torch.equal(two_moons(100, seed=3)[0], two_moons(100, seed=3)[0])
    assert not torch.equal(two_moons(100, seed=3)[0], two_moons(100, seed=4)[0])
    assert isinstance(st, Standardization)


def test_two_moons_density_integrates_to_one():
    step = 0.025
    xs = torch.arange(-1.6, 2.6, step, dtype=torch.float64)
    ys = torch.arange(-1.1, 1.6, step, dtype=torch.float64)
    grid = torch.cartesian_prod(xs, ys)
    total = two_moons_log_prob(grid, n_quad=128).exp().sum().item() * step * step
    assert abs(total - 1) < 1e-4
    # standardized density: the Jacobian term is included
    st = D.two_moons_population_standardization()
    z = st.apply(grid[:50])
    torch.testing.assert_close(
        two_moons_log_prob(z, standardization=st), two_moons_log_prob(grid[:50]) - st.log_det
    )


def test_two_moons_entropy():
    h_grid = entropy_two_moons()
    assert abs(h_grid - 1.136) < 0.01, h_grid  # the course's "about 1.136 nats"
    h_mc, stderr = entropy_two_moons(method="mc", n=4000, seed=1, return_stderr=True)
    assert 0 < stderr < 0.03
    assert abs(h_mc - h_grid) < 4 * stderr + 1e-3
    # population standardization matches a large sample's
    x, st = two_moons(200_000, seed=0, standardize=False)
    pop = D.two_moons_population_standardization()
    torch.testing.assert_close(x.mean(0).double(), pop.mean, atol=5e-3, rtol=0)
    torch.testing.assert_close(x.std(0).double(), pop.std, atol=5e-3, rtol=0)


# ------------------------------------------------------------------------------ digits


def test_digits():
    x, y = digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.uint8
    assert int(x.max()) == 255 and int(x.min()) == 0
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))


# ----------------------------------------------------------------------- lesson images


def test_lesson_images_fast_without_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("NFCOURSE_FAST", "1")
    monkeypatch.setenv("NFCOURSE_DATA", str(tmp_path))
    data = lesson_images()
    assert data.source == "digits"
    assert data.train.shape == (1297, 1, 28, 28) and data.test.shape == (500, 1, 28, 28)
    assert data.train.dtype == torch.uint8 and data.train_labels.shape == (1297,)
    assert "digits" in data.description and "\n" not in data.description
    assert list(tmp_path.iterdir()) == []  # fast mode never downloads
    small = lesson_images(100, 50, size=16)
    assert small.train.shape == (100, 1, 16, 16) and small.test.shape == (50, 1, 16, 16)


@needs_shared
def test_lesson_images_fast_with_mnist(monkeypatch):
    monkeypatch.setenv("NFCOURSE_FAST", "1")
    monkeypatch.setenv("NFCOURSE_DATA", str(SHARED_DATA))
    data = lesson_images()
    assert data.source == "mnist"
    assert data.train.shape == (2000, 1, 28, 28) and data.test.shape == (500, 1, 28, 28)
    assert "MNIST" in data.description and "2000 train" in data.description
    x, y = mnist("test", download=False)
    assert torch.equal(data.test, x[:500]) and torch.equal(data.test_labels, y[:500])
    assert lesson_images(64, 32, size=14).train.shape == (64, 1, 14, 14)


@needs_shared
def test_lesson_images_full_mode_uses_mnist(monkeypatch):
    monkeypatch.delenv("NFCOURSE_FAST", raising=False)
    monkeypatch.setenv("NFCOURSE_DATA", str(SHARED_DATA))
    data = lesson_images()
    assert data.source == "mnist" and len(data.train) == 19690 and len(data.test) == 10000
    assert "fast" not in data.description


# ----------------------------------------------------------------------- image density


def _grid_mass(density, step):
    xmin, xmax, ymin, ymax = density.extent
    xs = torch.arange(xmin - 0.3 + step / 2, xmax + 0.3, step, dtype=torch.float64)
    ys = torch.arange(ymin - 0.3 + step / 2, ymax + 0.3, step, dtype=torch.float64)
    grid = torch.cartesian_prod(xs, ys)
    return density.log_prob(grid).exp().sum().item() * step * step


def test_image_density_from_array():
    # 3 rows x 4 columns, values are gray levels (0 = black: most mass with invert)
    img = np.array([[0, 255, 255, 128], [255, 255, 255, 255], [255, 64, 255, 255]], dtype=np.uint8)
    x, dens = image_density(img, 40_000, seed=0)
    assert x.shape == (40_000, 2) and x.dtype == torch.float32
    assert dens.extent == pytest.approx((-2.0, 2.0, -1.5, 1.5))
    mass = 1 - img / 255.0
    w = mass / mass.sum()
    torch.testing.assert_close(dens.weights, torch.from_numpy(w))
    # samples land on the right pixels (y up: row 0 is the top), in the right proportions
    col = torch.floor((x[:, 0].double() + 2) / dens.pixel).long()
    row = torch.floor((1.5 - x[:, 1].double()) / dens.pixel).long()
    counts = torch.bincount(row * 4 + col, minlength=12).double() / len(x)
    assert counts.view(3, 4)[w == 0].sum() == 0
    assert torch.allclose(counts, torch.from_numpy(w.ravel()), atol=0.01)
    # its own log_prob: finite on samples, constant within a pixel, integrates to one
    lp = dens.log_prob(x)
    assert lp.isfinite().all() and lp.dtype == torch.float32
    torch.testing.assert_close(
        lp[(row == 0) & (col == 0)].double().unique(),
        torch.tensor([math.log(w[0, 0] / dens.pixel**2)], dtype=torch.float64),
    )
    assert abs(_grid_mass(dens, 0.01) - 1) < 1e-3
    # outside and on massless pixels: -inf, or the floor
    out = torch.tensor([[3.0, 0.0], [0.0, -1.7], [-0.5, 0.2]])
    assert torch.isinf(dens.log_prob(out)).all()
    assert dens.log_prob(out, floor=-30.0).tolist() == [-30.0] * 3
    # exact entropy equals the sample average of -log p
    assert abs(dens.entropy() + lp.double().mean().item()) < 0.02
    x2, _ = image_density(img, 10, seed=0)
    assert torch.equal(x2, image_density(img, 10, seed=0)[0])


def test_image_density_inputs_and_kl(tmp_path):
    im = Image.new("RGB", (40, 20), "white")
    im.paste((0, 0, 0), (0, 0, 10, 20))  # a black left quarter
    im.save(tmp_path / "pic.png")
    for src in (
        tmp_path / "pic.png",
        str(tmp_path / "pic.png"),
        im,
        np.asarray(im),
        torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1),
    ):
        x, dens = image_density(src, 500, seed=1)
        assert (x[:, 0] < -1.0).all() and dens.extent == pytest.approx((-2, 2, -1, 1))
    _, bright = image_density(im, 500, seed=1, invert=False)
    assert bright.weights[:, :10].sum() == 0
    _, small = image_density(im, 10, size=8)
    assert (small.height, small.width) == (4, 8)

    _, dens = image_density(logo_path(), 10, seed=0)
    assert dens.kl_to_model(dens.log_prob, 2000) == pytest.approx(0.0, abs=1e-9)
    gauss = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    kl = dens.kl_to_model(gauss.log_prob, 4000)
    expected = dens.entropy() * -1 - gauss.log_prob(dens.sample(200_000, seed=5)).mean().item()
    assert kl > 0 and abs(kl - expected) < 0.1
    with pytest.raises(ValueError, match="no mass"):
        image_density(np.full((4, 4), 255, np.uint8), 10)


def test_logo_is_packaged():
    path = Path(logo_path())
    assert path.is_file() and path.parent.name == "assets"
    with Image.open(path) as im:
        assert im.format == "PNG" and 48 <= im.size[0] <= 128 and im.size[0] == im.size[1]
        gray = np.asarray(im.convert("L"))
    assert 0.1 < (gray < 128).mean() < 0.6  # dark letters on a light background
    assert "assets/*.png" in (REPO / "pyproject.toml").read_text()
