"""Lesson 02's independent check: dequantization, bits per dimension, the importance bound.

Each check draws fresh inputs, asks the kernel for outputs and decides in float64 here:

* ``dequantization_test``: with the noise sent, ``z = logit(alpha + (1 - 2 alpha)(x + u)/L)``
  exactly (default and keyword-built layers, edge noise 1e-7 and 1 - 1e-7 included); the
  inverse gives the integer pixels back, and integers in ``[0, L - 1]`` for extreme ``z``;
  rows are independent; drawn noise is uniform on ``[0, 1)`` (Kolmogorov-Smirnov) and fresh
  on every call; uint8 input works; bad pixels raise ``ValueError``.
* ``dequantization_test_log_det``: the log-det is the formula's, equals log|det dz/du| of
  the grader's finite-difference Jacobian (which is diagonal), the inverse's log-det is
  minus it, and a standard logistic prior on ``z`` gives every dequantized image exactly
  ``(1 - 2 alpha)^D / L^D``, i.e. ``log2 L`` bits per dimension.
* ``bits_per_dim_test``: ``-log_prob / (D ln 2)`` for images of four shapes, 8 for a
  uniform model of 8-bit pixels, and the gradient ``-1 / (D ln 2)`` reaches ``log_prob``.
* ``importance_bpd_test``: ``log_prob`` is a function defined in the query that serves
  log-weights chosen here (which image it was given is read off the image itself), so the
  grader knows which k weights each image got: the answer must be
  ``-(logsumexp - log k) / (D ln 2)``, stable near -3000 nats, with exactly k calls per image.
* ``vardeq_test``: around a noise flow whose maths the grader knows (``u = sigmoid(eps
  e^(a0 + a1 c) + b0 + b1 c)``, random parameters), ``z`` and ``log_det = log|det dz/du| -
  log q(u|x)`` are exact, the noise flow gets ``eps`` and the context ``x / (L - 1) * 2 - 1``,
  the log-det matches finite differences in ``eps`` minus ``log N(eps)``, the inverse
  inverts, drawn ``eps`` is standard normal, and the gradient of the noise flow's parameters
  equals the grader's finite differences of its own formula.
* ``vardeq_test_train``: the student's layer trains that noise flow (started far from the
  answer, worse than uniform noise) against a peaked pixel density; from the parameters it
  learned the grader computes the variational bound itself on fresh noise, which must beat
  uniform noise (computed here by quadrature) by 0.5 bits/dim, and the bound the layer
  reports on the same noise must be that one, hence not above the true ``-log2 P(x)``.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

from nfcourse.grade.verify.base import Oracle, Verifier, check_array, draw_seed
from nfcourse.grade.verify.maths import fd_jacobian, fd_points, logabsdet_fd

__all__ = ["VERIFIER"]

H = 1e-5  # finite-difference step (float64)
LOGDET_TOL = 1e-5
LN2 = math.log(2)
LOG_2PI = math.log(2 * math.pi)


# ------------------------------------------------------------------------ grader-side maths
def _close(got: np.ndarray, want: np.ndarray) -> float:
    """Largest error of ``got`` relative to ``1 + |want|`` (inf when shapes differ)."""
    if got.shape != want.shape:
        return math.inf
    return float(np.max(np.abs(got - want) / (1 + np.abs(want)), initial=0.0))


def _log_sigmoid(t: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -t)


def _per_image(values: np.ndarray) -> np.ndarray:
    return values.reshape(values.shape[0], -1).sum(axis=1)


def _dequantize(x: np.ndarray, u: np.ndarray, levels: int,
                alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The specified uniform layer: ``z = logit(v)``, ``v = alpha + (1 - 2 alpha)(x + u)/L``
    and ``log|det dz/du|`` per image."""
    v = alpha + (1 - 2 * alpha) * (x + u) / levels
    log_v, log_1mv = np.log(v), np.log1p(-v)
    ld = math.log(1 - 2 * alpha) - math.log(levels) - log_v - log_1mv
    return log_v - log_1mv, _per_image(ld)


def _recover_noise(z: np.ndarray, x: np.ndarray, levels: int, alpha: float) -> np.ndarray:
    v = 1 / (1 + np.exp(-z))
    return (v - alpha) / (1 - 2 * alpha) * levels - x


def _inverse_log_det(z: np.ndarray, levels: int, alpha: float) -> np.ndarray:
    ld = math.log(levels) - math.log(1 - 2 * alpha) + _log_sigmoid(z) + _log_sigmoid(-z)
    return _per_image(ld)


def _log_normal(eps: np.ndarray) -> np.ndarray:
    return _per_image(-0.5 * (eps**2 + LOG_2PI))


def _context(x: np.ndarray, levels: int) -> np.ndarray:
    return x / (levels - 1) * 2 - 1


