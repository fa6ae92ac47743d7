"""Benchmarks, one entry point: `python -m ferrum_jax.bench [NAME] [options]`.

    (none)          executor.py      the executor vs HF transformers, same weights, one process (`--moe`: a Qwen3-MoE shape)
    serve           serve.py         drive a running OpenAI server like `vllm bench serve`
    serve-vs-hf     serve_vs_hf.py   the server vs HF static batches
    serve-vs-vllm   serve_vs_vllm.py the server vs vLLM's CPU build, same weights and workload
    prefix-cache    prefix_cache.py  a shared-system-prompt workload, caching on/off, vs vLLM CPU
    structured      structured.py    json_schema batch vs unconstrained, bitmask fill and schema compile time
    quant           quant.py         float32 / int8 / int4 weights: decode tok/s at batch 1 and 8, bytes, memory
    spec            spec.py          n-gram speculation vs plain decoding
    tp              tp.py            tensor-parallel overhead on fake CPU devices
    startup         startup.py       default model load and time to a healthy server
    hlo             hlo.py           the compiled batch-1 decode step's HLO, for hlo_bytes.py
    host            host.py          host time per engine step, sync vs async (tiny preset)
    steps           steps.py         step time by batch composition (default model), decode against its floor
    cpu-attention   cpu_attention.py decode attention alone on XLA:CPU, XLA path vs the C++ kernel
    int4-forms      int4_forms.py    which int4 matmul forms XLA:TPU/GPU fuse (compile-only)
    timeline        timeline.py      a serving run step by step: time by kind of step (default model)
    gpu-attention   gpu_attention.py the GPU attention kernel's correctness and speed
    gpu             gpu.py           a random Llama-3-8B-shaped model on the accelerator: decode/prefill tok/s, % of HBM
    roofline        roofline.py      compile-only decode rooflines for TPU/GPU targets (the BENCHMARKS.md table)
    layer-stack     layer_stack.py   XLA:CPU reading decoder weights out of a stacked array vs separate arrays
    sampler         sampler.py       the on-device sampler alone: greedy, top-p, penalties over 32 rows
    moe-forms       moe_forms.py     a mixture of experts' CPU forms side by side (C++ kernel in place, gathered, blocked) by tokens

None of them is part of the test suite; each module's docstring says what it measures and how.
"""
