"""Compile-only TPU and GPU targets (`python -m ferrum_jax.aot`): the real XLA:TPU + Mosaic and
XLA:GPU + Triton + ptxas compilers, run on this CPU machine against compile-only devices.

Oracles: the compilers themselves (a kernel they reject fails), XLA's memory analysis, and the
compiled HLO text (the kernel's custom call is there; no copy of the KV pool; two all-reduces
per tensor-parallel layer). Each target compiles in its own process (`make test` installs
libtpu, the jax CUDA plugin and ptxas), because some Triton failures abort the process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LLAMA_8B = str(REPO / "configs" / "models" / "llama-3-8b")
LLAMA_70B = str(REPO / "configs" / "models" / "llama-3-70b")
# Few buckets, at Llama-3's full context: on a TPU or GPU one 16-token step of up to 4 sequences,
# which also serves decodes of 1-4 (batch.step_cost: below the ridge, padding costs nothing).
SMALL = ["--max-model-len", "8192", "--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--programs", "logits_last"]
KERNEL_CALL = {"tpu": 'custom_call_target="tpu_custom_call"', "gpu": 'custom_call_target="__gpu$xla.gpu.triton"'}

needs_tpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (make test installs it)")
needs_cuda = pytest.mark.skipif(
    importlib.util.find_spec("jax_plugins.xla_cuda12") is None, reason="the jax CUDA plugin is not installed (make test installs it)"
)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def aot(tmp_path: Path, *args: str) -> tuple[int, dict, dict[str, str]]:
    """(exit code, the --json report, program name -> compiled HLO text)."""
    out = run_module("ferrum_jax.aot", *args, "--json", str(tmp_path / "r.json"), "--dump-hlo", str(tmp_path / "hlo"))
    report = json.loads((tmp_path / "r.json").read_text()) if (tmp_path / "r.json").exists() else {}
    hlo = {p.name.removesuffix(".hlo.txt"): p.read_text() for p in sorted((tmp_path / "hlo").glob("*.hlo.txt"))}
    assert report, out.stdout + out.stderr
    return out.returncode, report, hlo


@pytest.mark.parametrize("target", [
    pytest.param("tpu-v5e-1", marks=needs_tpu), pytest.param("tpu-v6e-1", marks=needs_tpu),
    pytest.param("gpu-h100", marks=needs_cuda), pytest.param("gpu-a100", marks=needs_cuda),
])  # fmt: skip
def test_attention_kernel_compiles_for_the_target(target):
    out = run_module("ferrum_jax.aot.kernel_check", "--target", target)
    results = [line for line in out.stdout.splitlines() if line.startswith(("ok ", "FAILED "))]
    skipped = [line for line in out.stdout.splitlines() if line.startswith("skipped ")]
    # The two fp8-KV cases: compiled everywhere but on the A100, whose Triton cannot convert fp8.
    assert len(skipped) == (2 if target == "gpu-a100" else 0) and all("kvfloat8" in line for line in skipped), out.stdout
    assert out.returncode == 0 and len(results) == 12 - len(skipped), out.stdout + out.stderr
    assert all(r.startswith("ok ") for r in results), out.stdout + out.stderr


@pytest.mark.parametrize("target, platform", [
    pytest.param("tpu-v6e-1", "tpu", marks=needs_tpu), pytest.param("gpu-h100", "gpu", marks=needs_cuda),
])  # fmt: skip
def test_llama3_8b_step_compiles_fits_and_copies_no_kv(tmp_path, target, platform):
    code, report, hlo = aot(tmp_path, "--target", target, "--model", LLAMA_8B, *SMALL, "--num-pages", "2048")
    assert code == 0 and report["fits"] and report["kv_pool_copies"] == 0, report
    assert sorted(hlo) == ["step_t16_s4_l4"]
    for name, text in hlo.items():
        assert KERNEL_CALL[platform] in text, f"{name}: the {platform} attention kernel is not in the program"
    # bfloat16 Llama-3-8B: 8.03e9 parameters; the pool 2 x 32 layers x 2048 pages x 16 x 8 x 128 x 2 bytes.
    assert 8.0e9 * 2 < report["weight_bytes_per_device"] < 8.1e9 * 2
    assert report["kv_pool_bytes_per_device"] == 2 * 32 * 2048 * 16 * 8 * 128 * 2
    assert all(p["peak_bytes"] >= report["weight_bytes_per_device"] + report["kv_pool_bytes_per_device"] for p in report["programs"])
    assert_moves_its_weights_once(report, hlo, platform)


def assert_moves_its_weights_once(report: dict, hlo: dict[str, str], platform: str) -> None:
    """Every program of few tokens writes (and reads back) no more than 10% of the weights'
    bytes beyond the KV, logits and activations (the roofline's excess: aot.hlo_traffic counts
    each write once per loop trip); on GPU each decoder weight is one in-place layer-kernel call
    (seven a layer), where XLA's gemm copied every layer out of the stack (174% excess in bf16)."""
    for r in report["roofline"]:
        assert r["excess_of_weights"] <= 0.10, (r["program"], r["excess_of_weights"], r["largest_writes"])
    if platform == "gpu":
        for name, text in hlo.items():
            assert text.count('name = "layer_matmul"') == 7, name
    decode = report["decode"]["decode_1"]
    assert decode["bound"] == "memory" and decode["predicted_tokens_per_s"] > 0


