"""Lesson 03 (coupling layers for images) graded end to end, and its self-checks.

The grading tests come from the shared harness (see harness.py): the solution gets full
marks, the untouched lesson zero, and each planted bug (one edit of the solution) loses the
points of exactly the test cells in ``loses``. The fast tests below check
``nfcourse.checks.lesson03`` itself: the reference layers pass, and known mistakes are named.
"""

import torch
from harness import Bug, lesson_grading_tests

from nfcourse import flows
from nfcourse.checks import lesson03

LESSON = "03_coupling_layers"

BUGS = [
    # bottom-left parity: still a checkerboard, so the flow and training are fine; only the
    # mask's own test, which holds the documented convention, fails
    Bug("checkerboard_parity", cell="checkerboard_mask_answer",
        old="mask = ((i + j) % 2 == 0).float()", new="mask = ((i + j) % 2 == 1).float()",
        loses={"checkerboard_mask_test"}),
    # the second half of the channels kept: the single-channel flow never uses it
    Bug("channel_mask_second_half", cell="channel_mask_answer",
        old="mask[: c // 2] = 1", new="mask[c // 2:] = 1",
        loses={"channel_mask_test"}),
    # the log-scale not zeroed on the kept pixels: they get scaled too, the inverse cannot
    # recover them and the log-det is not the Jacobian's; a fresh layer is still the identity
    Bug("scale_on_kept_half", cell="coupling_answer",
        old="return s * (1 - keep), t * (1 - keep)", new="return s, t * (1 - keep)",
        loses={"coupling_test", "simple_flow_test"}),
    # the log-det summed over the batch too: a scalar instead of (B,). Training then follows
    # a log-det B times too large and the flow learns nothing: one image at a time it scores
    # about 19 bits/dim. The hidden training test is fooled (evaluate() on batches of 256
    # reports about -480 bits/dim, each image credited with the whole batch's log-det); the
    # independent check scores the images one by one and fails it.
    Bug("logdet_summed_over_batch", cell="coupling_answer",
        old="return z, s.flatten(1).sum(1)", new="return z, s.sum()",
        loses={"coupling_test", "coupling_test_init", "train_test"}),
    # a network whose last layer is random: the flow does not start as the identity
    Bug("no_zero_init", cell="coupling_answer",
        old="net = GatedConvNet(c_in, c_hidden, 2 * c_in, num_layers)",
        new="net = GatedConvNet(c_in, c_hidden, 2 * c_in, num_layers, zero_init=False)",
        loses={"coupling_test_init", "simple_flow_test"}),
    # the same checkerboard in every coupling: half of the pixels are never transformed and
    # stay logits of dequantized pixels under N(0, 1), far above the bar
    Bug("masks_not_alternating", cell="simple_flow_answer",
        old="invert=(k % 2 == 1)", new="invert=False",
        loses={"simple_flow_test", "train_test"}),
]

globals().update(lesson_grading_tests(LESSON, BUGS))


# ------------------------------------------------------------------ the self-checks themselves
def _simple_flow(shape=(1, 28, 28), num_couplings=8, c_hidden=32, num_layers=2, vardeq=False):
    return flows.simple_image_flow(shape, num_couplings, hidden=c_hidden, num_layers=num_layers,
                                   vardeq=vardeq, vardeq_hidden=8, vardeq_layers=1)


def test_reference_layers_pass_every_check():
    assert lesson03.checkerboard_mask_problems(flows.checkerboard_mask) == []
    assert lesson03.channel_mask_problems(flows.channel_mask) == []
    assert lesson03.coupling_problems(flows.AffineCoupling) == []
    assert lesson03.coupling_init_problems(flows.AffineCoupling) == []
    assert lesson03.simple_flow_problems(_simple_flow, flows.AffineCoupling) == []


class _ScaledKeptHalf(flows.AffineCoupling):
    def _scale_shift(self, x_masked, mask, context):
        s, t = super()._scale_shift(x_masked, mask, context)
        return s + 0.1 * mask, t

    def forward(self, x, context=None):
        mask = self.get_mask(x)
        s, t = self._scale_shift(x * mask, mask, context)
        return x * torch.exp(s) + t, s.flatten(1).sum(1)


class _Unbounded(flows.AffineCoupling):
    def _scale_shift(self, x_masked, mask, context):
        s_raw, t = self.net(x_masked).chunk(2, dim=1)
        return s_raw * (1 - mask), t * (1 - mask)


class _NotIdentity(flows.AffineCoupling):
    def __init__(self, c_in, mask, net=None, **kwargs):
        super().__init__(c_in, mask, net, **kwargs)
        if net is None:
            torch.nn.init.normal_(self.net.last.weight, std=0.1)


def _joined(problems):
    return "\n".join(problems)


def test_checks_name_the_mistake():
    def odd_parity(h, w, invert=False):
        return flows.checkerboard_mask(h, w, not invert)

    def second_half(c, invert=False):
        return flows.channel_mask(c, not invert)

    assert "top-left" in _joined(lesson03.checkerboard_mask_problems(odd_parity))
    second = lesson03.channel_mask_problems(second_half)
    assert "first half" in _joined(second)
    assert "masked half passes through unchanged" in _joined(
        lesson03.coupling_problems(_ScaledKeptHalf))
    assert "log_scale" in _joined(lesson03.coupling_problems(_Unbounded))
    assert "not the identity" in _joined(lesson03.coupling_init_problems(_NotIdentity))

    def same_mask(shape=(1, 28, 28), num_couplings=8, c_hidden=32, num_layers=2, vardeq=False):
        model = _simple_flow(shape, num_couplings, c_hidden, num_layers, vardeq)
        for layer in model.flow.layers[1:]:
            layer.mask_name = "checkerboard"
        return model

    assert "same mask" in _joined(lesson03.simple_flow_problems(same_mask, flows.AffineCoupling))


def test_self_check_flags_the_reference(capsys):
    assert not lesson03.check_checkerboard_mask(flows.checkerboard_mask)
    assert "Write your own" in capsys.readouterr().out
    assert lesson03.coupling_independence(flows.AffineCoupling)
