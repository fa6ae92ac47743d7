"""`python -m ferrum_jax.bench gpu --smoke` runs on CPU (tiny model, the Pallas kernel in the
interpreter and the XLA path) and writes the JSON the first run on a GPU will write."""

import json
import os
import subprocess
import sys


def test_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "ferrum_jax.bench", "gpu", "--smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert [r["attention"] for r in result["runs"]] == ["pallas_interpret", "xla"]
    for run in result["runs"]:
        assert run["warmup_s"] > 0 and run["weight_bytes"] > 0
        assert [d["batch"] for d in run["decode"]] == [1, 2]
        assert all(d["ms"] > 0 and d["tokens_per_s"] > 0 for d in run["decode"])
        assert run["prefill"]["tokens"] == 32 and run["prefill"]["tokens_per_s"] > 0
