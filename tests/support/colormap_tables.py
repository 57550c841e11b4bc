"""Writes app/colormap_tables.py: the overlay colormaps as 256-entry RGB lookup tables, sampled from matplotlib.

The service ships the tables, not matplotlib. Run it again (from the repository root) only to add or change a
colormap: `.venv/bin/python -m tests.support.colormap_tables` (matplotlib comes with the test extra), then add
the name to `ColormapName` in app/colormaps.py and to the legend in app/static/app.js. A test checks that the
committed tables are what this writes.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

NAMES = ("jet", "turbo", "viridis", "inferno", "magma", "plasma", "cividis", "hot", "coolwarm", "gray")
TARGET = Path(__file__).resolve().parents[2] / "app" / "colormap_tables.py"
COLOURS_PER_LINE = 16


def table_hex(name: str) -> str:
    # Entry i of a 256-entry matplotlib colormap is its colour at i / 255.
    rgba = matplotlib.colormaps[name].resampled(256)(np.arange(256))
    return (np.round(rgba[:, :3] * 255).astype(np.uint8)).tobytes().hex()


def module_text() -> str:
    lines = [
        '"""The overlay colormaps as 256-entry RGB lookup tables (hex, 3 bytes per entry; entry i is the colour of',
        f'a heatmap value i / 255), sampled from matplotlib {matplotlib.__version__}. Written by',
        '`python -m tests.support.colormap_tables`: do not edit by hand."""',
        "",
        "TABLES: dict[str, str] = {",
    ]
    for name in NAMES:
        text = table_hex(name)
        step = 6 * COLOURS_PER_LINE
        lines.append(f'    "{name}": (')
        lines += [f'        "{text[start:start + step]}"' for start in range(0, len(text), step)]
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    TARGET.write_text(module_text())
    print(f"wrote {TARGET}")
