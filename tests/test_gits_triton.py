"""The Triton GITS cost kernels against the float64 torch backend, under TRITON_INTERPRET=1 on CPU.

Runs in a subprocess: the interpreter flag must be set before Triton is first imported, and the
rest of the test session must not see it.  On a CUDA machine the same checks run on the GPU.
D = 100 is not a multiple of BLOCK_D (64) and T = 9 not a power of two, so every mask is exercised.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    import geosample as gs
    from reference_cost import jump_error_bound, expansion_floor
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    T, B, D = 9, 3, 100
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
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
