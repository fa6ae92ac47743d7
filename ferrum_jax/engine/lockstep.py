"""Lockstep execution across the processes of a multi-host JAX job.

In JAX's multi-controller model every process must launch the same programs over the
global mesh, in the same order, with the same host inputs; a process that launches a step
alone waits forever in its first collective. The engine schedules from requests only
process 0 receives, so process 0 (the leader) runs the engine over a `LockstepExecutor`,
and every other process (a follower) runs `follow`, replaying the leader's executor calls
on its own replica of the executor, built from the same flags.

The engine only talks to its executor through methods, so the wrapper sees everything:
each call in `COMMANDS` (those that change the host bookkeeping -- the sequence table and
the page allocator -- or launch a program over the mesh) is sent to the followers as
(executor name, method, pickled arguments) before it runs on the leader. Followers
execute the same calls in the same order, so their bookkeeping stays identical to the
leader's and their device programs line up with the leader's. Everything else (page
counts, limits, `cfg`, `buckets`, `distribution`) passes through: those read host state
or, like `distribution`, run a local program on host data and change nothing, so the
followers need not run them (and `distribution` would ship `[rows, vocab]` logits).

Transport: the key-value store of the `jax.distributed` coordination service, one key per
command, numbered. A store works the same on every backend, costs no device program, and
lets an idle follower wait without sitting in a collective (which may time out) while the
leader waits for requests. Keys are deleted once every follower has read them: when a
mesh-wide program (`SYNCS`) finishes on the leader, every follower has reached it, so has
read every key up to its own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import pickle
import threading

from ferrum_jax.interfaces.errors import FerrumError

log = logging.getLogger(__name__)

COMMANDS = frozenset({"sample_unified", "extend", "truncate", "release_cache", "new_kv_cache", "warmup", "allow_rollback"})
SYNCS = frozenset({"sample_unified", "extend", "warmup"})  # each runs a program over the whole mesh
_STOP = "stop"
_PREFIX = "ferrum_jax/lockstep/"
_POLL_MS = 60_000  # a follower's wait per try; it waits on for as long as the leader is idle


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise FerrumError.internal("lockstep execution needs jax.distributed.initialize first")
    return client


class Channel:
    """The leader's numbered command stream through the coordination service's store."""

    def __init__(self):
        self._client = _client()
        self._seq = 0
        self._unread = 0  # the keys up to this one are read by every follower, and deleted
        self.lock = threading.Lock()  # send + run as one step, see LockstepExecutor

    def send(self, command: tuple) -> int:
        self._seq += 1
        self._client.key_value_set_bytes(f"{_PREFIX}{self._seq}", pickle.dumps(command, pickle.HIGHEST_PROTOCOL))
        return self._seq

    def read_up_to(self, seq: int) -> None:
        """Every follower has read command `seq`: drop the keys up to it."""
        for n in range(self._unread + 1, seq + 1):
            self._client.key_value_delete(f"{_PREFIX}{n}")
        self._unread = max(self._unread, seq)

    def stop(self) -> None:
        """Tells the followers to return from `follow`."""
        with self.lock:
            self.send((None, _STOP, (), {}))


class LockstepExecutor:
    """The leader's view of an executor: `COMMANDS` are broadcast, then run here.

    `name` tells the followers which of their executors a command is for (the target and a
    draft model share one channel, so their calls keep their relative order)."""

    def __init__(self, executor, channel: Channel, name: str = "target"):
        self._executor = executor
        self._channel = channel
        self._name = name

    def launch_unified(self, items, rows, feed=None):
        """Runs the step to the end as `sample_unified` on every process; returns its tokens. A
        launched step's device ids cannot feed the followers' next step, so the engine runs
        lockstep executors without async scheduling."""
        if feed is not None:
            raise FerrumError.internal("a lockstep executor cannot feed a step from an earlier one on device")
        return self.__getattr__("sample_unified")(items, rows)

    def launch_forward(self, items, feed=None):
        """Defers the step (a constrained one: its bitmask is not known yet) to
        `launch_sampler`, which runs all of it on every process."""
        if feed is not None:
            raise FerrumError.internal("a lockstep executor cannot feed a step from an earlier one on device")
        return items

    def launch_sampler(self, items, rows, allowed=None):
        """`sample_unified` with the bitmask, on every process; returns its tokens."""
        return self.__getattr__("sample_unified")(items, rows, allowed)

    def collect(self, launched):
        """The tokens `launch_unified` / `launch_sampler` already read."""
        return launched

    def __getattr__(self, attr: str):
        value = getattr(self._executor, attr)
        if attr not in COMMANDS:
            return value
        if inspect.iscoroutinefunction(value):

            async def broadcast_async(*args, **kwargs):
                with self._channel.lock:
                    seq = self._channel.send((self._name, attr, args, kwargs))
                    result = await value(*args, **kwargs)
                    if attr in SYNCS:
                        self._channel.read_up_to(seq)
                    return result

            return broadcast_async

        def broadcast(*args, **kwargs):
            # One lock over send + run: the engine calls from its loop and from its worker
            # thread, and the followers must see the calls in the order they ran here.
            with self._channel.lock:
                seq = self._channel.send((self._name, attr, args, kwargs))
                result = value(*args, **kwargs)
                if attr in SYNCS:
                    self._channel.read_up_to(seq)
                return result

        return broadcast


def follow(executor, draft=None) -> int:
    """A follower's whole life: replays the leader's commands on `executor` (and `draft`,
    the draft model's executor when speculative) until the leader says stop; returns the
    number of commands run.

    A `FerrumError` from a replayed call (a request the executor refused) is the one the
    leader got from the same call on the same state, so the follower goes on; anything
    else means the replicas may have diverged, and is raised."""
    client = _client()
    executors = {"target": executor, "draft": draft}
    seq = 0
    while True:
        seq += 1
        payload = _get(client, f"{_PREFIX}{seq}")
        name, method, args, kwargs = pickle.loads(payload)
        if method == _STOP:
            log.info("lockstep: the leader stopped after %d commands", seq - 1)
            return seq - 1
        target = executors[name]
        if target is None:
            raise FerrumError.internal(f"lockstep: a {method} command for a {name} executor this process does not have")
        try:
            result = getattr(target, method)(*args, **kwargs)
            if inspect.iscoroutine(result):
                asyncio.run(result)
        except FerrumError as e:
            log.debug("lockstep: replayed %s refused as on the leader: %s", method, e)


def _get(client, key: str) -> bytes:
    """Waits for `key` however long the leader is idle; other errors (the coordination
    service gone with the leader) are raised."""
    import jax

    while True:
        try:
            return client.blocking_key_value_get_bytes(key, _POLL_MS)
        except jax.errors.JaxRuntimeError as e:  # one type for every status; a timeout says so first
            if not str(e).startswith("DEADLINE_EXCEEDED"):
                raise
