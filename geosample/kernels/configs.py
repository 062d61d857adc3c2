"""Launch configurations of every Triton kernel the engine launches: the one table that the
launchers choose from and :mod:`geosample.kernels.compile_check` compiles in full.

Each :class:`Space` names a kernel, its launch options, and for every launch-time choice the
bounded set of values a launcher can pick (dtypes, constexpr flags, precision modes, block sizes).
The launchers read their constants and choice functions from here (never their own literals), and
the choice functions only return values from these sets, so a variant the check has not compiled
cannot be launched.  Where code generation differs between Triton releases, a launcher's choice
depends on the installed release too (:func:`triton_release`), through tables measured per release
(:data:`KDE_EXACT_TUNING`); the compile check compiles what the installed release gets.  Pure
Python: importing this module needs neither torch nor Triton.
"""
from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["Space", "SPACES", "cdiv", "next_power_of_2", "powers_of_2",
           "STEP_BLOCK", "STEP_WARPS", "STEP_MAX_ORDER", "cost_block_t", "COST_BLOCK_D", "MOMENT_BLOCK_D", "COST_WARPS",
           "triton_release", "ExactTuning", "KDE_EXACT_TUNING", "exact_tuning", "kde_two_phase",
           "kde_query_block", "fused_options", "fused_max_d", "KDE_BN", "KDE_BD", "KDE_MIN_TOP_K", "KDE_MAX_TOP_K", "top_k_width", "fused_tiles",
           "FUSED_MAX_D", "FUSED_BB", "FUSED_BN", "FUSED_BN_WIDE", "FUSED_PROGRAMS", "FUSED_MIN_TILES"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def powers_of_2(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2 lo, ..., hi (both powers of two)."""
    return tuple(1 << e for e in range(lo.bit_length() - 1, hi.bit_length()))


@dataclass(frozen=True)
class Space:
    """One kernel's launch space: ``module.kernel``, one variant per combination of ``choices``
    (name -> the values a launcher can pick) that ``where`` accepts.

    args: Triton types of the kernel's runtime arguments ("arg1 arg2" -> type; ``{name}`` is
    replaced by the variant's choice, unlisted arguments are int32 scalars); constexprs(variant):
    the kernel's constexpr arguments as the launcher passes them; options(variant): its launch
    options (num_warps, num_stages, maxnreg).
    """
    module: str
    kernel: str
    choices: dict
    args: dict
    constexprs: Callable[[dict], dict]
    options: Callable[[dict], dict]
    where: Callable[[dict], bool] = lambda variant: True

    def variants(self):
        """Every launchable configuration, as dicts name -> value."""
        names = list(self.choices)
        for values in itertools.product(*self.choices.values()):
            variant = dict(zip(names, values))
            if self.where(variant):
                yield variant

    def arg_types(self, variant: dict) -> dict:
        """Runtime argument name -> Triton type string for ``variant``."""
        return {a: t.format(**variant) for names, t in self.args.items() for a in names.split()}


# --- solver step (solver_step.py): one program per STEP_BLOCK elements ----------------------------
STEP_BLOCK = 1024       # elements per program: 4 KiB of float32 per operand
STEP_WARPS = 8          # 4 elements per thread (at 4 warps, 8 per thread spill: fp16, 4 unaligned rows)
STEP_MAX_ORDER = 4      # history entries one step can combine

# --- GITS cost matrix (gits_cost.py) --------------------------------------------------------------
COST_BLOCK_D = 32       # pair kernel: columns of D per step (128 bytes of float32 per row)
COST_MAX_BLOCK_T = 32   # pair kernel: later points j per program, so the tile is at most [32, 32]
MOMENT_BLOCK_D = 512    # moment kernel: columns per step, 4 per thread at 4 warps
COST_WARPS = 4
# pair kernel launch options: maxnreg lifts ptxas's own register target (on sm_100 it held the
# float64 [32, 32] tile at 80 registers and spilled 8 bytes); 128 keeps every variant spill-free
COST_PAIR_OPTIONS = {"num_warps": COST_WARPS, "maxnreg": 128}


def cost_block_t(t: int) -> int:
    """Later points per pair-kernel program for a grid of t points (more t -> more programs)."""
    return min(next_power_of_2(t), COST_MAX_BLOCK_T)


# --- KDE denoiser (kde_triton.py) -----------------------------------------------------------------
KDE_BN = 64             # data rows per tile of the two-phase kernels
KDE_BD = 64             # columns per block of the two-phase kernels
KDE_QUERY_BLOCKS = (16, 64)
# Launch options (no variant spills on sm_80 or sm_90).  "exact" dots run on the CUDA cores (ieee
# float32 FMA), whose operand tiles live in registers: 8 warps and no software pipelining.  "fast"
# (bfloat16 tensor cores): 4 warps and 3 stages, 8 warps for the wide tiles (64 queries in the
# two-phase kernels, [32, 256] rows in the fused one: at 4 warps they hit 255 registers and spilled
# 8-216 bytes).  maxnreg, the PTX .maxnreg bound: left to its own register target, ptxas held some
# variants at 80, 128 or 168 registers, far below 255, and spilled 8-32 bytes; with the bound it
# allocates what they need: 255 at fast precision; the fused kernel at exact precision 128 (two
# 256-thread blocks per SM), 192 for its [64, 128] tiles.
KDE_OPTIONS = {"exact": {"num_warps": 8, "num_stages": 1}, "fast": {"num_warps": 4, "num_stages": 3, "maxnreg": 255}}
KDE_WIDE_WARPS = 8
FUSED_MAX_D = 256       # D above this takes the two-phase path ([BN, D] row tiles no longer fit in registers)
FUSED_MAX_D_DEQUANT_EXACT = 128   # ... for float16 / uint8 rows at exact precision (256 spills ~2 KB)
FUSED_BB = 16           # queries per program (the smallest tl.dot M)
FUSED_BD = powers_of_2(16, FUSED_MAX_D)   # the one D block: next_pow2(D), at least 16 (tl.dot's K)
FUSED_BN = 64           # rows per tile for D <= 128
FUSED_BN_WIDE = 32      # rows per tile for 128 < D <= 256
FUSED_PROGRAMS = 512    # target programs per launch (~4 per SM on an H100): splits = 512 / query blocks
FUSED_MIN_TILES = 4     # at least this many tiles per split, so a split's partial write is amortised
KDE_MIN_TOP_K = 8       # the fused kernel's running top-k width: KDE_MIN_TOP_K to KDE_MAX_TOP_K logits
KDE_MAX_TOP_K = 64      # (refine_k), powers of two
KDE_STORAGE = {"fp32": False, "fp16": True, "u8": True}    # stored row type -> DEQUANT (scale q + shift)
KDE_PRECISION = {"exact": False, "fast": True}             # precision -> FAST


# --- what changes with the Triton release ---------------------------------------------------------
# An exact ("ieee") float32 tl.dot runs on the CUDA cores, its operands in registers.  Triton 3.7
# unrolls it as K outer products (each step needs one column of A and one row of B); from 3.8 on,
# each output element's K products form one chain, so a thread holds its whole rows of A and columns
# of B at once: (4 + 4) x 64 values for the two-phase kernels' [64, 64] tiles, which spilled up to
# 4 KB per thread.  ptxas's register targets moved too (3.9 compiles sm_90 with the ptxas of CUDA 13,
# which holds some variants at 80 or 128 registers and spills 8-16 bytes, or spills a few bytes under
# a .maxnreg bound that it fills).  So the exact kernels take, per Triton release, a dot depth (the
# two-phase kernels' tl.dot K, BK: tiles are summed in BK-row slices, in the same order) and register
# bounds, from measured tables (benchmarks/results/kde_exact_sweep_triton-*.md), each checked in full
# by the compile check (benchmarks/results/compile_check_triton-*.json; docs/gpu.md).  A release
# uses the entry of the newest release at or below it, an older one the oldest entry.
def _release(version: str) -> tuple[int, int]:
    """"3.9.0" (or "3.10.0+git1234") -> (3, 9) (or (3, 10))."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"not a Triton version: {version!r}")
    return int(m.group(1)), int(m.group(2))


@functools.lru_cache(maxsize=None)
def triton_release() -> Optional[tuple[int, int]]:
    """(major, minor) of the installed Triton (imported on first call), None without Triton."""
    try:
        import triton
    except ImportError:
        return None
    return _release(triton.__version__)


@dataclass(frozen=True)
class ExactTuning:
    """Exact-precision KDE launch choices for one Triton release.

    logits, wsum: the two-phase kernels' (BK, maxnreg) per query block BB: tl.dot depth (KDE_BN is
    whole tiles) and .maxnreg bound (None: ptxas's own register target); fused: the fused kernel's
    bound per D block BD (absent: ``fused_default``)."""
    logits: dict
    wsum: dict
    fused: dict
    fused_default: int = 128     # two 256-thread blocks per SM


# Each entry: of the candidates that spill nowhere (every storage, both integer specialisations,
# sm_80, sm_90 and sm_100; benchmarks/kde_exact_sweep.py), the one with the fewest registers.
KDE_EXACT_TUNING = {
    (3, 7): ExactTuning(logits={16: (64, None), 64: (64, None)}, wsum={16: (64, None), 64: (64, None)},
                        fused={128: 192}),
    (3, 8): ExactTuning(logits={16: (16, None), 64: (32, 168)}, wsum={16: (32, None), 64: (16, 255)},
                        fused={128: 192, 256: 192}),
}


def exact_tuning(release: Optional[tuple[int, int]] = None) -> ExactTuning:
    """The :data:`KDE_EXACT_TUNING` entry for ``release`` (default: the installed Triton's)."""
    release = release or triton_release() or min(KDE_EXACT_TUNING)
    known = [r for r in KDE_EXACT_TUNING if r <= release]
    return KDE_EXACT_TUNING[max(known) if known else min(KDE_EXACT_TUNING)]


def kde_two_phase(kernel: str, fast: bool, bb: int, release: Optional[tuple[int, int]] = None) -> tuple[int, dict]:
    """(BK, launch options) of the two-phase KDE kernel ``kernel`` ("logits" or "wsum") for blocks of
    bb queries (fast: precision "fast", else "exact") under Triton ``release`` (default: installed):
    the tl.dot depth and num_warps, num_stages, maxnreg."""
    options = dict(KDE_OPTIONS["fast" if fast else "exact"])
    if fast:
        if bb > KDE_QUERY_BLOCKS[0]:
            options["num_warps"] = KDE_WIDE_WARPS
        return KDE_BN, options
    bk, maxnreg = getattr(exact_tuning(release), kernel)[bb]
    return bk, options if maxnreg is None else {**options, "maxnreg": maxnreg}


def fused_options(fast: bool, bd: int, release: Optional[tuple[int, int]] = None) -> dict:
    """Launch options of the fused KDE kernel for the D block bd under Triton ``release``."""
    if not fast:
        tuning = exact_tuning(release)
        return {**KDE_OPTIONS["exact"], "maxnreg": tuning.fused.get(bd, tuning.fused_default)}
    options = dict(KDE_OPTIONS["fast"])
    if bd > 128:                                  # [FUSED_BN_WIDE, 256] row tiles
        options["num_warps"] = KDE_WIDE_WARPS
    return options


def fused_max_d(dequant: bool, fast: bool) -> int:
    """The largest D the fused kernel takes, for stored rows that need dequantising or not."""
    return FUSED_MAX_D_DEQUANT_EXACT if dequant and not fast else FUSED_MAX_D


def kde_query_block(b: int) -> int:
    """Queries per program of the two-phase kernels for a batch of b."""
    return KDE_QUERY_BLOCKS[0] if b <= KDE_QUERY_BLOCKS[0] else KDE_QUERY_BLOCKS[1]


def fused_tiles(d: int) -> tuple[int, int]:
    """(BD, BN) of the fused kernel for dimension d <= FUSED_MAX_D."""
    if not 1 <= d <= FUSED_MAX_D:
        raise ValueError(f"the fused KDE kernel takes 1 <= D <= {FUSED_MAX_D}, got {d}")
    bd = max(FUSED_BD[0], next_power_of_2(d))
    return bd, (FUSED_BN if bd <= 128 else FUSED_BN_WIDE)


def top_k_width(k: int) -> int:
    """KP, the fused kernel's top-k width for refine_k = k: a power of two >= k, at least
    KDE_MIN_TOP_K (the padding holds -inf keys, so a wider top-k gives the same k best)."""
    if not 1 <= k <= KDE_MAX_TOP_K:
        raise ValueError(f"the Triton KDE keeps 1 to {KDE_MAX_TOP_K} top logits (refine_k), got {k}")
    return max(KDE_MIN_TOP_K, next_power_of_2(k))


def _kde_flags(v: dict) -> dict:
    return {"dequant": KDE_STORAGE[v["storage"]], "fast": KDE_PRECISION[v["precision"]]}


def _kde_two_phase(kernel: str) -> tuple[Callable[[dict], dict], Callable[[dict], dict]]:
    """(constexprs, options) of the two-phase kernel ``kernel`` ("logits" or "wsum") for the Space."""
    def constexprs(v):
        flags = _kde_flags(v)
        return {"BB": v["BB"], "BN": KDE_BN, "BD": KDE_BD, "BK": kde_two_phase(kernel, flags["fast"], v["BB"])[0],
                **{k.upper(): f for k, f in flags.items()}}
    return constexprs, lambda v: kde_two_phase(kernel, KDE_PRECISION[v["precision"]], v["BB"])[1]


_KDE_TWO_PHASE = {"storage": tuple(KDE_STORAGE), "precision": tuple(KDE_PRECISION), "BB": KDE_QUERY_BLOCKS}
_COST_ARGS = {"x_ptr den_ptr": "*{dtype}", "grid_ptr out_ptr": "*fp64"}


def _warps(n: int) -> Callable[[dict], dict]:
    return lambda v: {"num_warps": n}


SPACES = (
    Space("geosample.kernels.solver_step", "_solver_step_kernel",
          {"dtype": ("fp32", "fp16", "bf16", "fp64"), "NEW": (0, 1, 2), "ORDER": tuple(range(1, STEP_MAX_ORDER + 1))},
          {"x_ptr y_ptr d_ptr hist_ptr out_ptr": "*{dtype}", "coef_ptr": "*fp64"},
          lambda v: {"NEW": v["NEW"], "ORDER": v["ORDER"], "BLOCK_SIZE": STEP_BLOCK}, _warps(STEP_WARPS)),
    Space("geosample.kernels.gits_cost", "_pair_kernel",
          {"dtype": ("fp32", "fp64"), "SQUARE": (False, True), "BLOCK_T": powers_of_2(2, COST_MAX_BLOCK_T)},
          _COST_ARGS, lambda v: {"SQUARE": v["SQUARE"], "BLOCK_T": v["BLOCK_T"], "BLOCK_D": COST_BLOCK_D},
          lambda v: COST_PAIR_OPTIONS),
    Space("geosample.kernels.gits_cost", "_moment_kernel", {"dtype": ("fp32", "fp64")},
          _COST_ARGS, lambda v: {"BLOCK_D": MOMENT_BLOCK_D}, _warps(COST_WARPS)),
    Space("geosample.kernels.kde_triton", "_logits_kernel", _KDE_TWO_PHASE,
          {"Y": "*{storage}", "X HY2 INV L TMAX SHIFT": "*fp32", "scale": "fp32"},
          *_kde_two_phase("logits")),
    Space("geosample.kernels.kde_triton", "_wsum_kernel", _KDE_TWO_PHASE,
          {"Y": "*{storage}", "L M TMAX OUT SHIFT": "*fp32", "scale": "fp32"},
          *_kde_two_phase("wsum")),
    Space("geosample.kernels.kde_triton", "_fused_kernel",
          {"storage": tuple(KDE_STORAGE), "precision": tuple(KDE_PRECISION), "BD": FUSED_BD,
           "KP": powers_of_2(KDE_MIN_TOP_K, KDE_MAX_TOP_K)},
          {"Y": "*{storage}", "X HY2 INV M S SHIFT": "*fp32", "Z Z2": "*fp64", "TOP": "*i64", "scale": "fp32"},
          lambda v: {"BB": FUSED_BB, "BN": fused_tiles(v["BD"])[1], "BD": v["BD"], "KP": v["KP"], **{k.upper(): f for k, f in _kde_flags(v).items()}},
          lambda v: fused_options(KDE_PRECISION[v["precision"]], v["BD"]),
          where=lambda v: v["BD"] <= fused_max_d(**_kde_flags(v))),
)
