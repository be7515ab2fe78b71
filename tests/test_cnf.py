"""Continuous normalizing flows: nfcourse.cnf keeps the flow contract and solves honestly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from nfcourse.cnf import (
    CNF,
    ODENet,
    cnf_2d,
    exact_divergence,
    ffjord_2d_defaults,
    hutchinson_divergence,
    regularized_loss,
    sample_noise,
    validate_log_density,
)

F64 = torch.float64


def _net(seed: int = 0, **kwargs) -> ODENet:
    torch.manual_seed(seed)
    kwargs = {"hidden": 16, "layers": 2, **kwargs}
    net = ODENet(2, **kwargs).to(F64)
    # Larger weights than the default init, so the flow bends noticeably in a short time.
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    return net


def _x(n: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=F64)


SOLVERS = {
    # fixed-step RK4 with many steps over a short time: the discrete map is the ODE's map up
    # to O(h^4); the log-det integrated alongside matches its Jacobian to ~1e-9 (measured
    # 7e-10; 3e-7 with 10 steps, 2e-5 with 4, 7e-3 for Euler with 10).
    "rk4": dict(method="rk4", steps=40, T=0.5),
    # adaptive dopri5 at tight tolerance: both sides are the ODE's flow (measured 1e-10).
    "dopri5": dict(method="dopri5", rtol=1e-10, atol=1e-10, T=0.5),
}


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("exact_trace", ["autograd", "analytic"])
def test_log_det_matches_autograd_jacobian_both_directions(solver, exact_trace, flowcheck):
    cnf = CNF(_net(), exact_trace=exact_trace, **SOLVERS[solver]).to(F64)
    x = _x(3)
    z, log_det = cnf(x)
    assert log_det.shape == (3,) and log_det.dtype == F64
    assert log_det.abs().min() > 1e-3, "the test flow should change volume"
    x_back, inv_log_det = cnf.inverse(z)
    torch.testing.assert_close(inv_log_det, -log_det, atol=1e-8, rtol=0)
    z = z.detach()
    for b in range(3):
        # log|det| of the Jacobian of the discrete solve, by autograd through the solver
        fwd = flowcheck.jacobian_logdet(lambda v: cnf(v)[0], x[b])
        inv = flowcheck.jacobian_logdet(lambda v: cnf.inverse(v)[0], z[b])
        torch.testing.assert_close(log_det[b].detach(), fwd, atol=1e-8, rtol=0)
        torch.testing.assert_close(inv_log_det[b].detach(), inv, atol=1e-8, rtol=0)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_forward_then_inverse_is_identity(solver):
    cnf = CNF(_net(), **SOLVERS[solver]).to(F64)
    x = _x(64)
    z, _ = cnf(x)
    assert (z - x).abs().max() > 0.05, "the test flow should move points"
    x_back, _ = cnf.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=0)


@pytest.mark.parametrize("embedding", ["concat", "fourier", "concatsquash"])
@pytest.mark.parametrize("activation", ["tanh", "softplus", "elu", "swish"])
def test_odenet_jacobian_matches_autograd(embedding, activation):
    net = _net(time_embedding=embedding, activation=activation)
    z, t = _x(4), torch.tensor(0.3, dtype=F64)
    f, jac = net.forward_with_jacobian(t, z)
    torch.testing.assert_close(f, net(t, z))
    for b in range(4):
        ref = torch.autograd.functional.jacobian(lambda v: net(t, v[None])[0], z[b])
        torch.testing.assert_close(jac[b].T, ref)  # jac[b, j, i] = d f_i / d z_j


def test_divergences_on_a_linear_field():
    a = torch.tensor([[0.7, -1.3], [2.1, -0.4]], dtype=F64)

    def f(t, z):
        return z @ a.T

    z = _x(8)
    dz, div = exact_divergence(f, z, 0.0)
    torch.testing.assert_close(dz, f(0.0, z))
    torch.testing.assert_close(div, torch.full((8,), 0.3, dtype=F64))
    # eps^T A eps = tr A + (a12 + a21) e1 e2: averaging over the 2^D Rademacher sign patterns
    # cancels the cross terms exactly.
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=2)), dtype=F64)
    total = torch.zeros(8, dtype=F64)
    for s in signs:
        _, est = hutchinson_divergence(f, z, 0.0, s.expand_as(z))
        total += est
    torch.testing.assert_close(total / len(signs), div)


def test_rademacher_hutchinson_is_exact_for_diagonal_jacobians():
    def f(t, z):  # elementwise, so df/dz is diagonal and eps_i^2 = 1 makes the estimate exact
        return torch.tanh(z) * torch.tensor([1.5, -0.5], dtype=F64) + t

    z = _x(16)
    _, exact = exact_divergence(f, z, 0.2)
    _, est = hutchinson_divergence(f, z, 0.2, sample_noise(z, "rademacher"))
    torch.testing.assert_close(est, exact)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_a_network(kind):
    net = _net()
    torch.manual_seed(3)
    z = _x(4).repeat(4000, 1)  # 4000 independent noise draws for each of 4 points
    t = torch.tensor(0.4, dtype=F64)
    _, exact = exact_divergence(net, z[:4], t)
    _, est = hutchinson_divergence(net, z, t, sample_noise(z, kind))
    est = est.reshape(4000, 4)
    mean, stderr = est.mean(0), est.std(0) / math.sqrt(4000)
    assert (stderr > 0).all()
    assert ((mean - exact).abs() < 5 * stderr).all(), (mean, exact, stderr)


def test_sample_noise_has_identity_second_moment():
    torch.manual_seed(0)
    like = torch.zeros(20000, 3, dtype=F64)
    for kind in ("rademacher", "gaussian"):
        eps = sample_noise(like, kind)
        second_moment = eps.T @ eps / len(eps)
        torch.testing.assert_close(second_moment, torch.eye(3, dtype=F64), atol=0.05, rtol=0)
    assert set(sample_noise(like).unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError):
        sample_noise(like, "uniform")


def test_hutchinson_cnf_close_to_exact_cnf():
    net = _net()
    exact = CNF(net, T=0.5, method="rk4", steps=20).to(F64)
    approx = CNF(net, T=0.5, method="rk4", steps=20, divergence="hutchinson").to(F64)
    torch.manual_seed(0)
    x = _x(4).repeat(2000, 1)
    z_exact, ld_exact = exact(x[:4])
    z_approx, ld_approx = approx(x)
    torch.testing.assert_close(z_approx[:4], z_exact)  # the noise never touches the path
    mean = ld_approx.reshape(2000, 4).mean(0)
    stderr = ld_approx.reshape(2000, 4).std(0) / math.sqrt(2000)
    assert ((mean - ld_exact).abs() < 5 * stderr + 1e-9).all()


def test_nfe_counted_and_reset_per_solve():
    cnf = CNF(_net(), T=1.0, method="rk4", steps=8).to(F64)
    x = _x()
    cnf(x)
    assert cnf.nfe == 32  # 8 steps of 4 stages
    cnf.inverse(x)
    assert cnf.nfe == 32  # reset, not accumulated
    cnf.transform(x, 0.0, 0.5)
    assert cnf.nfe == 16  # half the span, half the steps
    adaptive = CNF(_net(), T=1.0, method="dopri5", rtol=1e-6, atol=1e-6).to(F64)
    adaptive(x)
    first = adaptive.nfe
    assert first > 6
    adaptive(x)
    assert adaptive.nfe == first
    with adaptive.settings(rtol=1e-10, atol=1e-10):
        adaptive(x)
        assert adaptive.nfe > first  # tighter tolerance, more evaluations


def test_adjoint_counts_backward_evaluations():
    cnf = CNF(_net(), T=0.5, method="dopri5", adjoint=True).to(F64)
    z, log_det = cnf(_x())
    assert cnf.nfe_backward == 0
    (z.sum() + log_det.sum()).backward()
    assert cnf.nfe_backward > 0
    direct = CNF(_net(), T=0.5, method="dopri5").to(F64)
    z, log_det = direct(_x())
    (z.sum() + log_det.sum()).backward()
    assert direct.nfe_backward == 0


def test_transform_through_an_intermediate_time_equals_the_full_transform():
    x = _x(16)
    # fixed step: T/2 lies on the grid, so the two halves walk exactly the same steps
    cnf = CNF(_net(), T=1.0, method="rk4", steps=8).to(F64)
    z, log_det = cnf(x)
    mid, ld1 = cnf.transform(x, 0.0, 0.5)
    end, ld2 = cnf.transform(mid, 0.5, 1.0)
    torch.testing.assert_close(end, z, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld1 + ld2, log_det, atol=1e-12, rtol=0)
    # adaptive: any intermediate time, equal up to the solver's tolerance
    cnf = CNF(_net(), T=1.0, method="dopri5", rtol=1e-10, atol=1e-10).to(F64)
    z, log_det = cnf(x)
    mid, ld1 = cnf.transform(x, 0.0, 0.37)
    end, ld2 = cnf.transform(mid, 0.37, 1.0)
    torch.testing.assert_close(end, z, atol=1e-8, rtol=0)
    torch.testing.assert_close(ld1 + ld2, log_det, atol=1e-8, rtol=0)
    # and back: the state at 0.37 seen from the noise side
    back, _ = cnf.transform(z, 1.0, 0.37)
    torch.testing.assert_close(back, mid, atol=1e-8, rtol=0)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_sample_path_runs_from_noise_to_data(method):
    cnf = CNF(_net(), T=1.0, method=method, steps=8, rtol=1e-9, atol=1e-9).to(F64)
    z = _x(10)
    with torch.no_grad():
        path = cnf.sample_path(z, n=5)
        x, _ = cnf.inverse(z)
        half, _ = cnf.transform(z, 1.0, 0.5)
    assert path.shape == (5, 10, 2)
    torch.testing.assert_close(path[0], z)
    torch.testing.assert_close(path[-1], x, atol=1e-9, rtol=0)
    torch.testing.assert_close(path[2], half, atol=1e-9, rtol=0)  # t = 0.5, "layer 1.5"
    with torch.no_grad():
        given = cnf.sample_path(z, times=[0.75, 0.5, 0.0])
    assert given.shape == (3, 10, 2)
    torch.testing.assert_close(given[-1], x, atol=1e-9, rtol=0)


def test_regularization_is_finite_and_zero_for_a_zero_field():
    zero = ODENet(2, hidden=8, layers=2, zero_init=True).to(F64)
    cnf = CNF(zero, T=1.0, method="rk4", steps=4, kinetic_energy=0.1, jacobian_norm=0.1).to(F64)
    z, log_det = cnf(_x())
    torch.testing.assert_close(z, _x())
    for name in ("kinetic", "jacobian"):
        torch.testing.assert_close(cnf.last_regularization[name], torch.zeros(5, dtype=F64))
    assert cnf.regularization_loss().item() == 0.0

    for divergence in ("exact", "hutchinson"):
        cnf = CNF(_net(), T=1.0, method="rk4", steps=8, divergence=divergence,
                  kinetic_energy=0.1, jacobian_norm=0.2).to(F64)
        cnf(_x())
        reg = cnf.last_regularization
        assert all(torch.isfinite(v).all() and (v > 0).all() for v in reg.values())
        expected = 0.1 * reg["kinetic"].mean() + 0.2 * reg["jacobian"].mean()
        torch.testing.assert_close(cnf.regularization_loss(), expected)
        cnf.inverse(_x())  # integrals are reported positive in either direction
        assert all((v > 0).all() for v in cnf.last_regularization.values())


def test_regularization_values_on_a_linear_field():
    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=F64))

        def forward(self, t, z):
            return z @ self.a.T

    field = Linear()
    cnf = CNF(field, T=0.5, method="rk4", steps=50, track_regularization=True).to(F64)
    x = _x()
    z, _ = cnf(x)
    # int_0^T ||A||_F^2 dt, exactly
    expected = 0.5 * field.a.pow(2).sum()
    torch.testing.assert_close(cnf.last_regularization["jacobian"], expected.expand(5).detach())
    # kinetic energy of the exact solution z(t) = expm(A t) x, by the trapezoidal rule
    ts = torch.linspace(0, 0.5, 2001, dtype=F64)
    speed = torch.stack([(x @ torch.linalg.matrix_exp(field.a * t).T @ field.a.T).pow(2).sum(1)
                         for t in ts.tolist()]).detach()
    kinetic = torch.trapezoid(speed, ts, dim=0)
    torch.testing.assert_close(cnf.last_regularization["kinetic"], kinetic, atol=1e-6, rtol=0)
    assert cnf.regularization_loss().item() == 0.0  # tracked, but zero coefficients


def _gradients(cnf: CNF, x: torch.Tensor) -> list[torch.Tensor]:
    cnf.zero_grad()
    z, log_det = cnf(x)
    loss = (0.5 * z.pow(2).sum(1) - log_det).mean() + cnf.regularization_loss()
    loss.backward()
    return [p.grad.clone() for p in cnf.parameters()]


@pytest.mark.parametrize("train_T", [False, True])
def test_adjoint_gradients_match_direct_backprop(train_T):
    settings = dict(T=0.5, method="dopri5", rtol=1e-10, atol=1e-10, train_T=train_T)
    direct = CNF(_net(time_embedding="concatsquash"), **settings).to(F64)
    adjoint = CNF(_net(time_embedding="concatsquash"), adjoint=True, **settings).to(F64)
    x = _x(32)
    for a, b in zip(_gradients(direct, x), _gradients(adjoint, x), strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-6)


def test_adjoint_gradients_with_regularization_and_fixed_steps():
    settings = dict(T=0.5, method="rk4", steps=50, kinetic_energy=0.1, jacobian_norm=0.1)
    direct = CNF(_net(), **settings).to(F64)
    adjoint = CNF(_net(), adjoint=True, **settings).to(F64)
    x = _x(16)
    for a, b in zip(_gradients(direct, x), _gradients(adjoint, x), strict=True):
        # the adjoint solves the backward ODE with its own RK4 steps: O(h^4) apart
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_analytic_and_autograd_traces_agree_in_training():
    x = _x(16)
    grads = []
    for trace in ("analytic", "autograd"):
        cnf = CNF(_net(), T=0.5, method="rk4", steps=4, exact_trace=trace,
                  jacobian_norm=0.3).to(F64)
        grads.append(_gradients(cnf, x))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_float32_contract_and_settings_restore():
    cnf = CNF(ODENet(2), T=1.0, method="rk4", steps=8)
    x = torch.randn(7, 2)
    z, log_det = cnf(x)
    assert z.dtype == log_det.dtype == torch.float32 and log_det.shape == (7,)
    with cnf.settings(method="dopri5", rtol=1e-3, atol=1e-3):
        assert cnf.method == "dopri5"
    assert (cnf.method, cnf.rtol, cnf.steps) == ("rk4", 1e-5, 8)
    with pytest.raises(ValueError):
        with cnf.settings(tolerance=1):
            pass


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        CNF(ODENet(2), divergence="approximate")
    with pytest.raises(ValueError):
        CNF(ODENet(2), T=0.0)
    with pytest.raises(ValueError):
        ODENet(2, time_embedding="hyper")
    with pytest.raises(ValueError):
        CNF(nn.Linear(2, 2), exact_trace="analytic")(torch.randn(3, 2))


def test_cnf_2d_is_a_flow_model_that_trains():
    model = cnf_2d()
    cnf = model.flow
    assert isinstance(cnf, CNF) and cnf.method == "rk4" and cnf.adjoint is False
    torch.manual_seed(0)
    data = torch.randn(2000, 2) * 0.3 + torch.tensor([1.5, -1.0])
    assert model.log_prob(data[:5]).shape == (5,)
    assert cnf.nfe == 32
    assert model.sample(6).shape == (6, 2)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    before = model.loss(data).item()
    for _ in range(30):
        batch = data[torch.randint(0, 2000, (256,))]
        opt.zero_grad()
        regularized_loss(model, batch).backward()
        opt.step()
    after = model.loss(data).item()
    assert after < before - 0.5, (before, after)
    report = validate_log_density(model, data[:256])
    assert report["nfe_train"] == 32 and report["nfe_tight"] > 32
    assert abs(report["gap"]) < 0.05 and math.isfinite(report["max_abs_gap"])
    assert cnf.method == "rk4"  # restored after the tight solve


def test_ffjord_defaults_build():
    model = cnf_2d(**ffjord_2d_defaults())
    cnf = model.flow
    assert (cnf.method, cnf.rtol, cnf.atol, cnf.adjoint, cnf.divergence) == (
        "dopri5", 1e-5, 1e-5, True, "exact")
    assert cnf.train_T and abs(cnf.T.item() - 0.5) < 1e-6
    assert [m.out_features for m in cnf.odefunc.linears] == [64, 64, 64, 2]
    loss = model.loss(torch.randn(64, 2))
    loss.backward()
    assert cnf.nfe_backward > 0 and cnf.sqrt_T.grad is not None
