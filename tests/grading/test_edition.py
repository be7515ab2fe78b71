"""The grading edition of the package: a lesson's kernel holds none of its answers.

Fast tests build each lesson's edition into a temporary folder and import it in a
subprocess (the edition first on ``sys.path``, the working directory outside the repo);
one test starts a sandboxed kernel for a lesson and looks for the real source from inside.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nfcourse
from nfcourse.grade.edition import EXERCISES, build_edition, edition_for, removals
from nfcourse.grade.sandbox import isolation_problems

PACKAGE = Path(nfcourse.__file__).resolve().parent
LESSONS = sorted(EXERCISES)


@pytest.fixture(scope="module")
def editions(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("editions")
    return {lesson: build_edition(lesson, root / lesson) for lesson in LESSONS}


def run_in(edition: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(edition), "PYTHONDONTWRITEBYTECODE": "1",
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_lesson_without_an_entry_gets_no_reference_at_all(tmp_path):
    everything = {(r.module, r.name) for lesson in LESSONS for r in removals(lesson)}
    assert {(r.module, r.name) for r in removals("07_new")} == everything
    assert all(r.lesson == "07_new" for r in removals("07_new"))
    with pytest.raises(ValueError, match="not a lesson name"):
        build_edition("../x", tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("lesson", LESSONS)
def test_edition_has_no_grading_code_no_bytecode_and_is_read_only(editions, lesson):
    root = editions[lesson] / "nfcourse"
    assert (root / "__init__.py").is_file() and (root / "removed.py").is_file()
    assert not (root / "grade").exists()
    assert not [p for p in root.rglob("*") if p.name == "__pycache__" or p.suffix == ".pyc"]
    assert all(not os.access(p, os.W_OK) or os.geteuid() == 0 for p in root.rglob("*"))
    assert (root / "assets" / "logo.png").read_bytes() == (PACKAGE / "assets" / "logo.png"
                                                           ).read_bytes()


def _distinctive_lines(module: str, name: str) -> list[str]:
    """Source lines of the removed definition that only it has in the package."""
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(path.read_text())
    cls, _, member = name.partition(".")
    node = next(n for n in tree.body if getattr(n, "name", None) == cls)
    if member:
        node = next(n for n in node.body if getattr(n, "name", None) == member)
    lines = path.read_text().splitlines()[node.lineno - 1: node.end_lineno]
    everywhere = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py")
                           if "grade" not in p.relative_to(PACKAGE).parts)
    out = []
    for line in lines:
        text = line.strip()
        if (len(text) > 25 and not text.startswith(("#", '"', "'", "Args", "Example"))
                and everywhere.count(text) == 1):
            out.append(text)
    return out


@pytest.mark.parametrize("lesson", LESSONS)
def test_no_source_line_of_a_removed_definition_is_left(editions, lesson):
    text = "\n".join(p.read_text() for p in (editions[lesson] / "nfcourse").rglob("*.py"))
    for r in removals(lesson):
        lines = _distinctive_lines(r.module, r.name)
        assert lines, f"{r.module}:{r.name} has no distinctive line to look for"
        left = [line for line in lines if line in text]
        assert not left, f"{lesson}: {r.what} left behind {left[:3]}"


@pytest.mark.parametrize("lesson", LESSONS)
def test_every_removed_name_raises_naming_the_exercise_every_way(editions, lesson, tmp_path):
    cases = [(r.module, r.name, r.what, r.exercise) for r in removals(lesson)]
    result = run_in(editions[lesson], f"""
        import importlib, json
        import nfcourse
        bad = []
        def expect(how, fn, exercise):
            try:
                value = fn()
            except nfcourse.ExerciseRemoved as err:
                if f"exercise '{{exercise}}'" not in str(err) or "Write your own" not in str(err):
                    bad.append((how, "message: " + str(err)))
                return
            except Exception as err:
                bad.append((how, "raised " + type(err).__name__ + ": " + str(err)))
                return
            bad.append((how, "reachable: " + repr(value)[:80]))
        for module, name, what, exercise in {cases!r}:
            public = what.rsplit(".", 1)[0]
            head, _, member = name.partition(".")
            places = {{module}} if member else {{module, public}}
            for place in sorted(places):
                mod = importlib.import_module(place)
                if member:   # a removed method: from the class and from the class's namespace
                    cls = getattr(mod, head)
                    expect(place + ":" + name, lambda: getattr(cls, member), exercise)
                    continue
                if place == "nfcourse.flows" and head == "glow":
                    continue  # nfcourse.flows.glow is also the name of the Glow layers' module
                expect("from " + place, lambda: exec(f"from {{place}} import {{head}}", {{}}),
                       exercise)
                expect("attribute " + place, lambda: getattr(mod, head), exercise)
                computed = "".join(reversed(head[::-1]))  # a name built at run time
                expect("computed " + place,
                       lambda: getattr(importlib.import_module(place), computed), exercise)
                expect("import " + place, lambda: exec(f"import {{place}}\\n{{place}}.{{head}}",
                                                       {{}}), exercise)
        print(json.dumps(bad))
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_a_removed_method_leaves_the_rest_of_the_class(editions, tmp_path):
    result = run_in(editions["02_dequantization"], """
        import torch, nfcourse
        from nfcourse.flows import Compose, FlowModel, StandardNormal
        class Shift(torch.nn.Module):
            levels = None
            def forward(self, x, context=None):
                return x + 1, torch.zeros(len(x))
            def inverse(self, z, context=None):
                return z - 1, torch.zeros(len(z))
        model = FlowModel(Compose([Shift()]), StandardNormal((3,)))
        print(model.log_prob(torch.zeros(2, 3)).shape, model.sample(4).shape)
        try:
            model.bits_per_dim(torch.zeros(2, 3))
        except nfcourse.ExerciseRemoved as err:
            print("removed:", err.exercise)
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["torch.Size([2])", "torch.Size([4,", "3])", "removed:",
                                     "bits_per_dim"]


SCAFFOLDING = {
    # what each lesson's notebook uses from the package, and earlier lessons' layers
    "01_two_moons_realnvp": """
        from nfcourse import viz
        from nfcourse.checks import lesson01
        from nfcourse.data.toy import entropy_two_moons, two_moons
        from nfcourse.train import fit
        import torch
        x, _ = two_moons(64, seed=0)
        class Affine(torch.nn.Module):
            def __init__(self):
                super().__init__(); self.b = torch.nn.Parameter(torch.zeros(2))
            def forward(self, x): return x + self.b, torch.zeros(len(x))
            def inverse(self, z): return z - self.b, torch.zeros(len(z))
        class Density(torch.nn.Module):
            def __init__(self):
                super().__init__(); self.flow = Affine()
            def log_prob(self, x):
                z, ld = self.flow(x); return -0.5 * (z ** 2).sum(1) - 1.8378770664 + ld
            def loss(self, x): return -self.log_prob(x).mean()
            loss_unit = "nats"
        fit(Density(), x, steps=3, batch_size=32, progress=False)
        assert lesson01.check_warmup(1 / 6, lambda z1, z2: 4 * z1 * z2)
    """,
    "02_dequantization": """
        from nfcourse.flows import AffineCoupling, Compose, Flow, Sigmoid, StandardNormal
        from nfcourse.checks import lesson02
        from nfcourse.data import lesson_images
        import torch
        layer = AffineCoupling(1, "checkerboard", c_hidden=4, num_layers=1)
        z, ld = layer(torch.randn(2, 1, 4, 4))
        assert z.shape == (2, 1, 4, 4) and lesson02.NoiseFlowForTests() is not None
    """,
    "03_coupling_layers": """
        import torch
        from nfcourse.flows import (Compose, Dequantization, FlowModel, GatedConvNet,
                                    StandardNormal, VariationalDequantization)
        from nfcourse.checks import lesson03
        from nfcourse.train import evaluate, fit
        x = torch.randint(0, 256, (4, 1, 4, 4))
        z, ld = Dequantization()(x)          # lesson 02's layer is kept
        class Identity(torch.nn.Module):
            def forward(self, e, context=None): return e, torch.zeros(len(e))
        vd = VariationalDequantization(channels=1, coupling=lambda i: Identity())
        z, ld = vd(x)
        model = FlowModel(Compose([Dequantization()]), StandardNormal((1, 4, 4)))
        assert model.bits_per_dim(x).shape == (4,)   # lesson 02's bits/dim is kept
        try:
            VariationalDequantization(channels=1)      # the default is made of the couplings
        except nfcourse.ExerciseRemoved as err:
            assert err.exercise == "coupling"
        else:
            raise AssertionError("the default noise flow ran the reference couplings")
    """,
    "04_multiscale": """
        import torch
        from nfcourse.flows import AffineCoupling, Dequantization, channel_mask, checkerboard_mask
        from nfcourse.checks import lesson04
        z, _ = AffineCoupling(4, "channel", c_hidden=4, num_layers=1)(torch.randn(2, 4, 2, 2))
        assert checkerboard_mask(2, 2).shape == (1, 1, 2, 2)
    """,
    "05_glow": """
        import torch
        from nfcourse.flows import (AffineCoupling, Compose, Dequantization, FlowModel,
                                    ReversePermutation, Split, Squeeze, StandardNormal)
        from nfcourse.checks import lesson05
        z, _ = Squeeze()(torch.randn(2, 1, 4, 4))
        z, _ = ReversePermutation(4)(z)
    """,
    "06_ffjord_gifs": """
        import torch
        from nfcourse import viz
        from nfcourse.flows import Flow, realnvp_2d
        from nfcourse.checks import lesson06
        from nfcourse.data import image_density, logo_path, two_moons
        model = realnvp_2d(num_layers=2, hidden=8)    # lesson 01's layers are kept
        assert model.log_prob(torch.zeros(3, 2)).shape == (3,)
        import os
        assert os.path.isfile(logo_path())
    """,
}


@pytest.mark.parametrize("lesson", LESSONS)
def test_scaffolding_the_lesson_uses_works(editions, lesson, tmp_path):
    result = run_in(editions[lesson], "import nfcourse\nassert 'editions' in nfcourse.__file__"
                    + textwrap.dedent(SCAFFOLDING[lesson]) + "\nprint('ok')\n", tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_edition_for_caches_per_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("NFCOURSE_EDITION_CACHE", str(tmp_path / "cache"))
    first = edition_for("05_glow")
    assert edition_for("05_glow") == first
    assert first.parent == tmp_path / "cache" and first.name.startswith("05_glow-")
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no leftovers


@pytest.mark.skipif(bool(isolation_problems()), reason="no sandbox here")
def test_sandboxed_kernel_cannot_reach_the_real_source_or_flow_libraries(tmp_path, monkeypatch):
    """In lesson 03's grading kernel: the kept layers have their source, the real files read
    as the edition's, the grading code and normflows are not importable."""
    from nfcourse.grade.kernel import SandboxedKernelManager

    monkeypatch.setenv("NFCOURSE_EDITION_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    real_coupling = PACKAGE / "flows" / "coupling.py"
    probe = textwrap.dedent(f"""
        import importlib.util, inspect, json, sys
        import nfcourse, nfcourse.flows
        out = {{}}
        kept = inspect.getsource(nfcourse.flows.Dequantization)
        out["kept_source"] = "class Dequantization" in kept
        text = open({str(real_coupling)!r}).read()
        out["real_file_is_edition"] = ("Grading edition" in text
                                       and "class AffineCoupling" not in text)
        out["grade"] = importlib.util.find_spec("nfcourse.grade") is None
        try:
            import normflows
            out["normflows"] = "imported"
        except ImportError as err:
            out["normflows"] = str(err)
        try:
            from nfcourse.flows import AffineCoupling
            out["coupling"] = "imported"
        except nfcourse.ExerciseRemoved as err:
            out["coupling"] = str(err)
        import os
        out["pycache"] = [p for p, d, f in os.walk(os.path.dirname(nfcourse.__file__))
                          if "__pycache__" in d]
        print(json.dumps(out))
    """)

    async def ask() -> str:
        km = SandboxedKernelManager(kernel_name="python3", lesson="03_coupling_layers")
        await km.start_kernel(cwd=str(work), env=dict(os.environ))
        kc = km.client()
        kc.start_channels()
        printed: list[str] = []
        try:
            await kc.wait_for_ready(timeout=60)
            await kc.execute_interactive(probe, timeout=120, output_hook=lambda msg: printed.append(
                msg["content"].get("text", "") if msg["msg_type"] == "stream" else ""))
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
        return "".join(printed)

    out = json.loads(asyncio.run(ask()).strip().splitlines()[-1])
    assert out["kept_source"] and out["real_file_is_edition"] and out["grade"], out
    assert "not available in the grading sandbox" in out["normflows"], out
    assert "exercise 'coupling'" in out["coupling"], out
    assert out["pycache"] == [], out
