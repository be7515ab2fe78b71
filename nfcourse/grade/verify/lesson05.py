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
* ``glow_step_test``: a fresh step (mixing ``"lu"`` / ``"reverse"``) centres every channel;
  with every parameter randomised it is a flow (log-det against finite differences, inverse)
  one half of whose output is an affine function of the input. Built with ActNorm and the 1x1
  convolutions replaced by layers whose maths the grader knows, its output is, for every
  ``mixing``, that ActNorm, then that mixing, then a coupling that keeps one half unchanged
  and is affine in the other; ``ValueError`` for an unknown mixing.
* ``glow_test``: ``build_glow`` with ``GlowStep`` replaced by a step whose maths the grader
  knows, for three configurations: squeezes, steps (built with the right channels and the
  arguments passed on) and splits in the right order, and the model's ``z``, ``log_det`` and
  ``log_prob`` equal to the grader's own computation of dequantization, squeeze, steps and
  splits; the prior's shape. With the student's own steps (every parameter randomised) the
  flow runs back to the pixels and its inverse log-det is minus the forward one; samples are
  integer images.

The plain 1x1 convolution is checked as a flow in ``invconv_test`` only, and the steps of
``build_glow`` are checked in ``glow_step_test`` only: the same split of blame as the
notebook's hidden tests (see ``tests/grading/test_lesson05.py``).
"""

from __future__ import annotations

import math

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


def _no_reference(out: dict, what: str) -> None:
    assert float(out["ref"].reshape(-1)[0]) == 0, (
        f"{what} is, subclasses or holds the package's reference (nfcourse.flows.ActNorm, "
        "InvConv1x1, InvConv1x1LU or GlowStep); answers must be your own code")


#: Kernel side: 1.0 when ``obj`` (a class or a module) is or holds a reference layer.
_REF = """
        _nfv_ref = __import__('nfcourse.flows.glow', fromlist=['ActNorm'])
        _nfv_refs = (_nfv_ref.ActNorm, _nfv_ref.InvConv1x1, _nfv_ref.InvConv1x1LU,
                     _nfv_ref.GlowStep)
        def _nfv_is_ref(obj):
            if isinstance(obj, type):
                return float(issubclass(obj, _nfv_refs))
            modules = obj.modules() if hasattr(obj, 'modules') else ()
            return float(any(isinstance(m, _nfv_refs) for m in modules))
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
    out = oracle.query(_REF + """
        layer = ActNorm(3).double()
        out['ref'] = max(_nfv_is_ref(ActNorm), _nfv_is_ref(layer))
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
    _no_reference(out, "ActNorm")
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
    out = oracle.query(_REF + """
        layer = ActNorm(3).double()
        out['ref'] = max(_nfv_is_ref(ActNorm), _nfv_is_ref(layer))
        _nfv_store['actnorm_init'] = layer
        z1, _ = layer(_nfv_torch.as_tensor(inp['first']))
        z2, _ = layer(_nfv_torch.as_tensor(inp['later']))
        out['z1'], out['z2'] = z1, z2
    """, first=first, later=later)
    _no_reference(out, "ActNorm")
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
    out = oracle.query(_REF + """
        layer = InvConv1x1(4).double()
        out['ref'] = max(_nfv_is_ref(InvConv1x1), _nfv_is_ref(layer))
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
    _no_reference(out, "InvConv1x1")
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
    out = oracle.query(_REF + """
        layer = InvConv1x1LU(5).double()
        out['ref'] = max(_nfv_is_ref(InvConv1x1LU), _nfv_is_ref(layer))
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
    _no_reference(out, "InvConv1x1LU")
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
#: Kernel side: an ActNorm and two 1x1 convolutions whose maths the grader knows (no
#: parameters, so randomising the step's parameters leaves them alone), put in the place of
#: the student's while ``GlowStep`` is built; ``_NfvKnownStep`` likewise for ``build_glow``.
_KNOWN = """
        class _NfvActNorm(_nfv_torch.nn.Module):
            def __init__(self, num_channels):
                super().__init__()
                i = _nfv_torch.arange(int(num_channels), dtype=_nfv_torch.float64)
                self.register_buffer('a', _nfv_torch.exp(0.3 * _nfv_torch.sin(1.7 * i + 0.5)))
                self.register_buffer('b', 0.5 * _nfv_torch.cos(2.3 * i + 0.3))
            def forward(self, x, context=None):
                z = x * self.a.view(1, -1, 1, 1) + self.b.view(1, -1, 1, 1)
                ld = x.shape[2] * x.shape[3] * _nfv_torch.log(self.a).sum()
                return z, ld.expand(x.shape[0])
            def inverse(self, z, context=None):
                x = (z - self.b.view(1, -1, 1, 1)) / self.a.view(1, -1, 1, 1)
                ld = -z.shape[2] * z.shape[3] * _nfv_torch.log(self.a).sum()
                return x, ld.expand(z.shape[0])
        class _NfvMix(_nfv_torch.nn.Module):
            def __init__(self, num_channels):
                super().__init__()
                c = int(num_channels)
                i = _nfv_torch.arange(c, dtype=_nfv_torch.float64)
                w = (_nfv_torch.diag(1.0 + 0.4 * _nfv_torch.cos(i * self.freq))
                     + 0.3 * _nfv_torch.sin(self.freq * i.view(-1, 1) + 0.7 * i.view(1, -1)
                                            + 0.2))
                self.register_buffer('w', w)
            def forward(self, x, context=None):
                ld = x.shape[2] * x.shape[3] * _nfv_torch.linalg.slogdet(self.w)[1]
                return _nfv_torch.einsum('ij,bjhw->bihw', self.w, x), ld.expand(x.shape[0])
            def inverse(self, z, context=None):
                ld = -z.shape[2] * z.shape[3] * _nfv_torch.linalg.slogdet(self.w)[1]
                return (_nfv_torch.einsum('ij,bjhw->bihw', _nfv_torch.linalg.inv(self.w), z),
                        ld.expand(z.shape[0]))
        class _NfvMixLU(_NfvMix):
            freq = 1.3
        class _NfvMixPlain(_NfvMix):
            freq = 0.6
        _nfv_known = {'ActNorm': _NfvActNorm, 'InvConv1x1LU': _NfvMixLU,
                      'InvConv1x1': _NfvMixPlain}
"""


def _known_actnorm(c: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(c, dtype=float)
    return np.exp(0.3 * np.sin(1.7 * i + 0.5)), 0.5 * np.cos(2.3 * i + 0.3)


def _known_mix(c: int, freq: float) -> np.ndarray:
    i = np.arange(c, dtype=float)
    return np.diag(1.0 + 0.4 * np.cos(i * freq)) + 0.3 * np.sin(
        freq * i[:, None] + 0.7 * i[None, :] + 0.2)


_KNOWN_FREQ = {"lu": 1.3, "plain": 0.6}


def _real_step(oracle: Oracle, rng: np.random.Generator, mixing: str) -> None:
    """The student's own step as a flow (fresh centring, then random parameters)."""
    c, b = 4, 2
    what = f"GlowStep(4, hidden=8, num_layers=1, mixing={mixing!r})"
    first = _shifted(rng, (8, c, 2, 2))
    x = rng.normal(size=(b, c, 2, 2))
    d = rng.normal(size=(b, c, 2, 2)) * 0.5
    probes = np.concatenate([_fd_images(x), x + d, x - d])
    out = oracle.query(_REF + f"""
        step = GlowStep(4, hidden=8, num_layers=1, mixing={mixing!r}).double()
        out['ref'] = max(_nfv_is_ref(GlowStep), _nfv_is_ref(step))
        z0, _ = step(_nfv_torch.as_tensor(inp['first']))
        out['z0'] = z0
        _nfv_prep(step, inp['seed'][0], 0.2)
        z, ld = step(_nfv_torch.as_tensor(inp['x']))
        out['z'], out['ld'] = z, ld
        z1, _ = step(_nfv_torch.as_tensor(inp['x'][:1]))
        out['z1'] = z1
        back, ld_back = step.inverse(z[:{b}])
        out['back'], out['ld_back'] = back, ld_back
    """, first=first, x=probes, seed=[draw_seed(rng)])
    _no_reference(out, what)
    check_array(f"{what}'s output on its first batch", out["z0"], first.shape)
    mean = out["z0"].mean(axis=(0, 2, 3))
    assert np.max(np.abs(mean)) < 1e-6 * (1 + np.max(np.abs(out["z0"]))), (
        f"{what}: on its first batch a fresh step is ActNorm (which centres every channel), "
        "a linear mixing and a coupling that starts as the identity, so every channel of its "
        f"output has mean 0; the grader measures {np.round(mean, 4).tolist()}. Is ActNorm "
        "first, and does the coupling's network start at zero?")
    z, ld = out["z"], out["ld"]
    check_array(f"{what}'s z", z, probes.shape)
    check_array(f"{what}'s log_det", ld, (probes.shape[0],))
    n_fd = (2 * c * 4 + 1) * b
    base, up, down = z[:b], z[n_fd:n_fd + b], z[n_fd + b:]
    bend = [float(np.max(np.abs(up[:, h] + down[:, h] - 2 * base[:, h])))
            for h in (slice(0, c // 2), slice(c // 2, c))]
    assert min(bend) < 1e-8 * (1 + np.max(np.abs(base))), (
        f"{what} with random parameters: neither half of the output is an affine function of "
        "the input, so the coupling changes the half it is conditioned on (z_a must be x_a "
        "unchanged; only the other half is scaled and shifted)")
    assert _err(out["z1"].reshape(1, -1), base[:1].reshape(1, -1)) < EXACT, (
        f"{what}: the output for one image depends on the other images of the batch")
    check_array(f"{what}.inverse's x", out["back"], x.shape)
    worst = _err(out["back"], x)
    assert worst < 1e-8, (
        f"{what} with random parameters: inverse(forward(x)) is off from x by up to "
        f"{worst:.3g} (the inverse runs coupling, mixing and ActNorm backwards)")
    assert np.max(np.abs(out["ld_back"] + ld[:b])) < 1e-8 * (1 + np.max(np.abs(ld))), (
        f"{what}: the inverse's log_det is not minus the forward one")
    _fd_check(z, ld, b, f"{what} with random parameters")


def _known_step(oracle: Oracle, rng: np.random.Generator, mixing: str) -> None:
    """The step built with ActNorm and the 1x1 convolutions the grader knows."""
    c, b, k = 4, 2, 2
    what = f"GlowStep(4, mixing={mixing!r})"
    x = rng.normal(size=(b, c, 2, 2))
    a, shift = _known_actnorm(c)
    if mixing in _KNOWN_FREQ:
        mat = _known_mix(c, _KNOWN_FREQ[mixing])
    elif mixing == "reverse":
        mat = np.eye(c)[::-1]
    else:
        mat = None
    probes = [_fd_images(x)]
    if mat is not None:  # directions that move only one half of the mixing's output
        for half in (slice(0, k), slice(k, c)):
            du = np.zeros((b, c, 2, 2))
            du[:, half] = rng.normal(size=(b, c - k, 2, 2)) * 0.7
            dx = _pixelwise(np.linalg.inv(mat), du) / a.reshape(1, c, 1, 1)
            probes += [x + dx, x - dx]
    probes = np.concatenate(probes)
    out = oracle.query(_KNOWN + f"""
        _g = globals()
        saved = {{n: _g[n] for n in _nfv_known if n in _g}}
        _g.update(_nfv_known)
        try:
            step = GlowStep(4, hidden=8, num_layers=1, mixing={mixing!r})
        finally:
            for n in _nfv_known:
                if n in saved:
                    _g[n] = saved[n]
                else:
                    _g.pop(n, None)
        out['counts'] = [sum(isinstance(m, t) for m in step.modules())
                         for t in (_NfvActNorm, _NfvMixLU, _NfvMixPlain)]
        step = _nfv_prep(step, inp['seed'][0], 0.3)
        z, ld = step(_nfv_torch.as_tensor(inp['x']))
        out['z'], out['ld'] = z, ld
    """, x=probes, seed=[draw_seed(rng)])
    counts = out["counts"].reshape(-1)
    assert counts[0] == 1, (
        f"{what} must build exactly one ActNorm with ActNorm(num_channels) (the grader put a "
        f"layer of its own in ActNorm's place and found {int(counts[0])})")
    wanted = {"lu": [1, 0], "plain": [0, 1]}.get(mixing, [0, 0])
    assert list(counts[1:]) == wanted, (
        f"{what} must mix channels with "
        + {"lu": "InvConv1x1LU(num_channels)", "plain": "InvConv1x1(num_channels)"}.get(
            mixing, "a fixed permutation (nfcourse.flows."
            + ("ReversePermutation" if mixing == "reverse" else "RandomPermutation")
            + "), not a 1x1 convolution")
        + f" (the grader counted {int(counts[1])} InvConv1x1LU and {int(counts[2])} "
        "InvConv1x1 built)")
    z, ld = out["z"], out["ld"]
    check_array(f"{what}'s z", z, probes.shape)
    check_array(f"{what}'s log_det", ld, (probes.shape[0],))
    v = _channel_map(x, a, shift)
    base = z[:b]
    if mat is None:  # a random shuffle: one half must be channels of ActNorm's output
        found = []
        for half in (range(0, k), range(k, c)):
            pick = [j for i in half for j in range(c)
                    if _err(base[:, i], v[:, j]) < EXACT]
            found.append(len(set(pick)) == len(half))
        assert any(found), (
            f"{what}: no half of the output is a set of channels of ActNorm's output: the "
            "step must run ActNorm, then the permutation, then a coupling that passes one "
            "half through unchanged")
        _fd_check(z, ld, b, what)
        return
    u = _pixelwise(mat, v)
    kept = [h for h in (slice(0, k), slice(k, c)) if _err(base[:, h], u[:, h]) < EXACT]
    assert kept, (
        f"{what}: built with an ActNorm and a mixing whose maths the grader knows, the step's "
        "output does not contain the mixing's output for the first C // 2 channels unchanged: "
        "the step must run ActNorm, then the mixing, then a coupling that passes the first "
        "half through and only scales and shifts the second")
    keep = kept[0]
    free = slice(k, c) if keep.start == 0 else slice(0, k)
    # probes that move only the free half: z_free must be affine there, log_det constant
    i = 1 if keep.start == 0 else 0
    n_fd = (2 * c * 4 + 1) * b
    up = z[n_fd + 2 * i * b: n_fd + (2 * i + 1) * b]
    down = z[n_fd + (2 * i + 1) * b: n_fd + (2 * i + 2) * b]
    assert np.max(np.abs(base[:, free] - u[:, free])) > 1e-3, (
        f"{what}: with random network weights the coupling is still the identity")
    bend = float(np.max(np.abs(up[:, free] + down[:, free] - 2 * base[:, free])))
    assert bend < 1e-8 * (1 + np.max(np.abs(base))), (
        f"{what}: the coupling's output is not an affine function of the half it changes "
        "(z_b = x_b * exp(s) + t with s and t computed from the kept half only)")
    ld_moved = ld[n_fd + 2 * i * b: n_fd + (2 * i + 2) * b]
    assert np.max(np.abs(ld_moved - np.concatenate([ld[:b], ld[:b]]))) < 1e-8 * (
        1 + np.max(np.abs(ld))), (
        f"{what}: log_det changes with the half the coupling changes; s must depend on the "
        "kept half only")
    _fd_check(z, ld, b, f"{what} with known ActNorm and mixing")


def check_glow_step(oracle: Oracle, rng: np.random.Generator) -> str:
    for mixing in ("lu", "reverse"):
        _real_step(oracle, rng, mixing)
    for mixing in ("lu", "plain", "reverse", "random"):
        _known_step(oracle, rng, mixing)
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
    return ("fresh step centres each channel; random parameters: invertible, log_det = "
            "finite differences, one half affine (lu, reverse); with known ActNorm and mixing: "
            "ActNorm -> mixing -> coupling for all four mixings; ValueError otherwise")


# ------------------------------------------------------------------------------ build_glow
_KNOWN_STEP = """
        class _NfvKnownStep(_nfv_torch.nn.Module):
            codes = {'lu': 1, 'plain': 2, 'reverse': 3, 'random': 4}
            def __init__(self, num_channels, hidden=32, num_layers=1, mixing='lu'):
                super().__init__()
                c = int(num_channels)
                def num(v):
                    try:
                        return float(v)
                    except Exception:
                        return -1.0
                _nfv_store['glow_steps'].append(
                    [c, num(hidden), num(num_layers),
                     float(self.codes.get(mixing, -1) if isinstance(mixing, str) else -1)])
                i = _nfv_torch.arange(c, dtype=_nfv_torch.float64)
                self.c = c
                self.register_buffer('a', _nfv_torch.exp(0.25 * _nfv_torch.sin(1.3 * i + 0.4)))
                self.register_buffer('b', 0.3 * _nfv_torch.cos(0.9 * i + 0.1))
            def _sm(self, kept):
                m = kept.mean(dim=1, keepdim=True)
                return 0.4 * _nfv_torch.tanh(m + 0.2), 0.5 * _nfv_torch.sin(m)
            def forward(self, x, context=None):
                if x.dim() != 4 or x.shape[1] != self.c:
                    raise ValueError(f'GlowStep({self.c}) received a batch of shape '
                                     f'{tuple(x.shape)}')
                a, b, k = self.a.view(1, -1, 1, 1), self.b.view(1, -1, 1, 1), self.c // 2
                v = (x * a + b).flip(1)
                s, t = self._sm(v[:, :k])
                z = _nfv_torch.cat([v[:, :k], v[:, k:] * _nfv_torch.exp(s) + t], dim=1)
                ld = (x.shape[2] * x.shape[3] * _nfv_torch.log(self.a).sum()
                      + (self.c - k) * s.flatten(1).sum(1))
                return z, ld
            def inverse(self, z, context=None):
                a, b, k = self.a.view(1, -1, 1, 1), self.b.view(1, -1, 1, 1), self.c // 2
                s, t = self._sm(z[:, :k])
                v = _nfv_torch.cat([z[:, :k], (z[:, k:] - t) * _nfv_torch.exp(-s)], dim=1)
                x = (v.flip(1) - b) / a
                ld = -(z.shape[2] * z.shape[3] * _nfv_torch.log(self.a).sum()
                       + (self.c - k) * s.flatten(1).sum(1))
                return x, ld
"""


def _known_glow_step(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grader's copy of the kernel's ``_NfvKnownStep``."""
    b, c, hh, ww = x.shape
    i = np.arange(c, dtype=float)
    a, shift, k = np.exp(0.25 * np.sin(1.3 * i + 0.4)), 0.3 * np.cos(0.9 * i + 0.1), c // 2
    v = _channel_map(x, a, shift)[:, ::-1]
    m = v[:, :k].mean(axis=1, keepdims=True)
    s, t = 0.4 * np.tanh(m + 0.2), 0.5 * np.sin(m)
    z = np.concatenate([v[:, :k], v[:, k:] * np.exp(s) + t], axis=1)
    return z, hh * ww * np.log(a).sum() + (c - k) * s.reshape(b, -1).sum(axis=1)


def _squeeze(x: np.ndarray) -> np.ndarray:
    """``out[b, 4c + 2i + j, h, w] = x[b, c, 2h + i, 2w + j]`` (lesson 04's order)."""
    b, c, hh, ww = x.shape
    return x.reshape(b, c, hh // 2, 2, ww // 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(
        b, 4 * c, hh // 2, ww // 2)


def _log_normal(z: np.ndarray) -> np.ndarray:
    return (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).reshape(z.shape[0], -1).sum(axis=1)


def _expected_glow(x: np.ndarray, u: np.ndarray, alpha: float, levels: int, scales: int,
                   steps: int) -> dict:
    """What ``build_glow`` with the known step must compute: z, log_det, the layer kinds
    (1 dequantization, 2 squeeze, 3 step, 4 split) and the channels each step is built for."""
    d = int(np.prod(x.shape[1:]))
    v = alpha + (1 - 2 * alpha) * (x + u) / levels
    z = np.log(v) - np.log1p(-v)
    ld = (math.log(1 - 2 * alpha) - np.log(v) - np.log1p(-v)).reshape(x.shape[0], -1).sum(1)
    ld = ld - d * math.log(levels)
    kinds, channels = [1], []
    for scale in range(scales):
        z = _squeeze(z)
        kinds.append(2)
        for _ in range(steps):
            z, step_ld = _known_glow_step(z)
            ld = ld + step_ld
            kinds.append(3)
            channels.append(z.shape[1])
        if scale < scales - 1:
            half = z.shape[1] // 2
            ld = ld + _log_normal(z[:, half:])
            z = z[:, :half]
            kinds.append(4)
    return {"z": z, "ld": ld, "kinds": kinds, "channels": channels}


_NOISE = """
        _nfv_flows = __import__('nfcourse.flows', fromlist=['Dequantization'])
        def _nfv_fix_noise(model, noise):
            deqs = [m for m in model.flow.modules() if isinstance(m, _nfv_flows.Dequantization)]
            for m in deqs:
                m.forward = (lambda x, context=None, _m=m: type(_m).forward(
                    _m, x, context, noise=_nfv_torch.as_tensor(noise)))
            return deqs
"""

_GLOW_CASES = (
    # shape, num_scales, steps_per_scale, hidden, num_layers, mixing
    ((1, 8, 8), 2, 2, 8, 1, "lu"),
    ((1, 8, 8), 3, 1, 4, 2, "reverse"),
    ((2, 4, 8), 2, 1, 6, 1, "plain"),
)


def _glow_structure(oracle: Oracle, rng: np.random.Generator, case: tuple) -> None:
    shape, scales, steps, hidden, layers, mixing = case
    what = (f"build_glow(shape={shape}, num_scales={scales}, steps_per_scale={steps}, "
            f"hidden={hidden}, num_layers={layers}, mixing={mixing!r})")
    b = 2
    x = rng.integers(0, 256, size=(b, *shape)).astype(float)
    u = rng.uniform(size=x.shape)
    out = oracle.query(_REF + _KNOWN_STEP + _NOISE + f"""
        _g = globals()
        _nfv_store['glow_steps'] = []
        saved = _g.get('GlowStep', None)
        _g['GlowStep'] = _NfvKnownStep
        try:
            model = build_glow(shape={shape!r}, num_scales={scales}, steps_per_scale={steps},
                               hidden={hidden}, num_layers={layers}, mixing={mixing!r})
        finally:
            if saved is None:
                _g.pop('GlowStep', None)
            else:
                _g['GlowStep'] = saved
        out['ref'] = _nfv_is_ref(model)
        out['flow_model'] = float(isinstance(model, _nfv_flows.FlowModel))
        out['steps'] = _nfv_store['glow_steps'] or _nfv_np.zeros((0, 4))
        kinds = []
        for m in model.flow.modules():
            if isinstance(m, _nfv_flows.Dequantization):
                kinds.append(1)
            elif isinstance(m, _nfv_flows.Squeeze):
                kinds.append(2)
            elif isinstance(m, _NfvKnownStep):
                kinds.append(3)
            elif isinstance(m, _nfv_flows.Split):
                kinds.append(4)
        out['kinds'] = kinds
        out['prior'] = list(model.prior.shape)
        out['data_shape'] = list(model.data_shape)
        model = model.double()
        deqs = _nfv_fix_noise(model, inp['u'])
        out['deq'] = [[float(m.alpha), float(m.levels)] for m in deqs] or _nfv_np.zeros((0, 2))
        z, ld = model.flow(_nfv_torch.as_tensor(inp['x']))
        out['z'], out['ld'] = z, ld
        try:
            out['lp'] = model.log_prob(_nfv_torch.as_tensor(inp['x']))
        except Exception:
            out['lp'] = _nfv_np.full(len(inp['x']), _nfv_np.nan)
        for m in deqs:
            del m.forward
    """, x=x, u=u)
    _no_reference(out, what)
    assert float(out["flow_model"].reshape(-1)[0]) == 1, (
        f"{what} must return a nfcourse.flows.FlowModel")
    kinds = [int(k) for k in out["kinds"].reshape(-1)]
    deq = out["deq"].reshape(-1, 2)
    assert kinds[:1] == [1] and len(deq) == 1, (
        f"{what}: the flow must start with one dequantization layer "
        "(nfcourse.flows.Dequantization())")
    alpha, levels = float(deq[0, 0]), int(deq[0, 1])
    assert levels == 256 and 0 <= alpha < 0.5, (
        f"{what}: the dequantization must be for 256 levels (Dequantization()), got {levels}")
    want = _expected_glow(x, u, alpha, levels, scales, steps)
    names = {1: "dequantization", 2: "squeeze", 3: "GlowStep", 4: "split"}
    assert kinds == want["kinds"], (
        f"{what}: the layers come in the order {[names[k] for k in kinds]}; expected "
        f"{[names[k] for k in want['kinds']]}")
    args = out["steps"].reshape(-1, 4)
    expected_args = [[c, hidden, layers, MIXINGS[mixing]] for c in want["channels"]]
    assert args.tolist() == expected_args, (
        f"{what}: the steps were built as GlowStep(num_channels, hidden, num_layers, mixing) "
        f"with {[[int(a[0]), a[1], a[2], MIXING_NAMES.get(int(a[3]), '?')] for a in args]}; "
        f"expected {[[a[0], a[1], a[2], mixing] for a in expected_args]} (the channels after "
        "each squeeze and split, and the arguments passed on)")
    prior = tuple(int(s) for s in out["prior"].reshape(-1))
    assert prior == want["z"].shape[1:], (
        f"{what}: the prior must be StandardNormal({want['z'].shape[1:]}), the last scale's "
        f"latent; got shape {prior}")
    data_shape = tuple(int(s) for s in out["data_shape"].reshape(-1))
    assert data_shape == shape, f"{what}: data_shape must be {shape}, got {data_shape}"
    check_array(f"{what}: the flow's z", out["z"], want["z"].shape)
    check_array(f"{what}: the flow's log_det", out["ld"], (b,))
    assert _err(out["z"], want["z"]) < EXACT, (
        f"{what}: with GlowStep replaced by a step whose maths the grader knows, the flow's z "
        "is not dequantization, then per scale squeeze and the steps, with a split between "
        "scales")
    assert _err(out["ld"], want["ld"]) < EXACT, (
        f"{what}: the flow's log_det {np.round(out['ld'], 4).tolist()} is not the sum of its "
        f"layers' (the grader computes {np.round(want['ld'], 4).tolist()})")
    lp = want["ld"] + _log_normal(want["z"])
    assert out["lp"].shape == (b,) and not np.all(np.isnan(out["lp"])), (
        f"{what}: model.log_prob(x) raised an error or returned the wrong shape")
    check_array(f"{what}: log_prob", out["lp"], (b,))
    assert _err(out["lp"], lp) < EXACT, (
        f"{what}: log_prob is not log N(z; 0, I) + log_det over the prior's shape")


def _glow_round_trip(oracle: Oracle, rng: np.random.Generator) -> None:
    what = "build_glow(shape=(1, 8, 8), num_scales=2, steps_per_scale=2, hidden=8)"
    first = rng.integers(0, 256, size=(4, 1, 8, 8)).astype(float)
    x = rng.integers(0, 256, size=(3, 1, 8, 8)).astype(float)
    out = oracle.query(_REF + _NOISE + """
        model = build_glow(shape=(1, 8, 8), num_scales=2, steps_per_scale=2, hidden=8,
                           num_layers=1, mixing='lu').double()
        out['ref'] = _nfv_is_ref(model)
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
    _no_reference(out, what)
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
    check_array(f"{what}: model.sample(3)", s, (3, 1, 8, 8))
    assert np.all(s == np.round(s)) and s.min() >= 0 and s.max() <= 255, (
        f"{what}: model.sample(3) must give images of integers in [0, 255]")


def check_glow(oracle: Oracle, rng: np.random.Generator) -> str:
    for case in _GLOW_CASES:
        _glow_structure(oracle, rng, case)
    _glow_round_trip(oracle, rng)
    return ("three configurations with a known step: layer order, step arguments, prior "
            "shape, z / log_det / log_prob computed by the grader; your steps: round trip to "
            "the pixels, inverse log_det, integer samples")


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
    forbidden=("flows.ActNorm", "flows.InvConv1x1", "flows.InvConv1x1LU", "flows.GlowStep",
               "flows.glow", "flows.builders", "nfcourse.grade"),
    references=("nfcourse.flows.glow:ActNorm", "nfcourse.flows.glow:InvConv1x1",
                "nfcourse.flows.glow:InvConv1x1LU", "nfcourse.flows.glow:GlowStep",
                "nfcourse.flows.builders:glow"),
)
