"""Token logprobs for `return_logprob` requests (scheduler process).

Which distribution: the RAW model distribution, log_softmax of the fp32 logits as the model
produced them, before temperature, logit_bias, penalties, min_new_tokens and top-k / top-p /
min-p filtering (vLLM's default "raw logprobs"). So a logprob does not depend on the sampling
parameters, and scoring a text again (prompt logprobs) reproduces its generation logprobs.

Prompt logprobs: the logprob of prompt token j is read from the logits at position j - 1; the
first prompt token has none (None). The ModelRunner computes those extra rows only for requests
that ask (`ForwardBatch.extra_logit_indices`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, top_nums: Sequence[int]
) -> tuple[list[float], list[list[float]], list[list[int]]]:
    """Per row of fp32 `logits` [R, V]: the raw logprob of `targets[r]` and the top
    `top_nums[r]` (logprob, id) pairs, highest first. One host copy per result tensor."""
    if logits.shape[0] != targets.shape[0] or logits.shape[0] != len(top_nums):
        raise ValueError("token_logprobs: logits, targets and top_nums differ in rows")
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, targets.view(-1, 1).long()).squeeze(1).tolist()
    k = max(top_nums, default=0)
    if k <= 0:
        return chosen, [[] for _ in top_nums], [[] for _ in top_nums]
    k = min(k, lp.shape[1])
    top_v, top_i = lp.topk(k, dim=-1)
    vals = top_v.tolist()
    ids = top_i.tolist()
    return (
        chosen,
        [v[:n] for v, n in zip(vals, top_nums, strict=True)],
        [i[:n] for i, n in zip(ids, top_nums, strict=True)],
    )
