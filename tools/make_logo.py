"""Draw nfcourse's logo (``nfcourse/assets/logo.png``): dark "NF" letters on white.

The letters are drawn as polygons (no font files), so the output is the same everywhere.
Run ``python tools/make_logo.py`` to regenerate it. Dark pixels carry the mass when the
logo is used as a target density (``nfcourse.data.image_density(logo_path(), n)``).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 96
SUPER = 8  # draw large, then downsample: smooth (anti-aliased) edges
OUT = Path(__file__).resolve().parents[1] / "nfcourse" / "assets" / "logo.png"


def draw(size: int = SIZE) -> Image.Image:
    s = size * SUPER
    img = Image.new("L", (s, s), 255)
    d = ImageDraw.Draw(img)

    def box(x0, y0, x1, y1):
        d.rectangle([x0 * s, y0 * s, x1 * s, y1 * s], fill=0)

    top, bottom, stroke = 0.2, 0.8, 0.1
    # N: two uprights and a diagonal
    nx0, nx1 = 0.1, 0.46
    box(nx0, top, nx0 + stroke, bottom)
    box(nx1 - stroke, top, nx1, bottom)
    d.polygon(
        [
            (nx0 * s, top * s),
            ((nx0 + stroke * 1.3) * s, top * s),
            (nx1 * s, bottom * s),
            ((nx1 - stroke * 1.3) * s, bottom * s),
        ],
        fill=0,
    )
    # F: upright, top bar, middle bar
    fx0 = 0.56
    box(fx0, top, fx0 + stroke, bottom)
    box(fx0, top, 0.9, top + stroke)
    box(fx0, 0.45, 0.8, 0.45 + stroke)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    draw().save(OUT, optimize=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
