"""Grading of lesson 02 (dequantization): full marks, zero, and planted bugs.

Each bug is one edit of the solution; ``loses`` lists every test cell that must then score
zero (the rest keep their points). ``VariationalDequantization`` reuses the student's own
``Dequantization`` through ``super().forward(x, noise=u)``, so a bug in the uniform layer's
forward also costs the variational tests.
"""

import math

import torch
from harness import Bug, lesson_grading_tests

from nfcourse import flows
from nfcourse.checks import lesson02

LESSON = "02_dequantization"

BUGS = [
    # the log-det forgets the 1/levels scaling: 8 bits/dim off, and the variational bound
    # then claims less than the true NLL
    Bug("logdet_missing_levels", cell="dequantization_answer",
        old="math.log(1 - 2 * self.alpha) - math.log(self.levels) - log_v - log_1mv",
        new="math.log(1 - 2 * self.alpha) - log_v - log_1mv",
        loses={"dequantization_test_log_det", "vardeq_test", "vardeq_test_train"}),
    # noise added after scaling to [0, 1): values leave the unit interval, the logit is NaN
    Bug("noise_after_scaling", cell="dequantization_answer",
        old="(x + u) / self.levels", new="x / self.levels + u",
        loses={"dequantization_test", "dequantization_test_log_det", "vardeq_test",
               "vardeq_test_train"}),
    # nats instead of bits: divides by D but not by ln 2
    Bug("bpd_in_nats", cell="bits_per_dim_answer",
        old="x[0].numel() * math.log(2)", new="x[0].numel()",
        loses={"bits_per_dim_test"}),
    # the importance bound without -log k grows with k
    Bug("iw_missing_log_k", cell="importance_bpd_answer",
        old="torch.logsumexp(log_w, dim=0) - math.log(k)", new="torch.logsumexp(log_w, dim=0)",
        loses={"importance_bpd_test"}),
    # averaging the log-weights instead of the weights: no tighter than one sample
    Bug("iw_mean_of_logs", cell="importance_bpd_answer",
        old="torch.logsumexp(log_w, dim=0) - math.log(k)", new="log_w.mean(dim=0)",
        loses={"importance_bpd_test"}),
    # the variational layer forgets -log q(u|x): not a bound any more
    Bug("vardeq_missing_log_q", cell="vardeq_answer",
        old="return z, log_det - log_q", new="return z, log_det",
        loses={"vardeq_test", "vardeq_test_train"}),
]

globals().update(lesson_grading_tests(LESSON, BUGS))


# ------------------------------------------------------------------ the self-checks themselves
# Fast tests of nfcourse.checks.lesson02: the reference layers pass every check, and layers
# with a known mistake fail the check that names it.

class _ModelLike:
    """Just enough of a FlowModel to run the reference's bpd methods on a fake log_prob."""

    bits_per_dim = flows.FlowModel.bits_per_dim
    importance_log_prob = flows.FlowModel.importance_log_prob
    importance_bpd = flows.FlowModel.importance_bpd

    def __init__(self, log_prob, num_dims):
        self.log_prob = lambda x, context=None: log_prob(x)
        self.num_dims = num_dims


def _reference_bpd(log_prob, x):
    return _ModelLike(lambda _: log_prob, x[0].numel()).bits_per_dim(x)


def _reference_importance_bpd(log_prob, x, k=8):
    return _ModelLike(log_prob, x[0].numel()).importance_bpd(x, k)


def test_reference_layers_pass_every_check():
    for levels, seed in ((256, 0), (16, 1)):
        assert lesson02.dequantization_report(flows.Dequantization, levels, seed=seed).ok
        assert lesson02.variational_dequantization_report(
            flows.VariationalDequantization, levels, seed=seed).ok
    assert lesson02.vardeq_training_report(flows.VariationalDequantization).ok
    assert lesson02.bits_per_dim_report(_reference_bpd).ok
    assert lesson02.importance_bpd_report(_reference_importance_bpd).ok


class _NoLevelsTerm(flows.Dequantization):
    def forward(self, x, context=None, noise=None):
        z, log_det = super().forward(x, context, noise)
        return z, log_det + x[0].numel() * math.log(self.levels)


class _NoClamp(flows.Dequantization):
    def inverse(self, z, context=None):
        v, log_det = self.logit.inverse(z)
        return torch.floor(v * self.levels), log_det + z[0].numel() * math.log(self.levels)


class _NoLogQ(flows.VariationalDequantization):
    def forward(self, x, context=None, noise=None):
        x = self._to_float(x)
        u, _ = self.sample_noise(x, noise)
        return self._continuous(x, u)


def _failed(report):
    return {r.name for r in report.failed}


def test_checks_name_the_mistake():
    report = lesson02.dequantization_report(_NoLevelsTerm)
    assert _failed(report) == {"log_det", "inverse_log_det", "uniform_8bpd"}
    assert "log(levels)" in report["log_det"].hint
    assert _failed(lesson02.dequantization_report(_NoClamp)) == {"inverse_range"}
    vd = lesson02.variational_dequantization_report(_NoLogQ)
    assert _failed(vd) == {"log_det"} and "log q(u|x)" in vd["log_det"].hint
    assert _failed(lesson02.vardeq_training_report(_NoLogQ)) == {"valid_bound"}
    in_nats = lesson02.bits_per_dim_report(lambda lp, x: -lp / x[0].numel())
    assert _failed(in_nats) == {"uniform", "formula"}

    def mean_of_logs(log_prob, x, k=8):
        log_w = torch.stack([log_prob(x) for _ in range(k)])
        return -log_w.mean(0) / (x[0].numel() * math.log(2))

    iw = lesson02.importance_bpd_report(mean_of_logs)
    assert _failed(iw) == {"lognormal", "tighter"}
    assert "averaged the log-weights" in iw["lognormal"].hint


def test_require_lists_only_the_named_failures():
    report = lesson02.dequantization_report(_NoClamp)
    lesson02.require(report, "round_trip", "log_det")
    try:
        lesson02.require(report, "inverse_range")
    except AssertionError as exc:
        assert "inverse gives integers" in str(exc)
    else:
        raise AssertionError("require did not raise")