def _noise_flow(eps: np.ndarray, ctx: np.ndarray,
                theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grader's copy of the kernel's ``_NfvNoiseFlow`` (see ``NOISE_FLOW``)."""
    s = theta[0] + theta[1] * ctx
    v = eps * np.exp(s) + theta[2] + theta[3] * ctx
    return 1 / (1 + np.exp(-v)), _per_image(s + _log_sigmoid(v) + _log_sigmoid(-v))


def _vardeq(x: np.ndarray, eps: np.ndarray, levels: int, alpha: float,
            theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The specified variational layer: ``(z, log_det, log q(u|x))``."""
    u, ld_u = _noise_flow(eps, _context(x, levels), theta)
    log_q = _log_normal(eps) - ld_u
    z, ld = _dequantize(x, u, levels, alpha)
    return z, ld - log_q, log_q


def _pixels(rng: np.random.Generator, levels: int, shape: tuple[int, ...]) -> np.ndarray:
    """Random integer pixels with 0 and levels - 1 among them."""
    x = rng.integers(0, levels, size=shape).astype(float)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, 2, replace=False)] = [0, levels - 1]
    return x


def _ld_hint(diff: float, d: int, levels: int, log_q: float | None = None) -> str:
    if abs(abs(diff) - d * math.log(levels)) < 1e-3 * (1 + d * math.log(levels)):
        return (f"; the difference is D log(levels) = {d} x log({levels}): the -log(levels) of "
                "dividing by levels is missing (or has the wrong sign).")
    if log_q is not None and abs(diff - log_q) < 1e-3 * (1 + abs(log_q)):
        return ("; the difference is log q(u|x): subtract log q(u|x) = log N(eps; 0, I) - "
                "(the noise flow's log-det) from the uniform log-det.")
    return ""


# ---------------------------------------------------------------------- uniform dequantization
def _build(levels: int, alpha: float, default: bool) -> str:
    return "Dequantization()" if default else f"Dequantization(levels={levels}, alpha={alpha!r})"


def _configs(rng: np.random.Generator) -> list[tuple[int, float, bool]]:
    """The default layer, then the edge case of 2 levels and one with other levels (more
    than 256 or fewer), each with alpha passed by keyword."""
    levels = int(rng.choice([16, 1024]))
    return [(256, 1e-5, True), (2, float(rng.choice([1e-4, 1e-3])), False),
            (levels, float(rng.choice([1e-4, 1e-3])), False)]


