"""Lesson 02: correct answers in styles other than the solution's (see ``__init__``)."""

from __future__ import annotations

from alternatives import Alternative

LESSON = "02_dequantization"
# pictures, the float32 demonstrations and the MNIST training: no test needs them
SKIP = ("# Self-check", "rng = np.random", "def volumes", "layer = Dequantization()",
        "n_images", "data = lesson_images()", "class PixelAffine", "ks = (1, 4, 16)",
        "with torch.no_grad():", "fig, axes")

# -------------------------------------------------------------------- dequantization
DEQ_SPECIAL = '''\
class Dequantization(Flow):
    """torch.special.logit / expit, the log-det as -log(v (1 - v)) + constants, checks in
    a helper."""

    def __init__(self, levels=256, alpha=1e-5):
        super().__init__()
        self.levels = int(levels)
        self.alpha = float(alpha)

    def _validate(self, x):
        bad = (x < 0) | (x > self.levels - 1) | (torch.frac(x) != 0)
        if torch.any(bad):
            value = x[bad].flatten()[0].item()
            raise ValueError(f"pixel value {value} is not an integer in [0, {self.levels - 1}]")

    def _constant(self):
        return math.log1p(-2 * self.alpha) - math.log(self.levels)

    def forward(self, x, context=None, noise=None):
        x = x if torch.is_floating_point(x) else x.to(torch.get_default_dtype())
        self._validate(x)
        u = noise if noise is not None else torch.rand_like(x)
        v = self.alpha + (1 - 2 * self.alpha) * (x + u) / self.levels
        z = torch.special.logit(v)
        per_dim = self._constant() - torch.log(v) - torch.log1p(-v)
        return z, per_dim.reshape(x.shape[0], -1).sum(dim=1)

    def inverse(self, z, context=None):
        v = torch.special.expit(z)
        y = (v - self.alpha) * self.levels / (1 - 2 * self.alpha)
        x = torch.clamp(torch.floor(y), min=0, max=self.levels - 1)
        per_dim = -self._constant() - F.softplus(-z) - F.softplus(z)
        return x, per_dim.reshape(z.shape[0], -1).sum(dim=1)
'''

DEQ_COMPOSED = '''\
class _Squash:
    """x in [0, L] to (alpha, 1 - alpha) and back: a tiny helper object, not a layer."""

    def __init__(self, levels, alpha):
        self.levels, self.alpha = levels, alpha
        self.scale = (1 - 2 * alpha) / levels

    def to_unit(self, y):
        return self.alpha + self.scale * y

    def from_unit(self, v):
        return (v - self.alpha) / self.scale


class Dequantization(Flow):
    """The squash in a helper object; logit written as log(v) - log(1 - v) on the sum of
    logs; validation with torch.isclose against the rounded values."""

    def __init__(self, levels=256, alpha=1e-5):
        super().__init__()
        self.levels = int(levels)
        self.alpha = float(alpha)

    def forward(self, x, context=None, noise=None):
        if x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            x = x.to(torch.get_default_dtype())
        if x.min() < 0 or x.max() > self.levels - 1 or not torch.equal(x, x.round()):
            raise ValueError("Dequantization needs integer pixels between 0 and "
                             f"{self.levels - 1}")
        squash = _Squash(self.levels, self.alpha)
        u = torch.rand_like(x) if noise is None else noise
        v = squash.to_unit(x + u)
        log_v, log_w = v.log(), (-v).log1p()
        log_det = (math.log(squash.scale) - log_v - log_w).flatten(start_dim=1).sum(-1)
        return log_v - log_w, log_det

    def inverse(self, z, context=None):
        squash = _Squash(self.levels, self.alpha)
        v = torch.sigmoid(z)
        x = squash.from_unit(v).floor().clamp(0, self.levels - 1)
        log_det = (F.logsigmoid(z) + F.logsigmoid(-z) - math.log(squash.scale))
        return x, log_det.flatten(start_dim=1).sum(-1)
'''

# ----------------------------------------------------------------------- bits per dim
BPD_PROD = '''\
def bits_per_dim(log_prob, x):
    dims = math.prod(x.shape[1:])
    return -log_prob / math.log(2) / dims
'''

BPD_LOG2 = '''\
def bits_per_dim(log_prob, x):
    nats_per_dim = -log_prob / x.flatten(1).shape[1]
    return nats_per_dim * math.log2(math.e)
'''

