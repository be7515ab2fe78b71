"""Lesson 01's independent check: the maths of each exercise, verified from numbers.

Each check draws fresh inputs, asks the kernel for outputs and decides in float64 here:

* ``warmup_test``: ``jacobian_det == 1/6`` and ``p_z(z) == p_x(1 + 3 z1, 2 z2) * 6``.
* ``coupling_test_forward``: with random parameters, the kept coordinate passes unchanged,
  the free one is an affine function of itself (``z = x e^s + t``, ``s, t`` of the kept
  one), the layer is not the identity, rows are independent, and ``log_det`` equals
  log|det J| of the grader's own finite-difference Jacobian.
* ``coupling_test_inverse``: ``inverse(forward(x)) == x`` and the inverse's ``log_det``
  against the finite-difference Jacobian of the inverse.
* ``realnvp_test``: built with a coupling whose maths the grader knows (``coupling=``),
  the stack is that coupling with alternating masks, in order, log-dets added; the inverse
  inverts.
* ``density_test``: around an affine flow chosen here, ``log_prob`` is exact and
  ``sample`` returns the inverse flow of N(0, I) noise.
* ``train_test``: the trained model's held-out NLL, computed here from ``model.flow`` and
  finite differences on fresh points, beats the lesson's bar; the density it defines
  integrates to about 1 on a grid (a map that folds space cannot fake a high density).
  Whether the inverse is right is the coupling exercises' business, not this one's.
"""

from __future__ import annotations

import numpy as np

from nfcourse.grade.verify.base import Oracle, Verifier, check_array, draw_seed
from nfcourse.grade.verify.maths import fd_points, gaussian_log_prob, logabsdet_fd

__all__ = ["VERIFIER"]

H = 1e-5  # finite-difference step (float64)
LOGDET_TOL = 1e-5
EXACT = 1e-9


def check_warmup(oracle: Oracle, rng: np.random.Generator) -> str:
    z = rng.uniform(0.02, 0.98, size=(2, 64))
    out = oracle.query("""
        out['det'] = float(jacobian_det)
        out['pz'] = _nfv_np.asarray(p_z(inp['z'][0], inp['z'][1]), dtype=float)
    """, z=z)
    det = float(out["det"].reshape(-1)[0])
    assert abs(det - 1 / 6) < EXACT, f"jacobian_det is {det:.6g}, but |det dz/dx| = 1/6"
    pz = out["pz"].reshape(-1)
    check_array("p_z(z1, z2)", pz, (64,))
    expected = (3 * z[0]) * (2 * z[1]) / 9 * 6
    worst = float(np.max(np.abs(pz - expected)))
    assert worst < 1e-9, (f"p_z is off by up to {worst:.3g} from p_x(1 + 3 z1, 2 z2) * 6 at "
                          "random points of the unit square")
    return "jacobian_det = 1/6 and p_z agrees with the change of variables at 64 random points"


def _coupling_query(mask: list[float], key: str) -> str:
    return f"""
        layer = _nfv_prep(MaskedAffineCoupling(_nfv_torch.tensor({mask!r}), hidden=16),
                          inp['seed'][0], 0.5)
        _nfv_store[{key!r}] = layer
        z, ld = layer(_nfv_torch.as_tensor(inp['x']))
        out['z'], out['ld'] = z, ld
        z1, ld1 = layer(_nfv_torch.as_tensor(inp['x'][:1]))
        out['z1'], out['ld1'] = z1, ld1
    """


def check_coupling_forward(oracle: Oracle, rng: np.random.Generator) -> str:
    b = 24
    for i, mask in enumerate(([1.0, 0.0], [0.0, 1.0])):
        kept, free = int(np.argmax(mask)), int(np.argmin(mask))
        x = rng.normal(size=(b, 2))
        shift = np.zeros(2)
        shift[free] = 0.7
        probes = np.concatenate([fd_points(x, H), x + shift, x - shift])
        out = oracle.query(_coupling_query(mask, f"forward{i}"), x=probes, seed=[draw_seed(rng)])
        n = probes.shape[0]
        z, ld = out["z"], out["ld"]
        check_array("forward's z", z, (n, 2))
        check_array("forward's log_det", ld, (n,))
        where = f"mask {mask}"
        assert np.max(np.abs(z[:, kept] - probes[:, kept])) < EXACT, (
            f"with {where} the coordinate where mask == 1 must pass through unchanged")
        assert np.max(np.abs(z[:b, free] - x[:, free])) > 1e-3, (
            f"with {where} and random network weights the layer is still the identity: the "
            "free coordinate must be scaled and shifted by functions of the kept one")
        fd = logabsdet_fd(z[: 5 * b], b, 2, H)
        worst = float(np.max(np.abs(ld[:b] - fd)))
        assert worst < LOGDET_TOL, (
            f"with {where} log_det differs from log|det| of the Jacobian by up to {worst:.3g}")
        up, down = z[5 * b: 6 * b], z[6 * b:]
        curvature = float(np.max(np.abs(up[:, free] + down[:, free] - 2 * z[:b, free])))
        assert curvature < 1e-8, (
            f"with {where} z is not an affine function of the free coordinate (z = x e^s + t "
            "with s and t computed from the kept coordinate only)")
        assert np.max(np.abs(ld[5 * b:] - np.concatenate([ld[:b], ld[:b]]))) < 1e-8, (
            f"with {where} log_det changes with the free coordinate; s must depend on the "
            "kept one only")
        assert np.max(np.abs(out["z1"].reshape(-1, 2)[0] - z[0])) < EXACT, (
            "a point's output depends on the other points of the batch")
    return ("both masks: kept coordinate unchanged, affine in the free one, not the identity, "
            "log_det = log|det J| (finite differences, float64)")