@needs_tpu
@pytest.mark.parametrize("target", ["tpu-v5e-1", "tpu-v6e-1"])
def test_llama3_8b_int4_on_tpu_reads_uint4_codes_in_the_pallas_kernel(tmp_path, target):
    """On TPU the int4 weights are XLA's `uint4` (models.int4_codes) and every int4 matmul (seven
    a layer, the lm_head) is the Mosaic grouped kernel, which dequantizes tiles in VMEM: ~1 MiB
    of temporaries (activations). Held as packed bytes under XLA's grouped dots the same programs
    wrote 0.49-1.98 GiB; as uint4 under XLA's grouped dots, 0.21 GiB (partial sums). The MLP
    stacks are read in place (models.layer_slice): sliced per layer, XLA retiled whole stacks."""
    code, report, hlo = aot(tmp_path, "--target", target, "--model", LLAMA_8B, *SMALL, "--num-pages", "2048",
                            "--quantization", "int4")  # fmt: skip
    assert code == 0 and report["fits"] and report["kv_pool_copies"] == 0, report
    for name, text in hlo.items():
        assert re.search(r"= u4\[32,4096,14336\]\S* parameter\(", text), f"{name}: gate/up are not uint4 parameters"
        kernels = [line for line in text.splitlines() if KERNEL_CALL["tpu"] in line and "grouped_matmul_tpu" in line.split("=")[0]]
        assert len(kernels) == 8, f"{name}: {len(kernels)} grouped kernel calls"
        assert not re.search(r"= u4\[32,(4096,14336|14336,4096)\]\S* (copy|fusion)\(", text), f"{name}: an MLP stack is retiled"
    # Int4 codes are half a byte: 7.0e9 linear parameters (lm_head included) + the bfloat16 embedding.
    assert 4.4e9 < report["weight_bytes_per_device"] < 5.5e9
    for p in report["programs"]:
        assert p["temp_bytes"] < 8 * 2**20, (p["bucket"], p["temp_bytes"])
    # The kernel's stacked operands are pinned to HBM: unpinned, v6e's memory-space assignment
    # copied a whole scale stack into VMEM every layer (21% of the weights' bytes in excess).
    assert_moves_its_weights_once(report, hlo, "tpu")


@needs_cuda
def test_llama3_8b_prefill_on_gpu_does_the_flops_of_its_parameters(tmp_path):
    """Steps of 128 tokens (the layer kernel's row blocks, reading each layer in place) and 512
    (XLA's gemm, bound by FLOPs) multiply exactly what the parameters say: 2 x the layers' linear
    weights x tokens, plus the lm_head's row, counted from the compiled HLO once per layer
    (aot.hlo_traffic: dots, gemm calls and the Triton matmuls' shapes) against the hand count of
    Llama-3-8B. The 128-token step reads its weights once (excess under 10%)."""
    code, report, hlo = aot(tmp_path, "--target", "gpu-h100", "--model", LLAMA_8B, "--max-model-len", "2048",
                            "--max-num-seqs", "1", "--max-num-batched-tokens", "512", "--programs", "logits_last")  # fmt: skip
    assert code == 0, report
    linear = 32 * (4096 * (2 * 32 + 2 * 8) * 128 + 3 * 4096 * 14336)
    for tokens in (128, 512):
        (prefill,) = [r for r in report["roofline"] if r["tokens"] == tokens]
        want = 2 * linear * tokens + 2 * 128256 * 4096
        got = prefill["hlo_dot_flops"] + prefill["kernel_flops"]
        assert abs(got / want - 1) < 0.10, (tokens, prefill["hlo_dot_flops"], prefill["kernel_flops"], want)
        if tokens == 128:
            assert prefill["excess_of_weights"] <= 0.10, prefill["largest_writes"]
            assert hlo["step_t128_s1_l1"].count('name = "layer_matmul"') == 7


