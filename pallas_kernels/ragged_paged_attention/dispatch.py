"""Backend selection for ragged paged attention.

backend:
  "auto"       the Mosaic kernel on TPU, the Triton kernel on GPU, the XLA path on CPU. With
               interpret=True on CPU it runs the TPU kernel in the TPU interpreter instead, since
               that interpreter simulates DMAs and semaphores faithfully. The platform is the one
               the program is compiled for (`platform`), which for an ahead-of-time compile on a
               CPU host is not the process's default backend.
  "tpu"        the Mosaic kernel (tpu_kernel.py); interpret=True uses the TPU interpreter with
               race detection.
  "gpu"        the Triton kernel (gpu_kernel.py); interpret=True uses the Pallas interpreter.
  "xla"        blocked online-softmax jnp (xla.py) whose cost follows the real kv lengths: the
               CPU path; interpret is irrelevant.
  "reference"  the plain jnp reference (reference.py), the oracle; interpret is irrelevant.

Block sizes are performance hints, so a kernel ignores the ones it has no use for (the TPU
kernel has no kv_splits, the reference has none); names outside BLOCK_SIZE_NAMES are an error.
"""

import jax

from pallas_kernels.ragged_paged_attention.gpu_kernel import ragged_paged_attention_gpu
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.tpu_kernel import ragged_paged_attention_tpu
from pallas_kernels.ragged_paged_attention.xla import ragged_paged_attention_xla

BACKENDS = ("auto", "tpu", "gpu", "xla", "reference")
BLOCK_SIZE_NAMES = ("queries_per_block", "pages_per_block", "kv_splits")
_KERNEL_BLOCK_SIZES = {
    "tpu": ("queries_per_block", "pages_per_block"),
    "gpu": ("queries_per_block", "pages_per_block", "kv_splits"),
    "xla": (),
    "reference": (),
}


_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def fp8_supported(device):
  """Whether the kernel for `device` can read fp8 pages: Triton converts fp8 only on compute
  capability 8.9 (Ada/Hopper) and later; on an A100 its compile aborts the process."""
  cc = getattr(device, "compute_capability", None)
  return device.platform not in _GPU_PLATFORMS or cc is None or tuple(map(int, str(cc).split("."))) >= (8, 9)


def resolve_backend(backend, interpret, platform=None):
  """Concrete backend name for a requested one on `platform` (None: the default backend)."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
  if backend != "auto":
    return backend
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in _GPU_PLATFORMS:
    return "gpu"
  return "tpu" if interpret else "xla"


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, backend="auto",
                           interpret=False, platform=None, **block_sizes):
  """Ragged paged attention over one layer's pages.

  q [tokens, num_q_heads, head_dim]; k_pages/v_pages [num_kv_heads, num_pages, page_size,
  head_dim]; kv_lens [seqs]; page_indices [seqs, pages_per_seq]; cu_q_lens [seqs + 1]; num_seqs
  a scalar int32 array; platform: what "auto" resolves for (None: the default backend).
  Returns [tokens, num_q_heads, head_dim] in q's dtype. The semantics are
  documented in pallas_kernels.ragged_paged_attention.reference.
  """
  unknown = sorted(set(block_sizes) - set(BLOCK_SIZE_NAMES))
  if unknown:
    raise ValueError(f"block sizes {unknown} are not among {BLOCK_SIZE_NAMES}")
  chosen = resolve_backend(backend, interpret, platform)
  kwargs = {name: value for name, value in block_sizes.items()
            if name in _KERNEL_BLOCK_SIZES[chosen]}
  args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
  options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
  if chosen == "tpu":
    return ragged_paged_attention_tpu(*args, **options, interpret=interpret, **kwargs)
  if chosen == "gpu":
    return ragged_paged_attention_gpu(*args, **options, interpret=interpret, **kwargs)
  if chosen == "xla":
    return ragged_paged_attention_xla(*args, **options)
  return ragged_paged_attention_reference(*args, **options)
