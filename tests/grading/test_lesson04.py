"""Lesson 04 (multi-scale architecture) graded end to end, and its self-checks.

The grading tests come from the shared harness (see harness.py); each planted bug is one
edit of the solution and names exactly the test cells that must then score zero. The fast
tests below check ``nfcourse.checks.lesson04`` itself.
"""

import torch
from harness import Bug, lesson_grading_tests

from nfcourse import flows
from nfcourse.checks import lesson04

LESSON = "04_multiscale"

BUGS = [
    # column-major 2x2 blocks in forward only: the documented ordering is broken and the
    # inverse no longer undoes forward, so the flow's round trip fails; training (forward
    # only) still beats the bar
    Bug("squeeze_ordering", cell="squeeze_answer",
        old="z.permute(0, 1, 3, 5, 2, 4)", new="z.permute(0, 1, 5, 3, 2, 4)",
        loses={"squeeze_test", "multiscale_test"}),
    # the factored-out half is never scored by the prior: the split test and the flow's
    # identity-at-initialisation check fail. Training then reports a negative bits/dim
    # (about -0.4 in fast mode), which no bound on a discrete likelihood can be; scored
    # with the prior term its held-out bound is about 260 bits/dim, so training fails too.
    Bug("split_missing_prior_term", cell="split_answer",
        old="return z1, log_normal(z2)", new="return z1, x.new_zeros(x.shape[0])",
        loses={"split_test", "multiscale_test", "train_test"}),
    # the halves put back in the wrong order
    Bug("split_inverse_order", cell="split_answer",
        old="torch.cat([z, z2], dim=1)", new="torch.cat([z2, z], dim=1)",
        loses={"split_test", "multiscale_test"}),
    # sampling ignores the temperature: only the split's own test sees it
    Bug("split_ignores_temperature", cell="split_answer",
        old="z2 = self.temperature * torch.randn_like(z)", new="z2 = torch.randn_like(z)",
        loses={"split_test"}),
    # no split between the scales: the flow's output no longer matches its prior, nothing
    # trains
    Bug("no_split", cell="multiscale_answer",
        old="    layers.append(Split())\n", new="",
        loses={"multiscale_test", "train_test"}),
    # the same channel mask in every coupling of the last scale
    Bug("masks_not_alternating", cell="multiscale_answer",
        old="channel_mask(8 * c, invert=(k % 2 == 1))", new="channel_mask(8 * c)",
        loses={"multiscale_test"}),
]

globals().update(lesson_grading_tests(LESSON, BUGS))


# ------------------------------------------------------------------ the self-checks themselves
def _multiscale(shape=(1, 28, 28), c_hidden=(32, 48, 64), num_couplings=(2, 2, 4), num_layers=2,
                vardeq=False):
    return flows.multiscale_flow(shape, hidden=c_hidden, num_couplings=num_couplings,
                                 num_layers=num_layers, vardeq=vardeq, vardeq_hidden=8,
                                 vardeq_layers=1)


def test_reference_layers_pass_every_check():
    assert lesson04.squeeze_problems(flows.Squeeze) == []
    assert lesson04.split_problems(flows.Split) == []
    assert lesson04.multiscale_problems(_multiscale, flows.Squeeze, flows.Split) == []


class _ColumnMajorSqueeze(flows.Squeeze):
    def forward(self, x, context=None):
        b, c, h, w = x.shape
        z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 5, 3, 2, 4)
        return z.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)


class _SplitWithoutPrior(flows.Split):
    def forward(self, x, context=None):
        z1, _ = super().forward(x, context)
        return z1, x.new_zeros(x.shape[0])


class _HotSplit(flows.Split):
    def inverse(self, z, context=None, z2=None):
        if z2 is None and self.z2 is None:
            z2 = torch.randn_like(z)
        return super().inverse(z, context, z2)


def _joined(problems):
    return "\n".join(problems)


def test_checks_name_the_mistake():
    assert "top-right" in _joined(lesson04.squeeze_problems(_ColumnMajorSqueeze))
    assert "log N(z2" in _joined(lesson04.split_problems(_SplitWithoutPrior))
    assert "temperature" in _joined(lesson04.split_problems(_HotSplit))

    def without_prior_term(**kwargs):
        model = _multiscale(**kwargs)
        for i, layer in enumerate(model.flow.layers):
            if isinstance(layer, flows.Split):
                model.flow.layers[i] = _SplitWithoutPrior()
        return model

    found = lesson04.multiscale_problems(without_prior_term, flows.Squeeze, flows.Split)
    assert "prior" in _joined(found)


def test_self_check_flags_the_reference(capsys):
    assert not lesson04.check_squeeze(flows.Squeeze)
    assert "fail when graded" in capsys.readouterr().out
