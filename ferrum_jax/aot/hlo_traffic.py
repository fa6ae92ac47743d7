"""What a compiled program writes and multiplies per run, read from its HLO text.

XLA's `cost_analysis()` counts a while loop's body once, so for a layer loop it reports one
layer's bytes and FLOPs. Here every instruction reachable from the entry computation counts
once per execution: a loop body's instructions times the loop's known trip count (XLA records
it in the while's backend_config), nested loops multiplied through.

Written bytes: each instruction's result, except those that move nothing (parameters, tuples,
bitcasts, control flow) and in-place updates, which write their update only: a
dynamic-update-slice or scatter (or a fusion whose root is one) writes its update operand, and
a custom call its outputs not aliased to an operand. Every byte written is a temporary the
program reads back, except the results it returns. A result in TPU VMEM (memory space `S(1)` in
its layout) is no HBM write; an async copy into VMEM (`copy-done`) is an HBM read of its bytes,
counted apart (`vmem_fill_bytes`).

Dot FLOPs: 2 x output elements x contracted elements of every `dot` (in fusions too), of the
`convolution`s XLA:TPU writes dots as, and of the cuBLAS gemm custom calls XLA:GPU emits.
Kernel FLOPs: the Pallas kernels' own estimates (pallas_kernels.cost), which Mosaic writes into a
TPU custom call's backend config; the Triton lowering drops them, so on GPU the matmul kernels
(`layer_matmul`, `grouped_matmul`: x is their second operand) count 2 x result x x's last
dimension, and the attention kernel, whose work depends on runtime lengths, is not counted.
"""

from __future__ import annotations

import dataclasses
import math
import re

