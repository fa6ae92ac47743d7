"""Continuous batching over the executor's unified ragged step: scheduler, on-device
sampling, stop conditions, preemption, abort. Talks to the executor only."""

from ferrum_jax.engine.engine import Engine
from ferrum_jax.engine.stream import RequestStream
from ferrum_jax.engine.types import EngineConfig, EngineStats, RequestOutput, SamplingParams, TokenLogprob

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput", "RequestStream", "SamplingParams", "TokenLogprob"]
