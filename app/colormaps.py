"""The colormaps overlays can be drawn with, as OpenCV lookup tables built once at import."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from app.colormap_tables import TABLES

# A short list a client can offer in a menu; each is one of matplotlib's colormaps, shipped as a table.
ColormapName = Literal["jet", "turbo", "viridis", "inferno", "magma", "plasma", "cividis", "hot", "coolwarm", "gray"]
COLORMAPS: tuple[str, ...] = get_args(ColormapName)


def rgb_table(name: str) -> np.ndarray:
    """[256, 3] uint8: entry i is the RGB colour of a heatmap value i / 255."""
    return np.frombuffer(bytes.fromhex(TABLES[name]), dtype=np.uint8).reshape(256, 3)


# cv2.applyColorMap takes a [256, 1, 3] table in OpenCV's BGR order.
BGR_LOOKUP_TABLES: dict[str, np.ndarray] = {
    name: np.ascontiguousarray(rgb_table(name)[:, None, ::-1]) for name in COLORMAPS
}
