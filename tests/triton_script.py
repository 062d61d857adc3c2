"""Run a Triton check script in a fresh interpreter: compiled on a CUDA machine, else under
TRITON_INTERPRET=1 on CPU (the flag must be set before Triton is first imported, and the rest of
the test session must not see it).  The script picks its device with ``torch.cuda.is_available()``."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_triton_script(code: str, done: str, timeout: int = 300) -> None:
    """Run ``code``; AssertionError with its output unless it exits 0 and the first word of its
    last output line is ``done``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    assert r.returncode == 0 and last.split()[:1] == [done], (r.stdout + r.stderr)[-4000:]
