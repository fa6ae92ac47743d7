"""The ragged batch pytree, its host-side builder, and the shape buckets it is padded to."""

from ferrum_jax.batch.buckets import BucketSpec, StepShape
from ferrum_jax.batch.ragged import RaggedBatch, SequenceChunk, build_ragged_batch

__all__ = ["BucketSpec", "RaggedBatch", "SequenceChunk", "StepShape", "build_ragged_batch"]
