"""Lesson 05's independent check (Glow): the maths of each exercise, verified from numbers.

Each check draws fresh inputs, asks the kernel for outputs and decides in float64 here. Where
a layer's parametrisation is the student's choice (ActNorm's), the grader identifies the map
from its outputs instead of reading parameters.

* ``actnorm_test``: after initialising and then randomising every parameter, ActNorm is one
  affine map per channel (identified here from the outputs, the same for every pixel and
  sample), changed by its parameters, with ``log_det = H W sum_c log|a_c|`` that also equals
  log|det J| of the grader's finite-difference Jacobian; it works at another image size; its
  inverse inverts, with minus the log-det.
* ``actnorm_test_init``: on its first batch ActNorm is a per-channel affine map whose output
  has mean 0 and standard deviation 1 per channel (computed here); a later batch with other
  statistics goes through the *same* map (no second initialisation), as does an image of
  another size, and a new layer that loads the ``state_dict`` applies it too.
* ``invconv_test``: ``weight`` starts orthogonal; with a matrix ``A`` chosen here copied into
  it, ``z = A x`` at every pixel, ``log_det = H W log|det A|`` (NumPy's slogdet and finite
  differences), the inverse inverts.
* ``invconv_lu_test``: ``weight`` starts orthogonal; after randomising every parameter,
  ``z = W x`` with the ``weight`` it reports, ``log|det W| = sum(log_s)`` (NumPy's slogdet),
  ``log_det = H W sum(log_s)`` (and finite differences), the inverse inverts.
* ``glow_step_test``: for 2, 3, 4 and 5 channels and every mixing, judged only from what
  the step does (how it looks its classes up is not graded): a fresh step on exactly
  uncorrelated channels standardises like ActNorm (mean 0 everywhere, standard deviation 1
  on the half the coupling keeps); with its trainable parameters randomised, the kept half is
  one 1x1 affine map of the input that depends on every input channel (``"lu"``,
  ``"plain"``) or picks one each (``"random"``; reversed for ``"reverse"``) and the rest is
  not affine; ``"lu"`` and ``"reverse"`` steps are invertible with the finite-difference
  log-det; the mixings differ by exactly the trainable parameter sizes of the student's own
  ``InvConv1x1LU(C)`` / ``InvConv1x1(C)``; ``ValueError`` for an unknown mixing.
* ``glow_test``: ``build_glow`` with the student's own steps, for four configurations (1, 2
  and 3 input channels): every layer after the dequantization is classified from its numbers
  (lesson 04's squeeze, a split that keeps the first half and scores the rest with the
  prior, or a shape-preserving step), in the right order and channels, each step with the
  trainable parameter sizes of a fresh ``GlowStep`` built with the arguments passed on;
  ``z``, ``log_det`` and ``log_prob`` are the layers' composition; the prior's shape. With
  every parameter randomised the flow runs back to the pixels, its inverse log-det is minus
  the forward one, samples are integer images.

The plain 1x1 convolution is checked as a flow in ``invconv_test`` only, and the steps of
``build_glow`` are checked in ``glow_step_test`` only: the same split of blame as the
notebook's hidden tests (see ``tests/grading/test_lesson05.py``).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from nfcourse.grade.verify.base import Oracle, Verifier, check_array, draw_seed
from nfcourse.grade.verify.maths import fd_points, logabsdet_fd

__all__ = ["VERIFIER"]

H = 1e-5  # finite-difference step (float64)
EXACT = 1e-9  # relative tolerance of values the grader computes exactly
LOGDET_TOL = 1e-5  # finite-difference log-dets, relative to 1 + |log_det|

MIXINGS = {"lu": 1, "plain": 2, "reverse": 3, "random": 4}
MIXING_NAMES = {v: k for k, v in MIXINGS.items()}


# ------------------------------------------------------------------------------- helpers
def _err(got: np.ndarray, want: np.ndarray) -> float:
    """Largest difference, relative to the size of what was expected."""
    return float(np.max(np.abs(got - want)) / (1 + np.max(np.abs(want))))


def _pixelwise(matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``matrix`` applied to the channel vector of every pixel of ``(B, C, H, W)``."""
    return np.einsum("ij,bjhw->bihw", matrix, x)


