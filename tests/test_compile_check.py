"""The ahead-of-time compile check (no GPU needed): every launched kernel compiles for sm_80 and
sm_90 without spills, on a reduced set of variants that still takes every value of every launch
choice once (CI's .ci/run compiles the full set); the check itself catches the defects it is for;
and the launchers choose only configurations the check compiles."""
import json

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from geosample.kernels import compile_check as cc  # noqa: E402
from geosample.kernels import configs  # noqa: E402

KEYS = {"kernel", "target", "config", "ok", "n_regs", "n_spills", "shared_bytes"}


def covering(space):
    """Variants of ``space`` in which every value of every choice appears (greedily, fewest first),
    alternating the integer specialisation."""
    todo = {(k, v) for variant in space.variants() for k, v in variant.items()}
    picked = []
    while todo:
        best = max(space.variants(), key=lambda variant: len(todo & set(variant.items())))
        todo -= set(best.items())
        picked.append((space, {**best, "ints": cc.INTS[len(picked) % len(cc.INTS)]}))
    return picked


def test_every_kernel_compiles_within_its_spill_budget():
    variants = [pair for space in configs.SPACES for pair in covering(space)]
    rows = cc.check(["sm_80", "sm_90"], jobs=2, variants=variants)
    assert len(rows) == 2 * len(variants)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, cc.format_table(bad)
    budget = {f"{s.module.rsplit('.', 1)[1]}.{s.kernel}": s.spill_budget for s in configs.SPACES}
    assert all(KEYS <= set(r) and r["n_spills"] <= budget[r["kernel"]] and 0 < r["n_regs"] <= 255 for r in rows)
    assert all(budget[k] == 0 for k in budget if not k.startswith("kde_triton."))   # only the KDE's known spills


# a kernel with the defect the check found in the KDE's two-phase kernel: a plain Python global
THRESHOLD = 80.0
THRESHOLD_C = tl.constexpr(80.0)


@triton.jit
def _global_kernel(p, n, USE_CONSTEXPR: tl.constexpr):
    x = tl.load(p + tl.arange(0, 16), mask=tl.arange(0, 16) < n)
    if USE_CONSTEXPR:
        x = tl.where(x > -THRESHOLD_C, x, 0.0)
    else:
        x = tl.where(x > -THRESHOLD, x, 0.0)
    tl.store(p + tl.arange(0, 16), x, mask=tl.arange(0, 16) < n)


@triton.jit
def _spilling_kernel(p, BLOCK: tl.constexpr):
    """BLOCK float64 values live at once in one warp: far more than 255 registers per thread."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(p + offs)
    y = tl.cumsum(x, axis=0)
    tl.store(p + offs, y * tl.sum(x * y, axis=0) + x)


def test_check_reports_globals_and_spills():
    space = configs.Space(__name__, "_global_kernel", {"USE_CONSTEXPR": (False, True)}, {"p": "*fp32"},
                          lambda v: dict(v), lambda v: {"num_warps": 4})
    bad, good = (cc.compile_variant(space, {**v, "ints": "any"}, "sm_90") for v in space.variants())
    assert not bad["ok"] and "Cannot access global variable THRESHOLD" in bad["error"]
    assert good["ok"] and good["n_spills"] == 0
    space = configs.Space(__name__, "_spilling_kernel", {"BLOCK": (4096,)}, {"p": "*fp64"}, lambda v: dict(v),
                          lambda v: {"num_warps": 1})
    row = cc.compile_variant(space, {"BLOCK": 4096, "ints": "div16"}, "sm_80")
    assert not row["ok"] and row["n_spills"] > 0 and "spills" in row["error"]


def test_cli_json_and_exit_status(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert cc.main(["--targets", "sm_90", "--kernels", "_moment_kernel", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * len(cc.INTS) and all(KEYS <= set(r) and r["ok"] for r in rows)
    printed = capsys.readouterr().out
    assert "gits_cost._moment_kernel" in printed and "Roofline model" in printed
    with pytest.raises(SystemExit):
        cc.main(["--targets", "sm_12"])


def test_launchers_choose_only_checked_configurations():
    space = {s.kernel: s for s in configs.SPACES}
    assert {configs.cost_block_t(t) for t in range(2, 2000)} == set(space["_pair_kernel"].choices["BLOCK_T"])
    assert {configs.kde_query_block(b) for b in range(1, 300)} == set(space["_wsum_kernel"].choices["BB"])
    fused = space["_fused_kernel"].choices
    assert {configs.fused_tiles(d)[0] for d in range(1, configs.FUSED_MAX_D + 1)} == set(fused["BD"])
    for dequant in (False, True):                 # the fused kernel takes D up to fused_max_d, no more
        for fast in (False, True):
            widest = configs.fused_tiles(configs.fused_max_d(dequant, fast))[0]
            storage = "u8" if dequant else "fp32"
            assert widest == max(v["BD"] for v in space["_fused_kernel"].variants()
                                 if v["storage"] == storage and v["precision"] == ("fast" if fast else "exact"))
    assert {configs.top_k_width(k) for k in range(1, configs.KDE_MAX_TOP_K + 1)} == set(fused["KP"])
    for bad in (0, configs.KDE_MAX_TOP_K + 1):
        with pytest.raises(ValueError, match="refine_k"):
            configs.top_k_width(bad)
    with pytest.raises(ValueError, match="D <= 256"):
        configs.fused_tiles(configs.FUSED_MAX_D + 1)


def test_roofline_model_follows_the_shapes():
    from geosample.kernels import roofline
    calls = roofline.calls()
    assert {c.kernel for c in calls} >= {"solver_step", "gits _pair_kernel", "gits _moment_kernel",
                                         "kde _fused_kernel", "kde _logits_kernel", "kde _wsum_kernel"}
    step = calls[0]                       # float32 order-4 direction step: 7 words per element
    assert step.bytes_min == 7 * 4 * 256 * 3 * 64 * 64
    us, kind = step.bound_us("H100")
    assert kind == "memory" and us == pytest.approx(1e6 * step.bytes_min / 3.35e12)
