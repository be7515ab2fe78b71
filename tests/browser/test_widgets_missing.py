"""The slider check fails when the widgets cannot render: JupyterLab with the ipywidgets manager
(@jupyter-widgets/jupyterlab-manager) switched off through a temporary page_config.json.

The same probe notebook (``viz.explorer`` over three point clouds, a good and a broken GIF)
passes the slider check on the ordinary server, so the failure comes from the missing extension
and nothing else; there the GIF check also tells the broken GIF from the good one.
"""

from __future__ import annotations

from collections.abc import Iterator

import browserkit as bk
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser-b")]

PROBE = [
    "import numpy as np\nfrom nfcourse import viz\n"
    "rng = np.random.default_rng(0)\n"
    "frames = [rng.normal(size=(300, 2)) * s for s in (1.0, 2.0, 3.0)]",
    "viz.explorer(frames, [f'scale {s}' for s in (1, 2, 3)], description='frame')",
    # a GIF that decodes, then one that does not (a header and nothing else)
    "import io\nfrom IPython.display import Image, display\nfrom PIL import Image as PILImage\n"
    "buf = io.BytesIO()\nPILImage.new('RGB', (16, 8), 'red').save(buf, 'GIF')\n"
    "display(Image(data=buf.getvalue(), format='gif'))\n"
    "display(Image(data=b'GIF89a' + bytes(32), format='gif'))",
]
PROBE_PATH = "probe/explorer.ipynb"


@pytest.fixture(scope="module")
def lab_without_widgets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bk.LabServer]:
    bk.require_browser()
    tmp = tmp_path_factory.mktemp("lab-nowidgets")
    bk.write_notebook(tmp / "root" / PROBE_PATH, PROBE)
    server = bk.LabServer(tmp / "root", tmp / "server", disabled=(bk.WIDGET_MANAGER,)).start()
    yield server
    server.stop()


def test_slider_check_fails_without_widget_manager(lab_without_widgets, tab) -> None:
    page = tab.page
    bk.open_notebook(page, lab_without_widgets, PROBE_PATH)
    disabled = page.evaluate(
        "() => JSON.parse(document.getElementById('jupyter-config-data').textContent)"
        ".disabledExtensions"
    )
    assert bk.WIDGET_MANAGER in disabled
    bk.run_all_cells(page)
    bk.check_all_ran(page, len(PROBE))  # the kernel side is fine ...
    missing = r"expected 1 ipywidgets slider\(s\), the page renders 0"
    with pytest.raises(AssertionError, match=missing) as err:
        bk.check_sliders(page, 1)  # ... but the student sees no slider
    assert "IntSlider" in str(err.value)  # the widget's text repr shows instead
    tab.shot("no_widget_manager", bk.code_cell(page, 1))


def test_slider_check_passes_with_widget_manager(lab_server, tab) -> None:
    bk.write_notebook(lab_server.root / PROBE_PATH, PROBE)
    page = tab.page
    bk.open_notebook(page, lab_server, PROBE_PATH)
    bk.run_all_cells(page)
    bk.check_all_ran(page, len(PROBE))
    (result,) = bk.check_sliders(page, 1)
    assert result.readouts == ("0", "1")
    tab.shot("with_widget_manager", result.locator)
    # The GIF check tells a decoded GIF from a broken one.
    with pytest.raises(AssertionError, match="GIF 1 did not load") as err:
        bk.check_gifs(page, 2)
    assert "'w': 0" in str(err.value)
    with pytest.raises(AssertionError, match="expected 1 GIF"):
        bk.check_gifs(page, 1)