def _shifted(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Images whose channels have very different means and spreads."""
    c = shape[1]
    scale = rng.uniform(0.3, 5.0, size=c).reshape(1, c, 1, 1)
    loc = rng.uniform(-6.0, 8.0, size=c).reshape(1, c, 1, 1)
    return rng.normal(size=shape) * scale + loc


def _fd_images(x: np.ndarray, h: float = H) -> np.ndarray:
    """:func:`fd_points` of flattened images, back in image shape."""
    b = x.shape[0]
    return fd_points(x.reshape(b, -1), h).reshape(-1, *x.shape[1:])


def _fd_check(z: np.ndarray, ld: np.ndarray, b: int, what: str) -> None:
    """``ld[:b]`` against log|det| of the finite-difference Jacobian of an
    :func:`_fd_images` batch's outputs ``z``."""
    d = int(np.prod(z.shape[1:]))
    fd = logabsdet_fd(z.reshape(z.shape[0], d)[: (2 * d + 1) * b], b, d, H)
    worst = float(np.max(np.abs(ld[:b] - fd) / (1 + np.abs(fd))))
    assert worst < LOGDET_TOL, (
        f"{what}: log_det is {np.round(ld[:b], 4).tolist()} but log|det| of the Jacobian "
        f"(the grader's finite differences) is {np.round(fd, 4).tolist()}")


#: Kernel side: the sizes of a module's trainable parameters (a frozen ``nn.Parameter``, such
#: as an "initialised" flag or a fixed permutation, is state the answer keeps fixed; the
#: preamble's ``_nfv_prep`` leaves those alone too).
_PREP = """
        def _nfv_sizes(module):
            sizes = sorted(p.numel() for p in module.parameters() if p.requires_grad)
            return sizes or _nfv_np.zeros(0)
"""


def _fit_channels(x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per channel, the least-squares fit ``z = a_c x + b_c`` over batch and pixels, and the
    largest residual relative to the size of ``z``."""
    c = x.shape[1]
    a, b = np.empty(c), np.empty(c)
    worst = 0.0
    for k in range(c):
        xs, zs = x[:, k].reshape(-1), z[:, k].reshape(-1)
        design = np.stack([xs, np.ones_like(xs)], axis=1)
        (a[k], b[k]), *_ = np.linalg.lstsq(design, zs, rcond=None)
        worst = max(worst, float(np.max(np.abs(design @ [a[k], b[k]] - zs))
                                 / (1 + np.max(np.abs(zs)))))
    return a, b, worst


def _channel_map(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x * a.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)


# ------------------------------------------------------------------------------- ActNorm
def check_actnorm(oracle: Oracle, rng: np.random.Generator) -> str:
    c, b = 3, 2
    x_init = _shifted(rng, (16, c, 2, 3))
    x = _shifted(rng, (b, c, 2, 3))
    probes = _fd_images(x)
    n = probes.shape[0]
    out = oracle.query(_PREP + """
        layer = ActNorm(3).double()
        out['n_params'] = sum(p.numel() for p in layer.parameters())
        z0, _ = layer(_nfv_torch.as_tensor(inp['x_init']))
        out['z0'] = z0
        _nfv_prep(layer, inp['seed'][0], 0.5)
        _nfv_store['actnorm'] = layer
        z, ld = layer(_nfv_torch.as_tensor(inp['x']))
        out['z'], out['ld'] = z, ld
        z1, ld1 = layer(_nfv_torch.as_tensor(inp['x'][:1]))
        out['z1'], out['ld1'] = z1, ld1
    """, x_init=x_init, x=probes, seed=[draw_seed(rng)])
    assert float(out["n_params"].reshape(-1)[0]) > 0, (
        "ActNorm has no learnable parameters: its shift and scale must be nn.Parameters")
    check_array("ActNorm's output on its first batch", out["z0"], x_init.shape)
    z, ld = out["z"], out["ld"]
    check_array("ActNorm's z", z, probes.shape)
    check_array("ActNorm's log_det", ld, (n,))
    a, shift, residual = _fit_channels(probes, z)
    assert residual < EXACT, (
        "with random parameters ActNorm is not one affine map per channel: pixels (or "
        "samples) of the same channel are scaled or shifted differently (statistics per pixel "
        "instead of per channel?)")
    a0, shift0, _ = _fit_channels(x_init, out["z0"])
    assert np.max(np.abs(a - a0)) + np.max(np.abs(shift - shift0)) > 1e-3, (
        "ActNorm's map did not change when its parameters were set to random values: the "
        "output must be computed from the learnable shift and scale")
    assert np.max(np.abs(a - 1)) + np.max(np.abs(shift)) > 1e-3, (
        "with random parameters ActNorm is still the identity: z must be (x + shift) * scale "
        "with the layer's own parameters")
    expected = 6 * np.sum(np.log(np.abs(a)))
    worst = float(np.max(np.abs(ld - expected)))
    assert worst < EXACT * (1 + abs(expected)), (
        f"on 2x3 images log_det is {ld[0]:.6g} (up to {worst:.3g} off) but the per-channel "
        f"scales a_c the grader sees give H * W * sum log|a_c| = {expected:.6g}")
    _fd_check(z, ld, b, "ActNorm (random parameters)")
    assert _err(out["z1"].reshape(1, -1), z[:1].reshape(1, -1)) < EXACT, (
        "ActNorm's output for one image depends on the other images of the batch")

    other = rng.normal(size=(b, c, 4, 2)) * 2
    back = oracle.query("""
        layer = _nfv_store['actnorm']
        z2, ld2 = layer(_nfv_torch.as_tensor(inp['other']))
        out['z2'], out['ld2'] = z2, ld2
        x, ld = layer.inverse(_nfv_torch.as_tensor(inp['z']))
        out['x'], out['ld'] = x, ld
    """, other=other, z=z[:b])
    check_array("ActNorm's z on 4x2 images", back["z2"], other.shape)
    check_array("ActNorm's log_det on 4x2 images", back["ld2"], (b,))
    assert _err(back["z2"], _channel_map(other, a, shift)) < EXACT, (
        "on 4x2 images ActNorm applies a different map than on 2x3 images: one scale and one "
        "shift per channel, shared by every pixel")
    expected = 8 * np.sum(np.log(np.abs(a)))
    assert np.max(np.abs(back["ld2"] - expected)) < EXACT * (1 + abs(expected)), (
        f"on 4x2 images log_det is {back['ld2'][0]:.6g}, expected H * W * sum log|a_c| = "
        f"{expected:.6g}")
    check_array("ActNorm.inverse's x", back["x"], (b, c, 2, 3))
    check_array("ActNorm.inverse's log_det", back["ld"], (b,))
    worst = _err(back["x"], x)
    assert worst < EXACT, f"ActNorm.inverse(forward(x)) is off from x by up to {worst:.3g}"
    assert np.max(np.abs(back["ld"] + ld[:b])) < EXACT * (1 + np.max(np.abs(ld))), (
        "ActNorm.inverse's log_det is not minus the forward one")
    return ("one affine map per channel set by the parameters; log_det = H W sum log|a_c| "
            "(also by finite differences) at two image sizes; inverse inverts")


def check_actnorm_init(oracle: Oracle, rng: np.random.Generator) -> str:
    c = 3
    first = _shifted(rng, (8, c, 4, 4))
    later = _shifted(rng, (8, c, 4, 4))
    out = oracle.query(_PREP + """
        layer = ActNorm(3).double()
        _nfv_store['actnorm_init'] = layer
        z1, _ = layer(_nfv_torch.as_tensor(inp['first']))
        z2, _ = layer(_nfv_torch.as_tensor(inp['later']))
        out['z1'], out['z2'] = z1, z2
    """, first=first, later=later)
    z1, z2 = out["z1"], out["z2"]
    check_array("ActNorm's output on its first batch", z1, first.shape)
    check_array("ActNorm's output on a later batch", z2, later.shape)
    a, shift, residual = _fit_channels(first, z1)
    assert residual < EXACT, (
        "after the first batch ActNorm is not one affine map per channel: pixels of the same "
        "channel are scaled or shifted differently (statistics over the batch only, one per "
        "pixel? Take them over batch, height and width)")
    mean = z1.mean(axis=(0, 2, 3))
    spread = [z1.transpose(1, 0, 2, 3).reshape(c, -1).std(axis=1, ddof=d) for d in (0, 1)]
    assert np.max(np.abs(mean)) < 1e-6 and min(np.max(np.abs(s - 1)) for s in spread) < 1e-3, (
        "on its first batch ActNorm must make every channel mean 0 and standard deviation 1 "
        f"(over batch, height and width); the grader measures means "
        f"{np.round(mean, 4).tolist()} and standard deviations "
        f"{np.round(spread[1], 4).tolist()}")
    worst = _err(z2, _channel_map(later, a, shift))
    assert worst < EXACT, (
        "a later batch with other statistics did not go through the map set by the first "
        "batch: ActNorm initialised itself again (only the very first forward may set the "
        "parameters; keep a flag that says it is done)")

    small = rng.normal(size=(2, c, 2, 3)) * 3 + 1
    out = oracle.query("""
        layer = _nfv_store['actnorm_init']
        z, _ = layer(_nfv_torch.as_tensor(inp['small']))
        out['z'] = z
    """, small=small)
    check_array("ActNorm's output on 2x3 images", out["z"], small.shape)
    assert _err(out["z"], _channel_map(small, a, shift)) < EXACT, (
        "after initialising on 4x4 images ActNorm maps 2x3 images differently: one scale and "
        "one shift per channel, shared by every pixel")

    third = _shifted(rng, (4, c, 4, 4))
    out = oracle.query("""
        import io as _nfv_io
        layer = _nfv_store['actnorm_init']
        buffer = _nfv_io.BytesIO()
        _nfv_torch.save(layer.state_dict(), buffer)
        buffer.seek(0)
        fresh = ActNorm(3).double()
        fresh.load_state_dict(_nfv_torch.load(buffer, weights_only=True))
        z, _ = fresh(_nfv_torch.as_tensor(inp['third']))
        out['z'] = z
    """, third=third)
    check_array("a loaded ActNorm's output", out["z"], third.shape)
    assert _err(out["z"], _channel_map(third, a, shift)) < EXACT, (
        "the initialisation does not survive save and load: a new ActNorm that loads the "
        "state_dict of an initialised one initialises itself again on its first batch. Keep "
        "the 'initialised' flag in a buffer (self.register_buffer), part of the state_dict")
    return ("first batch: mean 0, standard deviation 1 per channel (measured by the grader); "
            "the same per-channel map for later batches, other sizes and after save/load")


# ----------------------------------------------------------------------- 1x1 convolutions
def _orthogonal(w: np.ndarray, what: str) -> None:
    err = float(np.max(np.abs(w @ w.T - np.eye(w.shape[0]))))
    assert err < 1e-5, (
        f"{what}.weight should start as a rotation (W W^T = I), but W W^T differs from I by "
        f"{err:.3g}: start from the Q of a QR decomposition of a random matrix")


def _check_linear_flow(what: str, w: np.ndarray, logdet_w: float, x: np.ndarray,
                       z: np.ndarray, ld: np.ndarray, back: dict, fd_b: int) -> None:
    """``z = W x`` per pixel on an :func:`_fd_images` batch of ``fd_b`` images followed by
    more images, ``log_det = H W logdet_w``, finite differences, and the inverse."""
    hw = x.shape[2] * x.shape[3]
    worst = _err(z, _pixelwise(w, x))
    assert worst < EXACT, f"{what}: z is not W x at every pixel (off by up to {worst:.3g})"
    expected = hw * logdet_w
    assert np.max(np.abs(ld - expected)) < EXACT * (1 + abs(expected)), (
        f"{what}: on {x.shape[2]}x{x.shape[3]} images log_det is {ld[0]:.6g}; expected H * W * "
        f"log|det W| = {expected:.6g}" + (
            " (exactly H * W times too small: the same matrix acts on every pixel)"
            if abs(expected) > 1e-3 and abs(ld[0] * hw - expected) < 1e-6 * abs(expected)
            else ""))
    _fd_check(z, ld, fd_b, what)
    b = back["x"].shape[0]
    worst = _err(back["x"], x[-b:])
    assert worst < 1e-8, f"{what}: inverse(forward(x)) is off from x by up to {worst:.3g}"
    assert np.max(np.abs(back["ld"] + ld[-b:])) < EXACT * (1 + abs(expected)), (
        f"{what}: the inverse's log_det is not minus the forward one")


def _check_linear_flow_wide(what: str, w: np.ndarray, logdet_w: float, x: np.ndarray,
                            z: np.ndarray, ld: np.ndarray) -> None:
    check_array(f"{what}'s log_det on {x.shape[2]}x{x.shape[3]} images", ld, (x.shape[0],))
    assert _err(z, _pixelwise(w, x)) < EXACT, (
        f"{what}: on {x.shape[2]}x{x.shape[3]} images z is not W x at every pixel")
    hw = x.shape[2] * x.shape[3]
    expected = hw * logdet_w
    assert np.max(np.abs(ld - expected)) < EXACT * (1 + abs(expected)), (
        f"{what}: on {x.shape[2]}x{x.shape[3]} images log_det is {ld[0]:.6g}; expected H * W "
        f"* log|det W| = {expected:.6g}" + (
            f" (exactly H * W = {hw} times too small: the matrix acts on every pixel)"
            if abs(expected) > 1e-3 and abs(ld[0] * hw - expected) < 1e-6 * abs(expected)
            else ""))


def check_invconv(oracle: Oracle, rng: np.random.Generator) -> str:
    c = 4
    q, _ = np.linalg.qr(rng.normal(size=(c, c)))
    a = q @ np.diag(rng.uniform(0.4, 2.0, size=c)) + 0.2 * rng.normal(size=(c, c))
    x = np.concatenate([_fd_images(rng.normal(size=(1, c, 2, 2))),
                        rng.normal(size=(2, c, 2, 2))])
    wide = rng.normal(size=(2, c, 3, 5))
    out = oracle.query(_PREP + """
        layer = InvConv1x1(4).double()
        out['param'] = float(isinstance(layer.weight, _nfv_torch.nn.Parameter))
        out['w0'] = layer.weight.detach().clone()
        layer.weight.copy_(_nfv_torch.as_tensor(inp['a']))
        out['w'] = layer.weight
        z, ld = layer(_nfv_torch.as_tensor(inp['x']))
        out['z'], out['ld'] = z, ld
        zw, ldw = layer(_nfv_torch.as_tensor(inp['wide']))
        out['zw'], out['ldw'] = zw, ldw
        back, ld_back = layer.inverse(z[-2:])
        out['back'], out['ld_back'] = back, ld_back
    """, a=a, x=x, wide=wide)
    assert float(out["param"].reshape(-1)[0]) == 1, (
        "InvConv1x1 must keep its matrix as a learnable nn.Parameter `self.weight`")
    check_array("InvConv1x1.weight", out["w0"], (c, c))
    _orthogonal(out["w0"], "InvConv1x1")
    assert _err(out["w"], a) < EXACT, "InvConv1x1.weight does not hold the matrix copied into it"
    check_array("InvConv1x1's z", out["z"], x.shape)
    check_array("InvConv1x1's log_det", out["ld"], (x.shape[0],))
    check_array("InvConv1x1.inverse's x", out["back"], (2, c, 2, 2))
    check_array("InvConv1x1.inverse's log_det", out["ld_back"], (2,))
    logdet = float(np.linalg.slogdet(a)[1])
    _check_linear_flow("InvConv1x1 with a general weight", a, logdet, x, out["z"], out["ld"],
                       {"x": out["back"], "ld": out["ld_back"]}, 1)
    check_array("InvConv1x1's z on 3x5 images", out["zw"], wide.shape)
    _check_linear_flow_wide("InvConv1x1", a, logdet, wide, out["zw"], out["ldw"])
    return ("starts orthogonal; with a general W: z = W x per pixel, log_det = H W log|det W| "
            "(NumPy slogdet and finite differences), inverse inverts")


def check_invconv_lu(oracle: Oracle, rng: np.random.Generator) -> str:
    c = 5
    x = np.concatenate([_fd_images(rng.normal(size=(1, c, 2, 2))),
                        rng.normal(size=(2, c, 2, 2))])
    wide = rng.normal(size=(2, c, 4, 3))
    out = oracle.query(_PREP + """
        layer = InvConv1x1LU(5).double()
        out['param'] = float(isinstance(layer.log_s, _nfv_torch.nn.Parameter))
        out['w0'], out['log_s0'] = layer.weight.detach().clone(), layer.log_s.detach().clone()
        _nfv_prep(layer, inp['seed'][0], 0.3)
        out['w'], out['log_s'] = layer.weight, layer.log_s
        z, ld = layer(_nfv_torch.as_tensor(inp['x']))
        out['z'], out['ld'] = z, ld
        zw, ldw = layer(_nfv_torch.as_tensor(inp['wide']))
        out['zw'], out['ldw'] = zw, ldw
        back, ld_back = layer.inverse(z[-2:])
        out['back'], out['ld_back'] = back, ld_back
    """, x=x, wide=wide, seed=[draw_seed(rng)])
    assert float(out["param"].reshape(-1)[0]) == 1, (
        "InvConv1x1LU must keep log|s| as a learnable nn.Parameter `self.log_s`")
    check_array("InvConv1x1LU.weight", out["w0"], (c, c))
    check_array("InvConv1x1LU.log_s", out["log_s0"], (c,))
    _orthogonal(out["w0"], "InvConv1x1LU")
    w, log_s = out["w"], out["log_s"]
    check_array("InvConv1x1LU.weight", w, (c, c))
    check_array("InvConv1x1LU.log_s", log_s, (c,))
    assert np.max(np.abs(w - out["w0"])) > 1e-3, (
        "InvConv1x1LU.weight did not change when every parameter was set to random values: "
        "assemble W = P L (U + diag(sign_s * exp(log_s))) from the parameters")
    sign, logdet = np.linalg.slogdet(w)
    assert sign != 0 and abs(logdet - log_s.sum()) < 1e-8 * (1 + abs(logdet)), (
        f"after randomising the parameters, log|det W| of the assembled weight is "
        f"{logdet:.6g} (NumPy) but sum(log_s) is {log_s.sum():.6g}: the diagonal of "
        "U + diag(s) must be sign_s * exp(log_s), L must have ones on its diagonal and both "
        "must stay triangular (mask them)")
    check_array("InvConv1x1LU's z", out["z"], x.shape)
    check_array("InvConv1x1LU's log_det", out["ld"], (x.shape[0],))
    check_array("InvConv1x1LU.inverse's x", out["back"], (2, c, 2, 2))
    check_array("InvConv1x1LU.inverse's log_det", out["ld_back"], (2,))
    ld = out["ld"]
    expected = 4 * log_s.sum()
    assert np.max(np.abs(ld - expected)) < EXACT * (1 + abs(expected)), (
        f"with random parameters, log_det on 2x2 images is {ld[0]:.6g}; expected H * W * "
        f"sum(log_s) = {expected:.6g} (det P = +-1 and det L = 1, so log|det W| is the sum of "
        "the logarithms log|s|, not of s itself)")
    _check_linear_flow("InvConv1x1LU with random parameters", w, float(log_s.sum()), x,
                       out["z"], ld, {"x": out["back"], "ld": out["ld_back"]}, 1)
    check_array("InvConv1x1LU's z on 4x3 images", out["zw"], wide.shape)
    _check_linear_flow_wide("InvConv1x1LU", w, float(log_s.sum()), wide, out["zw"], out["ldw"])
    return ("starts orthogonal; with random parameters: log|det W| = sum(log_s) (NumPy "
            "slogdet), z = W x per pixel, log_det = H W sum(log_s) (and finite differences), "
            "inverse inverts")


# ------------------------------------------------------------------------------ GlowStep
def _whitened(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Images whose channels, over batch and pixels, have very different means and spreads
    but are exactly uncorrelated: once ActNorm standardises them, any rotation of the
    channels (the 1x1 convolution starts as one) keeps every channel at standard deviation 1,
    so a fresh step's output statistics are known here whatever rotation it drew."""
    b, c, hh, ww = shape
    n = b * hh * ww
    cols = rng.normal(size=(n, c))
    q, _ = np.linalg.qr(cols - cols.mean(axis=0))  # orthonormal, zero-mean columns
    scale = rng.uniform(0.3, 5.0, size=c)
    loc = rng.uniform(-6.0, 8.0, size=c)
    x = q * math.sqrt(n) * scale + loc
    return x.reshape(b, hh, ww, c).transpose(0, 3, 1, 2).copy()


def _affine_rows(x: np.ndarray, z: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Output channels of ``z`` that are one affine map of the input's channel vector at every
    pixel (a 1x1 map: ``z[:, j, p] = m_j . x[:, :, p] + b_j``), and the matrix of their ``m_j``
    (identified here by least squares over batch and pixels)."""
    b, c, hh, ww = x.shape
    design = np.concatenate([x.transpose(0, 2, 3, 1).reshape(-1, c),
                             np.ones((b * hh * ww, 1))], axis=1)
    rows, mats = [], []
    for j in range(z.shape[1]):
        target = z[:, j].reshape(-1)
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        residual = float(np.max(np.abs(design @ coef - target)) / (1 + np.max(np.abs(target))))
        if residual < 1e-9:
            rows.append(j)
            mats.append(coef[:c])
    return rows, np.array(mats).reshape(len(rows), c)


def _step_structure(oracle: Oracle, rng: np.random.Generator, mixing: str, c: int) -> None:
    """What the lesson asks of a step, seen from its numbers: a fresh step standardises every
    channel like ActNorm; with random parameters the half the coupling keeps is a 1x1 map of
    the input that mixes every input channel (a learned 1x1 convolution) or picks one each
    (reversed or shuffled), and the rest is not affine (the coupling works)."""
    what = f"GlowStep({c}, hidden=8, num_layers=1, mixing={mixing!r})"
    first = _whitened(rng, (6, c, 3, 3))
    x = rng.normal(size=(6, c, 3, 3)) * 1.5
    out = oracle.query(_PREP + f"""
        step = GlowStep({c}, hidden=8, num_layers=1, mixing={mixing!r}).double()
        out['z0'] = step(_nfv_torch.as_tensor(inp['first']))[0]
        _nfv_prep(step, inp['seed'][0], 0.3)
        out['z'], out['ld'] = step(_nfv_torch.as_tensor(inp['x']))
    """, first=first, x=x, seed=[draw_seed(rng)])
    z0, z = out["z0"], out["z"]
    check_array(f"{what}'s output on its first batch", z0, first.shape)
    check_array(f"{what}'s z", z, x.shape)
    check_array(f"{what}'s log_det", out["ld"], (len(x),))
    rows, m = _affine_rows(x, z)
    k = c // 2
    assert len(rows) in (k, c - k), (
        f"{what} with random parameters: {len(rows)} of the {c} output channels are a 1x1 "
        f"affine map of the input; a step's coupling passes {k} of them (one half) through "
        "unchanged and transforms the rest with a scale and shift computed from that half "
        "(is the coupling's network still zero, or does it change both halves?)")
    scale = float(np.max(np.abs(m)))
    links = np.abs(m) > 1e-6 * scale
    if mixing in ("lu", "plain"):
        assert links.all(), (
            f"{what} with random parameters: the half the coupling keeps does not depend on "
            "every input channel (the grader measured which ones it depends on: "
            f"{links.astype(int).tolist()}); a learned 1x1 convolution mixes all channels "
            "before the coupling")
    else:
        assert np.all(links.sum(axis=1) == 1) and len(set(np.argmax(links, axis=1))) == len(rows), (
            f"{what}: with a fixed permutation each channel the coupling keeps must be one "
            "input channel (scaled and shifted by ActNorm); the grader finds that they depend "
            f"on {links.astype(int).tolist()}")
        if mixing == "reverse":
            picked = np.argmax(links, axis=1)
            assert all(int(p) == c - 1 - j for j, p in zip(rows, picked, strict=True)), (
                f"{what}: output channel j of the kept half must be input channel C - 1 - j "
                f"(the channels reversed); the grader finds channels {picked.tolist()} for "
                f"outputs {rows}")
    # a fresh step: ActNorm standardised the input, an orthogonal mixing or a permutation
    # kept that, and the kept half passed through: mean 0 everywhere, std 1 on the kept half
    mean = z0.mean(axis=(0, 2, 3))
    assert np.max(np.abs(mean)) < 1e-6 * (1 + np.max(np.abs(z0))), (
        f"{what}: on its first batch a fresh step is ActNorm (which centres every channel), "
        "a linear mixing and a coupling that starts as the identity, so every channel of its "
        f"output has mean 0; the grader measures {np.round(mean, 4).tolist()}. Is ActNorm "
        "first, and does the coupling's network start at zero?")
    flat = z0[:, rows].transpose(1, 0, 2, 3).reshape(len(rows), -1)
    spread = min(float(np.max(np.abs(flat.std(axis=1, ddof=d) - 1))) for d in (0, 1))
    assert spread < 1e-3, (
        f"{what}: on its first batch (channels uncorrelated, with very different means and "
        "spreads) the channels the coupling passes through must come out with standard "
        f"deviation 1 (ActNorm's initialisation, then a rotation); they are off by {spread:.3g}")


def _step_parameters(oracle: Oracle, c: int) -> None:
    """The mixings differ by exactly the student's own 1x1 layer's trainable parameters:
    ``mixing="lu"`` holds one more ``InvConv1x1LU(C)``'s worth than ``"reverse"``,
    ``"plain"`` one ``InvConv1x1(C)``'s, ``"random"`` none (found from parameter sizes, not
    from class names: however the step looks its classes up)."""
    out = oracle.query(_PREP + f"""
        for mixing in ('lu', 'plain', 'reverse', 'random'):
            out[mixing] = _nfv_sizes(GlowStep({c}, hidden=8, num_layers=1, mixing=mixing))
        out['lu_layer'] = _nfv_sizes(InvConv1x1LU({c}))
        out['plain_layer'] = _nfv_sizes(InvConv1x1({c}))
    """)
    sizes = {k: Counter(int(v) for v in out[k].reshape(-1)) for k in out}
    base = sizes["reverse"]
    for mixing, layer in (("lu", "lu_layer"), ("plain", "plain_layer"), ("random", None)):
        extra, missing = sizes[mixing] - base, base - sizes[mixing]
        want = sizes[layer] if layer else Counter()
        name = {"lu": f"InvConv1x1LU({c})", "plain": f"InvConv1x1({c})"}.get(mixing)
        assert extra == want and not missing, (
            f"GlowStep({c}, mixing={mixing!r}) has trainable parameters of sizes "
            f"{sorted(sizes[mixing].elements())}, mixing='reverse' {sorted(base.elements())}: "
            + (f"the difference must be one {name} of yours ({sorted(want.elements())})" if name
               else "a random permutation learns nothing, so they must be the same"))


def _real_step(oracle: Oracle, rng: np.random.Generator, mixing: str, c: int) -> None:
    """The student's own step as a flow with random parameters: log-det against finite
    differences, the inverse, one image independent of the rest of the batch."""
    b = 2
    what = f"GlowStep({c}, hidden=8, num_layers=1, mixing={mixing!r})"
    first = _shifted(rng, (8, c, 2, 2))
    x = rng.normal(size=(b, c, 2, 2))
    probes = _fd_images(x)
    out = oracle.query(_PREP + f"""
        step = GlowStep({c}, hidden=8, num_layers=1, mixing={mixing!r}).double()
        step(_nfv_torch.as_tensor(inp['first']))
        _nfv_prep(step, inp['seed'][0], 0.2)
        z, ld = step(_nfv_torch.as_tensor(inp['x']))
        out['z'], out['ld'] = z, ld
        out['z1'] = step(_nfv_torch.as_tensor(inp['x'][:1]))[0]
        out['back'], out['ld_back'] = step.inverse(z[:{b}])
    """, first=first, x=probes, seed=[draw_seed(rng)])
    z, ld = out["z"], out["ld"]
    check_array(f"{what}'s z", z, probes.shape)
    check_array(f"{what}'s log_det", ld, (probes.shape[0],))
    assert _err(out["z1"].reshape(1, -1), z[:1].reshape(1, -1)) < EXACT, (
        f"{what}: the output for one image depends on the other images of the batch")
    check_array(f"{what}.inverse's x", out["back"], x.shape)
    worst = _err(out["back"], x)
    assert worst < 1e-8, (
        f"{what} with random parameters: inverse(forward(x)) is off from x by up to "
        f"{worst:.3g} (the inverse runs coupling, mixing and ActNorm backwards)")
    assert np.max(np.abs(out["ld_back"] + ld[:b])) < 1e-8 * (1 + np.max(np.abs(ld))), (
        f"{what}: the inverse's log_det is not minus the forward one")
    _fd_check(z, ld, b, f"{what} with random parameters")


#: channel counts every step check tries: odd and even, the smallest a coupling can split
STEP_CHANNELS = (2, 3, 4, 5)


def check_glow_step(oracle: Oracle, rng: np.random.Generator) -> str:
    for c in STEP_CHANNELS:
        for mixing in ("lu", "reverse"):
            _real_step(oracle, rng, mixing, c)
        for mixing in ("lu", "plain", "reverse", "random"):
            _step_structure(oracle, rng, mixing, c)
    for c in (3, 4):
        _step_parameters(oracle, c)
    out = oracle.query("""
        try:
            GlowStep(4, hidden=8, num_layers=1, mixing='shuffle')
            out['raised'] = 0.0
        except ValueError:
            out['raised'] = 1.0
        except Exception:
            out['raised'] = 2.0
    """)
    raised = float(out["raised"].reshape(-1)[0])
    assert raised == 1, ("GlowStep(4, mixing='shuffle') must raise a ValueError"
                         + (" (it raised another exception)" if raised == 2 else ""))
    return (f"C = {', '.join(map(str, STEP_CHANNELS))}, every mixing: a fresh step standardises "
            "like ActNorm; random parameters: the kept half is a 1x1 map mixing every channel "
            "(lu, plain) or picking one (reverse, random), the rest transformed; invertible "
            "with log_det = finite differences (lu, reverse); the mixings differ by your 1x1 "
            "layers' parameters; ValueError otherwise")


# ------------------------------------------------------------------------------ build_glow
def _squeeze(x: np.ndarray) -> np.ndarray:
    """``out[b, 4c + 2i + j, h, w] = x[b, c, 2h + i, 2w + j]`` (lesson 04's order)."""
    b, c, hh, ww = x.shape
    return x.reshape(b, c, hh // 2, 2, ww // 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(
        b, 4 * c, hh // 2, ww // 2)


def _log_normal(z: np.ndarray) -> np.ndarray:
    return (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).reshape(z.shape[0], -1).sum(axis=1)


def _expected_kinds(shape: tuple[int, int, int], scales: int, steps: int
                    ) -> tuple[list[str], list[int]]:
    """The lesson's layer order after the dequantization and the channels of each step."""
    kinds, channels, c = [], [], shape[0]
    for scale in range(scales):
        kinds.append("squeeze")
        c *= 4
        kinds += ["step"] * steps
        channels += [c] * steps
        if scale < scales - 1:
            kinds.append("split")
            c //= 2
    return kinds, channels


def _kind(a: np.ndarray, y: np.ndarray, ld: np.ndarray) -> str:
    """What one layer did to its input, judged from the numbers alone."""
    if y.shape == a.shape:
        return "step"
    if y.ndim == 4 and y.shape[1:] == (4 * a.shape[1], a.shape[2] // 2, a.shape[3] // 2):
        return "squeeze" if np.array_equal(y, _squeeze(a)) and np.all(ld == 0) else "other"
    if y.ndim == 4 and y.shape[1:] == (a.shape[1] // 2, *a.shape[2:]):
        half = a.shape[1] // 2
        good = np.array_equal(y, a[:, :half]) and _err(ld, _log_normal(a[:, half:])) < EXACT
        return "split" if good else "other"
    return "other"


_NOISE = """
        _nfv_flows = __import__('nfcourse.flows', fromlist=['Dequantization'])
        def _nfv_fix_noise(model, noise):
            deqs = [m for m in model.flow.modules() if isinstance(m, _nfv_flows.Dequantization)]
            for m in deqs:
                m.forward = (lambda x, context=None, _m=m: type(_m).forward(
                    _m, x, context, noise=_nfv_torch.as_tensor(noise)))
            return deqs
        def _nfv_flat(m):
            if isinstance(m, _nfv_flows.Compose):
                return [leaf for sub in m.layers for leaf in _nfv_flat(sub)]
            return [m]
"""

_GLOW_CASES = (
    # shape, num_scales, steps_per_scale, hidden, num_layers, mixing
    ((1, 8, 8), 2, 2, 8, 1, "lu"),
    ((1, 8, 8), 3, 1, 4, 2, "reverse"),
    ((2, 4, 8), 2, 1, 6, 1, "plain"),
    ((3, 4, 4), 2, 1, 5, 1, "random"),
)


def _glow_structure(oracle: Oracle, rng: np.random.Generator, case: tuple) -> None:
    shape, scales, steps, hidden, layers, mixing = case
    what = (f"build_glow(shape={shape}, num_scales={scales}, steps_per_scale={steps}, "
            f"hidden={hidden}, num_layers={layers}, mixing={mixing!r})")
    b = 2
    x = rng.integers(0, 256, size=(b, *shape)).astype(float)
    u = rng.uniform(size=x.shape)
    out = oracle.query(_PREP + _NOISE + f"""
        model = build_glow(shape={shape!r}, num_scales={scales}, steps_per_scale={steps},
                           hidden={hidden}, num_layers={layers}, mixing={mixing!r})
        out['flow_model'] = float(isinstance(model, _nfv_flows.FlowModel))
        out['prior'] = list(model.prior.shape)
        out['data_shape'] = list(model.data_shape)
        model = model.double()
        layers = _nfv_flat(model.flow)
        out['n'] = [len(layers)]
        out['first_deq'] = [float(isinstance(layers[0], _nfv_flows.Dequantization))]
        deqs = _nfv_fix_noise(model, inp['u'])
        out['deq'] = [[float(m.alpha), float(m.levels)] for m in deqs] or _nfv_np.zeros((0, 2))
        try:
            h = _nfv_torch.as_tensor(inp['x'])
            for i, layer in enumerate(layers):
                y, ld = layer(h)
                out[f'h{{i}}'], out[f'ld{{i}}'] = y, ld
                if i and tuple(y.shape) == tuple(h.shape):
                    # a step: its sizes, and those of a fresh step run on the same input
                    # (a layer may size its parameters on its first batch)
                    fresh = GlowStep(y.shape[1], hidden={hidden}, num_layers={layers},
                                     mixing={mixing!r}).double()
                    fresh(h)
                    out[f'p{{i}}'], out[f'g{{i}}'] = _nfv_sizes(layer), _nfv_sizes(fresh)
                h = y
            z, ld = model.flow(_nfv_torch.as_tensor(inp['x']))
            out['z'], out['ld'] = z, ld
            try:
                out['lp'] = model.log_prob(_nfv_torch.as_tensor(inp['x']))
            except Exception:
                out['lp'] = _nfv_np.full(len(inp['x']), _nfv_np.nan)
        finally:
            for m in deqs:
                del m.forward
    """, x=x, u=u)
    assert float(out["flow_model"].reshape(-1)[0]) == 1, (
        f"{what} must return a nfcourse.flows.FlowModel")
    deq = out["deq"].reshape(-1, 2)
    assert float(out["first_deq"].reshape(-1)[0]) == 1 and len(deq) == 1, (
        f"{what}: the flow must start with one dequantization layer "
        "(nfcourse.flows.Dequantization())")
    alpha, levels = float(deq[0, 0]), int(deq[0, 1])
    assert levels == 256 and 0 <= alpha < 0.5, (
        f"{what}: the dequantization must be for 256 levels (Dequantization()), got {levels}")
    v = alpha + (1 - 2 * alpha) * (x + u) / levels
    ld0 = (math.log(1 - 2 * alpha) - np.log(v) - np.log1p(-v)).reshape(b, -1).sum(1) \
        - x[0].size * math.log(levels)
    assert _err(out["h0"], np.log(v) - np.log1p(-v)) < EXACT and _err(out["ld0"], ld0) < EXACT, (
        f"{what}: the first layer is not the lesson's dequantization (given its noise)")
    n = int(out["n"].reshape(-1)[0])
    kinds, total, h = [], out["ld0"].copy(), out["h0"]
    for i in range(1, n):
        y, ld = out[f"h{i}"], out[f"ld{i}"]
        check_array(f"{what}: layer {i}'s log_det", ld, (b,))
        assert np.all(np.isfinite(y)), f"{what}: layer {i} gives NaN or Inf"
        kinds.append(_kind(h, y, ld))
        total, h = total + ld, y
    want, channels = _expected_kinds(shape, scales, steps)
    assert kinds == want, (
        f"{what}: after the dequantization the layers act as {kinds} (judged from what each "
        f"does to its input; 'other' is none of a squeeze in lesson 04's order, a split that "
        f"keeps the first half and scores the other with the prior, or a step); expected {want}")
    steps_at = [i for i, k in enumerate(kinds, start=1) if k == "step"]
    got_channels = [int(out[f"h{i}"].shape[1]) for i in steps_at]
    assert got_channels == channels, (
        f"{what}: the steps act on {got_channels} channels; expected {channels}")
    for i, c in zip(steps_at, channels, strict=True):
        got = sorted(int(s) for s in out[f"p{i}"].reshape(-1))
        fresh = sorted(int(s) for s in out[f"g{i}"].reshape(-1))
        assert got == fresh, (
            f"{what}: the step on {c} channels (layer {i}) has trainable parameters of sizes "
            f"{got}, but GlowStep({c}, hidden={hidden}, num_layers={layers}, mixing={mixing!r}) "
            f"has {fresh}: build every step with the channels it sees and pass hidden, "
            "num_layers and mixing on")
    prior = tuple(int(s) for s in out["prior"].reshape(-1))
    assert prior == h.shape[1:], (
        f"{what}: the prior must be StandardNormal({h.shape[1:]}), the last scale's latent; got "
        f"shape {prior}")
    data_shape = tuple(int(s) for s in out["data_shape"].reshape(-1))
    assert data_shape == shape, f"{what}: data_shape must be {shape}, got {data_shape}"
    check_array(f"{what}: the flow's z", out["z"], h.shape)
    check_array(f"{what}: the flow's log_det", out["ld"], (b,))
    assert _err(out["z"], h) < EXACT, (
        f"{what}: model.flow(x)'s z is not what its layers, run one after the other, give")
    assert _err(out["ld"], total) < EXACT, (
        f"{what}: the flow's log_det {np.round(out['ld'], 4).tolist()} is not the sum of its "
        f"layers' ({np.round(total, 4).tolist()})")
    lp = total + _log_normal(h)
    assert out["lp"].shape == (b,) and not np.all(np.isnan(out["lp"])), (
        f"{what}: model.log_prob(x) raised an error or returned the wrong shape")
    check_array(f"{what}: log_prob", out["lp"], (b,))
    assert _err(out["lp"], lp) < EXACT, (
        f"{what}: log_prob is not log N(z; 0, I) + log_det over the prior's shape")


def _glow_round_trip(oracle: Oracle, rng: np.random.Generator, shape: tuple[int, int, int]
                     ) -> None:
    what = f"build_glow(shape={shape}, num_scales=2, steps_per_scale=2, hidden=8)"
    first = rng.integers(0, 256, size=(4, *shape)).astype(float)
    x = rng.integers(0, 256, size=(3, *shape)).astype(float)
    out = oracle.query(_PREP + _NOISE + f"""
        model = build_glow(shape={shape!r}, num_scales=2, steps_per_scale=2, hidden=8,
                           num_layers=1, mixing='lu').double()
        deqs = _nfv_fix_noise(model, inp['u0'])
        model.flow(_nfv_torch.as_tensor(inp['first']))
        for m in deqs:
            del m.forward
        _nfv_prep(model.flow, inp['seed'][0], 0.1)
        deqs = _nfv_fix_noise(model, inp['u'])
        splits = [m for m in model.flow.modules() if isinstance(m, _nfv_flows.Split)]
        hooks = [s.register_forward_hook(lambda mod, i, o: setattr(
            mod, 'z2', i[0].chunk(2, dim=1)[1].detach())) for s in splits]
        try:
            z, ld = model.flow(_nfv_torch.as_tensor(inp['x']))
            back, ld_back = model.flow.inverse(z)
        finally:
            for h in hooks:
                h.remove()
            for s in splits:
                s.z2 = None
            for m in deqs:
                del m.forward
        out['ld'], out['back'], out['ld_back'] = ld, back, ld_back
        _nfv_torch.manual_seed(int(inp['seed'][0]))
        out['samples'] = model.sample(3)
    """, first=first, u0=rng.uniform(size=first.shape), x=x, u=rng.uniform(size=x.shape),
        seed=[draw_seed(rng)])
    check_array(f"{what}: log_det", out["ld"], (3,))
    check_array(f"{what}: the inverse's output", out["back"], x.shape)
    wrong = float(np.mean(out["back"] != x))
    assert wrong == 0, (
        f"{what} with your steps and random parameters: running the flow backwards from f(x) "
        f"(with the split-off halves given back) does not give back the pixels ({wrong:.1%} "
        "differ): is every step invertible?")
    assert np.max(np.abs(out["ld_back"] + out["ld"])) < 1e-7 * (1 + np.max(np.abs(out["ld"]))), (
        f"{what}: the inverse's log_det is not minus the forward one")
    s = out["samples"]
    check_array(f"{what}: model.sample(3)", s, (3, *shape))
    assert np.all(s == np.round(s)) and s.min() >= 0 and s.max() <= 255, (
        f"{what}: model.sample(3) must give images of integers in [0, 255]")


def check_glow(oracle: Oracle, rng: np.random.Generator) -> str:
    for case in _GLOW_CASES:
        _glow_structure(oracle, rng, case)
    for shape in ((1, 8, 8), (3, 4, 4)):
        _glow_round_trip(oracle, rng, shape)
    return (f"{len(_GLOW_CASES)} configurations (1, 2 and 3 channels): each layer judged from "
            "what it does (dequantization, squeezes, steps, splits in order), every step sized "
            "like your GlowStep with the arguments passed on, prior shape, z / log_det / "
            "log_prob the sum of the layers; round trip to the pixels, inverse log_det, "
            "integer samples")


VERIFIER = Verifier(
    lesson="05_glow",
    checks={
        "actnorm_test": check_actnorm,
        "actnorm_test_init": check_actnorm_init,
        "invconv_test": check_invconv,
        "invconv_lu_test": check_invconv_lu,
        "glow_step_test": check_glow_step,
        "glow_test": check_glow,
    },
)
