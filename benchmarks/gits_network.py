"""GITS variants vs EDM's schedule at low NFE, on the shipped network and the closed-form models.

Per model (``--models``: network = ``geosample.models.load("cifar10-tiny")``; gaussian / mog =
the closed forms fitted to CIFAR-10 16x16, as ``nfe_quality.py`` builds them), solver and NFE,
the RMSE to the reference solve (Heun 100 steps = 199 NFE for the network, exact for gaussian,
RK4 400 steps for mog) of ``--batch`` test samples (noise seed ``--seed + 1``) on:

  edm          EDM's polynomial rho=7 schedule;
  gits         GITS as the reference does it (iPNDM teacher, 61-point rho=7 grid, dev, gamma 1.15);
  gits_refine  the same DP path refined by the solver's own error (``refine=True``);
  sweep        gamma picked from ``gs.gits.GAMMAS`` by the solver's error to the teacher;
  sweep_refine that path refined (``gamma=GAMMAS, refine=True``: the recommended setting);
  gits_t120 / gits_w64 / gits_w1024 / gits_l2  the reference search with 120 teacher steps, 64 or
               1024 warm-up samples, or the l2 metric (``--variants`` picks; not run by default).

GITS searches use ``--num-warmup`` teacher samples from seed ``--seed`` (disjoint from the test
noise); the gamma pick and the refinement judge on the first 64 of them.  Writes
``gits_network.json`` and ``.md`` to ``--out``.

    python benchmarks/gits_network.py --models network,gaussian,mog --nfes 5,6,8
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

import geosample as gs
from geosample._io import atomic_write_text
from geosample.data import load_images, resolve
from geosample.solvers import steps_for_nfe

sys.path.insert(0, str(Path(__file__).parent))
from nfe_quality import build_model, class_labels, draw_subset, machine  # noqa: E402

VARIANTS = {"edm": None, "gits": dict(gamma=1.15), "gits_refine": dict(gamma=1.15, refine=True),
            "sweep": dict(gamma=gs.gits.GAMMAS), "sweep_refine": dict(gamma=gs.gits.GAMMAS, refine=True),
            # probes of the reference search: a finer teacher grid, other warm-up counts, another metric
            "gits_t120": dict(gamma=1.15, teacher_steps=120), "gits_w64": dict(gamma=1.15, num_warmup=64),
            "gits_w1024": dict(gamma=1.15, num_warmup=1024), "gits_l2": dict(gamma=1.15, metric="l2")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="network,gaussian,mog")
    p.add_argument("--solvers", default="ipndm,euler,dpmpp")
    p.add_argument("--nfes", default="5,6,8")
    p.add_argument("--variants", default="edm,gits,gits_refine,sweep,sweep_refine")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num-warmup", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args(argv)


def load_model(name: str, seed: int):
    """(denoiser, reference(noise), reference description, shape) as nfe_quality.py builds them."""
    path = resolve("cifar10")
    images = torch.from_numpy(np.array(load_images(path))).to(torch.float32) / 127.5 - 1
    images = F.avg_pool2d(images, images.shape[-1] // 16)
    labels = class_labels(path)
    idx = draw_subset(labels, None, "balanced", torch.Generator().manual_seed(seed), seed)
    args = argparse.Namespace(model=name, rank=None)
    denoiser, reference, ref_name = build_model(args, images[idx], torch.from_numpy(labels)[idx])
    return denoiser, reference, ref_name, tuple(images.shape[1:])


def gain_table(rows: list[dict], model: str, solvers, nfes, variants) -> str:
    """RMSE per variant, and RMSE(edm) / RMSE(variant) - 1 in percent (positive: better than EDM)."""
    by = {(r["solver"], r["variant"], r["nfe"]): r["rmse"] for r in rows if r["model"] == model}
    head = "| solver | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines = [head, "|" + "---|" * (len(nfes) + 2)]
    for s in solvers:
        for v in variants:
            cells = []
            for n in nfes:
                r, e = by.get((s, v, n)), by.get((s, "edm", n))
                cells.append("" if r is None else f"{r:.4f}" if v == "edm" else f"{r:.4f} ({100 * (e / r - 1):+.0f}%)")
            lines.append(f"| {s} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    models, solvers, variants = args.models.split(","), args.solvers.split(","), args.variants.split(",")
    nfes = [int(n) for n in args.nfes.split(",")]
    out = Path(args.out)
    stem = out / ("gits_network" + (f"_{args.tag}" if args.tag else ""))
    os.environ["GEOSAMPLE_CACHE"] = tempfile.mkdtemp(prefix="gits_network_")  # one teacher per model, this run only
    report = {"machine": machine(), "command": "python " + " ".join(sys.argv), "batch": args.batch,
              "num_warmup": args.num_warmup, "test_noise_seed": args.seed + 1, "warmup_seed": args.seed,
              "references": {}, "results": []}
    for model in models:
        denoiser, reference, ref_name, shape = load_model(model, args.seed)
        noise = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(args.seed + 1))
        t0 = time.perf_counter()
        ref = reference(noise).double()
        report["references"][model] = {"method": ref_name, "time_s": time.perf_counter() - t0}
        for solver in solvers:
            for nfe in nfes:
                steps = steps_for_nfe(solver, nfe)
                for v in variants:
                    t0 = time.perf_counter()
                    if VARIANTS[v] is None:
                        sigmas, record = gs.schedules.polynomial(steps), {}
                    else:
                        s = gs.gits.search(denoiser, shape, steps, solver=solver,
                                           **{"num_warmup": args.num_warmup, "seed": args.seed, **VARIANTS[v]})
                        sigmas, record = s.sigmas, {"indices": s.indices, "gamma": s.gamma,
                                                    "refinement": s.params.get("refinement")}
                    search_s = time.perf_counter() - t0
                    x = gs.sample(denoiser, noise, sigmas, solver=solver)
                    rmse = math.sqrt(float((x.double() - ref).pow(2).mean()))
                    report["results"].append({"model": model, "solver": solver, "nfe": nfe, "variant": v,
                                              "rmse": rmse, "sigmas": sigmas.tolist(), "search_s": search_s,
                                              **record})
                    print(f"{model} {solver} NFE {nfe} {v}: {rmse:.4f} ({search_s:.0f} s)", flush=True)
                    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1))
    m = report["machine"]
    md = [f"### GITS variants vs EDM's rho=7 schedule ({m['date']})", "",
          f"Command: `{report['command']}`; {m['platform']}, {m['cpus']} shared CPU cores, torch {m['torch']} "
          f"({m['torch_threads']} thread), geosample {m['geosample']}. {args.batch} test samples (noise seed "
          f"{args.seed + 1}); GITS teacher: iPNDM, 61-point rho=7 grid, dev, {args.num_warmup} warm-up samples "
          f"(seed {args.seed}); gamma pick and refinement judged on the first 64 of them.", "",
          "RMSE to the reference, and in brackets RMSE(edm) / RMSE(schedule) - 1 (positive: better than EDM).", ""]
    for model in models:
        md += [f"**{model}** (reference: {report['references'][model]['method']})", "",
               gain_table(report["results"], model, solvers, nfes, variants), ""]
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1))
    atomic_write_text(stem.with_suffix(".md"), "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
