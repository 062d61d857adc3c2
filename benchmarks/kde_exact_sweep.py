"""Measure the exact-precision KDE kernels' registers and spills under candidate launch choices, for
the installed Triton release: the data behind :data:`geosample.kernels.configs.KDE_EXACT_TUNING`.

    python benchmarks/kde_exact_sweep.py [--targets sm_80,sm_90,sm_100] [--out benchmarks/results]

For every exact-precision variant of the two-phase kernels (dot depth BK in {16, 32, 64}) and of
the fused kernel at its widest D block, at both integer specialisations, it compiles each candidate
.maxnreg bound (none = ptxas's own register target) for every target, like the compile check does
(:func:`geosample.kernels.compile_check.compile_variant`), and writes
``kde_exact_sweep_triton-<version>.json`` (one row per compile) and ``.md`` (per candidate: the
variants that spill, and the most registers), so a table entry is chosen from measurements:
the candidate that spills nowhere, with the fewest registers.  ~770 compiles: ~10 minutes on one
core (run it under the machine's heavy-job lock).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
from dataclasses import replace
from pathlib import Path

from geosample._io import atomic_write_text
from geosample.kernels import compile_check as cc
from geosample.kernels import configs

TWO_PHASE = {"BK": (16, 32, 64), "maxnreg": (None, 168, 255)}
FUSED = {"BD": (256,), "maxnreg": (None, 128, 168, 192, 255)}


def _space(kernel: str, bk=None, maxnreg=None) -> configs.Space:
    """The compile check's space for ``kernel`` with the dot depth and register bound replaced."""
    base = {s.kernel: s for s in configs.SPACES}[kernel]

    def options(v):
        o = {k: x for k, x in base.options(v).items() if k != "maxnreg"}
        return o if maxnreg is None else {**o, "maxnreg": maxnreg}

    constexprs = base.constexprs if bk is None else (lambda v: {**base.constexprs(v), "BK": bk})
    return replace(base, constexprs=constexprs, options=options)


def candidates():
    """(label, space, variants) for every candidate: exact precision, both integer specialisations."""
    for kernel in ("_logits_kernel", "_wsum_kernel"):
        for bk, maxnreg in itertools.product(*TWO_PHASE.values()):
            for bb in configs.KDE_QUERY_BLOCKS:
                variants = [{"storage": s, "precision": "exact", "BB": bb, "ints": i}
                            for s in configs.KDE_STORAGE for i in cc.INTS]
                yield {"kernel": kernel, "BB": bb, "BK": bk, "maxnreg": maxnreg}, _space(kernel, bk, maxnreg), variants
    space = {s.kernel: s for s in configs.SPACES}["_fused_kernel"]
    for bd, maxnreg in itertools.product(*FUSED.values()):
        variants = [{**v, "ints": i} for v in space.variants() for i in cc.INTS
                    if v["precision"] == "exact" and v["BD"] == bd]
        yield {"kernel": "_fused_kernel", "BD": bd, "maxnreg": maxnreg}, _space("_fused_kernel", None, maxnreg), variants


def main(argv=None) -> int:
    import triton
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default="sm_80,sm_90,sm_100")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    targets = a.targets.split(",")
    cache = cc.default_cache_dir()
    rows, lines = [], []
    for label, space, variants in candidates():
        with cc._triton_cache(cache):
            got = [cc.compile_variant(space, v, t) for t in targets for v in variants]
        rows += [{**r, "candidate": label} for r in got]
        bad = [r for r in got if not r["ok"]]
        regs = max((r["n_regs"] or 0) for r in got)
        where = ", ".join(f"{r['target']} {r['config']['storage']} {r['config']['ints']}: "
                          f"{r['n_regs']}/{r['n_spills']}" if r["n_regs"] is not None else r["error"] for r in bad)
        lines.append(f"| {' '.join(f'{k}={v}' for k, v in label.items())} | {len(got)} | {len(bad)} | {regs} "
                     f"| {where or '-'} |")
        print(lines[-1], flush=True)
    version = triton.__version__
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    head = (f"# Exact KDE launch candidates, Triton {version} ({stamp})\n\n"
            f"{platform.platform()}, {os.cpu_count()} cores; ptxas "
            + ", ".join(f"{cc._ptxas_version(t)} ({t})" for t in targets)
            + ". Per candidate: compiles (variants x targets, ints=div16 and any), how many spill or fail, "
              "the most registers, and the failing ones as target storage ints: registers/spill bytes.\n\n"
              "| candidate | compiles | spill | max regs | spilling (regs/bytes) |\n|---|---|---|---|---|\n")
    out = Path(a.out)
    atomic_write_text(out / f"kde_exact_sweep_triton-{version}.md", head + "\n".join(lines) + "\n")
    atomic_write_text(out / f"kde_exact_sweep_triton-{version}.json", json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