@needs_tpu
@pytest.mark.parametrize("target, quantization", [("tpu-v6e-1", None), ("tpu-v5e-1", "int4")])
def test_llama3_8b_prefill_on_tpu_counts_the_flops_of_its_parameters(tmp_path, target, quantization):
    """A 128-token step on TPU: the compiled program's dots and convolutions plus its kernels'
    own CostEstimates (Mosaic keeps them in the custom call: the int4 grouped matmuls, the
    attention at half the table's capacity, pallas_kernels.cost), each counted once per layer,
    against the hand count 2 x linear weights x tokens + the lm_head's row + the attention."""
    flags = ["--quantization", quantization] if quantization else []
    code, report, _ = aot(tmp_path, "--target", target, "--model", LLAMA_8B, "--max-model-len", "2048", "--max-num-seqs",
                          "1", "--max-num-batched-tokens", "128", "--programs", "logits_last", *flags)  # fmt: skip
    assert code == 0, report
    linear = 32 * (4096 * (2 * 32 + 2 * 8) * 128 + 3 * 4096 * 14336)
    attention = 32 * 4 * 32 * 128 * 128 * 1024  # layers x 4 x heads x head_dim x tokens x context (2048 / 2)
    (prefill,) = [r for r in report["roofline"] if r["tokens"] == 128]
    want = 2 * linear * 128 + 2 * 128256 * 4096 + attention
    got = prefill["hlo_dot_flops"] + prefill["kernel_flops"]
    assert abs(got / want - 1) < 0.10, (prefill["hlo_dot_flops"], prefill["kernel_flops"], want)
    assert prefill["kernel_flops"] >= attention, prefill["kernel_flops"]
    assert abs(prefill["flops"] / want - 1) < 0.10, (prefill["flops"], want)


@needs_cuda
def test_llama3_8b_int8_on_gpu_reads_each_layer_in_place(tmp_path):
    """Per-channel int8 decoder weights on GPU go to the layer kernel too (codes read from the
    stack, the column scales applied in the kernel): XLA's gemm copied each layer's codes out of
    the stack, 170% of the weights' bytes in excess."""
    code, report, hlo = aot(tmp_path, "--target", "gpu-h100", "--model", LLAMA_8B, *SMALL, "--num-pages", "2048",
                            "--quantization", "int8")  # fmt: skip
    assert code == 0 and report["fits"] and report["kv_pool_copies"] == 0, report
    assert_moves_its_weights_once(report, hlo, "gpu")


@needs_cuda
def test_llama3_8b_int4_on_gpu_reads_packed_codes_in_the_pallas_kernel(tmp_path):
    """On GPU every int4 matmul (seven a layer, the lm_head) is the Pallas kernel reading the
    packed bytes, a decoder layer's straight from the stacked weights (models.layer_slice): XLA's
    grouped dots there wrote 1.0-1.97 GiB of converted codes, and slicing the layer out for the
    kernel first copied each weight (0.10 GiB of temporaries)."""
    code, report, hlo = aot(tmp_path, "--target", "gpu-h100", "--model", LLAMA_8B, *SMALL, "--num-pages", "2048",
                            "--quantization", "int4")  # fmt: skip
    assert code == 0 and report["fits"] and report["kv_pool_copies"] == 0, report
    for name, text in hlo.items():
        kernels = [line for line in text.splitlines() if KERNEL_CALL["gpu"] in line and 'name = "grouped_matmul"' in line]
        assert len(kernels) == 8, f"{name}: {len(kernels)} int4 kernel calls"
        assert not re.search(r"= u8\[1,\d+,\d+\]\S* (dynamic-slice|fusion)\(", text), f"{name}: a layer of int4 codes is sliced out"
    for p in report["programs"]:
        assert p["temp_bytes"] < 0.02 * 2**30, (p["bucket"], p["temp_bytes"])