# -------------------------------------------------------------------- importance bound
IW_LOGADDEXP = '''\
def importance_bpd(log_prob, x, k=8):
    """A running logaddexp over the k draws instead of one stack."""
    total = None
    for _ in range(k):
        log_w = log_prob(x)
        total = log_w if total is None else torch.logaddexp(total, log_w)
    bound = total - math.log(k)
    return bits_per_dim(bound, x)
'''

IW_MEAN_EXP = '''\
def importance_bpd(log_prob, x, k=8):
    """The log of the mean weight, shifted by its maximum for stability."""
    log_w = torch.stack([log_prob(x) for _ in range(k)], dim=1)      # (B, k)
    top = log_w.max(dim=1, keepdim=True).values
    log_mean = top.squeeze(1) + torch.log(torch.exp(log_w - top).mean(dim=1))
    return -log_mean / (x[0].numel() * math.log(2))
'''

# --------------------------------------------------------------- variational dequantization
VARDEQ_DISTRIBUTIONS = '''\
class VariationalDequantization(Dequantization):
    """log N(eps) from torch.distributions; the parent's forward called explicitly."""

    def __init__(self, noise_flow, levels=256, alpha=1e-5):
        super().__init__(levels, alpha)
        self.noise_flow = noise_flow

    def forward(self, x, context=None, noise=None):
        x = x.to(torch.get_default_dtype()) if not x.is_floating_point() else x
        eps = noise if noise is not None else torch.randn_like(x)
        ctx = 2 * x / (self.levels - 1) - 1
        u, log_det_u = self.noise_flow(eps, ctx)
        normal = torch.distributions.Normal(torch.zeros_like(eps), torch.ones_like(eps))
        log_q = normal.log_prob(eps).reshape(len(eps), -1).sum(1) - log_det_u
        z, log_det = Dequantization.forward(self, x, noise=u)
        return z, log_det - log_q
'''

VARDEQ_HELPERS = '''\
def standard_normal_log_density(eps):
    return -0.5 * (eps.pow(2).flatten(1).sum(1) + eps[0].numel() * math.log(2 * math.pi))


class VariationalDequantization(Dequantization):
    """log q computed by a module-level helper; context with torch.lerp."""

    def __init__(self, noise_flow, levels=256, alpha=1e-5):
        super().__init__(levels, alpha)
        self.noise_flow = noise_flow

    def context(self, x):
        return torch.lerp(-torch.ones_like(x), torch.ones_like(x), x / (self.levels - 1))

    def forward(self, x, context=None, noise=None):
        if not torch.is_floating_point(x):
            x = x.to(torch.get_default_dtype())
        eps = torch.randn_like(x) if noise is None else noise
        u, log_det_u = self.noise_flow(eps, self.context(x))
        z, log_det = super().forward(x, noise=u)
        return z, log_det + log_det_u - standard_normal_log_density(eps)
'''

ALTERNATIVES = [
    Alternative("special_functions", "torch.special.logit/expit, softplus log-dets, "
                "validation helper, math.prod bits/dim",
                {"dequantization_answer": DEQ_SPECIAL, "bits_per_dim_answer": BPD_PROD}),
    Alternative("helper_object", "the squash in a helper object, log-det from log(scale), "
                "log2(e) bits/dim, running logaddexp bound",
                {"dequantization_answer": DEQ_COMPOSED, "bits_per_dim_answer": BPD_LOG2,
                 "importance_bpd_answer": IW_LOGADDEXP}),
    Alternative("mean_exp_bound", "importance bound as a max-shifted log-mean-exp; "
                "variational layer with torch.distributions and the parent called by name",
                {"importance_bpd_answer": IW_MEAN_EXP, "vardeq_answer": VARDEQ_DISTRIBUTIONS}),
    Alternative("vardeq_helpers", "variational layer with a module-level log-density helper "
                "and a torch.lerp context",
                {"vardeq_answer": VARDEQ_HELPERS}),
    Alternative("special_with_vardeq", "special-function layer under the torch.distributions "
                "variational layer, logaddexp bound",
                {"dequantization_answer": DEQ_SPECIAL, "importance_bpd_answer": IW_LOGADDEXP,
                 "vardeq_answer": VARDEQ_DISTRIBUTIONS}),
    Alternative("all_different", "every answer cell in a style of its own at once",
                {"dequantization_answer": DEQ_COMPOSED, "bits_per_dim_answer": BPD_PROD,
                 "importance_bpd_answer": IW_MEAN_EXP, "vardeq_answer": VARDEQ_HELPERS}),
]
