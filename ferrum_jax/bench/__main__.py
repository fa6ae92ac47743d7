"""`python -m ferrum_jax.bench [NAME] ...`: runs benchmark NAME (see the package docstring);
without a name, the executor-vs-transformers benchmark."""

import importlib
import sys

SUBCOMMANDS = {
    "serve": "serve",
    "serve-vs-hf": "serve_vs_hf",
    "serve-vs-vllm": "serve_vs_vllm",
    "prefix-cache": "prefix_cache",
    "structured": "structured",
    "quant": "quant",
    "spec": "spec",
    "tp": "tp",
    "startup": "startup",
    "hlo": "hlo",
    "host": "host",
    "steps": "steps",
    "cpu-attention": "cpu_attention",
    "int4-forms": "int4_forms",
    "timeline": "timeline",
    "gpu-attention": "gpu_attention",
    "gpu": "gpu",
    "roofline": "roofline",
    "layer-stack": "layer_stack",
    "sampler": "sampler",
    "moe-forms": "moe_forms",
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    name, rest = (argv[0], argv[1:]) if argv[:1] and argv[0] in SUBCOMMANDS else (None, argv)
    module = importlib.import_module(f"ferrum_jax.bench.{SUBCOMMANDS[name] if name else 'executor'}")
    module.main(rest)


if __name__ == "__main__":
    main()
