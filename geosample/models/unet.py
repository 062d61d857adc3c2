"""A small UNet with EDM preconditioning (Karras et al. 2022, table 1).

The raw network F predicts a scaled residual; the denoiser is

    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise),
    c_skip = s_d^2 / (sigma^2 + s_d^2),   c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
    c_in = 1 / sqrt(sigma^2 + s_d^2),     c_noise = log(sigma) / 4,

with s_d = sigma_data = 0.5 for images in [-1, 1].  Shapes: x [B, C, H, W], sigma a float or [B].
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["UNet", "EDMDenoiser"]


def _groups(channels: int) -> int:
    return math.gcd(channels, 32)


class NoiseEmbedding(nn.Module):
    """c_noise [B] -> [B, dim]: sinusoidal features of fixed log-spaced frequencies, then an MLP."""

    def __init__(self, dim: int, features: int = 64):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), features // 2)),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angle = c_noise[:, None] * self.freqs[None]
        return self.mlp(torch.cat([angle.cos(), angle.sin()], dim=1))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding scales and shifts the second normalisation."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        return (self.skip(x) + h) / math.sqrt(2.0)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return (x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))) / math.sqrt(2.0)


class UNet(nn.Module):
    """F(x, c_noise): ``len(channel_mult)`` resolutions, ``blocks`` ResBlocks each, attention at the
    lowest resolution.  x [B, channels, H, W] with H, W divisible by 2^(len(channel_mult) - 1)."""

    def __init__(self, channels: int = 3, base: int = 64, channel_mult=(1, 2, 2), blocks: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        emb_dim = 4 * base
        self.embed = NoiseEmbedding(emb_dim)
        self.stem = nn.Conv2d(channels, base, 3, padding=1)
        widths = [base * m for m in channel_mult]
        self.down = nn.ModuleList()
        skips = [base]
        c = base
        for level, w in enumerate(widths):
            for _ in range(blocks):
                self.down.append(ResBlock(c, w, emb_dim, dropout))
                c = w
                skips.append(c)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout), Attention(c), ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), w, emb_dim, dropout))
                c = w
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
        self.head = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @property
    def bottleneck(self) -> nn.Module:
        """The last middle block: its output [B, C, H / 2^(L-1), W / 2^(L-1)] is the lowest-resolution
        representation (what AMED's predictor reads through a forward hook, geosample.amed)."""
        return self.mid[-1]

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise)
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.head(h)


class EDMDenoiser(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, log(sigma) / 4) around a :class:`UNet`.

    ``shape`` is one sample's (C, H, W); ``sigma_min``/``sigma_max`` the trained noise range.
    ``config`` holds the constructor's keywords (saved beside the weights)."""

    def __init__(self, shape=(3, 16, 16), sigma_min: float = 0.002, sigma_max: float = 80.0,
                 sigma_data: float = 0.5, **unet):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.config = dict(shape=list(self.shape), sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                           sigma_data=self.sigma_data, **unet)
        self.net = UNet(channels=self.shape[0], **unet)

    @property
    def bottleneck(self) -> nn.Module:
        """The UNet's bottleneck module (:attr:`UNet.bottleneck`); hooking it changes nothing computed."""
        return self.net.bottleneck

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point tensor, got {got}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")
        param = self.net.stem.weight
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.numel() != x.shape[0]:
            raise ValueError(f"sigma must be a float or a [B] tensor with B = {x.shape[0]}, got {sigma.numel()} values")
        if not bool((sigma > 0).all() & torch.isfinite(sigma).all()):
            raise ValueError("sigma must be finite and > 0")
        s = sigma[:, None, None, None]
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in = 1 / (s ** 2 + sd2).sqrt()
        xf = x.to(torch.float32)
        f = self.net((c_in * xf).to(param.dtype), (sigma.log() / 4).to(param.dtype)).to(torch.float32)
        return (c_skip * xf + c_out * f).to(x.dtype)
