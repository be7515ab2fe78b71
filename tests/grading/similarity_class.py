"""A small realistic class of lesson 01 for the similarity report (no kernels needed).

:func:`submit_class` hands in, besides the solution: a copy of the package's reference
coupling with its names changed, comments changed and lines reformatted (``carol``), two
students sharing one coupling (``dave``, and ``erin`` who renamed and re-wrapped it),
two honest answers written differently (``alice``, ``bob``), and ``mallory``, whose copy of
dave's answer carries HTML and a script in its comments and strings, and ``frank``, who
hides the disguised reference in a cell of his own above a one-line answer. Every cell but the
coupling is left as released, so only the coupling differs between students.
"""

from __future__ import annotations

import copy

from harness import _meta, released_notebook, student_notebook, submit

from nfcourse.grade import Course

LESSON = "01_two_moons_realnvp"
CELL = "coupling_answer"
REFERENCE = "reference:nfcourse.flows.coupling:MaskedAffineCoupling"

COPIED_REFERENCE = '''class MaskedAffineCoupling(nn.Module):
    def __init__(self, mask, hidden=64):
        super().__init__()
        # my own coupling, written from scratch
        m = torch.as_tensor(mask, dtype=torch.get_default_dtype()).flatten()
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("bad mask")
        if 2.0 <= 0:
            raise ValueError(f"bad bound {2.0}")
        n = m.numel()
        self.n, self.ctx = n, int(0)
        self.register_buffer("mask", m)
        self.net = MLP(n + self.ctx, 2 * n, hidden=hidden, num_hidden=2, zero_init=True)
        lb = torch.full((n,), math.log(2.0))
        self.log_bound = nn.Parameter(lb)

    def _scale_shift(self, xm):
        out = self.net(xm)
        if out.shape != (xm.shape[0], 2 * self.n):
            raise ValueError("the net returned the wrong shape")
        a, b = out.chunk(2, dim=1)
        lim = self.log_bound.exp()
        a = torch.tanh(a / lim) * lim
        keep = 1 - self.mask
        return a * keep, b * keep

    def forward(self, inp):
        a, b = self._scale_shift(inp * self.mask)
        out = inp * self.mask + (1 - self.mask) * (inp * torch.exp(a) + b)
        return out, a.sum(dim=1)

    def inverse(self, out):
        a, b = self._scale_shift(out * self.mask)
        inp = out * self.mask + (1 - self.mask) * ((out - b) * torch.exp(-a))
        return inp, -a.sum(dim=1)
'''

SHARED = '''class MaskedAffineCoupling(nn.Module):
    def __init__(self, mask, hidden=64):
        super().__init__()
        self.register_buffer("m", torch.as_tensor(mask).float())
        d = len(mask)
        self.scale_net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d),
                                       nn.Tanh())
        self.shift_net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))
        for net in (self.scale_net, self.shift_net):
            nn.init.zeros_(net[2].weight)
            nn.init.zeros_(net[2].bias)

    def _st(self, x):
        h = x * self.m
        return self.scale_net(h) * (1 - self.m), self.shift_net(h) * (1 - self.m)

    def forward(self, x):
        s, t = self._st(x)
        y = self.m * x + (1 - self.m) * (x * s.exp() + t)
        return y, torch.sum(s, dim=-1)

    def inverse(self, y):
        s, t = self._st(y)
        x = self.m * y + (1 - self.m) * (y - t) / s.exp()
        return x, -torch.sum(s, dim=-1)
'''

SHARED_EDITED = '''class MaskedAffineCoupling(nn.Module):
    def __init__(self, mask, hidden=64):
        super().__init__()
        # a buffer, so .to(device) moves it
        self.register_buffer("keep", torch.as_tensor(mask).float())
        size = len(mask)
        self.s_net = nn.Sequential(nn.Linear(size, hidden), nn.Tanh(),
                                   nn.Linear(hidden, size), nn.Tanh())
        self.t_net = nn.Sequential(nn.Linear(size, hidden), nn.Tanh(),
                                   nn.Linear(hidden, size))
        for network in (self.s_net, self.t_net):
            nn.init.zeros_(network[2].weight)
            nn.init.zeros_(network[2].bias)

    def _st(self, inputs):
        hidden_in = inputs * self.keep
        return (self.s_net(hidden_in) * (1 - self.keep),
                self.t_net(hidden_in) * (1 - self.keep))

    def forward(self, x):
        scale, shift = self._st(x)
        out = self.keep * x + (1 - self.keep) * (x * scale.exp() + shift)
        return out, torch.sum(scale, dim=-1)

    def inverse(self, y):
        scale, shift = self._st(y)
        x = self.keep * y + (1 - self.keep) * (y - shift) / scale.exp()
        return x, -torch.sum(scale, dim=-1)
'''