def check_dequantization(oracle: Oracle, rng: np.random.Generator) -> str:
    for levels, alpha, default in _configs(rng):
        where = f"Dequantization(levels={levels}, alpha={alpha:g})"
        # several channels and odd sizes here, one channel and even sizes below (xr)
        x = _pixels(rng, levels, (3, 3, 5, 4))
        u = rng.uniform(0, 1, size=x.shape)
        x.reshape(-1)[:4] = [0, levels - 1, levels - 1, 0]  # edge noise on the edge pixels
        u.reshape(-1)[:4] = [1e-7, 1 - 1e-7, 1e-7, 1 - 1e-7]
        xr = rng.integers(0, levels, size=(16, 1, 16, 16)).astype(float)
        z_ext = np.array([-1e4, -60.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 60.0, 1e4]).reshape(1, 1,
                                                                                       1, 9)
        bad = np.array([levels, -1.0, int(rng.integers(0, levels - 1)) + 0.5])
        out = oracle.query(f"""
            layer = {_build(levels, alpha, default)}
            x, u = _nfv_torch.as_tensor(inp['x']), _nfv_torch.as_tensor(inp['u'])
            z, ld = layer(x, noise=u)
            out['z'], out['ld'] = z, ld
            out['back'] = layer.inverse(z)[0]
            out['z1'] = layer(x[:1], noise=u[:1])[0]
            xr = _nfv_torch.as_tensor(inp['xr'])
            out['zr'], out['zr2'] = layer(xr)[0], layer(xr)[0]
            small = _nfv_torch.uint8 if {levels} <= 256 else _nfv_torch.int64
            out['z8'] = layer(xr[:2].to(small))[0]
            out['ext'] = layer.inverse(_nfv_torch.as_tensor(inp['zext']))[0]
            raised = []
            for value in inp['bad'].tolist():
                xb = x[:1].clone()
                xb.view(-1)[3] = value
                try:
                    layer(xb)
                    raised.append(0.0)
                except ValueError:
                    raised.append(1.0)
                except Exception:
                    raised.append(-1.0)
            out['raised'] = raised
        """, x=x, u=u, xr=xr, zext=z_ext, bad=bad)
        check_array(f"{where}: forward's z", out["z"], x.shape)
        check_array(f"{where}: forward's log_det", out["ld"], (3,))
        want, _ = _dequantize(x, u, levels, alpha)
        worst = _close(out["z"], want)
        assert worst < 1e-8, (
            f"{where}: z differs from logit(alpha + (1 - 2 alpha)(x + u)/levels) by up to "
            f"{worst:.3g} for the noise u passed as noise= (add the noise to the integer "
            "pixels, divide by levels, squeeze with alpha, then take the logit)")
        assert _close(out["z1"].reshape(x[:1].shape), out["z"][:1]) < 1e-12, (
            f"{where}: an image's z depends on the other images of the batch")
        check_array(f"{where}: inverse's x", out["back"], x.shape)
        wrong = int(np.sum(out["back"] != x))
        assert wrong == 0, (
            f"{where}: inverse(forward(x, noise=u)) gives {wrong} of {x.size} pixels wrong "
            "(float64, noise in [1e-7, 1 - 1e-7]); inverse: sigmoid, unsquash, times levels, "
            "floor, clamp")
        ext = out["ext"]
        assert ext.shape == z_ext.shape and np.all(np.isfinite(ext)) and np.all(
            ext == np.floor(ext)) and ext.min() >= 0 and ext.max() <= levels - 1, (
            f"{where}: inverse of extreme z {z_ext.reshape(-1).tolist()} gave "
            f"{ext.reshape(-1).tolist()}, not integers in [0, {levels - 1}] (clamp after "
            "the floor)")
        for key in ("zr", "zr2"):
            check_array(f"{where}: z without noise=", out[key], xr.shape)
        drawn = _recover_noise(out["zr"], xr, levels, alpha).reshape(-1)
        lo, hi = float(drawn.min()), float(drawn.max())
        ks = float(np.max(np.abs(np.sort(drawn) - (np.arange(drawn.size) + 0.5) / drawn.size)))
        assert lo > -1e-6 and hi < 1 + 1e-6 and ks < 0.06, (
            f"{where}: without noise= the noise added is not uniform on [0, 1): it ranges over "
            f"[{lo:.3g}, {hi:.3g}] with mean {drawn.mean():.3g} (draw it with "
            "torch.rand_like(x))")
        assert np.max(np.abs(out["zr"] - out["zr2"])) > 0, (
            f"{where}: two calls without noise= added the same noise; draw fresh noise each call")
        z8 = out["z8"]
        assert z8.shape == xr[:2].shape and np.all(np.isfinite(z8)), (
            f"{where}: integer (uint8) pixels gave z of shape {z8.shape} or NaN/Inf")
        u8 = _recover_noise(z8, xr[:2], levels, alpha)
        assert u8.min() > -1e-3 and u8.max() < 1 + 1e-3, (
            f"{where}: integer (uint8) pixels are not dequantized like float ones (convert them "
            "to a float dtype first)")
        raised = out["raised"].reshape(-1)
        names = (f"a pixel equal to levels ({levels})", "a negative pixel (-1)",
                 f"a non-integer pixel ({bad[2]})")
        for what, flag in zip(names, raised, strict=True):
            assert flag == 1, (f"{where}: {what} " + ("was accepted" if flag == 0 else
                               "raised another error than ValueError")
                               + "; raise ValueError for pixels outside [0, levels - 1] or "
                               "not integers")
    return ("z = logit(alpha + (1 - 2 alpha)(x + u)/L) exactly, exact round trip, uniform "
            "fresh noise, ValueError for bad pixels (default layer and levels/alpha given)")