_ITEM_BITS = {
    "pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32,
    "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8,
    "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "c64": 64, "c128": 128,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_NO_WRITE = {
    "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
    "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "copy-start",
    "all-reduce-start", "all-gather-start", "collective-permute-start", "send", "recv", "send-done",
    "recv-done", "async-start", "async-update",
}  # fmt: skip
_IN_PLACE = {"dynamic-update-slice": 1, "scatter": -1}  # op -> index of the operand it writes
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")
_COST_FLOPS = re.compile(r'"cost_estimate":\{"flops":"?(\d+)')
_TRITON_MATMULS = ('name = "layer_matmul"', 'name = "grouped_matmul"')


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's elements summed)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _ITEM_BITS:
            total += _ITEM_BITS[dtype] * math.prod(int(d) for d in dims.split(",") if d) // 8
    return total


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    op: str
    operands: list[str]
    attrs: str
    root: bool
    literal: str = ""  # a constant's value


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Per execution of a program."""

    written_bytes: int  # to HBM by every instruction, loop bodies times their trip counts
    vmem_fill_bytes: int  # read from HBM by async copies into TPU VMEM
    dot_flops: float
    kernel_flops: float
    loops: tuple[int, ...]  # trip counts of the loops reached (0 where XLA knows none)
    largest_writes: tuple[tuple[str, int, int], ...]  # (instruction line head, bytes, executions), largest total first


def _parse(hlo: str) -> tuple[dict[str, list[_Instruction]], str]:
    computations: dict[str, list[_Instruction]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                current = computations.setdefault(m.group(1), [])
                if line.startswith("ENTRY"):
                    entry = m.group(1)
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            root, name, shape, op, rest = m.groups()
            depth, i = 1, 0
            while i < len(rest) and depth:
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                i += 1
            current.append(_Instruction(name, shape, op, _OPERAND.findall(rest[: i - 1]), rest[i:], bool(root),
                                        rest[: i - 1] if op == "constant" else ""))
    return computations, entry


def _called(attrs: str, key: str) -> str | None:
    m = re.search(key + r"=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def _trip_count(computations: dict[str, list[_Instruction]], caller: str, loop: _Instruction) -> int:
    """The while's trip count: XLA's known_trip_count, else read off a `i < limit` condition
    and the constant `i` starts from (XLA:TPU records no count); 0 when neither says."""
    m = _TRIP.search(loop.attrs)
    if m:
        return int(m.group(1))
    cond = {i.name: i for i in computations.get(_called(loop.attrs, "condition"), [])}
    root = next((i for i in cond.values() if i.root), None)
    if root is None or root.op != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
        return 0
    index, limit = cond.get(root.operands[0]), cond.get(root.operands[1])
    if index is None or limit is None or index.op != "get-tuple-element" or limit.op != "constant":
        return 0
    k = int(re.search(r"index=(\d+)", index.attrs).group(1))
    start = 0
    caller_insts = {i.name: i for i in computations[caller]}
    init = caller_insts.get(loop.operands[0]) if loop.operands else None
    if init is not None and init.op == "tuple" and k < len(init.operands):
        first = caller_insts.get(init.operands[k])
        if first is not None and first.op == "constant":
            start = int(first.literal)
    return max(0, int(limit.literal) - start)


def traffic(hlo: str) -> Traffic:
    """What the compiled module `hlo` (its `as_text()`) writes and multiplies per execution."""
    computations, entry = _parse(hlo)
    shapes = {c: {i.name: i.shape for i in body} for c, body in computations.items()}
    writes: dict[str, list] = {}
    loops: list[int] = []

    def in_place_bytes(comp: str, inst: _Instruction) -> int | None:
        """Bytes an in-place update writes, None if `inst` is not one."""
        if inst.op in _IN_PLACE and inst.operands:
            return shape_bytes(shapes[comp].get(inst.operands[_IN_PLACE[inst.op]], ""))
        if inst.op == "fusion":
            called = _called(inst.attrs, "calls")
            root = next((i for i in computations.get(called, []) if i.root), None)
            if root is not None and root.op in _IN_PLACE:
                return in_place_bytes(called, root)
            if root is not None and root.op == "tuple":
                parts = [next((i for i in computations[called] if i.name == o), None) for o in root.operands]
                if parts and all(p is not None and p.op in _IN_PLACE for p in parts):
                    return sum(in_place_bytes(called, p) for p in parts)
        return None

    def dot_flops(comp: str, inst: _Instruction) -> float:
        if inst.op == "dot":
            lhs = _dims(shapes[comp].get(inst.operands[0], "")) if inst.operands else []
            m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attrs)
            contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
            return 2.0 * math.prod(_dims(inst.shape)) * contracted
        if inst.op == "convolution" and len(inst.operands) > 1:
            # XLA:TPU writes dots as convolutions, a dot's batch dimensions as spatial ones whose
            # window meets one valid position: contracted is the kernel's input-feature extent.
            rhs = _dims(shapes[comp].get(inst.operands[1], ""))
            m = re.search(r"dim_labels=\w*_(\w*)->", inst.attrs)
            contracted = rhs[m.group(1).index("i")] if m and rhs and "i" in m.group(1) else 1
            return 2.0 * math.prod(_dims(inst.shape)) * contracted
        if inst.op == "custom-call" and any(t in inst.attrs for t in _GEMM_TARGETS):
            lhs = _dims(shapes[comp].get(inst.operands[0], ""))
            m = re.search(r'"lhs_contracting_dimensions":\["?([0-9",]*)\]', inst.attrs)
            dims = [int(d) for d in (m.group(1).replace('"', "").split(",") if m else []) if d]
            contracted = math.prod(lhs[d] for d in dims) if lhs else 1
            return 2.0 * math.prod(_dims(inst.shape)) * contracted  # the first array: the result
        return 0.0

    def kernel_flops(comp: str, inst: _Instruction) -> float:
        if inst.op != "custom-call":
            return 0.0
        m = _COST_FLOPS.search(inst.attrs)
        if m:
            return float(m.group(1))
        if any(n in inst.attrs for n in _TRITON_MATMULS) and len(inst.operands) > 1:
            x = _dims(shapes[comp].get(inst.operands[1], ""))
            return 2.0 * math.prod(_dims(inst.shape)) * (x[-1] if x else 0)
        return 0.0

    vmem = [0]
    kernels = [0.0]

    def walk(comp: str, times: int) -> tuple[int, float]:
        written, flops = 0, 0.0
        for inst in computations.get(comp, []):
            if inst.op == "while":
                trip = _trip_count(computations, comp, inst)
                loops.append(trip)
                body_w, body_f = walk(_called(inst.attrs, "body"), times * max(trip, 1))
                written += body_w * max(trip, 1)
                flops += body_f * max(trip, 1)
                continue
            if inst.op in ("call", "conditional"):
                for key in ("to_apply", "true_computation", "false_computation"):
                    target = _called(inst.attrs, key)
                    if target:
                        w, f = walk(target, times)
                        written, flops = written + w, flops + f
                continue
            if inst.op == "fusion":
                flops += sum(dot_flops(_called(inst.attrs, "calls"), i) for i in computations.get(_called(inst.attrs, "calls"), []))
            flops += dot_flops(comp, inst)
            kernels[0] += times * kernel_flops(comp, inst)
            if inst.op in _NO_WRITE:
                continue
            if "S(1)" in inst.shape:
                if inst.op == "copy-done":
                    vmem[0] += times * shape_bytes(inst.shape)
                continue
            nbytes = in_place_bytes(comp, inst)
            if nbytes is None:
                nbytes = shape_bytes(inst.shape)
                if inst.op == "custom-call" and "output_to_operand_aliasing" in inst.attrs:
                    nbytes = _unaliased_bytes(inst)
            written += nbytes
            writes.setdefault(f"{inst.op} {inst.shape.split('{')[0]}", []).append((nbytes, times))
        return written, flops

    written, flops = walk(entry, 1)
    largest = sorted(
        ((k, sum(b for b, _ in v) // max(len(v), 1), sum(t for _, t in v)) for k, v in writes.items()),
        key=lambda r: -r[1] * r[2],
    )
    return Traffic(written, vmem[0], flops, kernels[0], tuple(loops), tuple(largest[:8]))


def _unaliased_bytes(inst: _Instruction) -> int:
    """A custom call's output bytes less the outputs aliased to operands (written in place)."""
    m = re.search(r"output_to_operand_aliasing=\{(.*?)\}\s*(,|$)", inst.attrs)
    aliased = {int(i) for i in re.findall(r"\{(\d+)\}:", m.group(1))} if m else set()
    if not inst.shape.startswith("("):
        return 0 if aliased else shape_bytes(inst.shape)
    elements = [e for e in re.findall(r"[a-z][a-z0-9]*\[[0-9,]*\]", inst.shape)]
    return sum(shape_bytes(e) for i, e in enumerate(elements) if i not in aliased)

