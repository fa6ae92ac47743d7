"""`python -m ferrum_jax.bench gpu --smoke` runs on CPU (tiny model, the Pallas kernel in the
interpreter and the XLA path) and writes the JSON the first run on a GPU will write."""

from bench_smoke import run_smoke


def test_smoke_run_writes_every_figure(tmp_path):
    result = run_smoke("gpu", tmp_path / "gpu.json")
    assert [r["attention"] for r in result["runs"]] == ["pallas_interpret", "xla"]
    for run in result["runs"]:
        assert run["warmup_s"] > 0 and run["weight_bytes"] > 0
        assert [d["batch"] for d in run["decode"]] == [1, 2]
        assert all(d["ms"] > 0 and d["tokens_per_s"] > 0 for d in run["decode"])
        assert run["prefill"]["tokens"] == 32 and run["prefill"]["tokens_per_s"] > 0
