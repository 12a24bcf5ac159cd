"""LogitsProcessor: hidden states of a step -> fp32 logits of the last token of each sequence.

Only the rows that will be sampled go through lm_head: the last new token of each sequence of an
extend batch, every token of a decode batch. An extend batch may name more token positions
(`ForwardBatch.extra_logit_indices`, set only for requests that asked for prompt logprobs);
their logits follow as rows B.. of the output, so a batch without them pays nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from srt.model_executor.forward_batch import ForwardBatch


class LogitsProcessor(nn.Module):
    def forward(
        self,
        hidden_states: torch.Tensor,
        lm_head: VocabParallelEmbedding,
        forward_batch: ForwardBatch,
    ) -> torch.Tensor:
        """hidden_states [T, hidden] -> logits [B (+ K), vocab] fp32 (K =
        len(extra_logit_indices) when set), gathered over the TP ranks' vocab blocks."""
        if not forward_batch.is_decode:
            assert forward_batch.extend_seq_lens is not None
            last = torch.cumsum(forward_batch.extend_seq_lens, 0) - 1
            extra = forward_batch.extra_logit_indices
            if extra is not None:
                last = torch.cat([last, extra])
            hidden_states = hidden_states[last]
        return lm_head.lm_head_logits(hidden_states)
