"""Train the tiny EDM denoiser shipped as ``geosample.models.load("cifar10-tiny")``.

EDM training (Karras et al. 2022): ln sigma ~ N(P_mean, P_std^2), loss weight
lambda(sigma) = (sigma^2 + s_d^2) / (sigma s_d)^2 on |D(y + sigma n, sigma) - y|^2, Adam with a
linear warm-up, an EMA of the weights (what is shipped).  All 50k CIFAR-10 training images (every
class), box-downsampled to ``--resolution`` (16 by default), random horizontal flips.  Everything
random comes from one seeded torch.Generator whose state is checkpointed, so a resumed run
continues the same sequence.

    python benchmarks/train_cifar10_tiny.py --minutes 90 --out /tmp/cifar10_tiny
    # killed? the same command resumes from /tmp/cifar10_tiny/checkpoint.pt

``--minutes`` stops at a wall-clock budget (checkpoint + export); ``--steps`` at a step count.
The exported file (float16 state_dict + config) goes to ``--export``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from geosample.data import load_images
from geosample.models.unet import EDMDenoiser

DEFAULT_DATA = "/work/shared/data/cifar10/train.tar.gz"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.environ.get("GEOSAMPLE_CIFAR10", DEFAULT_DATA))
    p.add_argument("--resolution", type=int, default=16, choices=(8, 16, 32))
    p.add_argument("--base", type=int, default=32, help="UNet width at full resolution")
    p.add_argument("--channel-mult", default="1,2,2")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300, help="linear learning-rate warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (ramped in as (1+t)/(10+t))")
    p.add_argument("--p-mean", type=float, default=-1.2)
    p.add_argument("--p-std", type=float, default=1.2)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: --minutes only)")
    p.add_argument("--minutes", type=float, default=90.0, help="wall-clock budget of this invocation")
    p.add_argument("--checkpoint-every", type=float, default=3.0, help="minutes between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="/tmp/cifar10_tiny", help="checkpoint and log folder")
    p.add_argument("--export", default=None, help="where to write the shipped weights (default: OUT/cifar10-tiny.pt)")
    return p.parse_args(argv)


def load_training_set(path: str, resolution: int) -> torch.Tensor:
    """All images as float32 [N, 3, r, r] in [-1, 1], 2x2 box-averaged down from 32x32."""
    u8 = torch.from_numpy(np.array(load_images(path)))  # a writable copy of the cached memory map
    x = u8.to(torch.float32) / 127.5 - 1
    if resolution != x.shape[-1]:
        x = F.avg_pool2d(x, x.shape[-1] // resolution)
    return x.contiguous()


def edm_loss(model: EDMDenoiser, y: torch.Tensor, gen: torch.Generator, p_mean: float, p_std: float):
    """Mean over the batch of lambda(sigma) |D(y + sigma n, sigma) - y|^2 / d."""
    b = y.shape[0]
    sigma = (torch.randn(b, generator=gen, device=y.device) * p_std + p_mean).exp()
    noise = torch.randn(y.shape, generator=gen, device=y.device)
    sd2 = model.sigma_data ** 2
    weight = (sigma ** 2 + sd2) / (sigma * model.sigma_data) ** 2
    err = (model(y + sigma[:, None, None, None] * noise, sigma) - y) ** 2
    return (weight * err.flatten(1).mean(1)).mean()


def export(ema: EDMDenoiser, path: Path, meta: dict) -> None:
    """float16 state_dict + config + training metadata, loadable with torch.load(weights_only=True)."""
    state = {k: v.detach().to("cpu", torch.float16) for k, v in ema.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"config": ema.config, "state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    export_path = Path(args.export) if args.export else out / "cifar10-tiny.pt"
    device = torch.device(args.device)

    data = load_training_set(args.data, args.resolution).to(device)
    config = dict(shape=(3, args.resolution, args.resolution), base=args.base, blocks=args.blocks,
                  channel_mult=tuple(int(m) for m in args.channel_mult.split(",")), dropout=args.dropout)
    torch.manual_seed(args.seed)  # parameter initialisation
    model = EDMDenoiser(**config).to(device)
    ema = EDMDenoiser(**config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    step, order, cursor, elapsed = 0, None, 0, 0.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"].cpu() if device.type == "cpu" else ck["gen"])
        step, order, cursor, elapsed = ck["step"], ck["order"].to(device), ck["cursor"], ck["elapsed"]
        print(f"resumed from {ckpt_path} at step {step} ({elapsed / 60:.1f} min trained)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, data {tuple(data.shape)}, device {device}, "
          f"{args.threads} thread(s), args {json.dumps(vars(args))}", flush=True)

    def save():
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "step": step, "order": order.cpu(), "cursor": cursor,
                    "elapsed": elapsed}, ckpt_path.with_suffix(".tmp"))
        os.replace(ckpt_path.with_suffix(".tmp"), ckpt_path)
        export(ema, export_path, dict(step=step, minutes=round(elapsed / 60, 1), params=n_params,
                                      batch=args.batch, lr=args.lr, seed=args.seed, ema=args.ema,
                                      resolution=args.resolution, device=str(device)))

    start = time.monotonic()
    last_ckpt = start
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", mininterval=10, smoothing=0.05)
    running = None
    while (args.steps is None or step < args.steps) and time.monotonic() - start < 60 * args.minutes:
        if order is None or cursor + args.batch > len(data):
            order, cursor = torch.randperm(len(data), generator=gen, device=device), 0
        idx = order[cursor:cursor + args.batch]
        cursor += args.batch
        y = data[idx]
        flip = torch.rand(len(idx), generator=gen, device=device) < 0.5
        y = torch.where(flip[:, None, None, None], y.flip(-1), y)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        loss = edm_loss(model, y, gen, args.p_mean, args.p_std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        now = time.monotonic()
        if now - last_ckpt > 60 * args.checkpoint_every:
            elapsed += now - last_ckpt
            last_ckpt = now
            save()
            print(f"step {step} loss {running:.4f} elapsed {elapsed / 60:.1f} min: checkpoint", flush=True)
    elapsed += time.monotonic() - last_ckpt
    save()
    bar.close()
    print(f"done: step {step}, {elapsed / 60:.1f} min trained, weights {export_path}", flush=True)


if __name__ == "__main__":
    main()
