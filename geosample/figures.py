"""Figures as PNG bytes: sample sheets (batches of images in [-1, 1] as labelled grids, PIL) and
the trajectory-geometry figures (matplotlib, the ``plots`` extra)."""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # PIL is imported where it is used
    import torch
    from PIL import Image

__all__ = ["image_grid", "labelled_panels", "png_bytes", "geometry_figures"]


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
    from PIL import Image, ImageDraw, ImageFont

    try:   # Pillow >= 10.1 with FreeType: a real font (the bitmap default squeezes spaces: "RMSE0.038")
        font = ImageFont.load_default(size=12)
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
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
        draw.text((x, 2), label, fill="black", font=font)
        out.paste(g, (x, top))
        x += g.width + pad
    return out


def _band(ax, x, v, color, label, show=4):
    """Mean line, 10-90% band and ``show`` individual samples of v [B, T] against x [T]."""
    import torch

    q = torch.quantile(v, torch.tensor([0.1, 0.9], dtype=v.dtype), dim=0)
    ax.fill_between(x, q[0], q[1], color=color, alpha=0.25, lw=0)
    for row in v[:show]:
        ax.plot(x, row, color=color, lw=0.5, alpha=0.6)
    ax.plot(x, v.mean(0), color=color, lw=2, label=label)


def _sigma_axis(ax, ylabel, logy=False):
    ax.set_xscale("log")
    ax.invert_xaxis()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("sigma (sampling runs right)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def geometry_figures(m: dict, title: str) -> dict:
    """name -> PNG bytes of the four geometry figures (boomerang, explained_variance, projection_3d,
    curvature) of :func:`geosample.geometry.measure`'s output."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the geometry figures need matplotlib: pip install 'geosample-diffusion[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    s = m["sigmas"].numpy()
    out = {}

    def png(fig, name):
        fig.set_layout_engine("constrained")   # room for every axis label and title (fixed margins clipped them)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        out[name] = buf.getvalue()

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    _band(ax[0, 0], s, m["relative_deviation"], "C0", "sampling trajectory x_t")
    _sigma_axis(ax[0, 0], "deviation from chord / chord length")
    _band(ax[0, 1], s[:-1], m["deviation_denoised"], "C1", "denoising trajectory D(x_t)")
    _sigma_axis(ax[0, 1], "deviation from chord of D outputs")
    _band(ax[1, 0], s, m["distance_to_end"], "C2", "|x_t - x_end|")
    _band(ax[1, 0], s[:-1], m["norms"]["direction"] * torch.as_tensor(s[:-1]), "C3", "sigma |d_t|")
    _sigma_axis(ax[1, 0], "distance", logy=True)
    _band(ax[1, 1], s[:-1], m["cosine"], "C4", "cos(d_t, x_t - x_end)")
    _sigma_axis(ax[1, 1], "cosine")
    for a in ax.flat:
        a.legend(fontsize=8)
    fig.suptitle(f"{title}: the boomerang (mean, 10-90% band, 4 samples)")
    png(fig, "boomerang")

    fig, ax = plt.subplots(figsize=(6, 4))
    k = torch.arange(1, m["ev_chord"].shape[1] + 1).numpy()
    for key, color, label in (("ev_chord", "C0", "chord removed"), ("ev_plain", "C1", "plain PCA"),
                              ("ev_denoised", "C2", "denoising traj., chord removed")):
        v = m[key]
        ax.fill_between(k[: v.shape[1]], v.amin(0), v.amax(0), color=color, alpha=0.25, lw=0)
        ax.plot(k[: v.shape[1]], v.mean(0), "o-", color=color, ms=3, label=f"{label} (k=2: mean {float(v[:, 1].mean()):.4f})")
    ax.axhline(0.99, color="gray", ls="--", lw=1)
    ax.set_xlabel("k principal components")
    ax.set_ylabel("explained variance (mean, min-max)")
    ax.set_ylim(min(0.5, float(m["ev_denoised"][:, 0].min())), 1.005)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}: explained variance vs k", fontsize=10)
    png(fig, "explained_variance")

    fig = plt.figure(figsize=(11, 4.5))
    c = m["aligned"] / m["chord"][:, None, None]
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    for row in c:
        ax3.plot(row[:, 0], row[:, 1], row[:, 2], lw=0.6, alpha=0.6)
    ax3.set_xlabel("chord")
    ax3.set_ylabel("PC1")
    ax3.set_zlabel("PC2")
    ax3.set_title("(chord, PC1, PC2), Procrustes-aligned, / chord length", fontsize=9)
    ax2 = fig.add_subplot(1, 2, 2)
    for row in c:
        ax2.plot(row[:, 0], row[:, 1], lw=0.6, alpha=0.6)
    ax2.plot([0, 1], [0, 0], "k--", lw=1, label="chord")
    ax2.set_xlabel("along the chord (x_T at 0, sample at 1)")
    ax2.set_ylabel("PC1")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{title}: {c.shape[0]} trajectories in 3-D")
    png(fig, "projection_3d")

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    _band(ax[0], s, m["kappa"], "C0", "curvature")
    _sigma_axis(ax[0], "curvature (1 / length)", logy=True)
    _band(ax[1], s, m["tau"].clamp_min(1e-12), "C1", "torsion")
    _sigma_axis(ax[1], "torsion (1 / length)", logy=True)
    for a in ax:
        a.legend(fontsize=8)
    fig.suptitle(f"{title}: curvature and torsion along the path (local cubic fit in arc length)")
    png(fig, "curvature")
    return out