@needs_tpu
def test_llama3_70b_tp8_has_two_all_reduces_per_layer(tmp_path):
    code, report, hlo = aot(
        tmp_path, "--target", "tpu-v6e-8", "--model", LLAMA_70B, "--tensor-parallel-size", "8", "--max-model-len", "8192",
        "--max-num-seqs", "1", "--max-num-batched-tokens", "16", "--num-pages", "4096", "--programs", "logits_last",
    )  # fmt: skip
    assert code == 0 and report["fits"] and report["kv_pool_copies"] == 0, report
    assert len(hlo) == 1
    for name, text in hlo.items():
        # The scanned layer body is the while loop's: attention's output projection and the MLP's down projection.
        in_layers = [line for line in text.splitlines() if re.search(r"\ball-reduce(-start)?\(", line) and "/while/" in line]
        assert len(in_layers) == 2, f"{name}: {in_layers}"
    assert 70.5e9 * 2 / 8 < report["weight_bytes_per_device"] < 71e9 * 2 / 8


@needs_tpu
def test_llama3_70b_int4_tp8_runs_the_grouped_kernel_per_shard(tmp_path):
    """Under tensor parallelism the Mosaic kernel runs inside shard_map on each chip's part of
    the uint4 weights (models.grouped_kernels): seven kernels a layer, the same two all-reduces
    a layer as the float model (o's and down's partial sums), no temporaries (XLA's grouped dots
    there: 0.49 GiB). The lm_head's 16032 columns a chip fit no kernel block and keep XLA."""
    code, report, hlo = aot(
        tmp_path, "--target", "tpu-v5e-8", "--model", LLAMA_70B, "--tensor-parallel-size", "8", "--max-model-len", "8192",
        "--max-num-seqs", "1", "--max-num-batched-tokens", "16", "--num-pages", "4096", "--programs", "logits_last",
        "--quantization", "int4",
    )  # fmt: skip
    assert code == 0 and report["fits"] and report["kv_pool_copies"] == 0, report
    for name, text in hlo.items():
        lines = text.splitlines()
        kernels = [line for line in lines if KERNEL_CALL["tpu"] in line and "grouped_matmul_tpu" in line.split("=")[0]]
        in_layers = [line for line in lines if re.search(r"\ball-reduce(-start)?\(", line) and "/while/" in line]
        assert len(kernels) == 7 and len(in_layers) == 2, (name, len(kernels), in_layers)
    assert 4.5 * 2**30 < report["weight_bytes_per_device"] < 5.0 * 2**30
    for p in report["programs"]:
        assert p["temp_bytes"] < 2**20, (p["bucket"], p["temp_bytes"])


@needs_tpu
@pytest.mark.parametrize("quantization, fits", [("int8", True), (None, False)])
def test_llama3_70b_fits_a_v5e_8_in_int8_and_not_in_bfloat16(tmp_path, quantization, fits):
    """16 GiB chips: bfloat16 weights alone are 17.6 GB a chip; int8 ones (+ the bfloat16
    embedding and per-channel scales) 9.0 GB, leaving room for thousands of KV pages."""
    flags = ["--quantization", quantization] if quantization else []
    code, report, _ = aot(
        tmp_path, "--target", "tpu-v5e-8", "--model", LLAMA_70B, "--tensor-parallel-size", "8", "--max-model-len", "8192",
        "--max-num-seqs", "1", "--max-num-batched-tokens", "16", "--num-pages", "4096", "--programs", "logits_last", *flags,
    )  # fmt: skip
    assert report["fits"] is fits and code == (0 if fits else 1), report
    if fits:
        assert 8.5e9 < report["weight_bytes_per_device"] < 9.5e9 and report["max_num_pages"] > 10000
        assert report["kv_pool_copies"] == 0
        # The integer weights are dequantized inside the matmuls: nothing beyond weights, pool
        # and a few MB of activations is live at the peak.
        assert report["peak_bytes_per_device"] - report["weight_bytes_per_device"] - report["kv_pool_bytes_per_device"] < 0.1e9


