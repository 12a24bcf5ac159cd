"""POST /v1/completions (main process): CompletionRequest in, CompletionResponse or a stream of
CompletionStreamResponse chunks out. Prompts may be text, token ids, or lists of either.

`logprobs: k` adds the legacy logprobs object (tokens, token_logprobs, top_logprobs,
text_offset); `echo` puts the prompt before the completion, and with logprobs its tokens'
logprobs too (the first prompt token's is null). They are RAW model logprobs, log_softmax of
the logits before temperature, penalties and filters (srt.entrypoints.openai.logprobs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from srt.entrypoints.openai.logprobs import completion_logprobs
from srt.entrypoints.openai.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamChoice,
    CompletionStreamResponse,
    RequestError,
    UsageInfo,
    new_id,
    openai_finish_reason,
)
from srt.entrypoints.openai.serving_base import OpenAIServingBase, abort_error, sse_stream
from srt.managers.io_struct import TokenizedGenerateReqInput
from srt.managers.tokenizer_manager import Disconnectable, GenerateReqInput


class OpenAIServingCompletion(OpenAIServingBase):
    async def create(
        self, req: CompletionRequest, raw_request: Disconnectable | None = None
    ) -> CompletionResponse | AsyncIterator[str]:
        """A response, or (stream=true) an async iterator of SSE strings ending in [DONE].
        Raises RequestError for anything wrong with the request, before generating."""
        req.check_supported()
        self.log_ignored(req)
        self.check_model(req.model)
        try:
            sp = req.sampling_params(req.max_tokens)
        except ValueError as e:
            raise RequestError(str(e)) from e
        want_lp, top = req.logprob_request()
        prompts = req.prompts()
        objs = [
            GenerateReqInput(
                text=p if isinstance(p, str) else None,
                input_ids=None if isinstance(p, str) else p,
                cache_salt=req.cache_salt,
                return_logprob=want_lp,
                top_logprobs_num=top,
                logprob_start_len=0 if want_lp and req.echo else -1,
            )
            for p in prompts
        ]
        reqs = await self.tokenize_choices(objs, sp, add_special_tokens=True)
        if req.stream:
            return sse_stream(self._stream(req, reqs))
        outs = await self.run_choices(reqs, raw_request)
        choices = []
        for i, out in enumerate(outs):
            meta = out["meta_info"]
            reason, matched = openai_finish_reason(meta["finish_reason"])
            text = out["text"]
            logprobs = None
            if req.echo:
                p = prompts[i // sp.n]
                text = (p if isinstance(p, str) else self.tm.decode(p)) + text
            if want_lp:
                tokens = meta["output_token_logprobs"]
                tops = meta.get("output_top_logprobs")
                if req.echo:
                    tokens = meta["input_token_logprobs"] + tokens
                    if tops is not None:
                        tops = meta["input_top_logprobs"] + tops
                logprobs = completion_logprobs(tokens, tops)
            choices.append(
                CompletionResponseChoice(
                    index=i,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=reason,
                    matched_stop=matched,
                )
            )
        return CompletionResponse(
            id=new_id("cmpl"),
            model=self.model_name,
            choices=choices,
            usage=self.usage(outs, sp.n),
        )

    async def _stream(
        self, req: CompletionRequest, reqs: list[TokenizedGenerateReqInput]
    ) -> AsyncIterator[CompletionStreamResponse]:
        rid = new_id("cmpl")
        n = req.n
        finals: dict[int, dict[str, Any]] = {}
        offsets = [0] * len(reqs)
        async for i, out in self.stream_choices(reqs):
            fr = out["meta_info"]["finish_reason"]
            reason, matched = openai_finish_reason(fr)
            if reason == "abort":
                raise abort_error(fr)
            text = out["delta"]["text"]
            lps = out["delta"].get("output_token_logprobs")
            if not text and not lps and reason is None:
                continue
            logprobs = None
            if lps is not None:
                logprobs = completion_logprobs(
                    lps, out["delta"].get("output_top_logprobs"), offsets[i]
                )
                offsets[i] += sum(len(t) for _, _, t in lps)
            if reason is not None:
                finals[i] = out
            yield CompletionStreamResponse(
                id=rid,
                model=self.model_name,
                choices=[
                    CompletionStreamChoice(
                        index=i,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=reason,
                        matched_stop=matched,
                    )
                ],
            )
        if req.stream_options is not None and req.stream_options.include_usage:
            usage: UsageInfo = self.usage([finals[i] for i in range(len(reqs))], n)
            yield CompletionStreamResponse(id=rid, model=self.model_name, choices=[], usage=usage)