def check_dequantization_log_det(oracle: Oracle, rng: np.random.Generator) -> str:
    b, shape = 2, (1, 2, 3)
    d = math.prod(shape)
    for levels, alpha, default in _configs(rng):
        where = f"Dequantization(levels={levels}, alpha={alpha:g})"
        xf = _pixels(rng, levels, (b, *shape))
        uf = rng.uniform(0.2, 0.8, size=(b, d))
        probes_u = fd_points(uf, H).reshape(-1, *shape)
        probes_x = np.tile(xf, (2 * d + 1, 1, 1, 1))
        xe = _pixels(rng, levels, (3, 2, 3, 5))  # several channels, odd sizes
        ue = rng.uniform(0, 1, size=xe.shape)
        ue.reshape(-1)[:4] = [1e-7, 1 - 1e-7, 1e-7, 1 - 1e-7]
        xr = rng.integers(0, levels, size=(8, 1, 4, 4)).astype(float)
        zq = rng.normal(size=(3, 1, 4, 4)) * 4
        out = oracle.query(f"""
            layer = {_build(levels, alpha, default)}
            t = _nfv_torch.as_tensor
            out['zf'], out['ldf'] = layer(t(inp['xf']), noise=t(inp['uf']))
            ze, lde = layer(t(inp['xe']), noise=t(inp['ue']))
            out['lde'], out['ldi_same'] = lde, layer.inverse(ze)[1]
            out['ldi'] = layer.inverse(t(inp['zq']))[1]
            out['zr'], out['ldr'] = layer(t(inp['xr']))
        """, xf=probes_x, uf=probes_u, xe=xe, ue=ue, zq=zq, xr=xr)
        n = probes_u.shape[0]
        check_array(f"{where}: forward's z", out["zf"], (n, *shape))
        check_array(f"{where}: forward's log_det", out["ldf"], (n,))
        check_array(f"{where}: forward's log_det", out["lde"], (3,))
        _, want = _dequantize(xe, ue, levels, alpha)
        diff = out["lde"] - want
        worst = _close(out["lde"], want)
        assert worst < 1e-8, (
            f"{where}: log_det is {out['lde'][0]:.6g} where log|det dz/du| = sum of "
            f"log(1 - 2 alpha) - log(levels) - log v - log(1 - v) is {want[0]:.6g}"
            + _ld_hint(float(diff[0]), xe[0].size, levels))
        jac_values = out["zf"].reshape(n, d)
        fd = logabsdet_fd(jac_values, b, d, H)
        worst = float(np.max(np.abs(out["ldf"][:b] - fd)))
        assert worst < LOGDET_TOL, (
            f"{where}: log_det differs from log|det dz/du| of the grader's finite-difference "
            f"Jacobian by up to {worst:.3g}"
            + _ld_hint(float(out["ldf"][0] - fd[0]), d, levels))
        jac = fd_jacobian(jac_values, b, d, H)
        off = jac - np.einsum("bii->bi", jac)[:, :, None] * np.eye(d)
        assert np.max(np.abs(off)) < 1e-8 * np.max(np.abs(jac)), (
            f"{where}: a pixel's z depends on the noise of other pixels (the Jacobian "
            "dz/du must be diagonal)")
        check_array(f"{where}: inverse's log_det", out["ldi"], (3,))
        want_inv = _inverse_log_det(zq, levels, alpha)
        worst = _close(out["ldi"], want_inv)
        assert worst < 1e-8, (
            f"{where}: inverse's log_det is {out['ldi'][0]:.6g}, but the continuous part "
            f"y = (sigmoid(z) - alpha) levels / (1 - 2 alpha) has log|det dy/dz| = "
            f"{want_inv[0]:.6g}"
            + _ld_hint(float(out["ldi"][0] - want_inv[0]), zq[0].size, levels))
        worst = _close(out["ldi_same"], -out["lde"])
        assert worst < 1e-8, (
            f"{where}: at the same z the inverse's log_det is not minus the forward one")
        check_array(f"{where}: z without noise=", out["zr"], xr.shape)
        check_array(f"{where}: log_det without noise=", out["ldr"], (8,))
        log_p = _per_image(_log_sigmoid(out["zr"]) + _log_sigmoid(-out["zr"])) + out["ldr"]
        dims = xr[0].size
        bpd = -log_p / (dims * LN2)
        expected = math.log2(levels) - math.log2(1 - 2 * alpha)
        worst = float(np.max(np.abs(bpd - expected)))
        assert worst < 1e-7, (
            f"{where}: a uniform density on [0, {levels})^D through your layer (a standard "
            f"logistic prior on z plus log_det) gives {bpd.mean():.5f} bits/dim, expected "
            f"log2({levels}) = {expected:.5f}"
            + _ld_hint(float((expected - bpd[0]) * dims * LN2), dims, levels))
    return ("log_det = log|det dz/du| (formula and finite differences, diagonal Jacobian); "
            "inverse log_det = minus it; a uniform density gives log2(levels) bits/dim")


# ---------------------------------------------------------------------------- bits per dim
BPD_SHAPES = ((1, 28, 28), (3, 8, 8), (7,), (2, 3, 4, 5))


def check_bits_per_dim(oracle: Oracle, rng: np.random.Generator) -> str:
    inputs: dict[str, np.ndarray] = {}
    expected = []
    for i, shape in enumerate(BPD_SHAPES):
        d = math.prod(shape)
        batch = int(rng.integers(2, 5))
        lp = -rng.uniform(0, 3 * d, size=batch)
        lp[0] = -d * math.log(256)         # a uniform model of 8-bit pixels: 8 bits/dim
        lp[1] = rng.uniform(0, 5)          # densities may exceed 1: positive log_prob
        inputs[f"lp{i}"] = lp
        inputs[f"x{i}"] = rng.integers(0, 256, size=(batch, *shape)).astype(float)
        expected.append(-lp / (d * LN2))
    weights = rng.uniform(0.5, 2, size=len(inputs["lp0"]))
    out = oracle.query(f"""
        for i in range({len(BPD_SHAPES)}):
            lp = _nfv_torch.as_tensor(inp[f'lp{{i}}'])
            out[f'b{{i}}'] = bits_per_dim(lp, _nfv_torch.as_tensor(inp[f'x{{i}}']))
        with _nfv_torch.enable_grad():
            lp = _nfv_torch.as_tensor(inp['lp0']).clone().requires_grad_(True)
            (bits_per_dim(lp, _nfv_torch.as_tensor(inp['x0'])) * _nfv_torch.as_tensor(
                inp['w'])).sum().backward()
            out['g'] = lp.grad if lp.grad is not None else _nfv_torch.full_like(lp, float('nan'))
    """, w=weights, **inputs)
    for i, shape in enumerate(BPD_SHAPES):
        got, want = out[f"b{i}"], expected[i]
        check_array(f"bits_per_dim for images of shape {shape}", got, want.shape)
        d = math.prod(shape)
        assert abs(got[0] - 8) < 1e-9, (
            f"images of shape {shape} (D = {d}) with log_prob = -D ln 256 (a uniform model of "
            f"8-bit pixels) gave {got[0]:.6g} bits/dim, expected 8")
        worst = _close(got, want)
        assert worst < 1e-10, (
            f"images of shape {shape}: log_prob {inputs[f'lp{i}'][2]:.5g} gave {got[2]:.6g} "
            f"bits/dim, expected -log_prob / (D ln 2) = {want[2]:.6g} with D = {d}")
    d0 = math.prod(BPD_SHAPES[0])
    grad = out["g"].reshape(-1)
    assert grad.shape == weights.shape and np.all(np.isfinite(grad)), (
        "bits_per_dim is not differentiable: no gradient reaches log_prob (use torch "
        "operations, no .item(), .detach() or numpy)")
    assert _close(grad, -weights / (d0 * LN2)) < 1e-10, (
        f"the gradient of bits_per_dim with respect to log_prob is {grad[0] / weights[0]:.6g}, "
        f"expected -1 / (D ln 2) = {-1 / (d0 * LN2):.6g}")
    return "-log_prob / (D ln 2) for four image shapes (8 for a uniform model); differentiable"


