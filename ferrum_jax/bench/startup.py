"""Start-up of the default model (SmolLM2-135M-Instruct GGUF): load time and time to a healthy server.

    python -m ferrum_jax.bench startup                # load (vs transformers) + server cold/warm
    python -m ferrum_jax.bench startup --make-serve   # also `make serve` in a fresh clone, install included
    python -m ferrum_jax.bench startup --model gemma3-270m   # a packaged model (ferrum_jax.packaged_models)

Every figure is a whole fresh process timed from its launch, so imports count:

  load         `JaxModelExecutor.from_pretrained(default_model_path())` (GGUF parse, host
               dequantization, device placement) against transformers'
               `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` on the same file, both
               float32; median of `--repeats` runs each, and ferrum's import time on its own.
  server       `python -m ferrum_jax.serve` with its defaults, launch to the first 200 from
               /health: cold (an empty JAX compilation cache, so every step program compiles)
               and warm (restarted on the cache the cold run filled).
  make serve   `git clone` of this checkout's HEAD into a temporary directory, then
               `make serve` there until /health answers: venv creation, the pip install (with
               whatever pip's download cache holds) and a cold compile, as a new user gets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ferrum_jax.bench.server_process import REPO, Server, free_port

_FERRUM_LOAD = (
    "import time; t0 = time.perf_counter(); import ferrum_jax as fj; t1 = time.perf_counter(); "
    "from ferrum_jax.packaged_models import PACKAGED; "
    "fj.JaxModelExecutor.from_pretrained(PACKAGED[{model!r}](), dtype='float32', progress=False); "
    "print(t1 - t0, time.perf_counter() - t0)"
)
_HF_LOAD = (
    "import time; t0 = time.perf_counter(); import torch, transformers; "
    "from ferrum_jax.packaged_models import PACKAGED; p = PACKAGED[{model!r}](); "
    "transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32); "
    "print(0.0, time.perf_counter() - t0)"
)


def _timed_python(code: str, env: dict) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    import_s, total_s = out.stdout.split()[-2:]
    return float(import_s), float(total_s)


def time_to_healthy(cmd: list[str], port: int, env: dict, cwd: Path, timeout_s: float) -> float:
    """Seconds from launching `cmd` to /health answering 200; the process is stopped after."""
    log = Path(tempfile.mkstemp(prefix="ferrum_startup_", suffix=".log")[1])
    server = Server("server", cmd, env, port, log, cwd)
    try:
        return server.start(timeout_s)
    finally:
        server.stop()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferrum_jax.bench startup", description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--make-serve", action="store_true", help="also time `make serve` in a fresh clone")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a server may take to become healthy")
    p.add_argument("--model", default="smollm2-135m", help="a packaged model (ferrum_jax.packaged_models)")
    args = p.parse_args(argv)
    # The server's own cache setting (FERRUM_JAX_CACHE_DIR) decides where programs go; a
    # JAX_COMPILATION_CACHE_DIR from the environment would override it.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"} | {"JAX_PLATFORMS": "cpu"}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start", flush=True)

    ferrum = [_timed_python(_FERRUM_LOAD.format(model=args.model), env) for _ in range(args.repeats)]
    hf = [_timed_python(_HF_LOAD.format(model=args.model), env) for _ in range(args.repeats)]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"\n| {args.model} load (float32, fresh process) | seconds (median) | runs |")
    print("|---|---:|---|")
    print(f"| ferrum_jax: import | {med([a for a, _ in ferrum]):.1f} | {', '.join(f'{a:.1f}' for a, _ in ferrum)} |")
    print(f"| ferrum_jax: import + from_pretrained(GGUF) | {med([b for _, b in ferrum]):.1f} | {', '.join(f'{b:.1f}' for _, b in ferrum)} |")
    print(f"| transformers: import + from_pretrained(gguf_file=) | {med([b for _, b in hf]):.1f} | {', '.join(f'{b:.1f}' for _, b in hf)} |", flush=True)

    cache = Path(tempfile.mkdtemp(prefix="ferrum_startup_cache_"))
    server_env = {**env, "FERRUM_JAX_CACHE_DIR": str(cache)}
    rows = []
    for label in ("cold (empty compile cache)", "warm (restart, same cache)"):
        port = free_port()
        cmd = [sys.executable, "-m", "ferrum_jax.serve", "--port", str(port), "--model", args.model]
        rows.append((f"`python -m ferrum_jax.serve`, {label}", time_to_healthy(cmd, port, server_env, REPO, args.timeout)))
        print(f"{rows[-1][0]}: {rows[-1][1]:.1f} s", flush=True)
    if args.make_serve:
        clone = Path(tempfile.mkdtemp(prefix="ferrum_fresh_")) / "ferrum_jax"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        fresh_cache = Path(tempfile.mkdtemp(prefix="ferrum_fresh_cache_"))
        port = free_port()
        fresh_env = {k: v for k, v in env.items() if k != "VIRTUAL_ENV"}
        fresh_env["FERRUM_JAX_CACHE_DIR"] = str(fresh_cache)
        cmd = ["make", "serve", f"ARGS=--port {port} --model {args.model}"]
        rows.append(("`make serve` in a fresh clone (venv + install + cold compile)", time_to_healthy(cmd, port, fresh_env, clone, args.timeout)))
        print(f"{rows[-1][0]}: {rows[-1][1]:.1f} s", flush=True)
        shutil.rmtree(clone.parent, ignore_errors=True)
    print("\n| launch to healthy /health | seconds |")
    print("|---|---:|")
    for name, s in rows:
        print(f"| {name} | {s:.1f} |")
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