def check_coupling_inverse(oracle: Oracle, rng: np.random.Generator) -> str:
    b = 24
    for i, mask in enumerate(([0.0, 1.0], [1.0, 0.0])):
        key = f"inverse{i}"
        x = rng.normal(size=(b, 2))
        out = oracle.query(_coupling_query(mask, key), x=x, seed=[draw_seed(rng)])
        check_array("forward's z", out["z"], (b, 2))
        free = int(np.argmin(mask))
        assert np.max(np.abs(out["z"][:, free] - x[:, free])) > 1e-3, (
            f"mask {mask}: with random network weights the layer is the identity, so its "
            "inverse is trivially right; the free coordinate must be transformed")
        back = oracle.query(f"""
            x, ld = _nfv_store[{key!r}].inverse(_nfv_torch.as_tensor(inp['z']))
            out['x'], out['ld'] = x, ld
        """, z=fd_points(out["z"], H))
        check_array("inverse's x", back["x"], (5 * b, 2))
        check_array("inverse's log_det", back["ld"], (5 * b,))
        worst = float(np.max(np.abs(back["x"][:b] - x)))
        assert worst < 1e-9, (
            f"mask {mask}: inverse(forward(x)) is off from x by up to {worst:.3g}")
        fd = logabsdet_fd(back["x"], b, 2, H)
        worst = float(np.max(np.abs(back["ld"][:b] - fd)))
        assert worst < LOGDET_TOL, (
            f"mask {mask}: the inverse's log_det differs from log|det| of its Jacobian by up "
            f"to {worst:.3g}")
    return "inverse(forward(x)) = x; inverse log_det = log|det J_inverse| (finite differences)"


def _known_coupling(x: np.ndarray, kept: int) -> tuple[np.ndarray, np.ndarray]:
    """The grader's copy of the kernel's ``_NfvCoupling`` (see base.KERNEL_PREAMBLE)."""
    s = 0.6 * np.tanh(x[:, kept] + 0.3)
    t = 0.8 * np.sin(x[:, kept])
    z = x.copy()
    z[:, 1 - kept] = x[:, 1 - kept] * np.exp(s) + t
    return z, s


def check_realnvp(oracle: Oracle, rng: np.random.Generator) -> str:
    """RealNVP built with a coupling whose maths the grader knows (its ``coupling=``
    argument): its output must be the alternating composition, computed here."""
    b = 32
    for n_layers in (4, 5):
        x = rng.normal(size=(b, 2))
        out = oracle.query(f"""
            flow = RealNVP(n_layers={n_layers}, hidden=8, coupling=_NfvCoupling).double()
            z, ld = flow(_nfv_torch.as_tensor(inp['x']))
            back, ld_inv = flow.inverse(z)
            out['z'], out['ld'], out['back'], out['ld_inv'] = z, ld, back, ld_inv
        """, x=x)
        check_array("RealNVP's z", out["z"], (b, 2))
        check_array("RealNVP's log_det", out["ld"], (b,))
        matches = []
        for first in (0, 1):
            z, ld = x, np.zeros(b)
            for k in range(n_layers):
                z, s = _known_coupling(z, (first + k) % 2)
                ld = ld + s
            matches.append(np.max(np.abs(out["z"] - z)) < EXACT
                           and np.max(np.abs(out["ld"] - ld)) < EXACT)
        assert any(matches), (
            f"RealNVP(n_layers={n_layers}, coupling=c) is not {n_layers} layers "
            "c(mask, hidden) with alternating masks, run in order with their log-dets added")
        worst = float(np.max(np.abs(out["back"] - x)))
        assert worst < 1e-9, f"RealNVP.inverse(forward(x)) is off from x by up to {worst:.3g}"
        worst = float(np.max(np.abs(out["ld_inv"] + out["ld"])))
        assert worst < EXACT, "RealNVP.inverse's log_det is not minus the forward one"
    return "4 and 5 layers: the alternating composition of a known coupling; inverse inverts"


