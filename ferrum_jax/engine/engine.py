"""The continuous-batching engine: one async loop that schedules, runs one unified ragged
step (sampling on device) in a worker thread, and streams each request's new tokens.

Only the loop touches the executor, so there are no locks: `add_request` and `abort`
just enqueue and wake the loop. The step itself runs off the event loop, so HTTP handlers
keep being served while the accelerator works.

Async scheduling (vLLM's): the loop launches step N+1 before it reads step N's tokens. Each
request sampled by step N counts that token as `pending`; step N+1 computes it with its id
taken from step N's sampler output on device (`Feed`), so the host schedules and builds step
N+1 while the device runs step N, and reads step N's tokens while step N+1 runs. A request
whose pending token ends it by length is not scheduled; one that step N ends by a stop token
has computed one token in step N+1 for nothing, which is dropped. Reads come first where the
host needs the token: a penalty's history, speculative drafting (which runs synchronously).

Structured outputs: a step with a constrained row is launched in two parts. The forward goes
first; while the device runs it, the host reads the previous step's tokens, advances each
grammar past them and packs the allowed tokens of this step's rows into a bitmask; then the
sampler is launched with it. Steps without a constrained row launch as one, as before.
Constrained requests do not speculate: their decodes go through the normal step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random

import numpy as np

from ferrum_jax.engine.drafter import Drafter
from ferrum_jax.engine.rejection import accept_drafts
from ferrum_jax.engine.request import Request, RequestState
from ferrum_jax.engine.scheduler import Scheduler
from ferrum_jax.engine.stream import RequestStream
from ferrum_jax.engine.types import EngineConfig, EngineStats, RequestOutput, SamplingParams, TokenLogprob
from ferrum_jax.interfaces import FerrumError, UnifiedBatchItem
from ferrum_jax.executor.launched_step import LaunchedStep, SampledToken
from ferrum_jax.step.sampling import MAX_BANNED, NUM_TOP_LOGPROBS, SamplingRow
from ferrum_jax.structured.matcher import RequestGrammar, fill_bitmasks

log = logging.getLogger(__name__)


_NO_HISTORY = np.zeros(0, np.int32)


def _uses_history(p) -> bool:
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1


class Engine:
    def __init__(self, executor, config: EngineConfig = EngineConfig(), drafter: Drafter | None = None):
        """drafter: proposes speculative tokens when config.num_speculative_tokens > 0."""
        if config.num_speculative_tokens and drafter is None:
            raise FerrumError.invalid_config(
                f"num_speculative_tokens={config.num_speculative_tokens} needs a drafter (n-gram or draft model)"
            )
        self.executor = executor
        self.config = config
        self.drafter = drafter if config.num_speculative_tokens else None
        if self.drafter is not None:
            # A verify writes the last token and its drafts, and keeps the accepted ones.
            executor.allow_rollback(config.num_speculative_tokens + 1)
            self.drafter.allow_rollback(config.num_speculative_tokens + 1)
        # The speculative path reads every token before drafting from it.
        self._async = config.async_scheduling and self.drafter is None
        max_seqs = min(config.max_num_seqs or executor.max_batch_size, executor.max_batch_size)
        max_tokens = min(
            config.max_num_batched_tokens or executor.buckets.max_num_batched_tokens,
            executor.buckets.max_num_batched_tokens,
        )
        self.scheduler = Scheduler(
            executor,
            max_seqs,
            max_tokens,
            lookahead=config.num_speculative_tokens,
            on_release=self.drafter.release if self.drafter else None,
        )
        eos = config.eos_token_ids or executor.cfg.eos_token_id or ()
        self.eos_token_ids = frozenset((eos,) if isinstance(eos, int) else eos)
        self._requests: dict[str, Request] = {}
        self._aborts: set[str] = set()
        self._wake = asyncio.Event()
        self._seeds = random.Random(config.seed)
        self._task: asyncio.Task | None = None
        self._accepting = True
        self._stopping = False
        self._dead: BaseException | None = None
        # The launched step whose tokens are not read yet, and each of its requests' item index.
        self._inflight: tuple[LaunchedStep, dict[Request, int]] | None = None
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.spec_counts = {"draft": 0, "accepted": 0, "steps": 0}

    # ------------------------------------------------------------------ public

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="ferrum-engine")

    @property
    def is_alive(self) -> bool:
        return self._task is not None and not self._task.done() and self._dead is None

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str | None = None,
        grammar: RequestGrammar | None = None,
    ) -> RequestStream:
        """Queues a request; raises at once if it is refused (full queue, can never fit).
        cache_salt: the request reuses cached KV only of requests with the same salt.
        grammar: every output token must follow it; the request stops when it is complete."""
        if not self.is_alive:
            raise FerrumError.backend("the engine loop is not running")
        if not self._accepting:
            raise FerrumError.resource_exhausted("the server is shutting down and accepts no new requests")
        if request_id in self._requests:
            raise FerrumError.invalid_request(f"request id {request_id!r} is already in flight")
        prompt = [int(t) for t in prompt_token_ids]
        self._validate_prompt(prompt, params)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise FerrumError.resource_exhausted(
                f"{len(self.scheduler.waiting)} requests are waiting, the limit is max_waiting={self.config.max_waiting}"
            )
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(32)
        req = Request(
            request_id=request_id, prompt_ids=prompt, params=params, seed=seed & 0xFFFFFFFF, cache_salt=cache_salt,
            grammar=grammar,
        )
        self._requests[request_id] = req
        self.scheduler.waiting.append(req)
        self.prompt_tokens += len(prompt)
        self._wake.set()
        return RequestStream(self, req)

    def abort(self, request_id: str) -> None:
        if request_id in self._requests:
            self._aborts.add(request_id)
            self._wake.set()

    def stats(self) -> EngineStats:
        ex = self.executor
        queried, hits = ex.prefix_cache_tokens
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=ex.num_used_pages / ex.num_total_pages,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            spec_draft_tokens=self.spec_counts["draft"],
            spec_accepted_tokens=self.spec_counts["accepted"],
            spec_verify_steps=self.spec_counts["steps"],
            prefix_cache_queries=queried,
            prefix_cache_hits=hits,
            prefix_cache_pages=ex.num_cached_pages,
        )

    async def drain(self, timeout_s: float) -> None:
        """Refuses new requests, lets in-flight ones finish (up to timeout_s), then stops."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._requests and self.is_alive and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        """Aborts everything and ends the loop once its current step is done (a step in the
        worker thread cannot be interrupted, and pages must not be freed under it)."""
        self._accepting = False
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._aborts.update(self._requests)
        self._process_aborts()

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        try:
            while not self._stopping:
                self._process_aborts()
                if not self.scheduler.running and not self.scheduler.waiting:
                    if self._inflight is not None:
                        await self._read_inflight()
                        continue
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                step = self.scheduler.schedule()
                if not step.work:
                    if self._inflight is not None:
                        await self._read_inflight()  # its tokens may end requests and free pages
                        continue
                    # Nothing fits this iteration (pages held by requests being aborted):
                    # yield so aborts and new requests are seen.
                    await asyncio.sleep(0.001)
                    continue
                if self.drafter is None:
                    await self._run_step(step.work)
                    continue
                decoding = [(r, n) for r, n in step.work if r.num_uncomputed == 1 and r.grammar is None]
                others = [(r, n) for r, n in step.work if r.num_uncomputed != 1 or r.grammar is not None]
                if decoding:
                    await self._run_spec_step([r for r, _ in decoding])
                if others:
                    await self._run_step(others)
            if self._inflight is not None:
                await self._read_inflight()
        except Exception as e:  # a bug in the loop itself: fail everything, stay dead
            log.exception("engine loop died")
            self._dead = e
            for req in list(self._requests.values()):
                self._finish(req, "error", error=FerrumError.internal(f"engine loop died: {e!r}"))
            raise

    async def _run_step(self, work: list[tuple[Request, int]]) -> None:
        """Launches one step over `work`; with async scheduling, then reads the step launched
        before it (whose tokens this one's decodes take on device), else this one's tokens."""
        if self._inflight is not None and any(r.pending and _uses_history(r.params) for r, _ in work):
            # A penalty's history must hold the pending token: read it first.
            await self._read_inflight()
            work = [(r, n) for r, n in work if r.state is RequestState.RUNNING]
            if not work:
                return
        items, rows, fed, constrained = [], [], [], []
        prev_items = self._inflight[1] if self._inflight is not None else {}
        for i, (req, n) in enumerate(work):
            final = req.num_computed + n == req.num_tokens
            if req.pending:
                fed.append((i, prev_items[req]))
            items.append(
                UnifiedBatchItem(
                    seq_id=req.request_id,
                    q_tokens=req.ids(req.num_computed, req.num_computed + n),
                    kv_cache=req.handle,
                    pos_offset=req.num_computed,
                    is_final_chunk=final,
                )
            )
            if final:
                if req.grammar is not None:
                    constrained.append((req.grammar, len(rows)))
                rows.append(self._sampling_row(req))
        feed = (self._inflight[0], fed) if fed else None
        try:
            if constrained:
                launched = await asyncio.to_thread(self.executor.launch_forward, items, feed)
            else:
                launched = await asyncio.to_thread(self.executor.launch_unified, items, rows, feed)
        except FerrumError as e:
            self._fail(work, e)
            return
        for req, n in work:
            req.num_computed += n
            if req.num_computed == req.num_tokens:
                req.pending += 1
        previous, self._inflight = self._inflight, None
        if previous is not None:
            await self._read(*previous)
        if constrained:
            # The grammars have now seen the previous step's tokens: this step's masks.
            vocab = self.executor.cfg.vocab_size
            try:
                launched = await asyncio.to_thread(self._launch_constrained_sampler, launched, rows, constrained, vocab)
            except FerrumError as e:
                for req, _ in work:
                    req.pending = 0
                self._fail(work, e)
                return
        self._inflight = (launched, {req: i for i, (req, _) in enumerate(work)})
        if not self._async:
            await self._read_inflight()

    def _launch_constrained_sampler(self, forward, rows: list[SamplingRow], constrained, vocab: int):
        return self.executor.launch_sampler(forward, rows, fill_bitmasks(constrained, len(rows), vocab))

    def _fail(self, work: list[tuple[Request, int]], e: FerrumError) -> None:
        log.warning("step failed for %d requests: %s", len(work), e)
        for req, _ in work:
            self._finish(req, "error", error=e)

    async def _read_inflight(self) -> None:
        inflight, self._inflight = self._inflight, None
        await self._read(*inflight)

    async def _read(self, launched, item_of: dict[Request, int]) -> None:
        """Reads a launched step's tokens and hands them to their requests."""
        try:
            sampled = await asyncio.to_thread(self.executor.collect, launched)
        except FerrumError as e:
            log.warning("step failed for %d requests: %s", len(item_of), e)
            for req in item_of:
                req.pending = 0
                self._finish(req, "error", error=e)
            return
        for req, i in item_of.items():
            tok = sampled[i]
            if tok is None:
                continue
            req.pending -= 1
            if req.state is not RequestState.FINISHED and not req.aborted:
                self._append_token(req, tok)

    async def _run_spec_step(self, reqs: list[Request]) -> None:
        """Drafts for every decoding request, ONE verify forward over all of them, exact
        rejection sampling, KV truncated to what was accepted."""
        ex, max_len = self.executor, self.executor.max_sequence_length
        ks = [
            max(0, min(r.spec_budget, r.params.max_tokens - len(r.output_ids) - 1, max_len - r.num_tokens))
            for r in reqs
        ]

        def verify():
            drafts = self.drafter.propose(reqs, ks, self._sampling_row)
            drafts = [dataclasses.replace(d, tokens=d.tokens[:k]) for d, k in zip(drafts, ks)]
            items = [(r.handle, [r.last_id] + d.tokens) for r, d in zip(reqs, drafts)]
            logits = ex.extend(items, "all")
            rows = [self._sampling_row(r, d.tokens[:j]) for r, d in zip(reqs, drafts) for j in range(len(d.tokens) + 1)]
            return drafts, logits, ex.distribution(np.concatenate(logits), rows)

        try:
            drafts, logits, probs = await asyncio.to_thread(verify)
        except FerrumError as e:
            log.warning("speculative step failed for %d requests: %s", len(reqs), e)
            for req in reqs:
                self._finish(req, "error", error=e)
            return
        offset = 0
        for req, d, lg in zip(reqs, drafts, logits):
            m = len(d.tokens) + 1
            p_rows, offset = probs[offset : offset + m], offset + m
            if req.aborted:
                continue
            rng = np.random.default_rng([req.seed, len(req.output_ids), 0x5EC])
            q_rows = None if d.probs is None else d.probs[: len(d.tokens)]
            accepted, nxt = accept_drafts(p_rows, d.tokens, q_rows, rng)
            before = req.num_tokens
            ex.truncate(req.handle, before + accepted)
            self.drafter.accepted(req, len(d.tokens), accepted)
            req.num_computed = before + accepted
            if d.tokens:
                self.spec_counts["draft"] += len(d.tokens)
                self.spec_counts["accepted"] += accepted
                self.spec_counts["steps"] += 1
            for token, row in zip(d.tokens[:accepted] + [nxt], lg):
                self._append_token(req, host_sampled(token, row))
                if req.state is RequestState.FINISHED:
                    break

    def _sampling_row(self, req: Request, extra: list[int] = ()) -> SamplingRow:
        """Sampling settings for the position after req.all_ids + extra."""
        p = req.params
        produced = len(req.output_ids) + req.pending + len(extra)
        banned = ()
        if produced < p.min_tokens:
            banned = tuple(sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)))
        return SamplingRow(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            seed=req.seed,
            step=produced,
            # Only penalties read the history; copying a long context every step costs host
            # time that grows with it.
            history=np.asarray(req.all_ids + list(extra), np.int32) if _uses_history(p) else _NO_HISTORY,
            num_prompt=len(req.prompt_ids),
            banned=banned,
        )

    def _append_token(self, req: Request, tok) -> None:
        token = tok.token_id
        if req.grammar is not None and not req.grammar.accept(token):
            self._finish(req, "error", error=FerrumError.internal(f"token {token} broke the request's grammar: {req.grammar.error}"))
            return
        req.output_ids.append(token)
        self.generation_tokens += 1
        p = req.params
        logprobs = None
        if p.logprobs is not None:
            top = tuple((int(i), float(v)) for i, v in zip(tok.top_ids[: p.logprobs], tok.top_logprobs[: p.logprobs]))
            logprobs = (TokenLogprob(token_id=token, logprob=tok.logprob, top=top),)
        reason, stop_token = None, None
        if len(req.output_ids) >= p.min_tokens and (
            token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos)
        ):
            reason, stop_token = "stop", token
        elif req.grammar is not None and req.grammar.terminated:
            reason = "stop"  # the grammar is complete: no token could extend it
        elif len(req.output_ids) >= p.max_tokens or req.num_tokens - req.pending >= self.executor.max_sequence_length:
            reason = "length"
        req.emit(
            RequestOutput(
                request_id=req.request_id,
                new_token_ids=(token,),
                new_logprobs=logprobs,
                num_prompt_tokens=len(req.prompt_ids),
                num_output_tokens=len(req.output_ids),
                num_cached_tokens=req.num_cached_tokens or 0,
                finished=reason is not None,
                finish_reason=reason,
                stop_token_id=stop_token,
            )
        )
        if reason is not None:
            self._retire(req)

    def _process_aborts(self) -> None:
        while self._aborts:
            req = self._requests.get(self._aborts.pop())
            if req is not None:
                req.aborted = True
                self._finish(req, "abort")

    def _finish(self, req: Request, reason: str, error: FerrumError | None = None) -> None:
        """Ends a request that did not stop by itself: a final empty delta."""
        if req.state is RequestState.FINISHED:
            return
        req.emit(
            RequestOutput(
                request_id=req.request_id,
                new_token_ids=(),
                new_logprobs=None,
                num_prompt_tokens=len(req.prompt_ids),
                num_output_tokens=len(req.output_ids),
                num_cached_tokens=req.num_cached_tokens or 0,
                finished=True,
                finish_reason=reason,
                error=error,
            )
        )
        self._retire(req)

    def _retire(self, req: Request) -> None:
        self.scheduler.remove(req)
        self._requests.pop(req.request_id, None)

    def _validate_prompt(self, prompt: list[int], params: SamplingParams) -> None:
        ex = self.executor
        if not prompt:
            raise FerrumError.invalid_request("the prompt is empty", param="prompt")
        vocab = ex.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise FerrumError.invalid_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        if len(prompt) >= ex.max_sequence_length:
            raise FerrumError.invalid_request(
                f"the prompt has {len(prompt)} tokens, leaving no room to generate within "
                f"max_model_len={ex.max_sequence_length}",
                param="prompt",
            )
        peak = min(len(prompt) + params.max_tokens, ex.max_sequence_length)
        if ex.pages_to_hold(peak) > ex.num_total_pages:
            raise FerrumError.invalid_request(
                f"a request of up to {peak} tokens needs {ex.pages_to_hold(peak)} KV pages, "
                f"the pool holds {ex.num_total_pages}",
                param="max_tokens",
            )
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        if params.min_tokens and len(banned) > MAX_BANNED:
            raise FerrumError.invalid_request(
                f"min_tokens with {len(banned)} stop/eos token ids, the limit is {MAX_BANNED}", param="stop_token_ids"
            )


def host_sampled(token: int, logits_v: np.ndarray) -> SampledToken:
    """A token chosen on the host (speculative path) with its raw logprobs, shaped like the
    device sampler's output."""
    shifted = logits_v.astype(np.float64) - logits_v.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    k = min(NUM_TOP_LOGPROBS, len(logprobs))
    top = np.argsort(-logprobs, kind="stable")[:k]
    return SampledToken(token_id=token, logprob=float(logprobs[token]), top_ids=top, top_logprobs=logprobs[top])
