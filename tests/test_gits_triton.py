"""The Triton GITS cost kernels against the float64 torch backend, in a subprocess
(:mod:`triton_script`): compiled on a CUDA machine, under TRITON_INTERPRET=1 on CPU.
D = 100 is not a multiple of the column blocks, and T = 41 is not a power of two and spans two blocks of
later points (configs.COST_MAX_BLOCK_T = 32), so every mask and the skipped blocks are exercised.
"""
import textwrap

import pytest

pytest.importorskip("triton")

from triton_script import run_triton_script  # noqa: E402

SCRIPT = textwrap.dedent("""
    import torch
    import geosample as gs
    from reference_cost import jump_error_bound, expansion_floor
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    T, B, D = 41, 2, 100
    grid = gs.schedules.polynomial(T - 1)
    n = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randn(T, B, D, generator=g, dtype=torch.float64).cumsum(0) * 0.05
    for dtype in (torch.float64, torch.float32):
        x = (y + grid[:, None, None] * n).to(dtype)
        traj = gs.Trajectory(x=x.to(dev), denoised=y[:-1].to(dtype).to(dev), sigmas=grid, nfe=T - 1)
        ref64 = gs.Trajectory(x=x.double(), denoised=y[:-1].to(dtype).double(), sigmas=grid, nfe=T - 1)
        for metric in ("l1", "l2", "dev"):
            got = gs.gits.cost_matrix(traj, metric, backend="triton").cpu()
            want = gs.gits.cost_matrix(ref64, metric, backend="torch")
            assert torch.equal(torch.isinf(got), torch.isinf(want)), metric
            up = torch.isfinite(want)
            err = (got[up] - want[up]).abs()
            # dev: float64 dot products; float64 l1/l2: rounding (and torch's l2 Gram floor);
            # float32 l1/l2: e formed in float32, the C++ backend's bound
            if metric == "dev" or dtype == torch.float64:
                tol = 3e-7 * expansion_floor(ref64)[up] if metric != "l1" else 1e-12 * (1 + want[up].abs())
            else:
                tol = jump_error_bound(ref64, metric)[up]
            assert (err <= tol).all(), (dtype, metric, err.max().item())
    print("OK")
""")


def test_triton_cost_kernels_match_torch_backend():
    run_triton_script(SCRIPT, "OK")
