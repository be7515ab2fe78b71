"""Grading of lesson 06 (continuous flows): full marks, zero, and planted bugs.

Each bug is one edit of the solution; ``loses`` lists every test cell that must then score
zero (the rest keep their points). The CNF calls the student's own divergences, so a wrong
sign in ``exact_divergence`` also costs the CNF tests and both trainings (the model's
``log_prob`` no longer integrates to one), and noise without ``E[eps eps^T] = I`` also costs
the CNF's Hutchinson mode. Bugs that leave a consistent density (time not fed to the network,
the flow integrated the wrong way round) train fine and lose only the tests that look at the
piece itself.
"""

from harness import Bug, lesson_grading_tests

LESSON = "06_ffjord_gifs"

BUGS = [
    # the divergence with the wrong sign: log p(x) no longer a density
    Bug("divergence_sign", cell="divergence_answer",
        old="div = div + row[:, i]", new="div = div - row[:, i]",
        loses={"divergence_test", "cnf_test", "cnf_test_jacobian", "train_moons_test",
               "train_image_test"}),
    # noise uniform on [0, 1): E[eps eps^T] != I, so Hutchinson's estimate is biased
    Bug("hutchinson_uniform_noise", cell="hutchinson_answer",
        old="return torch.randint(0, 2, z.shape, device=z.device).to(z.dtype) * 2 - 1",
        new="return torch.rand_like(z)",
        loses={"hutchinson_test", "hutchinson_test_noise", "cnf_test_jacobian"}),
    # log p(x) integrated from T to 0: the data treated as if they sat at t = T
    Bug("log_prob_wrong_direction", cell="cnf_answer",
        old="z, log_det = self.transform(x, 0.0, self.T)",
        new="z, log_det = self.transform(x, self.T, 0.0)",
        loses={"cnf_test"}),
    # the network never sees the time: an autonomous field f(z)
    Bug("time_not_fed", cell="odefunc_answer",
        old="h = linear(torch.cat([h, t_col], dim=1))",
        new="h = linear(torch.cat([h, torch.zeros_like(t_col)], dim=1))",
        loses={"odefunc_test"}),
]

globals().update(lesson_grading_tests(LESSON, BUGS))


# --------------------------------------------------------------- the self-checks themselves
# The checks must pass the reference implementation (they grade numbers; in a grading kernel
# the reference is absent anyway) and catch each planted mistake with a message that names it.
import math  # noqa: E402

import torch  # noqa: E402

from nfcourse import cnf  # noqa: E402
from nfcourse.checks import lesson06 as checks  # noqa: E402


class _RefCNF(cnf.CNF):
    def log_prob(self, x):
        z, log_det = self(x)
        return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + log_det


def test_checks_pass_the_reference():
    assert checks.odefunc_problems(cnf.ODENet) == []
    assert checks.exact_divergence_problems(cnf.exact_divergence) == []
    assert checks.hutchinson_problems(cnf.hutchinson_divergence, cnf.sample_noise) == []
    assert checks.noise_problems(cnf.sample_noise) == []
    assert checks.cnf_problems(_RefCNF) == []
    assert checks.cnf_jacobian_problems(_RefCNF) == []


def test_self_checks_warn_about_the_reference():
    assert checks._advice(cnf.ODENet, "odefunc")
    assert checks._advice(_RefCNF, "cnf")  # a subclass of the reference
    assert checks._advice(type("Own", (), {}), "cnf") == []


def test_cnf_check_catches_noise_drawn_at_every_evaluation():
    """Fresh Hutchinson noise at every evaluation of the dynamics: still unbiased, so the mean
    test passes, but the lesson's rule is one draw per solve."""
    class Fresh(_RefCNF):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

            class Redraw(type(self.dynamics)):
                def forward(self, t, state):
                    if self.divergence == "hutchinson":
                        self.noise = cnf.sample_noise(state[0])
                    return super().forward(t, state)

            self.dynamics.__class__ = Redraw

    problems = checks.cnf_jacobian_problems(Fresh)
    assert any("once per solve" in p for p in problems), problems


def test_checks_name_the_mistakes():
    def minus_divergence(f, z, t):
        dz, div = cnf.exact_divergence(f, z, t)
        return dz, -div

    problems = checks.exact_divergence_problems(minus_divergence)
    assert any("minus the expected value" in p for p in problems), problems

    def uniform(z):
        return torch.rand_like(z)

    assert any("E[eps eps^T] = I" in p for p in checks.noise_problems(uniform))
    problems = checks.hutchinson_problems(cnf.hutchinson_divergence, uniform)
    assert any("biased" in p for p in problems), problems

    class Backwards(_RefCNF):
        def log_prob(self, x):
            z, log_det = self.transform(x, self.T, 0.0)
            return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + log_det

    problems = checks.cnf_problems(Backwards)
    assert any("integrate from 0 to T" in p for p in problems), problems


def test_linear_field_is_exact():
    A = torch.tensor([[0.2, -1.0], [0.7, 0.1]], dtype=torch.float64)
    for power in (0, 1):
        field = checks.LinearField(A, power=power)
        x = torch.randn(3, 2, dtype=torch.float64)
        ref = cnf.CNF(field, T=1.3, method="dopri5", rtol=1e-10, atol=1e-10)
        z, log_det = ref(x)
        z_ex, log_det_ex = field.exact(x, 0.0, 1.3)
        torch.testing.assert_close(z.detach(), z_ex, atol=1e-7, rtol=1e-7)
        torch.testing.assert_close(log_det.detach(), log_det_ex, atol=1e-7, rtol=1e-7)


def test_training_checks_reject_an_improper_density():
    # a "model" whose log-density is too large everywhere: its KL estimate comes out negative
    class TooGood(torch.nn.Module):
        def log_prob(self, x):
            return checks.moons_log_prob(x).float() + 1.0

    problems = checks.moons_problems(TooGood(), limit=0.6)
    assert any("negative" in p for p in problems), problems
