"""aot.hlo_traffic against hand counts on small XLA:CPU programs: a loop's body counts once per
trip (XLA's cost analysis counts it once in all), an in-place update writes its update only, dots
count 2 x M x N x K."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ferrum_jax.aot.hlo_traffic import shape_bytes, traffic

LAYERS, D = 10, 256


def _hlo(fn, *args, donate=()) -> str:
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile().as_text()


def test_a_loop_body_counts_once_per_trip():
    w = jnp.ones((LAYERS, D, D), jnp.float32)
    x = jnp.ones((1, D), jnp.float32)
    t = traffic(_hlo(lambda w, x: jax.lax.fori_loop(0, LAYERS, lambda i, x: x @ w[i], x), w, x))
    assert t.loops == (LAYERS,)
    assert t.dot_flops == LAYERS * 2 * D * D
    # XLA:CPU writes each layer's slice of the stack out before its dot (the copy the roofline
    # calls excess): at least one layer's bytes per trip, and little else.
    assert LAYERS * D * D * 4 <= t.written_bytes <= LAYERS * (D * D * 4 + 4 * D * 4) + 4096


def test_an_in_place_update_writes_its_update_only():
    buf = jnp.zeros((4096, D), jnp.float32)  # 4 MiB, carried through the loop and donated
    row = jnp.ones((1, D), jnp.float32)

    def fill(buf, row):
        return jax.lax.fori_loop(0, LAYERS, lambda i, b: jax.lax.dynamic_update_slice(b, row * i, (i, 0)), buf)

    t = traffic(_hlo(fill, buf, row, donate=(0,)))
    assert t.loops == (LAYERS,)
    assert t.written_bytes <= LAYERS * 2 * D * 4 + 4096  # each trip: the row (and its scaled copy)


def test_shape_bytes_sums_tuples_and_narrow_types():
    assert shape_bytes("(f32[2,3]{1,0}, bf16[4]{0}, s4[8]{0}, pred[])") == 24 + 8 + 4 + 1
