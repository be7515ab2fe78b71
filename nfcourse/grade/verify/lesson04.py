"""Lesson 04's independent check: squeeze, split and the multi-scale flow, verified from numbers.

Each check draws fresh inputs, asks the kernel for outputs and decides in float64 here:

* ``squeeze_test``: for random shapes, ``Squeeze`` is exactly the lesson's permutation
  ``out[b, 4c + 2i + j, h, w] = x[b, c, 2h + i, 2w + j]`` (computed here with NumPy), both
  log-dets are exactly 0 and ``inverse`` exactly undoes that ordering.
* ``split_test``: ``forward`` keeps exactly the first half of the channels and its log-det is
  ``log N(second half; 0, I)``; ``inverse`` puts back the half it is given (``z2``, else
  ``self.z2``), in that order of precedence, with log-det ``-log N(z2)``; without one it draws
  ``temperature * N(0, I)`` (mean, spread and shape of the samples tested here, for a
  temperature chosen here), with the matching log-det.
* ``multiscale_test``: the 1x8x8 flow of the hidden test with random parameters, read layer by
  layer: a uniform dequantization (its logit computed here), the couplings with the lesson's
  masks (what each leaves unchanged, exactly; none is the identity), squeezes and the split
  as above, in the table's order and shapes; its log-det after the dequantization equals
  ``log|det J| + log N(split-off half)`` of the grader's own finite-difference Jacobian of the
  bijection ``v -> (z, split-off half)`` (D = 64); the inverse with the split-off halves put
  back returns the pixels; ``log_prob = log N(z) + log_det``. A second size and other
  ``num_couplings`` give the matching layers; ``c_hidden`` and ``num_layers`` change the
  couplings' sizes; ``vardeq=True`` starts with a learned dequantization whose log-det
  (``-log q(u|x)`` included) matches finite differences in its Gaussian noise.
* ``train_test``: the trained ``model``'s held-out bits per dimension, computed here from the
  latents and log-dets of fresh test images with dequantization noise drawn here, beats the
  lesson's bar; the claimed log-det of one of them is checked against the grader's own
  finite-difference Jacobian of the whole bijection (noise -> final latent and split-off half,
  D = 784), so a split that does not score its half with the prior cannot fake a low bpd.
"""

from __future__ import annotations

import functools
import math
import textwrap

import numpy as np

from nfcourse.grade.verify.base import Oracle, Verifier, check_array, draw_seed
from nfcourse.grade.verify.maths import fd_points, logabsdet_fd

__all__ = ["VERIFIER"]

H = 1e-5  # finite-difference step (float64)
LOGDET_TOL = 1e-5  # small layers with random parameters (D = 64)
# forward-difference steps for the trained model (float64): in uniform noise u, small enough
# for the logit's curvature near u = 0.05; in Gaussian noise (a learned dequantization), large
# enough that a saturated noise map still moves pixel + u by far more than its round-off
FORWARD_H = {"uniform": 1e-7, "gaussian": 1e-5}
TRAIN_LOGDET_TOL = 1e-2  # the trained model, D = 784: 1e-2 nats is 2e-5 bits/dim
ALPHA = 1e-5  # Dequantization()'s squash before the logit (the lesson builds it with defaults)
LEVELS = 256
LOG_2PI = math.log(2 * math.pi)
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
#: (B, C, H, W) every squeeze check tries: one channel, odd and even counts, 2x2, non-square
SQUEEZE_EDGES = ((1, 1, 2, 2), (2, 3, 4, 6), (3, 2, 6, 2))
#: (C, H, W) of the half a split keeps, every time: one channel, odd and even, one pixel
SPLIT_EDGES = ((1, 1, 1), (2, 3, 2), (3, 2, 1))


def _log_normal(a: np.ndarray) -> np.ndarray:
    """log N(a; 0, I) summed over all but the first axis."""
    a = a.reshape(a.shape[0], -1)
    return -0.5 * (a**2).sum(axis=1) - 0.5 * a.shape[1] * LOG_2PI


def _close(a: np.ndarray, b: np.ndarray) -> float:
    """Worst error relative to max(1, |b|): 0 when a matches b."""
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))) if a.size else 0.0


def _off(a: np.ndarray, b: np.ndarray) -> str:
    """The worst absolute error, for messages."""
    return f"{float(np.max(np.abs(a - b))):.3g}"


