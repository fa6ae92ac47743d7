"""Runs a benchmark's `--smoke` mode on CPU in a subprocess and returns the JSON it wrote."""

import json
import os
import subprocess
import sys


def run_smoke(name: str, out) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "ferrum_jax.bench", name, "--smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())