# ---------------------------------------------------------------------- importance-weighted bpd
# log_prob served from the weights the grader chose: which image a row is, is read off the
# row (image b is filled with the value b), so any batching of the k calls works.
SERVED_LOG_PROB = """
def _nfv_served(weights):
    weights = _nfv_torch.as_tensor(weights)
    k, n = weights.shape
    calls = [0] * n
    def log_prob(xb, context=None):
        ids = _nfv_torch.as_tensor(xb).reshape(xb.shape[0], -1)[:, 0].double().round()
        values = []
        for i in ids.long().tolist():
            if not 0 <= i < n:
                raise ValueError('log_prob was given an image that is not one of x')
            if calls[i] >= k:
                raise ValueError('log_prob was called more than k times on an image')
            values.append(weights[calls[i], i])
            calls[i] += 1
        return _nfv_torch.stack(values)
    return log_prob, calls
"""


def _logsumexp(a: np.ndarray) -> np.ndarray:
    top = a.max(axis=0)
    return top + np.log(np.exp(a - top).sum(axis=0))


def check_importance_bpd(oracle: Oracle, rng: np.random.Generator) -> str:
    b, shape = 3, (1, 2, 3)
    d = math.prod(shape)
    x = np.broadcast_to(np.arange(b, dtype=float).reshape(b, 1, 1, 1), (b, *shape)).copy()
    cases = [  # (k, log-weights)
        (1, rng.normal(-20, 3, size=(1, b))),
        (4, np.full((4, b), -7.0) + rng.normal(size=(1, b))),     # equal weights per image
        (5, rng.normal(-3000, 4, size=(5, b))),                    # exp() underflows
        (16, rng.normal(-20, 3, size=(16, b))),
    ]
    inputs = {f"w{i}": w for i, (_, w) in enumerate(cases)}
    calls = "\n".join(
        f"lp, calls = _nfv_served(inp['w{i}'])\n"
        f"out['r{i}'] = importance_bpd(lp, _nfv_torch.as_tensor(inp['x']), k={k})\n"
        f"out['c{i}'] = calls"
        for i, (k, _) in enumerate(cases))
    out = oracle.query(SERVED_LOG_PROB + calls, x=x, **inputs)
    for i, (k, w) in enumerate(cases):
        where = f"k = {k}" + (", log-weights near -3000 nats" if i == 2 else "")
        counts = out[f"c{i}"].reshape(-1)
        assert np.all(counts == k), (
            f"{where}: log_prob was called {counts.astype(int).tolist()} times on the "
            f"{b} images; call it k = {k} times (each call draws new noise)")
        got = out[f"r{i}"]
        assert got.shape == (b,), (
            f"{where}: importance_bpd returned shape {got.shape}, expected ({b},)")
        assert np.all(np.isfinite(got)), (
            f"{where}: importance_bpd gave {got.tolist()}; average in log space with "
            "torch.logsumexp (exp of the log-weights underflows)")
        want = -(_logsumexp(w) - math.log(k)) / (d * LN2)
        worst = _close(got, want)
        if worst >= 1e-9:
            off = float((got[0] - want[0]) * d * LN2)
            hint = ""
            if abs(abs(off) - math.log(k)) < 1e-6 and k > 1:
                hint = " (off by log k: subtract log k after the logsumexp)"
            elif _close(got, -w.mean(axis=0) / (d * LN2)) < 1e-9:
                hint = (" (that is the mean of the log-weights; average the weights themselves: "
                        "logsumexp - log k)")
            raise AssertionError(
                f"{where}: for the log-weights the grader served, importance_bpd gave "
                f"{got[0]:.6g} bits/dim, expected -(logsumexp - log k) / (D ln 2) = "
                f"{want[0]:.6g}{hint}")
    return ("-(logsumexp_k log w - log k) / (D ln 2) for k = 1, 4, 5, 16 on served "
            "log-weights, stable at -3000 nats, k calls per image")


