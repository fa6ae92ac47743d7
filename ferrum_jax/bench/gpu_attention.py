"""Correctness and speed of the GPU (Triton) ragged paged attention kernel, in one run.

Usage, on a machine with an NVIDIA GPU (written for an H200):
  python -m ferrum_jax.bench gpu-attention --out results.json
and on CPU, to prove the script executes (tiny shapes, Pallas interpreter, one repeat):
  JAX_PLATFORMS=cpu python -m ferrum_jax.bench gpu-attention --smoke

Method:
1. Correctness. Ragged batches (decode-only, prefill-only, mixed; bf16 and f32) are built the way
   tests/attention_kernels/ragged_batches.py builds them: pages from a shuffled pool so page tables are not
   contiguous, garbage in-range page ids past each sequence's length and in padding rows.
   `ragged_paged_attention(..., backend="gpu")` is compared on the device with
   `ragged_paged_attention_reference` under jax.jit; the error is max|kernel - ref| / max|ref|,
   against 3e-2 for bf16 and 1e-5 for f32. f32 runs under jax.default_matmul_precision("highest")
   on both sides, because the default f32 dot on Ampere and later is TF32 (~1e-3 relative), which
   would measure the rounding mode, not the kernel. Every timed kernel configuration is also
   checked against the reference output of its benchmark batch.
2. Timing. A decode-heavy batch (64 sequences x 2048 context, q_len 1) and a prefill-heavy batch
   (8 sequences x 2048 new tokens, no prior context), 32 q heads, 8 KV heads, head_dim 128,
   page_size 16, bf16. The kernel runs with its default block sizes and a small sweep of
   kv_splits / pages_per_block / queries_per_block; the XLA reference runs under jax.jit. After
   warmup calls (which include compilation), each sample issues INNER back-to-back calls and
   waits for the last with jax.block_until_ready, so host dispatch overlaps device work; the
   figure is the median over samples of sample time / INNER.
3. Bandwidth. Bytes moved = the K and V pages the live contexts occupy (ceil(kv_len / page_size)
   pages per sequence, every KV head) + the live q rows + the output rows. That is the minimum
   traffic; bytes / time is the achieved HBM bandwidth. For decode it is the figure of merit. For
   prefill the kernel re-reads a sequence's KV once per query block, so the bandwidth figure
   understates the real traffic and the causal-attention FLOP rate (4 * head_dim * q_heads per
   attended (query, key) pair) is the meaningful one. The ratio is taken against the copy
   bandwidth of the same device: a jitted `x + 1` over a 4 GiB float32 array, (read + written
   bytes) / median time.
4. Output: markdown tables on stdout and a JSON with every figure plus device kind and versions.
   Any NaN, tolerance breach or kernel error is recorded, the run continues so one run reports
   everything, and the script exits 1 at the end listing the failures.
"""

import argparse
import contextlib
import functools
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import jax
import jax.numpy as jnp

# Runnable as a plain script from anywhere: the repository root holds pallas_kernels.

from pallas_kernels import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.gpu_kernel import gpu_block_sizes

TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-5}

# Full run: the shapes of the brief. Smoke run: the same code paths at sizes the CPU interpreter
# gets through in seconds (head_dim and page_size stay powers of two, as the kernel requires).
FULL = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
            check_seqs=8, check_pages_per_seq=64,
            decode_seqs=64, decode_ctx=2048, prefill_seqs=8, prefill_tokens=2048,
            warmup=3, samples=20, inner=10, copy_bytes=4 << 30,
            decode_sweep=[dict(kv_splits=s) for s in (1, 2, 4, 8)]
            + [dict(pages_per_block=p) for p in (2, 8)]
            + [dict(queries_per_block=4), dict(queries_per_block=4, kv_splits=8)],
            prefill_sweep=[dict(pages_per_block=p) for p in (2, 8)]
            + [dict(queries_per_block=q) for q in (4, 16)]
            + [dict(queries_per_block=16, pages_per_block=2)])
SMOKE = dict(num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4,
             check_seqs=3, check_pages_per_seq=8,
             decode_seqs=4, decode_ctx=32, prefill_seqs=2, prefill_tokens=16,
             warmup=1, samples=1, inner=1, copy_bytes=4 << 20,
             decode_sweep=[dict(kv_splits=2)], prefill_sweep=[])


