"""Lesson 03's independent check: coupling layers for images, verified from numbers.

Each check draws fresh inputs, asks the kernel for outputs and decides in float64 here:

Every randomised draw of a size comes on top of fixed edge cases checked every time (odd
and even heights, widths and channel counts, one channel and several), so a verdict never
depends on the luck of the draw; the draws come from a seed computed from the submission.

* ``checkerboard_mask_test``: for a single pixel, every parity of height and width and
  random sizes, the mask is exactly 1 where ``i + j`` is even (0 elsewhere, swapped by
  ``invert``), a float ``(1, 1, h, w)`` tensor.
* ``channel_mask_test``: for 2, 3 and 5 channels and random counts, exactly the first
  ``c // 2`` channels are 1 (swapped by ``invert``), a float ``(1, c, 1, 1)`` tensor.
* ``coupling_test``: on small images (a checkerboard on 1 channel, a channel mask and an
  inverted checkerboard on 2, a channel mask on 3) with random weights for its trainable
  parameters (frozen ones, such as a mask kept as a parameter, are left alone), the kept
  entries pass through
  unchanged, the Jacobian the grader measures by finite differences has identity rows for
  the kept entries and a diagonal block for the transformed ones, the output is affine in
  the transformed entries, the layer is not the identity, ``log_det`` is log|det J|, rows are
  independent; the inverse inverts with its own log-det; ``|s| <= exp(log_scale)``.
* ``coupling_test_init``: a freshly built layer (default network) is the identity both
  ways, with zero log-dets of shape ``(B,)``.
* ``simple_flow_test``: at two small shapes (one channel, then two or three; odd and even
  sizes) and an even and an odd number of couplings, the flow starts
  with the lesson's uniform dequantization (same numbers as the grader's own), is the
  identity after it when fresh, and with random weights every coupling keeps exactly a
  checkerboard of pixels unchanged, alternating from one coupling to the next; the log-det
  after dequantization is log|det J| of the grader's finite differences; the inverse gives
  the pixels back; the prior has the data's shape; ``vardeq=True`` uses a variational
  dequantization.
* ``train_test``: the grader dequantizes held-out test images with noise it draws, the
  kernel runs the trained ``model``'s layers after its dequantization one image at a time,
  and the grader turns ``z`` and the log-dets into bits per dimension. The reported log-dets
  are checked against finite differences of the same trained layers on a 10x10 crop (their
  masks cropped alike, wherever a layer keeps them: attribute, buffer or frozen parameter;
  a full 28x28 Jacobian is too slow to measure in the grading budget);
  any excess per dimension is added to the score, so inflated log-dets gain nothing.
"""

from __future__ import annotations

import math

import numpy as np

from nfcourse.grade.verify.base import Oracle, Verifier, check_array, draw_seed
from nfcourse.grade.verify.maths import fd_jacobian, fd_points, gaussian_log_prob, logabsdet_fd

__all__ = ["VERIFIER", "dequantize", "checkerboard", "channel"]

H = 1e-5  # finite-difference step (float64)
LOGDET_TOL = 1e-5
EXACT = 1e-9
# nfcourse.flows.Dequantization's defaults, which the lesson's flows use
ALPHA, LEVELS = 1e-5, 256
CROP = 10  # side of the crop on which the trained model's log-dets are measured