# ---------------------------------------------------------------------- variational
NOISE_FLOW = """
class _NfvNoiseFlow(_nfv_torch.nn.Module):
    # u = sigmoid(eps exp(a0 + a1 c) + b0 + b1 c); records the eps and contexts it gets
    def __init__(self, theta):
        super().__init__()
        self.theta = _nfv_torch.nn.Parameter(_nfv_torch.as_tensor(theta).double().clone())
        self.seen = []
    def forward(self, eps, context=None):
        if context is None:
            raise ValueError('the noise flow needs the image as context: noise_flow(eps, context)')
        c = context.to(eps.dtype)
        s = self.theta[0] + self.theta[1] * c
        v = eps * _nfv_torch.exp(s) + self.theta[2] + self.theta[3] * c
        self.seen.append((eps.detach().clone(), context.detach().clone()))
        fl = _nfv_torch.nn.functional.logsigmoid
        return _nfv_torch.sigmoid(v), (s + fl(v) + fl(-v)).flatten(1).sum(1)
    def inverse(self, u, context=None):
        c = context.to(u.dtype)
        s = self.theta[0] + self.theta[1] * c
        v = _nfv_torch.log(u) - _nfv_torch.log1p(-u)
        fl = _nfv_torch.nn.functional.logsigmoid
        eps = (v - self.theta[2] - self.theta[3] * c) * _nfv_torch.exp(-s)
        return eps, -(s + fl(v) + fl(-v)).flatten(1).sum(1)
"""


def _vardeq_build(levels: int, alpha: float) -> str:
    return (f"flow = _NfvNoiseFlow(inp['theta'])\n"
            f"layer = VariationalDequantization(noise_flow=flow, levels={levels}, "
            f"alpha={alpha!r})\n")


