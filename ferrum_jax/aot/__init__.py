"""Ahead-of-time compiles for TPU and GPU targets from a CPU host: `python -m ferrum_jax.aot`."""
