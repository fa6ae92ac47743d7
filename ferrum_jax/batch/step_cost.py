"""What a step costs by its shape: the roofline that decides which buckets are worth a program.

Every bucket is a program compiled at start-up (on a TPU 2-13 s each for Llama-3-8B), and a
bucket pays only if serving its steps in the next bucket up would cost more. In units of one
token's layer FLOPs (2 x the decoder layers' linear parameters), a step of T tokens and R logit
rows costs

    max(ridge_tokens, T + R x row_tokens)

ridge_tokens: the tokens whose FLOPs take as long as streaming the weights once (chip peak x
weight bytes / (HBM bandwidth x 2 x layer parameters)); below it a step is a weight stream and
padding tokens or rows costs nothing. Llama-3-8B in bfloat16: 560 tokens on a v6e, 295 on an
H100. Without a chip's figures (CPU) it is 1: every token counts, which keeps every bucket.
row_tokens: one logit row's lm_head FLOPs in tokens (hidden x vocab / layer parameters): 0.075
for Llama-3-8B, 0.27 for SmolLM2-135M.

A smaller bucket is compiled when the next larger one would cost more than PADDING_TOLERANCE
over it. The model leaves out what makes a padded token dearer than its FLOPs (activations,
attention over padding): both are small beside the weights below the ridge, and the attention
kernels skip padding rows (their sequence count is a runtime value).
"""

from __future__ import annotations

import dataclasses

PADDING_TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True)
class StepCost:
    ridge_tokens: float
    row_tokens: float

    def time(self, tokens: int, rows: int) -> float:
        return max(self.ridge_tokens, tokens + rows * self.row_tokens)

    def pays(self, small: tuple[int, int], large: tuple[int, int]) -> bool:
        """Whether a step of `small` (tokens, rows) costs enough less than `large` for a program."""
        return self.time(*large) > (1 + PADDING_TOLERANCE) * self.time(*small)


def model_step_cost(layer_params: int, hidden_x_vocab: int, weight_bytes: int,
                    peak_flops: float | None, hbm_bytes_per_s: float | None) -> StepCost:
    """The StepCost of a model on a chip (peaks None: no roofline, FLOP-bound)."""
    row_tokens = hidden_x_vocab / layer_params
    if peak_flops is None or hbm_bytes_per_s is None:
        return StepCost(1.0, row_tokens)
    return StepCost(peak_flops * weight_bytes / (hbm_bytes_per_s * 2 * layer_params), row_tokens)