def check_vardeq(oracle: Oracle, rng: np.random.Generator) -> str:
    b, shape = 2, (1, 2, 3)
    d = math.prod(shape)
    for levels, alpha in ((256, 1e-5), (int(rng.choice([16, 64])), 1e-4)):
        where = f"VariationalDequantization(levels={levels}, alpha={alpha:g})"
        theta = np.concatenate([rng.uniform(-0.3, 0.3, 2), rng.uniform(-1, 1, 2)])
        x = _pixels(rng, levels, (3, 3, 5, 4))  # several channels, odd sizes (xd: one)
        eps = np.clip(rng.normal(size=x.shape), -3, 3)
        xf = _pixels(rng, levels, (b, *shape))
        ef = np.clip(rng.normal(size=(b, d)), -2, 2)
        probes_e = fd_points(ef, H).reshape(-1, *shape)
        probes_x = np.tile(xf, (2 * d + 1, 1, 1, 1))
        xd = rng.integers(0, levels, size=(16, 1, 8, 8)).astype(float)
        wz, wl = rng.uniform(0.5, 1.5, size=x.shape), rng.uniform(0.5, 1.5, size=3)
        out = oracle.query(NOISE_FLOW + _vardeq_build(levels, alpha) + textwrap.dedent("""
            t = _nfv_torch.as_tensor
            x, eps = t(inp['x']), t(inp['eps'])
            z, ld = layer(x, noise=eps)
            out['z'], out['ld'] = z, ld
            out['seen_eps'], out['seen_ctx'] = flow.seen[-1] if flow.seen else (eps * 0, x * 0)
            out['back'] = layer.inverse(z)[0]
            out['back3'] = layer.inverse(layer(x, noise=3 * eps)[0])[0]
            out['zf'], out['ldf'] = layer(t(inp['xf']), noise=t(inp['ef']))
            flow.seen.clear()
            out['zd'], out['ldd'] = layer(t(inp['xd']))
            out['eps_d'] = flow.seen[-1][0] if flow.seen else t(inp['xd']) * float('nan')
            with _nfv_torch.enable_grad():
                zg, ldg = layer(x, noise=eps)
                total = (zg * t(inp['wz'])).sum() + (ldg * t(inp['wl'])).sum()
                if total.requires_grad:
                    total.backward()
            g = flow.theta.grad
            out['g'] = g if g is not None else _nfv_torch.full((4,), float('nan'))
        """), theta=theta, x=x, eps=eps, xf=probes_x, ef=probes_e, xd=xd, wz=wz, wl=wl)
        check_array(f"{where}: z", out["z"], x.shape)
        check_array(f"{where}: log_det", out["ld"], (3,))
        seen_eps, seen_ctx = out["seen_eps"], out["seen_ctx"]
        assert seen_eps.shape == x.shape and np.max(np.abs(seen_eps - eps)) < 1e-12, (
            f"{where}: the noise flow was not called with eps = noise (the standard normal "
            "values passed as noise=); call self.noise_flow(eps, context)")
        want_ctx = _context(x, levels)
        assert seen_ctx.shape == x.shape and np.max(np.abs(seen_ctx - want_ctx)) < 1e-12, (
            f"{where}: the noise flow's context is not the image rescaled to [-1, 1], "
            "x / (levels - 1) * 2 - 1")
        z_want, ld_want, log_q = _vardeq(x, eps, levels, alpha, theta)
        worst = _close(out["z"], z_want)
        assert worst < 1e-8, (
            f"{where}: z differs by up to {worst:.3g} from the uniform layer's z at x + u with "
            "u the noise flow's output (add u to x as it is; it is already in (0, 1))")
        diff = float(out["ld"][0] - ld_want[0])
        assert _close(out["ld"], ld_want) < 1e-8, (
            f"{where}: log_det is {out['ld'][0]:.6g}, expected log|det dz/du| - log q(u|x) = "
            f"{ld_want[0]:.6g} with log q(u|x) = log N(eps; 0, I) - (the noise flow's log-det)"
            + _ld_hint(diff, x[0].size, levels, float(log_q[0])))
        for key in ("back", "back3"):
            wrong = int(np.sum(out[key] != x)) if out[key].shape == x.shape else x.size
            assert wrong == 0, (
                f"{where}: inverse(forward(x)) gives {wrong} of {x.size} pixels wrong")
        n = probes_e.shape[0]
        check_array(f"{where}: z", out["zf"], (n, *shape))
        check_array(f"{where}: log_det", out["ldf"], (n,))
        fd = logabsdet_fd(out["zf"].reshape(n, d), b, d, H) - _log_normal(ef)
        worst = float(np.max(np.abs(out["ldf"][:b] - fd)))
        assert worst < LOGDET_TOL, (
            f"{where}: log_det differs from log|det dz/deps| - log N(eps) (the grader's "
            f"finite differences in eps) by up to {worst:.3g}")
        eps_d = out["eps_d"]
        assert eps_d.shape == xd.shape and np.all(np.isfinite(eps_d)), (
            f"{where}: without noise= the noise flow was not called with eps of x's shape")
        mean, std = float(eps_d.mean()), float(eps_d.std())
        assert abs(mean) < 0.2 and 0.85 < std < 1.15, (
            f"{where}: without noise= eps has mean {mean:.3f} and std {std:.3f}; draw it from "
            "N(0, I) with torch.randn_like(x)")
        z_d, ld_d, _ = _vardeq(xd, eps_d, levels, alpha, theta)
        assert _close(out["zd"], z_d) < 1e-8 and _close(out["ldd"], ld_d) < 1e-8, (
            f"{where}: without noise=, z and log_det do not follow from the eps the noise "
            "flow was given")
        grad = out["g"].reshape(-1)
        assert grad.shape == (4,) and np.all(np.isfinite(grad)), (
            f"{where}: no gradient reaches the noise flow's parameters (no torch.no_grad(), "
            ".detach() or .item() on the way from eps to z and log_det)")
        want_g = np.empty(4)
        for j in range(4):
            step = np.zeros(4)
            step[j] = 1e-6
            values = []
            for sign in (1, -1):
                zz, ll, _ = _vardeq(x, eps, levels, alpha, theta + sign * step)
                values.append(float((zz * wz).sum() + (ll * wl).sum()))
            want_g[j] = (values[0] - values[1]) / 2e-6
        worst = _close(grad, want_g)
        assert worst < 1e-5, (
            f"{where}: the gradient of z and log_det with respect to the noise flow's "
            f"parameters is {np.round(grad, 4).tolist()}, expected {np.round(want_g, 4).tolist()}")
    return ("with a known noise flow: z and log_det = log|det dz/du| - log q(u|x) exact and "
            "against finite differences in eps; context x/(L-1)*2-1; round trip; N(0, I) noise; "
            "gradients reach the noise flow")