@needs_tpu
def test_an_oversized_config_is_reported_as_not_fitting(tmp_path):
    # 16384 pages of Llama-3-8B are 64 GiB of KV next to 15 GiB of weights; a v6e has 32 GiB.
    code, report, _ = aot(tmp_path, "--target", "tpu-v6e-1", "--model", LLAMA_8B, *SMALL, "--num-pages", "16384")
    assert code == 1 and report["fits"] is False, report


@needs_tpu
def test_the_kv_copy_check_finds_the_copies_a_layout_changing_scatter_makes():
    """The HLO check against a real XLA:TPU compile: the old write (heads in the scatter window)
    relaid the pool out around the kernel; write_kv keeps it in place."""
    script = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ferrum_jax.aot.hlo_checks import kv_pool_copies
from ferrum_jax.aot.targets import get_target
from ferrum_jax.models.paged_attention import write_kv
from pallas_kernels import ragged_paged_attention

def heads_in_window(pages, new, slots):
    ps = pages.shape[2]
    return pages.at[:, slots // ps, slots % ps, :].set(jnp.swapaxes(new, 0, 1).astype(pages.dtype))

dev = get_target("tpu-v6e-1").devices()[0]
sh = NamedSharding(Mesh(np.asarray([dev]), ("x",)), PartitionSpec())
s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
layers, pages = 4, 256
pool = (8, layers * pages, 16, 128)
args = (s((32, 32, 128), jnp.bfloat16), s((32, 8, 128), jnp.bfloat16), s(pool, jnp.bfloat16), s((32,), jnp.int32),
        s((8,), jnp.int32), s((8, 64), jnp.int32), s((9,), jnp.int32), s((), jnp.int32))
for write in (heads_in_window, write_kv):
    # Like the step: the pool is carried through a loop over layers, each writing then attending.
    def step(q, new, k, slots, kv_lens, table, cu, n):
        def layer(l, carry):
            x, k = carry
            k = write(k, new, slots + l * pages * 16)
            return ragged_paged_attention(x, k, k, kv_lens, table + l * pages, cu, n, sm_scale=0.1, platform="tpu"), k
        return jax.lax.fori_loop(0, layers, layer, (q, k))
    hlo = jax.jit(step, donate_argnums=2).lower(*args).compile().as_text()
    print(write.__name__, len(kv_pool_copies(hlo, pool, layers)))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    counts = dict(line.split() for line in out.stdout.splitlines() if line.startswith(("heads_in_window", "write_kv")))
    assert int(counts["heads_in_window"]) > 0 and int(counts["write_kv"]) == 0, out.stdout + out.stderr


GEMMA3_27B = str(REPO / "configs" / "models" / "gemma-3-27b")


@needs_tpu
def test_gemma3_27b_tp4_loops_over_its_block_of_six_layers(tmp_path):
    """Gemma-3-27B (62 layers, 5 local : 1 global) on a v6e-4 at TP 4: two layer loops (ten
    blocks of six layers, then two local layers), so one attention kernel per layer of a loop
    body: seven in the program, not one per run of equal layers (21 loops); weights 27.0e9 bf16
    parameters split four ways."""
    code, report, hlo = aot(tmp_path, "--target", "tpu-v6e-4", "--model", GEMMA3_27B, "--tensor-parallel-size", "4", *SMALL,
                            "--num-pages", "2048")  # fmt: skip
    assert code == 0 and report["fits"] and report["kv_pool_copies"] == 0, report
    for name, text in hlo.items():
        assert len(re.findall(r" while\(", text)) == 2, name
        assert text.count(KERNEL_CALL["tpu"]) == 7, name
    assert 27.0e9 * 2 / 4 < report["weight_bytes_per_device"] < 27.1e9 * 2 / 4


@needs_cuda
def test_gemma3_270m_on_gpu_runs_the_triton_kernel_at_head_dim_256(tmp_path):
    """The packaged Gemma 3 270M (head_dim 256, one KV head, windows of 512) compiles for an
    H100: one loop over its 6-layer block, six Triton attention kernels in the body, and its 42
    projections (seven a layer) the layer kernel reading each weight in place."""
    code, report, hlo = aot(tmp_path, "--target", "gpu-h100", "--model", "gemma3-270m", *SMALL)
    assert code == 0 and report["fits"] and report["kv_pool_copies"] == 0, report
    for name, text in hlo.items():
        assert len(re.findall(r" while\(", text)) == 1, name
        assert text.count('name = "ragged_paged_attention_gpu"') == 6, name
        assert text.count('name = "layer_matmul"') == 42, name


QWEN3_MOE = str(REPO / "configs" / "models" / "qwen3-30b-a3b")


@needs_tpu
def test_qwen3_30b_a3b_fits_a_v6e_8_and_a_decode_reads_its_experts_only(tmp_path):
    """Qwen3-30B-A3B (48 layers of 128 experts, top-8) at TP 8 on a v6e-8: a chip holds its
    eighth of every expert's MLP width, and with them 7,831,580,672 bytes (hand count below). A
    1-token decode keeps its own bucket (batch.step_cost: it gathers 8 of 128 experts, a 16-token
    step all of them), and its roofline reads the dense weights and a sixteenth of the experts."""
    code, report, _ = aot(tmp_path, "--target", "tpu-v6e-8", "--model", QWEN3_MOE, "--tensor-parallel-size", "8",
                          "--max-model-len", "4096", "--max-num-seqs", "4", "--max-num-batched-tokens", "16",
                          "--programs", "logits_last")  # fmt: skip
    assert code == 0 and report["fits"] and report["kv_pool_copies"] == 0, report
    experts = 48 * 128 * 3 * 2048 * 768 * 2 // 8
    embeddings = 2 * (151936 // 8) * 2048 * 2  # the vocabulary split eight ways
    # q/o split by heads; 4 KV heads on 8 chips: k/v replicated; norms and the router replicated.
    layer = (2 * 2048 * 4096 // 8 + 2 * 2048 * 512 + 2 * 2048 + 2 * 128 + 2048 * 128) * 2
    dense = embeddings + 48 * layer + 2048 * 2
    assert report["weight_bytes_per_device"] == dense + experts == 7_831_580_672
    decode = report["decode"]["decode_1"]
    assert decode["program"] == "step_t1_s1_l1" and decode["weight_bytes"] == dense + experts // 16


@needs_tpu
def test_qwen3_30b_a3b_expert_parallel_reads_its_experts_in_place(tmp_path):
    """Qwen3-30B-A3B at expert parallelism 8 on a v6e-8: a chip holds 16 whole experts a layer,
    the same bytes as at TP 8. A 1-token and a 16-token step run the grouped experts on each
    chip's own and read them in place (excess under 10%; the gathered form's gather had been
    turned into slices of the whole stack, 656 GiB a step)."""
    code, report, _ = aot(tmp_path, "--target", "tpu-v6e-8", "--model", QWEN3_MOE, "--tensor-parallel-size", "8",
                          "--enable-expert-parallel", "--max-model-len", "4096", "--max-num-seqs", "1",
                          "--max-num-batched-tokens", "16", "--programs", "logits_last")  # fmt: skip
    assert code == 0 and report["fits"] and report["weight_bytes_per_device"] == 7_831_580_672, report
    for r in report["roofline"]:
        assert r["excess_of_weights"] <= 0.10, (r["program"], r["excess_of_weights"], r["largest_writes"])


@needs_tpu
def test_mixtral_8x7b_decode_reads_its_two_experts_in_place(tmp_path):
    """Mixtral-8x7B at TP 8 on a v5e-8: a chip's experts are whole TPU tiles (4096 x 1792), so a
    decode loops over its pairs slicing each expert in place (a gather of such slices XLA:TPU
    turned into slices of the whole stack: 674 GiB a step); 1- and 2-token steps within 10%."""
    code, report, _ = aot(tmp_path, "--target", "tpu-v5e-8", "--model", str(REPO / "configs" / "models" / "mixtral-8x7b"),
                          "--tensor-parallel-size", "8", "--max-model-len", "4096", "--max-num-seqs", "2",
                          "--max-num-batched-tokens", "16", "--programs", "logits_last")  # fmt: skip
    assert code == 0, report
    for r in report["roofline"]:
        assert r["excess_of_weights"] <= 0.10, (r["program"], r["excess_of_weights"], r["largest_writes"])
