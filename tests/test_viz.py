"""nfcourse.viz: figures are Figures, GIFs are readable and have the frames asked for."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_flows import moons, tiny_realnvp  # noqa: E402

from nfcourse import viz  # noqa: E402
from nfcourse.train import fit  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = tiny_realnvp(layers=4)
    x = moons(512)
    history = fit(
        model,
        x,
        steps=30,
        batch_size=128,
        lr=5e-3,
        device="cpu",
        progress=False,
        val_data=x[:128],
        val_every=10,
    )
    return model, x, history


def _frames(path):
    with Image.open(path) as im:
        assert im.format == "GIF"
        n = im.n_frames
        for i in range(n):
            im.seek(i)
            im.convert("RGB")
        return n, im.size


def test_figures_are_figures(trained):
    model, x, history = trained
    for fig in (
        viz.flow_panels(model, x, n=200),
        viz.flow_panels(tiny_realnvp(), x, n=200),  # untrained: near the identity
        viz.flow_panels(model.flow, x, n=200),  # a bare flow and the default prior
        viz.density_heatmap(model, extent=(-3, 3, -3, 3), grid=40),
        viz.density_heatmap(lambda p: -0.5 * (p**2).sum(1), grid=30, log=True),
        viz.loss_curve(history),
        viz.loss_curve(history.to_dict()),
        viz.loss_curve([3.0, 2.0, 1.5]),
        viz.image_grid(torch.randint(0, 256, (10, 1, 8, 8)), nrow=5),
        viz.image_grid(torch.rand(4, 3, 6, 6), nrow=2, title="rgb"),
    ):
        assert isinstance(fig, Figure)
    ax = viz.loss_curve(history).axes[0]
    assert "nats" in ax.get_ylabel()


def test_image_grid_layout():
    grid = viz._to_grid_array(torch.zeros(5, 1, 4, 4), nrow=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and grid.dtype == np.uint8


def test_interpolation_grid_is_a_figure():
    class PixelFlow(torch.nn.Module):  # elementwise scaling of images
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, context=None):
            return x * self.a, x.new_zeros(len(x))

        def inverse(self, z, context=None):
            return z / self.a, z.new_zeros(len(z))

    imgs = torch.randint(0, 256, (4, 1, 6, 6)).float()
    fig = viz.interpolation_grid(PixelFlow(), imgs[:2], imgs[2:], steps=5)
    assert isinstance(fig, Figure)


def test_layer_morph_gif_has_the_requested_frames(trained, tmp_path):
    model, _, _ = trained
    gif = viz.layer_morph_gif(
        model.flow.layers, 300, tmp_path / "m.gif", frames_per_layer=3, dpi=40
    )
    n, size = _frames(gif.path)
    assert gif.frames == n == 3 * 4 + 1
    assert size[0] > 50
    # a model and a list of layers give the same thing; the GIF shows inline in a notebook
    gif2 = viz.layer_morph_gif(
        model, torch.randn(100, 2), tmp_path / "m2.gif", frames_per_layer=2, dpi=40
    )
    assert gif2.frames == 2 * 4 + 1
    assert "data:image/gif;base64" in gif2._repr_html_()
    assert str(gif2) == str(tmp_path / "m2.gif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gif", "m2.gif"]


def test_ode_morph_gif_from_states_and_from_an_object_with_sample_path(tmp_path):
    t = torch.linspace(0, 1, 7)
    z = torch.randn(200, 2)
    states = torch.stack([z * (1 + s) + s for s in t])  # (T, B, 2)
    gif = viz.ode_morph_gif(states, tmp_path / "ode.gif", times=t, dpi=40)
    assert _frames(gif.path)[0] == gif.frames == 7

    class FakeCNF:
        def sample_path(self, z, times):
            return torch.stack([z + float(s) for s in times])

    gif = viz.ode_morph_gif(
        FakeCNF(), tmp_path / "ode2.gif", times=torch.linspace(0, 1, 5), n=100, dpi=40
    )
    assert _frames(gif.path)[0] == 5
    with pytest.raises(ValueError):
        viz.ode_morph_gif(np.zeros((3, 10, 3)), tmp_path / "bad.gif")


def test_side_by_side_gif_and_show_gif(tmp_path):
    a = viz.write_gif(
        [np.full((20, 30, 3), i * 20, np.uint8) for i in range(4)], tmp_path / "a.gif"
    )
    b = viz.write_gif(
        [np.full((24, 16, 3), 200 - i * 9, np.uint8) for i in range(9)], tmp_path / "b.gif"
    )
    assert (a.frames, b.frames) == (4, 9)
    both = viz.side_by_side_gif(a, b.path, tmp_path / "ab.gif", gap=2)
    n, size = _frames(both.path)
    assert both.frames == n == 9 and size == (30 + 2 + 16, 24)
    img = viz.show_gif(both)
    assert img.format == "gif" and len(img.data) > 0


def test_write_gif_merges_identical_frames():
    frames = [np.zeros((8, 8, 3), np.uint8)] * 3 + [np.full((8, 8, 3), 255, np.uint8)]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        gif = viz.write_gif(frames, f"{d}/x.gif", fps=10, hold_last=0)
        assert gif.frames == 2
        _, durations = viz.read_gif(gif.path)
        assert durations == [300, 100]


def test_explorer_over_layers_and_over_time(trained):
    model, _, _ = trained
    states = viz.layer_states(model, torch.randn(100, 2))
    box = viz.explorer(states, [f"layer {i}" for i in range(len(states))])
    assert box.slider.max == len(states) - 1
    box.slider.value = 2  # redraws
    assert isinstance(box.redraw(len(states) - 1), Figure)
    timeline = viz.explorer(
        torch.randn(5, 50, 2), [f"t = {t:.2f}" for t in range(5)], description="t"
    )
    timeline.slider.value = 4
    images = viz.explorer([torch.rand(4, 1, 5, 5) for _ in range(3)], description="temp")
    images.slider.value = 1
