"""The ahead-of-time compile check (no GPU needed): every launched kernel compiles for sm_80,
sm_90 (and sm_100 where the installed Triton supports it) without spills, on a reduced set of
variants that still takes every value of every launch choice once (CI's .ci/run compiles the full
set, on the pinned and the newest Triton); the check itself catches the defects it is for; the
launchers choose only configurations the check compiles, with the options of the installed Triton
release's table."""
import json

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from geosample.kernels import compile_check as cc  # noqa: E402
from geosample.kernels import configs  # noqa: E402

KEYS = {"kernel", "target", "config", "ok", "n_regs", "n_spills", "shared_bytes", "triton", "ptxas", "options"}


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


def test_every_kernel_compiles_without_spills():
    variants = [pair for space in configs.SPACES for pair in covering(space)]
    targets = cc.supported_targets()                     # sm_80, sm_90, and sm_100 where Triton has it
    assert {"sm_80", "sm_90"} <= set(targets)
    rows = cc.check(targets, jobs=2, variants=variants)
    assert len(rows) == len(targets) * len(variants)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, cc.format_table(bad)
    assert all(KEYS <= set(r) and r["n_spills"] == 0 and 0 < r["n_regs"] <= 255 for r in rows)


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


def test_cli_json_and_exit_status(tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "rows.json", tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-default"))
    assert cc.main(["--targets", "sm_90", "--kernels", "_moment_kernel", "--json", str(out),
                    "--cache-dir", str(cache)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * len(cc.INTS) and all(KEYS <= set(r) and r["ok"] for r in rows)
    assert {r["triton"] for r in rows} == {triton.__version__}                # which release compiled them
    assert all(r["options"] == {"num_warps": configs.COST_WARPS} and r["ptxas"] for r in rows)
    assert any(cache.rglob("*.cubin")) and not (tmp_path / "triton-default").exists()  # its own cache folder
    printed = capsys.readouterr().out
    assert "gits_cost._moment_kernel" in printed and "Roofline model" in printed
    assert f"with Triton {triton.__version__}" in printed
    with pytest.raises(SystemExit):
        cc.main(["--targets", "sm_12"])


def test_default_cache_is_per_triton_version(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path))
    assert cc.default_cache_dir() == str(tmp_path / f"triton-{triton.__version__}")


def test_exact_tuning_is_chosen_by_triton_release():
    """A release takes the entry of the newest tabled release at or below it, an older one the oldest."""
    table = configs.KDE_EXACT_TUNING
    oldest, newest = min(table), max(table)
    assert configs.triton_release() == configs._release(triton.__version__)
    assert configs._release("3.10.0+git1a2b") == (3, 10) and configs._release("3.9.0") == (3, 9)
    with pytest.raises(ValueError, match="not a Triton version"):
        configs._release("main")
    for release, tuning in table.items():
        assert configs.exact_tuning(release) is tuning
        assert configs.exact_tuning((release[0], release[1], 5)) is tuning          # patch releases
        for kernel in ("logits", "wsum"):
            assert set(getattr(tuning, kernel)) == set(configs.KDE_QUERY_BLOCKS)
            for bb in configs.KDE_QUERY_BLOCKS:
                bk, options = configs.kde_two_phase(kernel, False, bb, release)
                assert (bk, options.get("maxnreg")) == getattr(tuning, kernel)[bb]
                # tl.dot's K is at least 16, and the slices tile both summed axes (D blocks, row tiles)
                assert bk >= 16 and configs.KDE_BD % bk == 0 and configs.KDE_BN % bk == 0
                fast = configs.kde_two_phase(kernel, True, bb, release)
                assert fast == configs.kde_two_phase(kernel, True, bb, oldest) and fast[0] == configs.KDE_BN
        for bd in configs.FUSED_BD:
            assert configs.fused_options(False, bd, release)["maxnreg"] == tuning.fused.get(bd, tuning.fused_default)
    assert configs.exact_tuning((newest[0], newest[1] + 1)) is table[newest]
    assert configs.exact_tuning((2, 3)) is table[oldest]


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


class _Launched(Exception):
    pass


class _Spy:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kw)`` records kw (and stops the
    launcher with _Launched when ``stop``)."""

    def __init__(self, stop=True):
        self.stop, self.calls = stop, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append(kw)
            if self.stop:
                raise _Launched
        return launch


def _launch_kwargs(monkeypatch, fn, kernel, b, d, storage, k, fast):
    """The keyword arguments the KDE launcher ``fn`` passes to ``kernel`` for a batch of b queries."""
    import torch
    from geosample.kernels import kde_triton
    spies = {name: _Spy(stop=name == kernel) for name in ("_logits_kernel", "_wsum_kernel", "_fused_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(kde_triton, name, spy)
    q = torch.zeros(300, d, dtype={"fp32": torch.float32, "fp16": torch.float16, "u8": torch.uint8}[storage])
    with pytest.raises(_Launched):
        fn(q, torch.zeros(300), torch.zeros(b, d), torch.ones(b), k, fast, 1.0, torch.zeros(d))
    return spies[kernel].calls[-1]


@pytest.mark.parametrize("release", [None, *configs.KDE_EXACT_TUNING])
def test_kde_launchers_pass_the_checked_constexprs_and_options(monkeypatch, release):
    """Every KDE launch uses a variant of the table with the table's constexprs and launch options,
    those of the installed Triton release (None) or of each tabled release."""
    from geosample.kernels import kde_triton
    if release is not None:
        monkeypatch.setattr(configs, "triton_release", lambda: release)
    tuning = configs.exact_tuning(release)
    space = {s.kernel: s for s in configs.SPACES}
    runtime = ("num_warps", "num_stages", "maxnreg")
    seen = set()
    for storage in configs.KDE_STORAGE:
        for precision, fast in configs.KDE_PRECISION.items():
            cases = [("_fused_kernel", kde_triton._fused_partial, b, d, k) for b in (3, 40) for k in (1, 9, 64)
                     for d in (5, 16, 33, 100, 129, 256) if d <= configs.fused_max_d(storage != "fp32", fast)]
            cases += [(kernel, kde_triton._range_partial, b, 300, 16) for kernel in ("_logits_kernel", "_wsum_kernel")
                      for b in (3, 16, 17, 40)]
            for kernel, fn, b, d, k in cases:
                kw = _launch_kwargs(monkeypatch, fn, kernel, b, d, storage, k, fast)
                variant = {"storage": storage, "precision": precision,
                           **{c: kw[c] for c in space[kernel].choices if c in kw}}
                assert variant in list(space[kernel].variants()), (kernel, variant)
                assert space[kernel].constexprs(variant) == {c: v for c, v in kw.items() if c not in runtime}
                assert space[kernel].options(variant) == {c: v for c, v in kw.items() if c in runtime}
                if fast:
                    assert kw.get("BK", configs.KDE_BN) == configs.KDE_BN and kw["maxnreg"] == 255
                elif kernel == "_fused_kernel":
                    assert kw["maxnreg"] == tuning.fused.get(kw["BD"], tuning.fused_default)
                else:
                    table = tuning.logits if kernel == "_logits_kernel" else tuning.wsum
                    assert (kw["BK"], kw.get("maxnreg")) == table[kw["BB"]]
                seen.add((kernel, tuple(variant.values())))
    assert len(seen) > 50


def test_roofline_model_follows_the_shapes():
    from geosample.kernels import roofline
    calls = roofline.calls()
    assert {c.kernel for c in calls} >= {"solver_step", "gits _pair_kernel", "gits _moment_kernel",
                                         "kde _fused_kernel", "kde _logits_kernel", "kde _wsum_kernel"}
    step = calls[0]                       # float32 order-4 direction step: 7 words per element
    assert step.bytes_min == 7 * 4 * 256 * 3 * 64 * 64
    us, kind = step.bound_us("H100")
    assert kind == "memory" and us == pytest.approx(1e6 * step.bytes_min / 3.35e12)


def test_kde_launch_model_occupancy_and_prediction():
    """Occupancy follows the SM's register, warp and shared-memory limits; the predicted time is the
    roofline bound, scaled up for too few resident warps and a partly filled last wave."""
    from geosample.kernels import roofline
    assert roofline.blocks_per_sm(128, 8, 32768, "sm_90") == 2        # 4,096 registers per warp: 16 warps
    assert roofline.blocks_per_sm(255, 8, 0, "sm_90") == 1            # rounded to 256 per thread: 8 warps
    assert roofline.blocks_per_sm(32, 8, 0, "sm_80") == 8             # the 64-warp limit
    assert roofline.blocks_per_sm(40, 4, 80 * 1024, "sm_90") == 2     # shared memory: 2 x 81 KiB of 228 KiB
    launches = roofline.kde_launches()
    assert {launch.kernel.split(".")[1] for launch in launches} == {"_fused_kernel", "_logits_kernel", "_wsum_kernel"}
    assert len({(launch.call.shape, launch.config["precision"]) for launch in launches}) == 8

    def rows(regs):
        return [{"kernel": launch.kernel, "target": t, "config": launch.config, "n_regs": regs, "n_spills": 0,
                 "shared_bytes": 16384, "triton": "9.9.9", "options": {"num_warps": 8}}
                for launch in launches for t in roofline.SM]
    lean, fat = roofline.kde_model(rows(64)), roofline.kde_model(rows(255))
    assert len(lean) == len(fat) == len(launches) * len(roofline.SM)
    for a, b in zip(lean, fat):
        assert a["triton"] == "9.9.9" and a["occupancy"] == 0.5 and b["occupancy"] == 0.125
        assert a["bound_us"] == b["bound_us"] <= a["predicted_us"] <= b["predicted_us"]
    assert any(a["predicted_us"] < b["predicted_us"] for a, b in zip(lean, fat))   # occupancy matters somewhere
    assert "| 9.9.9 | _fused_kernel | N=1000000 D=64 B=16 |" in roofline.format_kde_model(lean)
    with pytest.raises(ValueError, match="launch options"):
        roofline.kde_model([{k: v for k, v in r.items() if k != "options"} for r in rows(64)])
