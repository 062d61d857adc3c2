"""Ahead-of-time compile check of every Triton kernel the engine launches, for GPU targets this
machine does not have (no GPU or driver needed: Triton's NVIDIA backend ships ptxas and cuobjdump).

    python -m geosample.kernels.compile_check --targets sm_80,sm_90 [--json FILE] [--summary] [--cache-dir DIR]

For each target and each variant of :data:`geosample.kernels.configs.SPACES` (the table the
launchers choose from), the kernel is compiled to a cubin as a launch would specialise it:
pointers 16-byte aligned (as torch allocates them), integer arguments int32, and both of Triton's
integer specialisations (``ints=div16``: every integer argument a multiple of 16, as at the
benchmark shapes; ``ints=any``: none is, the unaligned worst case).  Registers and spills (stack
and local memory bytes per thread: ptxas's spill stores) come from ``cuobjdump
--dump-resource-usage``; shared memory is the compiled metadata's (what Triton checks against the
device at launch).  A variant is ok when it compiles, spills nothing and fits the target's shared
memory per block.  Exit status 0 only when every variant is ok; the roofline model of
:mod:`geosample.kernels.roofline` is printed after the table, with the KDE launches' registers,
occupancy and predicted times from the rows just compiled.  Each row names the Triton release
that compiled it and the ptxas it ran; the launch options come from the table for that release
(:mod:`geosample.kernels.configs`).  The cubins go to a cache folder of the check's own, one per
Triton version (:func:`default_cache_dir`), never to Triton's ``~/.triton/cache``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from .configs import SPACES, Space

__all__ = ["TARGETS", "default_cache_dir", "supported_targets", "compile_variant", "check", "main"]

# capability, shared memory per block (bytes, the opt-in maximum)
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024), "sm_100": (100, 227 * 1024)}
INTS = ("div16", "any")   # Triton's specialisation of integer arguments (multiple of 16 or not)
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _target(name: str):
    from triton.backends.compiler import GPUTarget
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return GPUTarget("cuda", TARGETS[name][0], 32)


def default_cache_dir() -> str:
    """The check's Triton cache: ``$GEOSAMPLE_CACHE/triton-<version>`` (``~/.cache/geosample/...``),
    one folder per Triton version, so releases never share (or evict) each other's cubins."""
    import triton

    root = os.environ.get("GEOSAMPLE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "geosample")
    return os.path.join(root, f"triton-{triton.__version__}")   # geosample._io.cache_root (kernels import no layer above)


@contextlib.contextmanager
def _triton_cache(path: str):
    """TRITON_CACHE_DIR = path while compiling (Triton reads it at every compile)."""
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = old


def _ptxas_version(target: str):
    """The CUDA release of the ptxas Triton runs for ``target`` ("12.9"), or None if this Triton
    does not say (private API: ``get_ptxas``)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return str(get_ptxas(TARGETS[target][0]).version)
    except Exception:  # noqa: BLE001 -- only a label of the report
        return None


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack + local bytes per thread) of the one kernel in ``cubin``."""
    import triton
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = _RESOURCES.search(out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    regs, stack, _, local = map(int, m.groups())
    return regs, stack + local


def compile_variant(space: Space, variant: dict, target: str) -> dict:
    """Compile one variant for ``target``; the JSON row (kernel, target, config, ok, n_regs,
    n_spills, shared_bytes, error, and triton, ptxas, options: what compiled it, with which launch
    options)."""
    import triton
    from triton.compiler import ASTSource

    choice = {k: v for k, v in variant.items() if k != "ints"}
    row = {"kernel": f"{space.module.rsplit('.', 1)[-1]}.{space.kernel}", "target": target, "config": variant,
           "ok": False, "n_regs": None, "n_spills": None, "shared_bytes": None, "error": None,
           "triton": triton.__version__, "ptxas": _ptxas_version(target), "options": None}
    try:
        fn = getattr(importlib.import_module(space.module), space.kernel)
        row["options"] = space.options(choice)
        types, constexprs = space.arg_types(choice), space.constexprs(choice)
        signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
        divisible = ("*", "i32") if variant["ints"] == "div16" else ("*",)
        aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                   if signature[a].startswith(divisible)}
        kernel = triton.compile(ASTSource(fn, signature, constexprs, aligned), target=_target(target),
                                options=row["options"])
        regs, spills = _resources(kernel.asm["cubin"])
        shared = kernel.metadata.shared
        row.update(n_regs=regs, n_spills=spills, shared_bytes=shared)
        limit = TARGETS[target][1]
        if spills:
            row["error"] = f"{spills} bytes of local memory per thread (register spills)"
        elif shared > limit:
            row["error"] = f"{shared} bytes of shared memory > {limit}"
        else:
            row["ok"] = True
    except Exception as e:  # noqa: BLE001 -- every failure is a row of the report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    return row


def _compile_many(jobs, cache_dir: str):
    """Rows for (kernel name, variant, target) triples (names, not spaces: they cross processes),
    compiled into the Triton cache ``cache_dir``."""
    spaces = {s.kernel: s for s in SPACES}
    with _triton_cache(cache_dir):
        return [compile_variant(spaces[kernel], variant, target) for kernel, variant, target in jobs]


def supported_targets(names=tuple(TARGETS)) -> list[str]:
    """The targets among ``names`` that the installed Triton compiles to (ptxas knows the arch)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(p, BLOCK: tl.constexpr):
        tl.store(p + tl.arange(0, BLOCK), 1.0)

    from triton.compiler import ASTSource
    ok = []
    with _triton_cache(default_cache_dir()):
        for name in names:
            try:
                triton.compile(ASTSource(_probe, {"p": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 32}),
                               target=_target(name))
                ok.append(name)
            except Exception:  # noqa: BLE001 -- an arch this ptxas does not know
                pass
    return ok


def check(targets, spaces=SPACES, jobs: int = 1, variants=None, progress=None, cache_dir=None) -> list[dict]:
    """Rows for every variant of ``spaces`` (a subset of SPACES) at both integer specialisations
    (or the given ``variants``: (space, variant with "ints") pairs) on every target, in a fixed
    order; ``jobs`` worker processes; ``progress(done, total)`` is called as rows come in.
    Compiled into the Triton cache ``cache_dir`` (default: :func:`default_cache_dir`)."""
    pairs = variants or [(s, {**v, "ints": i}) for s in spaces for v in s.variants() for i in INTS]
    work = [(s.kernel, v, t) for t in targets for s, v in pairs]
    chunks = [work[i:i + 4] for i in range(0, len(work), 4)]
    cache_dir = cache_dir or default_cache_dir()
    rows = []
    with ProcessPoolExecutor(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        for done in (pool.map if pool else map)(_compile_many, chunks, [cache_dir] * len(chunks)):
            rows += done
            if progress:
                progress(len(rows), len(work))
    return rows


def _config_text(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def format_table(rows: list[dict]) -> str:
    """One line per row: kernel, target, config, registers, spills, shared bytes, ok."""
    head = f"{'kernel':34} {'target':7} {'config':42} {'regs':>5} {'spills':>6} {'shared':>7}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [("-" if r[k] is None else str(r[k])) for k in ("n_regs", "n_spills", "shared_bytes")]
        lines.append(f"{r['kernel']:34} {r['target']:7} {_config_text(r['config']):42} {cells[0]:>5} "
                     f"{cells[1]:>6} {cells[2]:>7}  {'ok' if r['ok'] else 'FAIL: ' + r['error']}")
    return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    """Per kernel and target: variants, failures, register range, most spills and shared bytes."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["target"]), []).append(r)
    head = f"{'kernel':34} {'target':7} {'variants':>8} {'failed':>6} {'regs':>9} {'spills':>6} {'shared':>7}"
    lines = [head, "-" * len(head)]
    for (kernel, target), rs in groups.items():
        regs = [r["n_regs"] for r in rs if r["n_regs"] is not None]
        spills = max((r["n_spills"] for r in rs if r["n_spills"] is not None), default=None)
        shared = max((r["shared_bytes"] for r in rs if r["shared_bytes"] is not None), default=None)
        reg_range = f"{min(regs)}-{max(regs)}" if regs else "-"
        lines.append(f"{kernel:34} {target:7} {len(rs):>8} {sum(not r['ok'] for r in rs):>6} {reg_range:>9} "
                     f"{'-' if spills is None else spills:>6} {'-' if shared is None else shared:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m geosample.kernels.compile_check", description=__doc__.split("\n")[0])
    p.add_argument("--targets", default=None,
                   help=f"comma-separated GPU targets ({', '.join(TARGETS)}; default: all the installed Triton supports)")
    p.add_argument("--json", metavar="FILE", help="write the rows as a JSON list to FILE")
    p.add_argument("--summary", action="store_true", help="print the per-kernel summary and the failures only")
    p.add_argument("--kernels", default=None, help="comma-separated kernel function names (default: all)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="Triton cache for the compiled variants (default: ~/.cache/geosample/triton-<version>)")
    a = p.parse_args(argv)
    try:
        targets = a.targets.split(",") if a.targets else supported_targets()
        for t in targets:
            _target(t)
        spaces = SPACES if a.kernels is None else tuple(s for s in SPACES if s.kernel in a.kernels.split(","))
    except ValueError as e:
        p.error(str(e))
    if not spaces:
        p.error(f"no kernel matches --kernels {a.kernels}; known: {', '.join(s.kernel for s in SPACES)}")
    import triton
    cache_dir = a.cache_dir or default_cache_dir()
    print(f"Triton {triton.__version__}, ptxas " + ", ".join(f"{_ptxas_version(t)} ({t})" for t in targets)
          + f"; cache {cache_dir}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    rows = check(targets, spaces, jobs=a.jobs, cache_dir=cache_dir,
                 progress=lambda done, total: print(f"compiled {done}/{total}", file=sys.stderr, flush=True)
                 if done % 40 < 4 or done == total else None)
    seconds = time.perf_counter() - start
    failed = [r for r in rows if not r["ok"]]
    print(format_table(failed if a.summary else rows))
    print()
    print(format_summary(rows))
    print(f"\n{len(rows)} variants for {', '.join(targets)} with Triton {triton.__version__} in {seconds:.0f} s: "
          f"{len(rows) - len(failed)} ok, {len(failed)} failed ({sum(bool(r['n_spills']) for r in rows)} spill)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    from .roofline import format_kde_model, format_model, kde_model
    print()
    print(format_model())
    model = kde_model(rows)
    if model:
        print(f"\nKDE launches at the benchmark shapes (Triton {triton.__version__}; docs/gpu.md explains the model)")
        print(format_kde_model(model))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
