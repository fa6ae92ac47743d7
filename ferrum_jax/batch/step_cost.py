"""What a step costs by its shape: the roofline that decides which buckets are worth a program.

Every bucket is a program compiled at start-up (on a TPU 2-13 s each for Llama-3-8B), and a
bucket pays only if serving its steps in the next bucket up would cost more. In units of one
token's layer FLOPs (2 x the decoder layers' linear parameters), a step of T tokens and R logit
rows costs

    max(ridge_tokens, T + R x row_tokens)

ridge_tokens: the tokens whose FLOPs take as long as streaming the weights once (chip peak x
weight bytes / (HBM bandwidth x 2 x layer parameters)); below it a step is a weight stream and
padding tokens or rows costs nothing. Llama-3-8B in bfloat16 (16.06e9 bytes, embedding
included): 644 tokens on a v6e, 340 on an H100. Without a chip's figures (CPU) it is 1: every
token counts, which keeps the decode buckets and drops only sequence buckets whose padding rows
cost under 2% of the step.
row_tokens: one logit row's lm_head FLOPs in tokens (hidden x vocab / layer parameters): 0.075
for Llama-3-8B, 0.27 for SmolLM2-135M.
A mixture-of-experts model streams its dense weights whatever the step, but of its expert stacks
only what its token-expert pairs gather (models.moe: one expert's weights a pair, all of them
once the pairs reach the expert count): the ridge grows with the tokens,
ridge_tokens + expert_ridge_tokens x min(1, tokens x experts_per_token / num_experts), so on a
chip a 1-token decode of Qwen3-30B-A3B (8 of 128 experts) costs a sixteenth of the expert
stream a 16-token step does, and its decode buckets pay.

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
    expert_ridge_tokens: float = 0.0
    expert_share_per_token: float = 0.0  # experts_per_token / num_experts

    def time(self, tokens: int, rows: int) -> float:
        stream = self.ridge_tokens + self.expert_ridge_tokens * min(1.0, tokens * self.expert_share_per_token)
        return max(stream, tokens + rows * self.row_tokens)

    def pays(self, small: tuple[int, int], large: tuple[int, int]) -> bool:
        """Whether a step of `small` (tokens, rows) costs enough less than `large` for a program."""
        return self.time(*large) > (1 + PADDING_TOLERANCE) * self.time(*small)


def model_step_cost(layer_params: int, hidden_x_vocab: int, weight_bytes: int, peak_flops: float | None,
                    hbm_bytes_per_s: float | None, expert_bytes: int = 0, expert_share_per_token: float = 0.0) -> StepCost:
    """The StepCost of a model on a chip (peaks None: no roofline, FLOP-bound). expert_bytes:
    the part of weight_bytes in expert stacks, of which a token gathers expert_share_per_token."""
    row_tokens = hidden_x_vocab / layer_params
    if peak_flops is None or hbm_bytes_per_s is None:
        return StepCost(1.0, row_tokens)
    tokens_per_byte = peak_flops / (hbm_bytes_per_s * 2 * layer_params)
    return StepCost(tokens_per_byte * (weight_bytes - expert_bytes), row_tokens, tokens_per_byte * expert_bytes,
                    expert_share_per_token)