def squeeze_np(x: np.ndarray) -> np.ndarray:
    """The lesson's squeeze: out[b, 4c + 2i + j, h, w] = x[b, c, 2h + i, 2w + j]."""
    b, c, h, w = x.shape
    z = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze_np(z: np.ndarray) -> np.ndarray:
    """The inverse of :func:`squeeze_np`."""
    b, c4, h, w = z.shape
    x = z.reshape(b, c4 // 4, 2, 2, h, w).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, 2 * h, 2 * w)


# ---------------------------------------------------------------------------------- squeeze
def _holds(channel: np.ndarray, x: np.ndarray) -> str:
    """What one output channel of a squeeze holds, in words."""
    for c in range(x.shape[1]):
        for k in range(4):
            i, j = divmod(k, 2)
            if np.array_equal(channel, x[:, c, i::2, j::2]):
                return f"the {CORNERS[k]} pixel of every block of input channel {c}"
    return "numbers that are not one pixel of every 2x2 block"


def check_squeeze(oracle: Oracle, rng: np.random.Generator) -> str:
    # the edge cases every time (one channel, odd and even counts, the smallest image, a
    # non-square one), then one random shape
    shapes = list(SQUEEZE_EDGES) + [(int(rng.integers(2, 5)), int(rng.integers(1, 6)),
                                     2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5)))]
    for shape in shapes:
        b, c, h, w = shape
        x = rng.normal(size=shape)
        want = squeeze_np(x)
        out = oracle.query("""
            layer = Squeeze()
            z, ld = layer(_nfv_torch.as_tensor(inp['x']))
            out['z'], out['ld'] = z, ld
            x, ld_inv = layer.inverse(_nfv_torch.as_tensor(inp['z']))
            out['x'], out['ld_inv'] = x, ld_inv
        """, x=x, z=want)
        where = f"for a batch of shape {shape}"
        check_array(f"Squeeze()(x) {where}", out["z"], want.shape)
        for k in range(4 * c):
            if not np.array_equal(out["z"][:, k], want[:, k]):
                cc, (i, j) = k // 4, divmod(k % 4, 2)
                raise AssertionError(
                    f"{where}, output channel {k} should hold the {CORNERS[2 * i + j]} pixel of "
                    f"every 2x2 block of input channel {cc} (out[b, 4c + 2i + j, h, w] = "
                    f"x[b, c, 2h + i, 2w + j]); it holds {_holds(out['z'][:, k], x)}")
        check_array(f"Squeeze's log_det {where}", out["ld"], (b,))
        assert np.all(out["ld"] == 0), (
            "Squeeze only moves numbers: its log_det must be exactly 0 for every sample")
        check_array(f"Squeeze.inverse(z) {where}", out["x"], shape)
        assert np.array_equal(out["x"], x), (
            f"{where}, Squeeze.inverse does not exactly undo the lesson's ordering: it must "
            "put out[b, 4c + 2i + j, h, w] back at x[b, c, 2h + i, 2w + j]")
        check_array(f"Squeeze.inverse's log_det {where}", out["ld_inv"], (b,))
        assert np.all(out["ld_inv"] == 0), "Squeeze.inverse's log_det must be exactly 0"
    return (f"shapes {', '.join(map(str, shapes))}: the lesson's exact channel order, "
            "log-dets exactly 0, the inverse exact")


# ---------------------------------------------------------------------------------- split
def _sample_problem(sample: np.ndarray, temperature: float) -> str | None:
    """Why ``sample`` is not ``temperature * N(0, I)`` (None when it looks like it)."""
    flat = sample.reshape(-1)
    if temperature == 0:
        return None if np.all(flat == 0) else "it is not all zeros"
    mean, std = float(flat.mean()), float(flat.std())
    if abs(mean) > 0.1 * temperature or abs(std / temperature - 1) > 0.1:
        return f"its mean is {mean:.3g} and its standard deviation {std:.3g}"
    # Kolmogorov-Smirnov distance to the normal CDF (the 1 % critical value is 0.026 here)
    s = np.sort(flat / temperature)
    erf = np.vectorize(math.erf)
    cdf = 0.5 * (1 + erf(s / math.sqrt(2)))
    n = len(s)
    gap = float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))
    if gap > 0.05:
        return f"its values are not normally distributed (Kolmogorov-Smirnov distance {gap:.3f})"
    return None


def check_split(oracle: Oracle, rng: np.random.Generator) -> str:
    cases = list(SPLIT_EDGES) + [(int(rng.integers(1, 5)), int(rng.integers(1, 5)),
                                  int(rng.integers(1, 5)))]
    for c, h, w in cases:
        temperature = _split_case(oracle, rng, c, h, w)
    return ("keeps the first half exactly, log_det = log N(second half); the inverse puts back "
            "z2 / self.z2 with log_det -log N(z2); samples are temperature * N(0, I) at "
            f"temperatures 1, {temperature:.2f} and 0; halves of {', '.join(map(str, cases))}")


