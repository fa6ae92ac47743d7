"""`python -m ferrum_jax.bench gpu-attention --smoke` runs on CPU and writes the JSON the GPU run will write."""

from bench_smoke import run_smoke


def test_smoke_run_writes_expected_json(tmp_path):
  result = run_smoke("gpu-attention", tmp_path / "results.json")
  assert {"device_kind", "platform", "jax_version", "jaxlib_version", "smoke", "interpret",
          "config", "correctness", "copy_bandwidth", "timings", "failures"} <= set(result)
  assert result["smoke"] and result["interpret"] and result["failures"] == []
  kinds = {(r["name"].split()[1], r["dtype"]) for r in result["correctness"]}
  assert kinds == {(k, d) for k in ("decode", "prefill", "mixed") for d in ("bfloat16", "float32")}
  assert all(r["ok"] and r["max_rel_error"] <= r["tolerance"] for r in result["correctness"])
  assert result["copy_bandwidth"]["bytes_per_s"] > 0
  impls = {(r["batch"], r["impl"]) for r in result["timings"]}
  assert {("decode", "xla reference (jit)"), ("decode", "gpu kernel (default)"),
          ("prefill", "xla reference (jit)"), ("prefill", "gpu kernel (default)")} <= impls
  for r in result["timings"]:
    assert r["seconds"] > 0 and r["bytes_per_s"] > 0 and r["flops_per_s"] > 0