def checkerboard(h: int, w: int, invert: bool = False) -> np.ndarray:
    """The lesson's checkerboard: ``(1, 1, h, w)``, 1 where ``i + j`` is even."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mask = ((i + j) % 2 == 0).astype(float)
    return (1 - mask if invert else mask).reshape(1, 1, h, w)


def channel(c: int, invert: bool = False) -> np.ndarray:
    """The lesson's channel mask: ``(1, c, 1, 1)``, the first ``c // 2`` channels 1."""
    mask = (np.arange(c) < c // 2).astype(float)
    return (1 - mask if invert else mask).reshape(1, c, 1, 1)


def dequantize(x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform dequantization and logit, the grader's float64 copy of the package's layer:
    ``y = logit(a + (1 - 2a)(x + u) / L)``, log-det ``sum(log(1 - 2a) - log v - log(1 - v))
    - D log L`` (per image), with ``a = 1e-5`` and ``L = 256``."""
    v = ALPHA + (1 - 2 * ALPHA) * (x + u) / LEVELS
    y = np.log(v) - np.log1p(-v)
    b = x.shape[0]
    per_dim = math.log(1 - 2 * ALPHA) - np.log(v) - np.log1p(-v)
    return y, per_dim.reshape(b, -1).sum(1) - per_dim[0].size * math.log(LEVELS)


def _mismatch(got: np.ndarray, expected: np.ndarray) -> str:
    wrong = np.argwhere(got != expected)
    idx = tuple(int(i) for i in wrong[0])
    return (f"is wrong at {len(wrong)} of {expected.size} positions, e.g. index {idx}: got "
            f"{got[idx]:g}, expected {expected[idx]:g}")


# ------------------------------------------------------------------------------- masks
def _mask_query(calls: list[str]) -> str:
    lines = []
    for k, call in enumerate(calls):
        lines.append(f"m = {call}")
        lines.append(f"out['m{k}'] = m")
        lines.append(f"out['f{k}'] = [float(_nfv_torch.is_tensor(m) and m.is_floating_point())]")
    return "\n".join(lines)


def _check_masks(oracle: Oracle, calls: list[str], expected: list[np.ndarray],
                 rule: str) -> None:
    out = oracle.query(_mask_query(calls))
    for k, (call, want) in enumerate(zip(calls, expected, strict=True)):
        got = out[f"m{k}"]
        assert got.shape == want.shape, (
            f"{call} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        assert out[f"f{k}"][0] == 1.0, f"{call} is not a float tensor (multiply images by it)"
        assert np.all((got == 0) | (got == 1)), f"{call} holds values other than 0 and 1"
        assert np.array_equal(got, want), f"{call} {_mismatch(got, want)} ({rule})"


#: sizes every check covers: a single pixel, every parity of height and width
EDGE_SIZES = ((1, 1), (2, 2), (3, 5), (4, 7), (5, 4))


def check_checkerboard(oracle: Oracle, rng: np.random.Generator) -> str:
    sizes = list(EDGE_SIZES)
    sizes += [(int(rng.integers(2, 10)), int(rng.integers(2, 10))) for _ in range(2)]
    sizes.append((int(rng.integers(20, 33)), int(rng.integers(20, 33))))
    calls, expected = [], []
    for h, w in sizes:
        for invert in (False, True):
            calls.append(f"checkerboard_mask({h}, {w}, invert={invert})")
            expected.append(checkerboard(h, w, invert))
    _check_masks(oracle, calls, expected,
                 "1 where i + j is even, so the top-left pixel is kept; invert=True swaps")
    return f"exact checkerboards for sizes {sizes}, both parities"


#: channel counts every check covers: the smallest even and odd ones (for an odd count
#: ``c // 2`` and ``ceil(c / 2)`` differ)
EDGE_CHANNELS = (2, 3, 5)


def check_channel(oracle: Oracle, rng: np.random.Generator) -> str:
    extra = rng.choice(np.arange(4, 17), size=2, replace=False)
    counts = sorted({*EDGE_CHANNELS, *(int(c) for c in extra)})
    calls, expected = [], []
    for c in counts:
        for invert in (False, True):
            calls.append(f"channel_mask({c}, invert={invert})")
            expected.append(channel(c, invert))
    _check_masks(oracle, calls, expected,
                 "the first c // 2 channels are 1; invert=True swaps")
    return f"exact channel masks for c = {counts}, both ways"


# ----------------------------------------------------------------------------- coupling
def _build(c: int, seed_key: str = "seed", std: float = 0.5, prep: bool = True) -> str:
    layer = (f"ImageAffineCoupling({c}, _nfv_torch.as_tensor(inp['mask']).float(), "
             "c_hidden=8, num_layers=1)")
    return f"_nfv_prep({layer}, inp[{seed_key!r}][0], {std})" if prep else layer


def _coupling_case(oracle: Oracle, rng: np.random.Generator, c: int, mask: np.ndarray,
                   hw: tuple[int, int], label: str, key: str) -> None:
    h, w = hw
    d = c * h * w
    b = 4
    full = np.broadcast_to(mask, (1, c, h, w)).reshape(d)
    kept, free = full == 1, full == 0
    x = rng.normal(size=(b, d))
    shift = 0.7 * rng.normal(size=(b, d)) * free
    nb = b * (2 * d + 1)
    probes = np.concatenate([fd_points(x, H), x + shift, x - shift])
    out = oracle.query(f"""
        layer = {_build(c)}
        _nfv_store[{key!r}] = layer
        x = _nfv_torch.as_tensor(inp['x']).reshape(-1, {c}, {h}, {w})
        z, ld = layer(x)
        out['z'], out['ld'] = z, ld
        z1, ld1 = layer(x[:1])
        out['z1'], out['ld1'] = z1, ld1
    """, x=probes, mask=mask, seed=[draw_seed(rng)])
    n = probes.shape[0]
    z, ld = out["z"], out["ld"]
    check_array("forward's z", z, (n, c, h, w))
    assert ld.shape == (n,), (
        f"forward's log_det has {ld.size} value(s) for a batch of {n} images; it must hold one "
        f"log-det per image, shape ({n},)")
    check_array("forward's log_det", ld, (n,))
    z = z.reshape(n, d)
    where = f"with {label} on {c}x{h}x{w} images"
    worst = float(np.max(np.abs(z[:, kept] - probes[:, kept])))
    assert worst < EXACT, (
        f"{where}, the kept entries (mask = 1) change by up to {worst:.3g}; they must pass "
        "through unchanged")
    assert np.max(np.abs(z[:b, free] - x[:, free])) > 1e-3, (
        f"{where} and random network weights the layer is still the identity: the entries "
        "where mask = 0 must be scaled and shifted by functions of the kept ones")
    assert (np.max(np.abs(out["z1"].reshape(-1)[:d] - z[0])) < EXACT
            and abs(float(out["ld1"].reshape(-1)[0]) - float(ld[0])) < EXACT), (
        f"{where}, an image's output or log_det depends on the other images of the batch")
    jac = fd_jacobian(z[:nb], b, d, H)
    rows = float(np.max(np.abs(jac[:, kept, :] - np.eye(d)[kept])))
    assert rows < 1e-6, (
        f"{where}, a kept output depends on something other than its own input")
    block = jac[:, free][:, :, free]
    off = float(np.max(np.abs(block - block * np.eye(int(free.sum()))))) if free.any() else 0
    assert off < 1e-6, (
        f"{where}, a transformed entry depends on another transformed entry: s and t must "
        "be computed from the kept entries only")
    worst = float(np.max(np.abs(ld[:b] - logabsdet_fd(z[:nb], b, d, H))))
    assert worst < LOGDET_TOL, (
        f"{where}, log_det differs from log|det| of the Jacobian by up to {worst:.3g}")
    up, down = z[nb:nb + b], z[nb + b:]
    worst = float(np.max(np.abs(up + down - 2 * z[:b])))
    assert worst < 1e-8, (
        f"{where}, z is not an affine function of the transformed entries (z = x e^s + t "
        "with s and t computed from the kept entries)")
    assert np.max(np.abs(ld[nb:] - np.concatenate([ld[:b], ld[:b]]))) < 1e-8, (
        f"{where}, log_det changes with the transformed entries; s must depend on the kept "
        "ones only")

    zb = z[:b]
    back = oracle.query(f"""
        z = _nfv_torch.as_tensor(inp['z']).reshape(-1, {c}, {h}, {w})
        x, ld = _nfv_store[{key!r}].inverse(z)
        out['x'], out['ld'] = x, ld
    """, z=fd_points(zb, H))
    check_array("inverse's x", back["x"], (nb, c, h, w))
    check_array("inverse's log_det", back["ld"], (nb,))
    xs = back["x"].reshape(nb, d)
    worst = float(np.max(np.abs(xs[:b] - x)))
    assert worst < 1e-9, f"{where}, inverse(forward(x)) is off from x by up to {worst:.3g}"
    worst = float(np.max(np.abs(back["ld"][:b] - logabsdet_fd(xs, b, d, H))))
    assert worst < LOGDET_TOL, (
        f"{where}, the inverse's log_det differs from log|det| of its Jacobian by up to "
        f"{worst:.3g}")


def _bound_case(oracle: Oracle, rng: np.random.Generator) -> float:
    """With a network whose raw log-scales are large, every |s| stays within exp(log_scale)
    (s is read off the map itself: z(x + d) - z(x) = d e^s on the transformed entries)."""
    h, w = 4, 4
    mask = checkerboard(h, w, bool(rng.integers(2)))
    bound = float(rng.uniform(0.3, 0.8))
    b = 8
    x = rng.normal(size=(b, 1, h, w))
    step = 0.5 * (1 - mask)
    out = oracle.query(f"""
        layer = {_build(1, std=2.5)}
        if not hasattr(layer, 'log_scale'):
            raise AttributeError('ImageAffineCoupling has no log_scale, the learnable bound '
                                 'of the log-scale')
        out['param'] = [float(isinstance(layer.log_scale, _nfv_torch.nn.Parameter))]
        layer.log_scale.data.fill_(_nfv_np.log(inp['bound'][0]))
        x = _nfv_torch.as_tensor(inp['x'])
        out['z'] = layer(x)[0]
        out['zs'] = layer(x + _nfv_torch.as_tensor(inp['step']))[0]
    """, x=x, mask=mask, seed=[draw_seed(rng)], bound=[bound], step=step)
    assert out["param"][0] == 1.0, (
        "log_scale must be an nn.Parameter: the bound of the log-scale is learned")
    check_array("forward's z", out["z"], (b, 1, h, w))
    check_array("forward's z", out["zs"], (b, 1, h, w))
    free = np.broadcast_to(mask == 0, x.shape)
    ratio = (out["zs"] - out["z"])[free] / 0.5
    assert np.all(ratio > 0), "the scale e^s of a transformed entry is not positive"
    worst = float(np.max(np.abs(np.log(ratio))))
    assert worst <= bound * (1 + 1e-6) + 1e-9, (
        f"the log-scale is not bounded: with exp(log_scale) = {bound:.3f} and a network whose "
        f"raw log-scale is large, |s| reaches {worst:.3g}; use s = exp(log_scale) * "
        "tanh(s_raw / exp(log_scale))")
    return bound


def check_coupling(oracle: Oracle, rng: np.random.Generator) -> str:
    hw1 = (int(rng.integers(4, 6)), int(rng.integers(4, 7)))
    cases = [
        (1, checkerboard(*hw1, bool(rng.integers(2))), hw1, "a checkerboard mask"),
        (2, channel(2, bool(rng.integers(2))), (4, 4), "a channel mask"),
        (2, checkerboard(3, 4, True), (3, 4), "an inverted checkerboard mask"),
        # an odd channel count: the channel mask keeps c // 2 of them
        (3, channel(3, bool(rng.integers(2))), (3, 3), "a channel mask"),
    ]
    for k, (c, mask, hw, label) in enumerate(cases):
        _coupling_case(oracle, rng, c, mask, hw, label, f"coupling{k}")
    _bound_case(oracle, rng)
    return ("checkerboard, channel and inverted masks with random weights: kept entries "
            "unchanged, affine in the others, not the identity, log_det = log|det J| (finite "
            "differences, float64), inverse inverts with its log-det; |s| <= exp(log_scale)")


def check_coupling_init(oracle: Oracle, rng: np.random.Generator) -> str:
    h1, w1 = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    h2, w2 = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    cases = [(1, checkerboard(h1, w1, bool(rng.integers(2))), (h1, w1), "a checkerboard mask"),
             (2, channel(2, bool(rng.integers(2))), (h2, w2), "a channel mask"),
             # fixed edge cases: odd sizes, an odd channel count
             (1, checkerboard(5, 4), (5, 4), "a checkerboard mask"),
             (3, channel(3, bool(rng.integers(2))), (3, 5), "a channel mask")]
    b = 4
    for c, mask, (h, w), label in cases:
        # float32 inputs, as a freshly built layer is float32
        x = rng.normal(size=(b, c, h, w)).astype(np.float32).astype(float)
        out = oracle.query(f"""
            layer = {_build(c, prep=False)}
            x = _nfv_torch.as_tensor(inp['x']).float()
            out['z'], out['ld'] = layer(x)
            out['x'], out['ld_inv'] = layer.inverse(x)
        """, x=x, mask=mask)
        what = f"ImageAffineCoupling({c}, <{label}>, c_hidden=8, num_layers=1)"
        for direction, y, ld in (("forward", out["z"], out["ld"]),
                                 ("inverse", out["x"], out["ld_inv"])):
            assert y.shape == x.shape, (
                f"{what}.{direction} gives shape {tuple(y.shape)} for input {tuple(x.shape)}")
            worst = float(np.max(np.abs(y - x) / (1 + np.abs(x))))
            assert worst < 1e-6, (
                f"{what}.{direction} is not the identity right after construction (off by up "
                f"to {worst:.3g}): zero the network's last layer (GatedConvNet does by default) "
                "so that s = t = 0")
            assert ld.shape == (b,), (
                f"{what}.{direction}'s log_det has shape {tuple(ld.shape)}, expected ({b},): "
                "one log-det per image")
            assert float(np.max(np.abs(ld))) < 1e-6, (
                f"{what}.{direction}'s log_det must be 0 at initialisation")
    return "a fresh layer is the identity both ways with zero log-dets of shape (B,)"


# --------------------------------------------------------------------------- the flow
def _layers_code(model: str) -> str:
    return (f"layers = list({model}.flow.layers) if hasattr({model}.flow, 'layers') else "
            f"list({model}.flow.children())")


def check_simple_flow(oracle: Oracle, rng: np.random.Generator) -> str:
    """Two builds every time: one channel (the lesson's) with an odd height, an even width
    and an even number of couplings; several channels with the parities swapped and an odd
    number. Neither the hidden test's 4 couplings nor the default 8: a builder tuned to
    those shows itself."""
    done = []
    for c, h, w, n in ((1, int(rng.choice([5, 7])), int(rng.choice([4, 6])),
                        int(rng.choice([2, 6]))),
                       (int(rng.choice([2, 3])), int(rng.choice([4, 6])), 5,
                        int(rng.choice([3, 5])))):
        done.append(_simple_flow_case(oracle, rng, c, h, w, n))
    return "; ".join(done) + (": uniform dequantization first, identity when fresh, "
                              "alternating checkerboards, log-det = log|det J|, inverse gives "
                              "the pixels back")


def _simple_flow_case(oracle: Oracle, rng: np.random.Generator, c: int, h: int, w: int,
                      n_couplings: int) -> str:
    d, b = c * h * w, 2
    pixels = rng.integers(0, 256, size=(b, c, h, w)).astype(float)
    noise = rng.uniform(size=pixels.shape)
    y, ld_deq = dequantize(pixels, noise)
    call = (f"build_simple_flow(shape=({c}, {h}, {w}), num_couplings={n_couplings}, "
            "c_hidden=8, num_layers=1")
    out = oracle.query(f"""
        import nfcourse.flows as _nfv_flows
        m = {call})
        out['model'] = [float(isinstance(m, _nfv_flows.FlowModel))]
        out['prior'] = list(m.prior.shape)
        m = m.double()
        _nfv_store['simple'] = m
        {_layers_code('m')}
        out['n'] = [len(layers)]
        out['coupling'] = [float(isinstance(l, ImageAffineCoupling)) for l in layers]
        first = layers[0]
        out['deq'] = [float(isinstance(first, _nfv_flows.Dequantization)
                            and not isinstance(first, _nfv_flows.VariationalDequantization))]
        if out['deq'][0]:
            y0, ld0 = first(_nfv_torch.as_tensor(inp['x']), noise=_nfv_torch.as_tensor(inp['u']))
            out['y0'], out['ld0'] = y0, ld0
        h, total = _nfv_torch.as_tensor(inp['y']), 0
        for layer in layers[1:]:
            h, ld = layer(h)
            total = total + ld
        out['z_fresh'], out['ld_fresh'] = h, total
        vd = {call}, vardeq=True)
        {_layers_code('vd')}
        out['vardeq'] = [float(isinstance(layers[0], _nfv_flows.VariationalDequantization))]
    """, x=pixels, u=noise, y=y)
    assert out["model"][0] == 1.0, f"{call}) does not return a nfcourse.flows.FlowModel"
    assert tuple(out["prior"].astype(int)) == (c, h, w), (
        f"{call}): the prior has shape {tuple(out['prior'].astype(int))}, expected "
        f"StandardNormal(({c}, {h}, {w}))")
    n_layers = int(out["n"][0])
    assert out["deq"][0] == 1.0, (
        f"{call}): the flow must start with a dequantization layer (nfcourse.flows."
        "Dequantization when vardeq=False)")
    assert n_layers == n_couplings + 1 and np.all(out["coupling"][1:] == 1.0), (
        f"{call}): expected the dequantization then {n_couplings} ImageAffineCoupling layers, "
        f"found {n_layers} layers, {int(out['coupling'].sum())} of them ImageAffineCoupling")
    assert (np.max(np.abs(out["y0"] - y)) < 1e-9 and np.max(np.abs(out["ld0"] - ld_deq)) < 1e-6), (
        f"{call}): the first layer is not the lesson's uniform dequantization and logit")
    assert out["vardeq"][0] == 1.0, (
        f"{call}, vardeq=True): the flow must start with a VariationalDequantization layer")
    check_array("the fresh flow's output", out["z_fresh"], y.shape)
    assert (np.max(np.abs(out["z_fresh"] - y)) < 1e-9
            and np.max(np.abs(out["ld_fresh"])) < 1e-9), (
        f"{call}): a freshly built flow must be the identity after dequantization (the "
        "couplings' last layers start at zero)")

    # every coupling with random weights: which pixels it keeps, the log-det, the inverse
    probes = fd_points(y.reshape(b, d), H)
    nb = probes.shape[0]
    seed = draw_seed(rng)
    out = oracle.query(f"""
        m = _nfv_store['simple']
        {_layers_code('m')}
        for k, layer in enumerate(layers[1:]):
            _nfv_prep(layer, inp['seed'][0] + k, 0.3)
        h = _nfv_torch.as_tensor(inp['y']).reshape(-1, {c}, {h}, {w})
        steps = []
        for layer in layers[1:]:
            h = layer(h)[0]
            steps.append(h)
        out['steps'] = _nfv_torch.stack(steps)
        lds = []
        for i in range({b}):
            g, total = _nfv_torch.as_tensor(inp['y'][i:i + 1]).reshape(1, {c}, {h}, {w}), 0
            for layer in layers[1:]:
                g, ld = layer(g)
                total = total + ld
            lds.append(_nfv_torch.as_tensor(total).reshape(-1))
        out['ld'] = _nfv_torch.cat(lds)
        g = h[:{b}]
        for layer in reversed(layers[1:]):
            g = layer.inverse(g)[0]
        out['back'] = g
        out['pixels'] = m.flow.inverse(h[:{b}])[0]
    """, y=probes, seed=[seed])
    steps = out["steps"]
    check_array("the couplings' outputs", steps, (n_couplings, nb, c, h, w))
    steps = steps.reshape(n_couplings, nb, d)
    # the checkerboard of pixels, the same in every channel
    boards = tuple(np.broadcast_to(checkerboard(h, w, inv), (1, c, h, w)).reshape(d) == 1
                   for inv in (False, True))
    previous = None
    inputs = probes
    for k in range(n_couplings):
        change = np.max(np.abs(steps[k][:b] - inputs[:b]), axis=0)
        kept = change < EXACT
        assert any(np.array_equal(kept, board) for board in boards), (
            f"with random weights, coupling {k} of {call}) keeps {int(kept.sum())} of {d} "
            "pixels unchanged, not a checkerboard of them")
        assert previous is None or not np.array_equal(kept, previous), (
            f"couplings {k - 1} and {k} of {call}) keep the same pixels: alternate the "
            "checkerboard and its inverse, so that every pixel gets transformed")
        previous, inputs = kept, steps[k]
    check_array("the flow's log_det for one image", out["ld"], (b,))
    worst = float(np.max(np.abs(out["ld"] - logabsdet_fd(steps[-1], b, d, H))))
    assert worst < LOGDET_TOL, (
        f"with random weights, the log-det of the couplings of {call}) differs from log|det| "
        f"of their Jacobian by up to {worst:.3g}")
    worst = float(np.max(np.abs(out["back"].reshape(b, d) - y.reshape(b, d))))
    assert worst < 1e-9, (
        f"with random weights, running the couplings of {call}) backwards does not give their "
        f"input back (off by up to {worst:.3g})")
    assert np.array_equal(out["pixels"].reshape(pixels.shape), pixels), (
        f"with random weights, model.flow.inverse(model.flow(x)) of {call}) does not give the "
        "pixels back")
    return f"{n_couplings} couplings at {c}x{h}x{w}"


# -------------------------------------------------------------------------- training
def _held_out(rng: np.random.Generator, n: int) -> tuple[np.ndarray, str]:
    from nfcourse.data import lesson_images

    data = lesson_images(n_train=1)
    test = data.test.double().numpy()
    return test[rng.choice(len(test), size=min(n, len(test)), replace=False)], data.source


def check_trained(oracle: Oracle, rng: np.random.Generator) -> str:
    """Held-out bits per dimension of the trained ``model``, computed here.

    The grader dequantizes the images itself (noise drawn here), so only the couplings run in
    the kernel, one image per call (a log-det summed over the batch cannot help). Their
    log-dets are measured on a crop (below) and any excess is charged to the score.
    """
    from nfcourse.checks.lesson03 import bpd_bar

    images, source = _held_out(rng, 48)
    bar = bpd_bar(source)
    b, c, hh, ww = images.shape
    d = c * hh * ww
    y, ld_deq = dequantize(images, rng.uniform(size=images.shape))
    r0, c0 = (int(v) for v in rng.integers(4, min(hh, ww) - CROP - 3, size=2))
    crop = y[int(rng.integers(b)), :, r0:r0 + CROP, c0:c0 + CROP].reshape(1, -1)
    dc = crop.shape[1]
    out = oracle.query(f"""
        import copy as _nfv_copy
        m = _nfv_copy.deepcopy(model).double()
        {_layers_code('m')}
        out['count'] = [float(sum(isinstance(l, ImageAffineCoupling) for l in layers[1:]))]
        y = _nfv_torch.as_tensor(inp['y'])
        zs, lds = [], []
        for i in range(y.shape[0]):
            h, total = y[i:i + 1], 0
            for layer in layers[1:]:
                h, ld = layer(h)
                total = total + ld
            zs.append(h)
            lds.append(_nfv_torch.as_tensor(total).reshape(-1))
        out['z'], out['ld'] = _nfv_torch.cat(zs), _nfv_torch.cat(lds)
        # the same layers on a crop: masks (and anything else of the image's size) cropped
        # alike, wherever the layer keeps them: an attribute, a buffer or a parameter (a
        # frozen nn.Parameter mask), on the layer or a module inside it
        r0, c0, k = {r0}, {c0}, {CROP}
        for layer in layers[1:]:
            for mod in layer.modules():
                held = (list(vars(mod).items()) + list(mod._buffers.items())
                        + list(mod._parameters.items()))
                for name, value in held:
                    if not (_nfv_torch.is_tensor(value) and value.dim() >= 2
                            and tuple(value.shape[-2:]) == ({hh}, {ww})):
                        continue
                    cropped = value.detach()[..., r0:r0 + k, c0:c0 + k].clone()
                    if isinstance(value, _nfv_torch.nn.Parameter):
                        cropped = _nfv_torch.nn.Parameter(cropped, value.requires_grad)
                    setattr(mod, name, cropped)
        def run(h):
            total = 0
            for layer in layers[1:]:
                h, ld = layer(h)
                total = total + ld
            return h, _nfv_torch.as_tensor(total).reshape(-1)
        p = _nfv_torch.as_tensor(inp['probes']).reshape(-1, {c}, k, k)
        out['zc'] = run(p)[0]
        out['ldc'] = run(p[:1])[1]
    """, y=y, probes=fd_points(crop, H), timeout=180)
    count = int(out["count"][0])
    assert count >= 8, (
        f"the trained model has {count} ImageAffineCoupling layers after its dequantization; "
        "the lesson's flow has 8")
    check_array("the trained couplings' z", out["z"], (b, c, hh, ww))
    check_array("the trained couplings' log_det (one image per call)", out["ld"], (b,))
    log_p = gaussian_log_prob(out["z"].reshape(b, d)) + out["ld"] + ld_deq
    bpd = float(np.mean(-log_p / (d * math.log(2))))
    check_array("the couplings' output on the crop", out["zc"], ((2 * dc + 1), c, CROP, CROP))
    check_array("the couplings' log_det on the crop", out["ldc"], (1,))
    measured = float(logabsdet_fd(out["zc"].reshape(-1, dc), 1, dc, H)[0])
    excess = (float(out["ldc"][0]) - measured) / (dc * math.log(2))
    charged = bpd + max(0.0, excess)
    note = (f"; its log-dets exceed log|det J| by {excess:.3f} bits/dim on a {CROP}x{CROP} crop "
            "(finite differences), added to the score" if excess > 1e-6 else "")
    assert math.isfinite(charged), "the trained flow gives NaN or Inf on held-out images"
    assert charged < bar, (
        f"held-out bits/dim {charged:.3f} (computed by the grader from the couplings' outputs "
        f"on {b} dequantized test images{note}) does not beat {bar}")
    return (f"held-out bits/dim {charged:.3f} < {bar} on {b} test images (the grader's own "
            f"dequantization and computation{note})")


VERIFIER = Verifier(
    lesson="03_coupling_layers",
    checks={
        "checkerboard_mask_test": check_checkerboard,
        "channel_mask_test": check_channel,
        "coupling_test": check_coupling,
        "coupling_test_init": check_coupling_init,
        "simple_flow_test": check_simple_flow,
        "train_test": check_trained,
    },
)
