"""OpenAI logprob shapes built from SGLang's meta_info lists (main process).

The numbers are RAW model logprobs: log_softmax of the logits before temperature, penalties,
logit_bias and top-k/top-p/min-p filtering (see srt.layers.logprobs), like vLLM's default.
Entries arrive as [logprob, token_id, text]; a prompt's first token has logprob None.

- chat (`logprobs: true`, `top_logprobs: k`): {"content": [{token, bytes, logprob,
  top_logprobs: [{token, bytes, logprob}]}]}.
- completions (`logprobs: k`, legacy): {tokens, token_logprobs, top_logprobs: [{token:
  logprob}] (None where there is no logprob), text_offset}; text_offset counts characters
  from the start of the choice's text (which holds the prompt first with `echo`).
"""

from __future__ import annotations

from typing import Any

Entry = list[Any]  # [logprob | None, token_id, text]


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(tokens: list[Entry], tops: list[list[Entry]] | None) -> dict[str, Any]:
    content = []
    for i, (lp, _tid, text) in enumerate(tokens):
        alts = tops[i] if tops is not None and i < len(tops) else []
        content.append(
            {
                "token": text,
                "bytes": _utf8(text),
                "logprob": lp,
                "top_logprobs": [
                    {"token": t, "bytes": _utf8(t), "logprob": v} for v, _id, t in alts
                ],
            }
        )
    return {"content": content}


def completion_logprobs(
    tokens: list[Entry], tops: list[list[Entry]] | None, initial_offset: int = 0
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    offset = initial_offset
    for i, (lp, _tid, text) in enumerate(tokens):
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        alts = tops[i] if tops is not None and i < len(tops) else []
        # A dict keyed by text merges alternatives that decode alike; the best one stays.
        top: dict[str, float] = {}
        for v, _id, t in alts:
            top.setdefault(t, v)
        out["top_logprobs"].append(top if lp is not None else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out