def _split_case(oracle: Oracle, rng: np.random.Generator, c: int, h: int, w: int) -> float:
    """One size of :func:`check_split`; returns the temperature it tried."""
    b = 3
    x = rng.normal(size=(b, 2 * c, h, w)) * 1.5
    kept, dropped = x[:, :c], x[:, c:]
    z2, z2_attr = rng.normal(size=(b, c, h, w)), rng.normal(size=(b, c, h, w)) + 1
    n = -(-4000 // (c * h * w))  # at least 4000 sampled numbers
    base = rng.uniform(2, 3, size=(n, c, h, w))  # the kept half: far from N(0, I)
    temperature = float(rng.uniform(0.3, 0.8))
    out = oracle.query("""
        t = _nfv_torch.as_tensor
        layer = Split()
        out['z1'], out['ld'] = layer(t(inp['x']))
        out['back'], out['ld_back'] = layer.inverse(t(inp['kept']), z2=t(inp['z2']))
        layer.z2 = t(inp['z2_attr'])
        out['attr'], out['ld_attr'] = layer.inverse(t(inp['kept']))
        out['both'], _ = layer.inverse(t(inp['kept']), z2=t(inp['z2']))
        layer.z2 = None
        _nfv_torch.manual_seed(int(inp['seed'][0]))
        out['s_default'], out['ld_default'] = Split().inverse(t(inp['base']))
        for key, temp in (('s_temp', float(inp['temperature'][0])), ('s_zero', 0.0)):
            layer = Split()
            layer.temperature = temp
            out[key], out['ld_' + key[2:]] = layer.inverse(t(inp['base']))
    """, x=x, kept=kept, z2=z2, z2_attr=z2_attr, base=base, seed=[draw_seed(rng)],
        temperature=[temperature])
    shape = (b, 2 * c, h, w)
    check_array(f"Split()(x)'s first output for x of shape {shape}", out["z1"], kept.shape)
    assert np.array_equal(out["z1"], kept), (
        f"Split.forward must keep the first half of the channels (x[:, :{c}] for {2 * c} "
        "channels) exactly as they are")
    check_array("Split.forward's log_det", out["ld"], (b,))
    want = _log_normal(dropped)
    hint = " (it is zero: the factored-out half must be scored by the prior)" if np.all(
        out["ld"] == 0) else ""
    assert _close(out["ld"], want) < 1e-9, (
        "Split.forward's log_det must be log N(z2; 0, I) of the factored-out second half, "
        f"summed per sample; it is off by up to {_off(out['ld'], want)} nats{hint}")
    for key, ld_key, half, how in (("back", "ld_back", z2, "inverse(z1, z2=z2)"),
                                   ("attr", "ld_attr", z2_attr, "inverse(z1) with self.z2 set")):
        check_array(f"Split.{how}", out[key], shape)
        assert np.array_equal(out[key], np.concatenate([kept, half], axis=1)), (
            f"Split.{how} must return the given z1 followed by the second half "
            "(torch.cat([z1, z2], dim=1))")
        check_array(f"Split.{how}'s log_det", out[ld_key], (b,))
        want = -_log_normal(half)
        assert _close(out[ld_key], want) < 1e-9, (
            f"Split.{how}'s log_det must be -log N(z2; 0, I) (minus the forward one); it is "
            f"off by up to {_off(out[ld_key], want)} nats")
    assert np.array_equal(out["both"], np.concatenate([kept, z2], axis=1)), (
        "Split.inverse(z1, z2=z2) must use the z2 it is given, even when self.z2 is set")
    for key, temp, what in (("s_default", 1.0, "a fresh Split() (temperature 1)"),
                            ("s_temp", temperature, f"temperature = {temperature:.3f}"),
                            ("s_zero", 0.0, "temperature = 0")):
        sample = out[key]
        check_array(f"Split.inverse(z1) without z2, {what},", sample, (n, 2 * c, h, w))
        assert np.array_equal(sample[:, :c], base), (
            f"Split.inverse(z1) without z2 ({what}) must return z1 unchanged as the first half")
        problem = _sample_problem(sample[:, c:], temp)
        assert problem is None, (
            f"Split.inverse(z1) without z2 must draw the second half as temperature * N(0, I); "
            f"with {what} {problem}")
        ld = out["ld_" + key[2:]]
        check_array(f"Split.inverse's log_det when it samples ({what})", ld, (n,))
        want = -_log_normal(sample[:, c:])
        assert _close(ld, want) < 1e-9, (
            f"Split.inverse's log_det must be -log N(z2) of the half it drew ({what}); it is off "
            f"by up to {_off(ld, want)} nats")
    return temperature


# ---------------------------------------------------------------------------------- the flow
#: Kernel-side: run the flow's layers one by one (``layers[0]`` with the noise it is sent),
#: keeping each output and log-det, and the half each layer that shrinks its input dropped.
_RUN = """
def run(layers, x, noise=None, keep=False):
    h, total = layers[0](x) if noise is None else layers[0](x, noise=noise)
    trace, lds, drops = [h], [total], []
    for layer in layers[1:]:
        y, ld = layer(h)
        if y[0].numel() < h[0].numel():
            drops.append(h[:, h.shape[1] // 2:].flatten(1))
        h, total = y, total + ld
        if keep:
            trace.append(h)
            lds.append(ld)
    return h, total, drops, trace, lds

def layers_of(model):
    layers = getattr(model.flow, 'layers', None)
    if layers is None:
        raise TypeError('model.flow must be Compose(layers), with the layers in order')
    return list(layers)
"""


def _code(*parts: str) -> str:
    """Query parts written at different indents, as one block of code."""
    return "\n".join(textwrap.dedent(part).strip("\n") for part in parts)


def _checker(h: int, w: int, invert: bool) -> np.ndarray:
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mask = (i + j) % 2 == 0
    return ~mask if invert else mask


def expected_layers(shape: tuple[int, int, int], counts: tuple[int, int, int]) -> list[dict]:
    """The lesson's table: each layer after the dequantization as (kind, output shape, what a
    coupling leaves unchanged, a name for messages)."""
    c, h, w = shape
    out = []

    def couplings(n, shp, scale, checkerboard):
        for k in range(n):
            invert = k % 2 == 1
            if checkerboard:
                kept = np.broadcast_to(_checker(shp[1], shp[2], invert), shp)
                what = "inverted checkerboard" if invert else "checkerboard"
            else:
                kept = np.zeros(shp, dtype=bool)
                kept[: shp[0] // 2] = True
                kept = ~kept if invert else kept
                what = "inverted channel mask" if invert else "channel mask"
            out.append({"kind": "coupling", "shape": shp, "kept": kept, "mask": what,
                        "scale": scale, "name": f"coupling {k + 1} of scale {scale} ({what})"})

    couplings(counts[0], (c, h, w), 1, True)
    out.append({"kind": "squeeze", "shape": (4 * c, h // 2, w // 2), "name": "the first squeeze"})
    couplings(counts[1], (4 * c, h // 2, w // 2), 2, False)
    out.append({"kind": "split", "shape": (2 * c, h // 2, w // 2), "name": "the split"})
    out.append({"kind": "squeeze", "shape": (8 * c, h // 4, w // 4),
                "name": "the second squeeze"})
    couplings(counts[2], (8 * c, h // 4, w // 4), 3, False)
    return out


def _describe_kept(kept: np.ndarray) -> str:
    if kept.all():
        return "everything (with random parameters it is the identity)"
    if not kept.any():
        return "nothing"
    c, h, w = kept.shape
    for invert in (False, True):
        name = "inverted " if invert else ""
        if np.array_equal(kept, np.broadcast_to(_checker(h, w, invert), kept.shape)):
            return f"the {name}checkerboard"
        channels = np.zeros(kept.shape, dtype=bool)
        channels[: c // 2] = True
        if np.array_equal(kept, ~channels if invert else channels):
            return f"the {name}channel mask's half"
    return "another pattern"


def _dequantized(x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform dequantization then the logit: (y, log-det) as the lesson's layer computes."""
    v = ALPHA + (1 - 2 * ALPHA) * (x + u) / LEVELS
    y = np.log(v) - np.log1p(-v)
    ld = (math.log(1 - 2 * ALPHA) - np.log(v) - np.log1p(-v)).reshape(len(x), -1).sum(axis=1)
    return y, ld - x[0].size * math.log(LEVELS)


def _structure(out: dict, shape: tuple[int, int, int], counts: tuple[int, int, int],
               what: str) -> list[dict]:
    """Check every layer of a traced flow against the lesson's table; returns the table."""
    table = expected_layers(shape, counts)
    n = int(out["n"].reshape(-1)[0])
    got = [tuple(out[f"h{i}"].shape[1:]) for i in range(1, n)]
    want = [t["shape"] for t in table]
    kinds = ["dequantization"] + [t["kind"] for t in table]
    assert got == want, (
        f"{what} should have {len(kinds)} layers, {kinds}, whose outputs after the "
        f"dequantization have shapes {want}; its {n} layers output {got}")
    for i, t in enumerate(table, start=1):
        a, z, ld = out[f"h{i - 1}"], out[f"h{i}"], out[f"ld{i}"]
        assert np.all(np.isfinite(z)) and ld.shape == (len(a),) and np.all(np.isfinite(ld)), (
            f"{what}: {t['name']} (layer {i}) gives NaN/Inf or a log_det not of shape (batch,)")
        if t["kind"] == "squeeze":
            assert np.array_equal(z, squeeze_np(a)) and np.all(ld == 0), (
                f"{what}: {t['name']} (layer {i}) is not the lesson's squeeze "
                "(out[b, 4c + 2i + j, h, w] = x[b, c, 2h + i, 2w + j], log_det 0)")
        elif t["kind"] == "split":
            c = a.shape[1] // 2
            assert np.array_equal(z, a[:, :c]), (
                f"{what}: the split (layer {i}) must keep the first half of the channels")
            want = _log_normal(a[:, c:])
            assert _close(ld, want) < 1e-9, (
                f"{what}: the split's log_det (layer {i}) must be log N of the half it factors "
                f"out; it is off by up to {_off(ld, want)} nats (does the factored-out half "
                "reach the prior?)")
        else:
            kept = np.all(z == a, axis=0)
            assert np.array_equal(kept, t["kept"]), (
                f"{what}: {t['name']}, layer {i}, should leave the {t['mask']}'s half "
                "unchanged and transform the rest (masks alternate within a scale, the first "
                "with invert=False: checkerboards at full resolution, channel masks after "
                f"squeezing); with random parameters it leaves unchanged {_describe_kept(kept)}")
    return table


_BUILD = "build_multiscale_flow(shape={shape}, c_hidden={hidden}, num_couplings={counts}, " \
         "num_layers={layers}{extra})"


def _trace_query(shape, counts, hidden=(8, 8, 8), layers=1) -> str:
    build = _BUILD.format(shape=shape, hidden=hidden, counts=counts, layers=layers, extra="")
    return _code(_RUN, f"""
model = _nfv_prep({build}, inp['seed'][0], 0.2).eval()
layers = layers_of(model)
_nfv_store['ms'] = (model, layers)
x = _nfv_torch.as_tensor(inp['x'])
z, total, drops, trace, lds = run(layers, x, _nfv_torch.as_tensor(inp['u']), keep=True)
out['n'] = [len(layers)]
for i, (h, ld) in enumerate(zip(trace, lds)):
    out[f'h{{i}}'], out[f'ld{{i}}'] = h, ld
out['z'], out['total'] = z, total
out['data_shape'] = list(model.data_shape)
_nfv_torch.manual_seed(int(inp['seed'][0]))
out['lp'] = model.log_prob(x)
_nfv_torch.manual_seed(int(inp['seed'][0]))
out['zf'], out['ldf'] = model.flow(x)
splits = [(i, layer) for i, layer in enumerate(layers) if i and
          trace[i][0].numel() < trace[i - 1][0].numel()]
try:
    for i, layer in splits:
        layer.z2 = trace[i - 1][:, trace[i - 1].shape[1] // 2:]
    out['back'], out['ld_back'] = model.flow.inverse(z)
    h = z
    for layer in reversed(layers[1:]):
        h, _ = layer.inverse(h)
    out['v_back'] = h
finally:
    for i, layer in splits:
        layer.z2 = None
""")


def _pixels(rng: np.random.Generator, b: int, shape) -> tuple[np.ndarray, np.ndarray]:
    x = rng.integers(0, LEVELS, size=(b, *shape)).astype(float)
    return x, rng.uniform(0.02, 0.98, size=x.shape)


def _check_trace(out: dict, x: np.ndarray, u: np.ndarray, shape, counts, what: str) -> None:
    b = len(x)
    check_array(f"{what}: the dequantization's output", out["h0"], x.shape)
    y, ld0 = _dequantized(x, u)
    assert max(_close(out["h0"], y), _close(out["ld0"], ld0)) < 1e-9, (
        f"{what}: the first layer must be Dequantization() (uniform noise, then the logit): "
        f"given the noise, its output is off by up to {_off(out['h0'], y)} and its log_det "
        f"by {_off(out['ld0'], ld0)}")
    _structure(out, shape, counts, what)
    assert tuple(int(s) for s in out["data_shape"]) == tuple(shape), (
        f"{what}: model.data_shape must be {tuple(shape)} (pass data_shape=shape to FlowModel)")
    back = out["back"]
    assert back.shape == x.shape and np.array_equal(back, x), (
        f"{what}: model.flow.inverse(model.flow(x)), with the split given back the half it "
        "factored out (its z2), does not return the pixels")
    assert _close(out["v_back"], out["h0"]) < 1e-8, (
        f"{what}: running the layers' inverses backwards from z, with the split given back its "
        f"half, misses the dequantized image by up to {_off(out['v_back'], out['h0'])}")
    assert _close(out["ld_back"], -out["total"]) < 1e-6, (
        f"{what}: the inverse's log_det is not minus the forward one (off by "
        f"{_off(out['ld_back'], -out['total'])} nats)")
    check_array(f"{what}: model.log_prob(x)", out["lp"], (b,))
    want = _log_normal(out["zf"]) + out["ldf"]
    assert _close(out["lp"], want) < 1e-8, (
        f"{what}: model.log_prob(x) is not log N(z; 0, I) + log_det of the flow: the prior "
        "must be StandardNormal((8C, H/4, W/4)) over the final latent (off by "
        f"{_off(out['lp'], want)} nats)")


def check_multiscale(oracle: Oracle, rng: np.random.Generator) -> str:
    shape, counts, b = (1, 8, 8), (2, 2, 2), 3
    what = _BUILD.format(shape=shape, hidden=(8, 8, 8), counts=counts, layers=1, extra="")
    x, u = _pixels(rng, b, shape)
    out = oracle.query(_trace_query(shape, counts), x=x, u=u, seed=[draw_seed(rng)])
    _check_trace(out, x, u, shape, counts, what)

    # log-det of the flow after the dequantization, against finite differences of the
    # bijection v -> (z, split-off half): log_det = log|det J| + log N(split-off half)
    fd_b, d = 2, int(np.prod(shape))
    v = out["h0"][:fd_b].reshape(fd_b, d)
    fd = oracle.query(_code(_RUN, """
        model, layers = _nfv_store['ms']
        v = _nfv_torch.as_tensor(inp['v']).reshape(-1, *model.data_shape)
        h, total = v, v.new_zeros(v.shape[0])
        drops = []
        for layer in layers[1:]:
            y, ld = layer(h)
            if y[0].numel() < h[0].numel():
                drops.append(h[:, h.shape[1] // 2:].flatten(1))
            h, total = y, total + ld
        out['z'], out['ld'] = h.flatten(1), total
        out['drop'] = _nfv_torch.cat(drops, dim=1)
    """), v=fd_points(v, H))
    n = fd_b * (2 * d + 1)
    check_array("the flow's z on the finite-difference points", fd["z"], (n, d // 2))
    check_array("the split-off half on the finite-difference points", fd["drop"], (n, d // 2))
    jac = logabsdet_fd(np.concatenate([fd["z"], fd["drop"]], axis=1), fd_b, d, H)
    expected = jac + _log_normal(fd["drop"][:fd_b])
    claimed = fd["ld"][:fd_b]
    worst = float(np.max(np.abs(claimed - expected)))
    assert worst < LOGDET_TOL, (
        f"{what} with random parameters: the log-det of the layers after the dequantization "
        "differs from log|det J| + log N(split-off half) of the grader's finite-difference "
        f"Jacobian by up to {worst:.3g} nats")
    assert np.max(np.abs(claimed - out["total"][:fd_b] + out["ld0"][:fd_b])) < 1e-8, (
        f"{what}: the layers give other log-dets for the same input when run again")

    # another size and other numbers of couplings; c_hidden and num_layers; vardeq
    # (several channels, odd and even: a builder hard-coded to one channel shows itself)
    for shape2, counts2 in (((1, 4, 8), (1, 3, 3)), ((3, 4, 4), (1, 1, 1)),
                            ((2, 4, 8), (2, 1, 2))):
        what2 = _BUILD.format(shape=shape2, hidden=(8, 8, 8), counts=counts2, layers=1,
                              extra="")
        x2, u2 = _pixels(rng, b, shape2)
        out2 = oracle.query(_trace_query(shape2, counts2), x=x2, u=u2, seed=[draw_seed(rng)])
        _check_trace(out2, x2, u2, shape2, counts2, what2)

    eps = rng.normal(size=(1, d))
    # dark pixels: pixel + u is then exact in float64 (near 255 it loses the last bits of u,
    # which the differences of a saturated noise map cannot afford)
    pixels = rng.integers(0, 4, size=(1, *shape)).astype(float)
    sizes = oracle.query(_code(_RUN, f"""
        def sizes(**kw):
            model = build_multiscale_flow(shape={shape}, num_couplings={counts}, **kw)
            return [sum(p.numel() for p in layer.parameters()) for layer in layers_of(model)]
        out['a'] = sizes(c_hidden=(8, 8, 8), num_layers=1)
        out['e'] = sizes(c_hidden=(4, 8, 12), num_layers=1)
        out['f'] = sizes(c_hidden=(8, 8, 8), num_layers=2)
        vd = _nfv_prep(build_multiscale_flow(shape={shape}, c_hidden=(8, 8, 8),
                                             num_couplings={counts}, num_layers=1,
                                             vardeq=True), inp['seed'][0], 0.1).eval()
        eps = _nfv_torch.as_tensor(inp['eps']).reshape(-1, *{shape})
        x = _nfv_torch.as_tensor(inp['x']).expand(eps.shape[0], *{shape})
        y, ld = layers_of(vd)[0](x, noise=eps)
        out['y'], out['ld'] = y.flatten(1), ld
    """), eps=fd_points(eps, H), x=pixels, seed=[draw_seed(rng)])
    table = expected_layers(shape, counts)
    for key in ("a", "e", "f"):
        check_array("the layers' parameter counts", sizes[key], (len(table) + 1,))
    for i, t in enumerate(table, start=1):
        if t["kind"] != "coupling":
            continue
        s = t["scale"]
        a, e, f = sizes["a"][i], sizes["e"][i], sizes["f"][i]
        assert f > a, ("build_multiscale_flow ignores num_layers: with num_layers=2 the "
                       "couplings' networks must be deeper (more parameters) than with 1")
        want = {1: e < a, 2: e == a, 3: e > a}[s]
        assert want, (
            f"build_multiscale_flow does not give scale {s}'s couplings c_hidden[{s - 1}] "
            "channels: with c_hidden=(4, 8, 12) instead of (8, 8, 8) the couplings of scales "
            "1, 2 and 3 must get fewer, as many and more parameters")
    what_vd = _BUILD.format(shape=shape, hidden=(8, 8, 8), counts=counts, layers=1,
                            extra=", vardeq=True")
    check_array(f"{what_vd}: the first layer's output", sizes["y"], (2 * d + 1, d))
    check_array(f"{what_vd}: the first layer's log_det", sizes["ld"], (2 * d + 1,))
    squashed = 1 / (1 + np.exp(-sizes["y"][0]))  # undo the logit, then the squash
    noise = (squashed - ALPHA) / (1 - 2 * ALPHA) * LEVELS - pixels.reshape(-1)
    assert np.all((noise > -1e-6) & (noise < 1 + 1e-6)), (
        f"{what_vd} must start with VariationalDequantization: given Gaussian noise, its "
        "first layer must dequantize (pixel + u with u in (0, 1), then the logit)")
    expected = logabsdet_fd(sizes["y"], 1, d, H)[0] - _log_normal(eps)[0]
    worst = abs(float(sizes["ld"][0]) - expected)
    assert worst < LOGDET_TOL, (
        f"{what_vd}: the first layer's log_det must be log|det dy/deps| - log N(eps) "
        f"(a learned dequantization's -log q(u|x) included); it is off by "
        f"{worst:.3g} nats")
    return (f"{shape}, (1, 4, 8), (3, 4, 4) and (2, 4, 8) flows with random parameters: "
            "dequantization, squeezes, split "
            "and couplings in the table's order, shapes and masks, none the identity; log-det "
            "= log|det J| + log N(split-off half) (finite differences, D = 64); exact round "
            "trip; c_hidden, num_layers and vardeq=True honoured")


# ---------------------------------------------------------------------------------- training
@functools.lru_cache(maxsize=2)
def _held_out(fast: bool, root: str) -> tuple[np.ndarray, float]:
    """The lesson's test images (as the notebook loads them) and the bpd bar for them."""
    from nfcourse.checks.lesson04 import bpd_bar
    from nfcourse.data import lesson_images

    data = lesson_images()
    return data.test.double().numpy(), bpd_bar(data.source)


def held_out_data() -> tuple[np.ndarray, float]:
    from nfcourse.config import data_root, fast_mode

    return _held_out(fast_mode(), data_root())


_NOISE = """
from nfcourse.flows import VariationalDequantization as _V
trained = model.double().eval()
layers = layers_of(trained)
variational = isinstance(layers[0], _V)
"""


def trained_bpd(oracle: Oracle, rng: np.random.Generator, images: np.ndarray,
                n: int = 128, chunk: int = 392) -> tuple[float, str]:
    """Held-out bits/dim of ``model`` on ``n`` of ``images``, computed here, and the claimed
    log-det of one of them checked against finite differences (raises AssertionError)."""
    d = int(np.prod(images.shape[1:]))
    pick = rng.choice(len(images), size=min(n, len(images) - 1) + 1, replace=False)
    x = images[pick]
    u = rng.uniform(size=x.shape)
    u[0] = rng.uniform(0.05, 0.95, size=x.shape[1:])  # the probed image: room for the steps
    eps = rng.normal(size=x.shape)
    order = rng.permutation(len(x))  # the probed image hides among the others
    where = int(np.argsort(order)[0])
    out = oracle.query(_code(_RUN, _NOISE, """
        x = _nfv_torch.as_tensor(inp['x'])
        noise = _nfv_torch.as_tensor(inp['eps'] if variational else inp['u'])
        zs, lds = [], []
        for i in range(0, len(x), 16):
            z, total, drops, _, _ = run(layers, x[i:i + 16], noise[i:i + 16])
            zs.append(z.flatten(1))
            lds.append(total)
        out['z'], out['ld'] = _nfv_torch.cat(zs), _nfv_torch.cat(lds)
        out['variational'] = [float(variational)]
    """), x=x[order], u=u[order], eps=eps[order], timeout=300)
    variational = bool(out["variational"].reshape(-1)[0])
    z, ld = out["z"], out["ld"]
    assert z.ndim == 2 and len(z) == len(x), "model's flow did not return one latent per image"
    check_array("the trained model's log-det", ld, (len(x),))
    assert np.all(np.isfinite(z)), "the trained flow gives NaN or Inf latents on test images"
    log_p = _log_normal(z) + ld
    own = np.delete(log_p, where)
    bpd = float(-own.mean() / (d * math.log(2)))

    # The claimed log-det of the probed image against forward differences in its noise (in
    # float64 they are accurate to ~1e-6 per entry, far inside the tolerance, and cost half
    # of central ones: D + 1 runs of the flow instead of 2D + 1).
    noise = (eps if variational else u)[0].reshape(1, d)
    step = FORWARD_H["gaussian" if variational else "uniform"]
    cols, claimed, y = [], 0.0, np.zeros((1, d))
    for lo in range(0, d, chunk):
        hi = min(d, lo + chunk)
        fd = oracle.query(_code(_RUN, _NOISE, """
            x = _nfv_torch.as_tensor(inp['x'])
            base = _nfv_torch.as_tensor(inp['noise'])
            lo, hi, h = int(inp['lo'][0]), int(inp['hi'][0]), float(inp['h'][0])
            k = _nfv_torch.arange(hi - lo)
            probes = base.repeat(hi - lo + 1, 1)
            probes[1 + k, lo + k] += h
            probes = probes.reshape(-1, *x.shape[1:])
            ys, lds = [], []
            for i in range(0, len(probes), 16):  # float64 convolutions: fastest on a CPU
                p = probes[i:i + 16]               # in small batches
                z, total, drops, _, _ = run(layers, x.expand(len(p), *x.shape[1:]), p)
                ys.append(_nfv_torch.cat([z.flatten(1)] + drops, dim=1))
                lds.append(total)
            out['y'], out['ld'] = _nfv_torch.cat(ys), _nfv_torch.cat(lds)
        """), x=x[:1], noise=noise, lo=[lo], hi=[hi], h=[step], timeout=300)
        y = fd["y"]
        assert y.shape == (hi - lo + 1, d), (
            f"the trained flow's final latent and split-off halves have {y.shape[1]} numbers "
            f"per image, not the image's {d}: every dimension must either reach the prior at "
            "the end or be factored out by a split (the first half of its channels kept)")
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(fd["ld"])), (
            "the trained flow gives NaN or Inf near a test image")
        same = max(_close(y[0, : z.shape[1]], z[where]), _close(fd["ld"][:1], ld[where:where + 1]))
        assert same < 1e-7, (
            "the trained flow gives another latent or log-det for the same image and noise "
            "when it is run again")
        claimed = float(fd["ld"][0])
        cols.append((y[1:] - y[:1]) / step)
    dropped = y[0, z.shape[1]:]
    assert dropped.size, (
        "the trained model factors nothing out: train the multi-scale flow of "
        "build_multiscale_flow, whose split sends half of the channels to the prior")
    jac = np.concatenate(cols, axis=0).T  # J[out, in]
    sign, logabs = np.linalg.slogdet(jac)
    expected = logabs + _log_normal(dropped[None])[0]
    if variational:  # the noise is Gaussian: log q(u|x) = log N(eps) - log|du/deps|
        expected -= _log_normal(eps[0][None])[0]
    worst = abs(claimed - expected) if sign != 0 else math.inf
    assert worst < TRAIN_LOGDET_TOL, (
        "the trained model's log-det for a test image is not log|det J| + log N(split-off "
        "half) of the grader's finite-difference Jacobian of the whole flow (noise -> final "
        f"latent and split-off half): off by {worst:.4g} nats, so the bits/dim it reports is "
        "not a bound on the data's likelihood (does every split score its half with the prior?)")
    return bpd, f"log-det checked on one image (D = {d}, within {worst:.1g} nats)"


def check_trained(oracle: Oracle, rng: np.random.Generator) -> str:
    images, bar = held_out_data()
    bpd, fd_note = trained_bpd(oracle, rng, images)
    assert math.isfinite(bpd), "the trained model's held-out bits/dim is not finite"
    assert bpd < bar, (
        f"held-out bits/dim {bpd:.3f} (computed by the grader from the trained model's latents "
        f"and log-dets on fresh test images) does not beat {bar}")
    return f"held-out {bpd:.3f} bits/dim < {bar} (the grader's own computation); {fd_note}"


VERIFIER = Verifier(
    lesson="04_multiscale",
    checks={
        "squeeze_test": check_squeeze,
        "split_test": check_split,
        "multiscale_test": check_multiscale,
        "train_test": check_trained,
    },
)