HONEST_A = '''class MaskedAffineCoupling(nn.Module):
    def __init__(self, mask, hidden=64):
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.float32)
        self.register_buffer("mask", mask)
        width = mask.shape[0]
        layers = [nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, 2 * width)]
        self.body = nn.Sequential(*layers)
        with torch.no_grad():
            self.body[-1].weight.zero_()
            self.body[-1].bias.zero_()

    def params(self, frozen):
        raw = self.body(frozen)
        log_scale = torch.tanh(raw[:, : raw.shape[1] // 2])
        shift = raw[:, raw.shape[1] // 2 :]
        active = 1.0 - self.mask
        return log_scale * active, shift * active

    def forward(self, x):
        log_scale, shift = self.params(self.mask * x)
        result = torch.where(self.mask.bool(), x, x * log_scale.exp() + shift)
        return result, log_scale.sum(1)

    def inverse(self, z):
        log_scale, shift = self.params(self.mask * z)
        result = torch.where(self.mask.bool(), z, (z - shift) * (-log_scale).exp())
        return result, -log_scale.sum(1)
'''

HONEST_B = '''import torch.nn.functional as F


class MaskedAffineCoupling(nn.Module):
    def __init__(self, mask, hidden=64):
        super().__init__()
        self.register_buffer("b", torch.tensor(mask, dtype=torch.float))
        n = self.b.numel()
        self.w1 = nn.Linear(n, hidden)
        self.w2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, n * 2)
        nn.init.constant_(self.out.weight, 0.0)
        nn.init.constant_(self.out.bias, 0.0)

    def net(self, u):
        u = F.leaky_relu(self.w1(u))
        u = F.leaky_relu(self.w2(u))
        log_s, t = torch.split(self.out(u), self.b.numel(), dim=1)
        return 0.9 * torch.tanh(log_s), t

    def forward(self, x):
        x_fixed = x * self.b
        log_s, t = self.net(x_fixed)
        log_s, t = log_s * (1 - self.b), t * (1 - self.b)
        z = x_fixed + (1 - self.b) * x * torch.exp(log_s) + t
        ldj = torch.einsum("bi->b", log_s)
        return z, ldj

    def inverse(self, z):
        z_fixed = z * self.b
        log_s, t = self.net(z_fixed)
        log_s, t = log_s * (1 - self.b), t * (1 - self.b)
        x = z_fixed + (1 - self.b) * (z - t) * torch.exp(-log_s)
        return x, -torch.einsum("bi->b", log_s)
'''

HOSTILE = SHARED.replace(
    "        super().__init__()\n",
    "        super().__init__()  # </pre><script>alert('pwned')</script>"
    "<img src=x onerror=alert(1)>\n"
    "        self.note = \"<SCRIPT>document.location='http://evil/'</SCRIPT>\"\n", 1)
HOSTILE_ID = "mallory<script>alert(2)<img src=x onerror=alert(3)>"  # a folder name: no "/"

ANSWERS = {"carol": COPIED_REFERENCE, "dave": SHARED, "erin": SHARED_EDITED,
           "alice": HONEST_A, "bob": HONEST_B, HOSTILE_ID: HOSTILE}


def with_answer(course: Course, source: str):
    """The released lesson with ``source`` as its coupling answer (other answers as stubs)."""
    nb = released_notebook(course, LESSON)
    for cell in nb.cells:
        if _meta(cell).get("grade_id") == CELL:
            cell.source = source
    return nb


def hidden_copy(course: Course):
    """``frank``: the disguised reference in a cell of his own above the answer, whose answer
    cell only names it."""
    import nbformat

    nb = with_answer(course, "MaskedAffineCoupling = MyCoupling\n")
    index = next(i for i, c in enumerate(nb.cells) if _meta(c).get("grade_id") == CELL)
    nb.cells.insert(index, nbformat.v4.new_code_cell(
        COPIED_REFERENCE.replace("class MaskedAffineCoupling", "class MyCoupling")))
    return nb


def submit_class(course: Course) -> dict[str, str]:
    """Hand in the class; returns ``student -> coupling answer`` (the solution's included)."""
    solution = student_notebook(course, LESSON)
    submit(course, LESSON, "solution", solution)
    for student, source in ANSWERS.items():
        submit(course, LESSON, student, with_answer(course, source))
    submit(course, LESSON, "frank", hidden_copy(course))
    answer = next(c.source for c in copy.deepcopy(solution).cells
                  if _meta(c).get("grade_id") == CELL)
    return {"solution": answer, **ANSWERS}