def check_vardeq_train(oracle: Oracle, rng: np.random.Generator) -> str:
    """Train the noise flow through the student's layer, judge the result grader-side."""
    levels, alpha, steps = 256, 1e-5, 100
    shape = (1, 2, 2)
    d = math.prod(shape)
    pixel = int(rng.integers(16, 240))
    width = float(rng.uniform(0.1, 0.15))
    y0 = pixel + 0.5
    v0 = alpha + (1 - 2 * alpha) * y0 / levels
    mu = math.log(v0) - math.log1p(-v0)
    sd = width * (1 - 2 * alpha) / (levels * v0 * (1 - v0))  # width levels, in logit units

    def log_density(z: np.ndarray) -> np.ndarray:
        return _per_image(-0.5 * ((z - mu) / sd) ** 2 - math.log(sd) - 0.5 * LOG_2PI)

    def logit(y: float) -> float:
        v = alpha + (1 - 2 * alpha) * y / levels
        return math.log(v) - math.log1p(-v)

    def cdf(t: float) -> float:
        return 0.5 * math.erfc(-t / math.sqrt(2))

    true_bpd = -math.log(cdf((logit(y0 + 0.5) - mu) / sd) - cdf((logit(y0 - 0.5) - mu) / sd))
    true_bpd /= LN2
    # uniform noise's bound per dimension, by the midpoint rule over u in [0, 1)
    grid = ((np.arange(20000) + 0.5) / 20000).reshape(-1, 1)
    z_u, ld_u = _dequantize(np.full_like(grid, pixel), grid, levels, alpha)
    uniform_bpd = float(-(log_density(z_u) + ld_u).mean() / LN2)

    theta0 = np.array([0.0, 0.0, float(rng.choice([-2.0, 2.0])), 0.0])  # far off: q is skewed
    eps_eval = rng.normal(size=(2000, *shape))
    out = oracle.query(NOISE_FLOW + _vardeq_build(levels, alpha) + textwrap.dedent(f"""
        t = _nfv_torch.as_tensor
        mu, sd = float(inp['mu'][0]), float(inp['sd'][0])
        def log_density(z):
            return (-0.5 * ((z - mu) / sd) ** 2 - _nfv_np.log(sd)
                    - 0.5 * _nfv_np.log(2 * _nfv_np.pi)).flatten(1).sum(1)
        x = _nfv_torch.full((64, *{shape!r}), {float(pixel)!r}, dtype=_nfv_torch.float64)
        opt = _nfv_torch.optim.Adam(flow.parameters(), lr=0.05)
        with _nfv_torch.random.fork_rng(devices=[]), _nfv_torch.enable_grad():
            _nfv_torch.manual_seed(int(inp['seed'][0]))
            for _ in range({steps}):
                z, ld = layer(x)
                loss = -(log_density(z) + ld).mean() / ({d} * _nfv_np.log(2))
                opt.zero_grad()
                loss.backward()
                opt.step()
        out['loss'] = [float(loss.detach())]
        out['theta'] = flow.theta
        xe = _nfv_torch.full((2000, *{shape!r}), {float(pixel)!r}, dtype=_nfv_torch.float64)
        out['z'], out['ld'] = layer(xe, noise=t(inp['eps']))
    """), theta=theta0, mu=[mu], sd=[sd], seed=[draw_seed(rng)], eps=eps_eval, timeout=120)
    where = (f"trained against a density peaked at pixel {pixel} (width {width:.3f} levels; "
             f"uniform noise {uniform_bpd:.3f} bits/dim, true {true_bpd:.4f})")
    loss = float(out["loss"].reshape(-1)[0])
    assert math.isfinite(loss), f"{where}: the training loss became {loss}"
    theta = out["theta"].reshape(-1)
    assert theta.shape == (4,) and np.all(np.isfinite(theta)), (
        f"{where}: the noise flow's parameters are not finite after training")
    x_eval = np.full(eps_eval.shape, float(pixel))
    z_own, ld_own, _ = _vardeq(x_eval, eps_eval, levels, alpha, theta)
    own_bpd = float(-(log_density(z_own) + ld_own).mean() / (d * LN2))
    assert own_bpd < uniform_bpd - 0.5, (
        f"{where}: the noise your layer learned gives a bound of {own_bpd:.3f} bits/dim "
        f"(computed by the grader from the trained noise flow), not at least 0.5 below uniform "
        "noise; u must come from the noise flow with gradients and log_det must subtract "
        "log q(u|x)")
    check_array(f"{where}: z", out["z"], eps_eval.shape)
    check_array(f"{where}: log_det", out["ld"], (eps_eval.shape[0],))
    claimed_bpd = float(-(log_density(out["z"]) + out["ld"]).mean() / (d * LN2))
    assert claimed_bpd > true_bpd - 0.02, (
        f"{where}: your layer's log-weights say {claimed_bpd:.3f} bits/dim, below the true "
        f"-log2 P(x) per dimension {true_bpd:.4f}: a lower bound on log P(x) cannot be above "
        "it (is -log q(u|x) or -log(levels) missing from log_det?)")
    assert abs(claimed_bpd - own_bpd) < 0.01, (
        f"{where}: your layer reports {claimed_bpd:.3f} bits/dim for noise whose bound is "
        f"{own_bpd:.3f} bits/dim (the grader's computation from the trained noise flow)")
    return (f"learned noise {own_bpd:.3f} bits/dim (grader's computation) vs uniform "
            f"{uniform_bpd:.3f}; reported {claimed_bpd:.3f} >= true {true_bpd:.4f}")


# ---------------------------------------------------------------------- the verifier
VERIFIER = Verifier(
    lesson="02_dequantization",
    checks={
        "dequantization_test": check_dequantization,
        "dequantization_test_log_det": check_dequantization_log_det,
        "bits_per_dim_test": check_bits_per_dim,
        "importance_bpd_test": check_importance_bpd,
        "vardeq_test": check_vardeq,
        "vardeq_test_train": check_vardeq_train,
    },
)
