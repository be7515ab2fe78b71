"""Reference normalizing-flow layers and models used across the course.

Every layer follows the contract of :class:`Flow` (see ``CONTRIBUTING.md``):
``forward(x, context=None) -> (z, log_det)`` from data to noise and
``inverse(z, context=None) -> (x, log_det)`` back, ``log_det`` of shape ``(batch,)``.
"""

from nfcourse.flows.base import Compose, Flow, Inverse
from nfcourse.flows.builders import glow, multiscale_flow, realnvp_2d, simple_image_flow
from nfcourse.flows.coupling import AffineCoupling, MaskedAffineCoupling
from nfcourse.flows.dequantization import (
    Dequantization,
    LogitTransform,
    Sigmoid,
    VariationalDequantization,
    check_pixels,
)
from nfcourse.flows.glow import (
    ActNorm,
    GlowStep,
    InvConv1x1,
    InvConv1x1LU,
    RandomPermutation,
    ReversePermutation,
)
from nfcourse.flows.masks import alternating_mask, channel_mask, checkerboard_mask
from nfcourse.flows.model import FlowModel
from nfcourse.flows.multiscale import Split, Squeeze
from nfcourse.flows.nets import MLP, ChannelLayerNorm, ConcatELU, GatedConvNet, GatedResidualBlock
from nfcourse.flows.priors import StandardNormal

__all__ = [
    "Flow",
    "Compose",
    "Inverse",
    "StandardNormal",
    "checkerboard_mask",
    "channel_mask",
    "alternating_mask",
    "MLP",
    "ConcatELU",
    "ChannelLayerNorm",
    "GatedResidualBlock",
    "GatedConvNet",
    "MaskedAffineCoupling",
    "AffineCoupling",
    "LogitTransform",
    "Sigmoid",
    "Dequantization",
    "VariationalDequantization",
    "check_pixels",
    "Squeeze",
    "Split",
    "ActNorm",
    "InvConv1x1",
    "InvConv1x1LU",
    "ReversePermutation",
    "RandomPermutation",
    "GlowStep",
    "FlowModel",
    "realnvp_2d",
    "simple_image_flow",
    "multiscale_flow",
    "glow",
]
