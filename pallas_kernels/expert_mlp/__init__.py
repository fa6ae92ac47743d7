"""A mixture of experts' gated expert MLPs over stacked weights (cpu_kernel: XLA:CPU, in place)."""
