"""LogitsProcessor: hidden states of a step -> fp32 logits of the last token of each sequence.

Only the rows that will be sampled go through lm_head: the last new token of each sequence of an
extend batch, every token of a decode batch.
"""

from __future__ import annotations

import torch
from torch import nn

from srt.model_executor.forward_batch import ForwardBatch


class LogitsProcessor(nn.Module):
    def forward(
        self, hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        """hidden_states [T, hidden], lm_head_weight [vocab, hidden] -> logits [B, vocab] fp32."""
        if not forward_batch.is_decode:
            assert forward_batch.extend_seq_lens is not None
            last = torch.cumsum(forward_batch.extend_seq_lens, 0) - 1
            hidden_states = hidden_states[last]
        return torch.matmul(hidden_states, lm_head_weight.t()).float()