def check_density(oracle: Oracle, rng: np.random.Generator) -> str:
    """FlowDensity around an affine flow z = x A^T + b chosen here, so both log_prob and
    the distribution of samples are known exactly."""
    b, n = 64, 4000
    a = rng.normal(size=(2, 2)) + 2 * np.eye(2)
    shift = rng.normal(size=2)
    x = rng.normal(size=(b, 2)) * 2
    out = oracle.query("""
        density = FlowDensity(_NfvAffineFlow(inp['a'], inp['b']))
        out['lp'] = density.log_prob(_nfv_torch.as_tensor(inp['x']))
        single = FlowDensity(_NfvAffineFlow(inp['a'], inp['b']).float())
        _nfv_torch.manual_seed(int(inp['seed'][0]))
        out['s'] = single.sample(int(inp['n'][0]))
    """, a=a, b=shift, x=x, seed=[draw_seed(rng)], n=[n])
    check_array("log_prob(x)", out["lp"], (b,))
    expected = gaussian_log_prob(x @ a.T + shift) + np.linalg.slogdet(a)[1]
    worst = float(np.max(np.abs(out["lp"] - expected)))
    assert worst < 1e-8, (
        f"log_prob differs from log N(f(x); 0, I) + log|det J_f| by up to {worst:.3g} for a "
        "known affine flow")
    check_array("sample(n)", out["s"], (n, 2))
    zs = out["s"] @ a.T + shift
    mean, cov = zs.mean(axis=0), np.cov(zs.T)
    assert np.max(np.abs(mean)) < 0.1 and np.max(np.abs(cov - np.eye(2))) < 0.15, (
        "sample(n) does not run the flow's inverse on N(0, I) noise: the flow maps its "
        f"points to mean {np.round(mean, 2).tolist()}, covariance {np.round(cov, 2).tolist()}")
    return "log_prob exact for a known flow; samples are the inverse flow of N(0, I)"


def check_trained(oracle: Oracle, rng: np.random.Generator) -> str:
    """Held-out NLL and normalisation of the trained ``model``, from ``model.flow`` alone.

    Held-out points and one jittered point per cell of a grid over [-4, 4]^2 go to the
    kernel in one shuffled batch, so a kernel cannot answer the two questions differently.
    """
    from nfcourse.checks.lesson01 import NLL_THRESHOLD, held_out_moons

    n_test, cells, width = 1000, 100, 8.0
    x_test = held_out_moons(n_test, seed=draw_seed(rng)).double().numpy()
    step = width / cells
    corner = np.stack(np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij"), -1)
    grid = -width / 2 + (corner.reshape(-1, 2) + rng.uniform(size=(cells * cells, 2))) * step
    points = np.concatenate([x_test, grid])
    order = rng.permutation(len(points))
    b = len(points)
    out = oracle.query("""
        m = model.double()
        x = _nfv_torch.as_tensor(inp['x'])
        z = m.flow(x)[0]
        out['z'] = z
    """, x=fd_points(points[order], H), timeout=180)
    check_array("model.flow(x)", out["z"], (5 * b, 2))
    log_density = np.empty(b)
    log_density[order] = (gaussian_log_prob(out["z"][:b]) + logabsdet_fd(out["z"], b, 2, H))
    own = log_density[:n_test]
    nll = -float(own.mean())
    assert np.isfinite(nll), "the trained flow gives NaN or Inf on held-out points"
    assert nll < NLL_THRESHOLD, (
        f"held-out NLL {nll:.3f} nats (computed by the grader from model.flow) is not below "
        f"{NLL_THRESHOLD}")
    mass = float(np.exp(log_density[n_test:]).sum() * step * step)
    assert 0.7 < mass < 1.15, (
        f"the learned density integrates to {mass:.3f} over [-4, 4]^2, not about 1: the flow "
        "is not a valid change of variables")
    return (f"held-out NLL {nll:.3f} < {NLL_THRESHOLD} (the grader's own computation); the "
            f"density integrates to {mass:.2f} over [-4, 4]^2")


VERIFIER = Verifier(
    lesson="01_two_moons_realnvp",
    checks={
        "warmup_test": check_warmup,
        "coupling_test_forward": check_coupling_forward,
        "coupling_test_inverse": check_coupling_inverse,
        "realnvp_test": check_realnvp,
        "density_test": check_density,
        "train_test": check_trained,
    },
)
