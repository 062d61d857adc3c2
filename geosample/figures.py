"""Sample sheets as PNG images: batches of images in [-1, 1] laid out as labelled grids (PIL)."""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # PIL is imported where it is used
    import torch
    from PIL import Image

__all__ = ["image_grid", "labelled_panels", "png_bytes"]


def png_bytes(image: "Image.Image") -> bytes:
    """The PNG file of a PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_grid(images: "torch.Tensor", scale: int) -> "Image.Image":
    """[B, C, H, W] in [-1, 1] (C = 1 or 3) -> a near-square grid (1 px gaps) as a PIL image,
    upscaled by ``scale``."""
    import numpy as np
    import torch
    from PIL import Image

    b, c, h, w = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    px = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for k in range(b):
        r, q = divmod(k, cols)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = px[k].transpose(1, 2, 0)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def labelled_panels(panels: list[tuple[str, "torch.Tensor"]]) -> "Image.Image":
    """Side-by-side image grids, each with its label above it; images smaller than 32 px are
    upscaled by a whole factor."""
    from PIL import Image, ImageDraw

    h, w = panels[0][1].shape[-2:]
    scale = max(1, 32 // max(h, w))
    grids = [(label, image_grid(x, scale).convert("RGB")) for label, x in panels]
    pad, top = 8, 18
    width = sum(g.width for _, g in grids) + pad * (len(grids) + 1)
    height = max(g.height for _, g in grids) + top + pad
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    x = pad
    for label, g in grids:
        draw.text((x, 3), label, fill="black")
        out.paste(g, (x, top))
        x += g.width + pad
    return out