def make_batch(seed, lens, *, num_tokens, num_seqs_max, pages_per_seq, cfg, dtype):
  """A ragged batch from (q_len, kv_len) pairs, laid out as in tests/attention_kernels/ragged_batches.py.

  q has num_tokens rows; those past the live tokens are padding, whose output the contract pins
  to zero. Returns (args tuple, live
  (q_len, kv_len) pairs).
  """
  rng = np.random.default_rng(seed)
  q_lens = np.array([ql for ql, _ in lens], np.int32)
  kv_lens = np.array([kl for _, kl in lens], np.int32)
  page_size = cfg["page_size"]
  assert np.all(q_lens <= kv_lens) and np.all(kv_lens <= pages_per_seq * page_size)
  assert q_lens.sum() <= num_tokens
  num_pages = num_seqs_max * pages_per_seq
  pool = rng.permutation(num_pages)
  page_indices = rng.integers(0, num_pages, (num_seqs_max, pages_per_seq)).astype(np.int32)
  offset = 0
  for s, n in enumerate(-(-kv_lens // page_size)):
    page_indices[s, :n] = pool[offset:offset + n]
    offset += n
  num_live = len(lens)
  cu_q_lens = np.full(num_seqs_max + 1, q_lens.sum(), np.int32)
  cu_q_lens[:num_live + 1] = np.concatenate([[0], np.cumsum(q_lens)])
  kv_lens_all = np.zeros(num_seqs_max, np.int32)
  kv_lens_all[:num_live] = kv_lens
  h, kvh, d = cfg["num_q_heads"], cfg["num_kv_heads"], cfg["head_dim"]

  def normal(shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

  pages_shape = (kvh, num_pages, page_size, d)
  args = (normal((num_tokens, h, d)), normal(pages_shape), normal(pages_shape),
          jnp.asarray(kv_lens_all), jnp.asarray(page_indices), jnp.asarray(cu_q_lens),
          jnp.asarray(num_live, jnp.int32))
  return args, list(zip(q_lens.tolist(), kv_lens.tolist()))


def attention_fn(backend, interpret, block_sizes, head_dim):
  """A jitted attention call; block sizes are static, so each configuration compiles once.

  backend="reference" dispatches straight to ragged_paged_attention_reference (the XLA path).
  """
  return jax.jit(functools.partial(
      ragged_paged_attention, sm_scale=1.0 / math.sqrt(head_dim), backend=backend,
      interpret=interpret, **block_sizes))


def precision_for(dtype):
  """IEEE f32 dots for f32 (see the docstring); bf16 is traced exactly as production traces it."""
  if dtype == jnp.float32:
    return jax.default_matmul_precision("highest")
  return contextlib.nullcontext()


def relative_error(out, ref):
  """(max|out - ref| / max|ref|, whether either side has a NaN), computed on the device."""
  out32, ref32 = out.astype(jnp.float32), ref.astype(jnp.float32)
  err = jnp.max(jnp.abs(out32 - ref32)) / jnp.maximum(jnp.max(jnp.abs(ref32)), 1e-30)
  has_nan = jnp.isnan(out32).any() | jnp.isnan(ref32).any()
  return float(err), bool(has_nan)


def judge(name, dtype, err, has_nan, failures):
  tol = TOLERANCE[jnp.dtype(dtype).name]
  ok = not has_nan and err <= tol
  if not ok:
    failures.append(f"{name}: {'NaN in output' if has_nan else f'error {err:.3e} > {tol:g}'}")
  return dict(max_rel_error=err, nan=has_nan, tolerance=tol, ok=ok)


def check_correctness(cfg, interpret, failures):
  """Kernel vs reference on decode-only, prefill-only and mixed batches, bf16 and f32."""
  n, pps, ps = cfg["check_seqs"], cfg["check_pages_per_seq"], cfg["page_size"]
  ctx = pps * ps
  rng = np.random.default_rng(0)
  kinds = {
      "decode": [(1, int(k)) for k in rng.integers(1, ctx + 1, n)],
      "prefill": [(int(k), int(k)) for k in rng.integers(1, ctx // 4 + 1, n)],
      # Chunked-prefill continuations next to decodes; one q_len 0 sequence, which the
      # contract allows and which must contribute nothing.
      "mixed": [(1, ctx), (ctx // 4, ctx // 2), (0, 5)]
               + [(int(q), int(q) + int(p)) for q, p in zip(rng.integers(1, ctx // 8 + 1, n - 3),
                                                          rng.integers(0, ctx // 2, n - 3))],
  }
  # One token bucket and one padding sequence slot for all kinds: every batch of a dtype shares
  # one compilation (as the engine's buckets do), and padding tokens and num_seqs < seqs are
  # exercised on every check.
  num_tokens = n * (ctx // 4) + 1
  rows = []
  for dtype in (jnp.bfloat16, jnp.float32):
    for kind, lens in kinds.items():
      args, _ = make_batch(len(rows) + 1, lens, num_tokens=num_tokens, num_seqs_max=n + 1,
                           pages_per_seq=pps, cfg=cfg, dtype=dtype)
      name = f"check {kind} {jnp.dtype(dtype).name}"
      with precision_for(dtype):
        ref = attention_fn("reference", False, {}, cfg["head_dim"])(*args)
        try:
          out = attention_fn("gpu", interpret, {}, cfg["head_dim"])(*args)
        except Exception as e:  # noqa: BLE001 -- recorded and reported, the run goes on.
          failures.append(f"{name}: {type(e).__name__}: {e}")
          rows.append(dict(name=name, dtype=jnp.dtype(dtype).name, error=repr(e), ok=False))
          continue
      rows.append(dict(name=name, dtype=jnp.dtype(dtype).name,
                       tokens=sum(ql for ql, _ in lens), lens=lens,
                       **judge(name, dtype, *relative_error(out, ref), failures)))
  return rows


def time_call(fn, args, cfg):
  """Median seconds per call; see the docstring (warmup, INNER back-to-back calls per sample)."""
  for _ in range(cfg["warmup"]):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(cfg["samples"]):
    start = time.perf_counter()
    for _ in range(cfg["inner"]):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / cfg["inner"])
  return statistics.median(samples)


def traffic(live, cfg, dtype):
  """(minimum bytes moved, causal attention FLOPs) of a batch's live sequences."""
  item = jnp.dtype(dtype).itemsize
  h, kvh, d, ps = cfg["num_q_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["page_size"]
  kv_bytes = sum(-(-kl // ps) for _, kl in live) * ps * d * kvh * 2 * item
  qo_bytes = 2 * sum(ql for ql, _ in live) * h * d * item
  # Query j of a sequence sits at kv_len - q_len + j and sees that many keys plus itself.
  pairs = sum(ql * (kl - ql) + ql * (ql + 1) // 2 for ql, kl in live)
  return kv_bytes + qo_bytes, 4 * d * h * pairs


def copy_bandwidth(cfg):
  """Bytes per second of a jitted elementwise pass (read + write) over a large f32 array."""
  x = jnp.zeros((cfg["copy_bytes"] // 4,), jnp.float32)
  seconds = time_call(jax.jit(lambda a: a + 1), (x,), cfg)
  nbytes = 2 * cfg["copy_bytes"]
  return dict(bytes=nbytes, seconds=seconds, bytes_per_s=nbytes / seconds)


def benchmark(cfg, interpret, failures):
  """Time the kernel (defaults + sweep) and the jitted reference on the two benchmark batches."""
  ps, dtype = cfg["page_size"], jnp.bfloat16
  batches = {
      "decode": ([(1, cfg["decode_ctx"])] * cfg["decode_seqs"], cfg["decode_ctx"] // ps,
                 cfg["decode_sweep"]),
      "prefill": ([(cfg["prefill_tokens"], cfg["prefill_tokens"])] * cfg["prefill_seqs"],
                  cfg["prefill_tokens"] // ps, cfg["prefill_sweep"]),
  }
  rows = []
  for kind, (lens, pps, sweep) in batches.items():
    args, live = make_batch(100 + len(rows), lens, num_tokens=sum(ql for ql, _ in lens),
                            num_seqs_max=len(lens), pages_per_seq=pps, cfg=cfg, dtype=dtype)
    nbytes, flops = traffic(live, cfg, dtype)
    ref_fn = attention_fn("reference", False, {}, cfg["head_dim"])
    ref = ref_fn(*args)
    group = cfg["num_q_heads"] // cfg["num_kv_heads"]
    runs, seen = [("xla reference (jit)", ref_fn, None)], set()
    for block_sizes in [{}] + sweep:
      # Report the block sizes the kernel resolves, so defaults are visible in the table, and
      # skip sweep points that resolve to a configuration already timed (often the default).
      resolved = gpu_block_sizes(args[0].shape[0], cfg["num_kv_heads"], group, ps, pps,
                                 cfg["head_dim"], **block_sizes)
      if resolved in seen:
        continue
      seen.add(resolved)
      label = "gpu kernel (" + ("default" if not block_sizes else "sweep") + ")"
      runs.append((label, attention_fn("gpu", interpret, block_sizes, cfg["head_dim"]),
                   dict(zip(("queries_per_block", "pages_per_block", "kv_splits"), resolved))))
    for label, fn, resolved in runs:
      name = f"{kind} {label} {resolved or ''}".strip()
      row = dict(batch=kind, impl=label, block_sizes=resolved, bytes=nbytes, flops=flops)
      try:
        if resolved is not None:
          row.update(judge(name, dtype, *relative_error(fn(*args), ref), failures))
        seconds = time_call(fn, args, cfg)
      except Exception as e:  # noqa: BLE001 -- recorded and reported, the run goes on.
        failures.append(f"{name}: {type(e).__name__}: {e}")
        rows.append(dict(row, error=repr(e), ok=False))
        continue
      rows.append(dict(row, seconds=seconds, bytes_per_s=nbytes / seconds,
                       flops_per_s=flops / seconds))
  return rows


def markdown(result):
  lines = [f"device: {result['device_kind']} ({result['platform']}), jax {result['jax_version']}",
           "", "| check | tokens | max rel error | tolerance | ok |", "|---|---|---|---|---|"]
  for r in result["correctness"]:
    err = f"{r['max_rel_error']:.2e}" if "max_rel_error" in r else "error"
    lines.append(f"| {r['name']} | {r.get('tokens', '-')} | {err} | {r.get('tolerance', '-')} "
                 f"| {r['ok']} |")
  copy = result["copy_bandwidth"]["bytes_per_s"]
  lines += ["", f"copy bandwidth: {copy / 1e9:.1f} GB/s", "",
            "| batch | impl | q/p/s blocks | median ms | GB/s | % of copy | TFLOP/s | ok |",
            "|---|---|---|---|---|---|---|---|"]
  for r in result["timings"]:
    bs = r["block_sizes"]
    blocks = (f"{bs['queries_per_block']}/{bs['pages_per_block']}/{bs['kv_splits']}"
              if bs else "-")
    if "seconds" not in r:
      lines.append(f"| {r['batch']} | {r['impl']} | {blocks} | error | | | | False |")
      continue
    lines.append(f"| {r['batch']} | {r['impl']} | {blocks} | {r['seconds'] * 1e3:.3f} "
                 f"| {r['bytes_per_s'] / 1e9:.1f} | {100 * r['bytes_per_s'] / copy:.1f} "
                 f"| {r['flops_per_s'] / 1e12:.2f} | {r.get('ok', '-')} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m ferrum_jax.bench gpu-attention", description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="gpu_attention_results.json", help="JSON output path")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, interpret=True, one repeat: proves the script runs on CPU")
  opts = parser.parse_args(argv)
  cfg = SMOKE if opts.smoke else FULL
  # The Triton kernel only compiles for a GPU; elsewhere the Pallas interpreter runs it.
  interpret = opts.smoke or jax.default_backend() != "gpu"
  failures = []
  started = time.perf_counter()
  result = dict(
      device_kind=jax.devices()[0].device_kind, platform=jax.default_backend(),
      jax_version=jax.__version__, jaxlib_version=jax.lib.__version__,
      python_version=platform.python_version(), smoke=opts.smoke, interpret=interpret,
      config=dict(cfg),
      correctness=check_correctness(cfg, interpret, failures),
      copy_bandwidth=copy_bandwidth(cfg),
  )
  result["timings"] = benchmark(cfg, interpret, failures)
  result["failures"] = failures
  result["wall_seconds"] = time.perf_counter() - started
  Path(opts.out).write_text(json.dumps(result, indent=1))
  print(markdown(result))
  print(f"\nwrote {opts.out} in {result['wall_seconds']:.1f} s")
  if failures:
    print("FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
