"""POST /v1/completions (main process): CompletionRequest in, CompletionResponse or a stream of
CompletionStreamResponse chunks out. Prompts may be text, token ids, or lists of either."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

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
        self.check_model(req.model)
        try:
            sp = req.sampling_params(req.max_tokens)
        except ValueError as e:
            raise RequestError(str(e)) from e
        objs = [
            GenerateReqInput(text=p, cache_salt=req.cache_salt)
            if isinstance(p, str)
            else GenerateReqInput(input_ids=p, cache_salt=req.cache_salt)
            for p in req.prompts()
        ]
        reqs = await self.tokenize_choices(objs, sp, add_special_tokens=True)
        if req.stream:
            return sse_stream(self._stream(req, reqs))
        outs = await self.run_choices(reqs, raw_request)
        choices = []
        for i, out in enumerate(outs):
            reason, matched = openai_finish_reason(out["meta_info"]["finish_reason"])
            choices.append(
                CompletionResponseChoice(
                    index=i, text=out["text"], finish_reason=reason, matched_stop=matched
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
        async for i, out in self.stream_choices(reqs):
            fr = out["meta_info"]["finish_reason"]
            reason, matched = openai_finish_reason(fr)
            if reason == "abort":
                raise abort_error(fr)
            text = out["delta"]["text"]
            if not text and reason is None:
                continue
            if reason is not None:
                finals[i] = out
            yield CompletionStreamResponse(
                id=rid,
                model=self.model_name,
                choices=[
                    CompletionStreamChoice(
                        index=i, text=text, finish_reason=reason, matched_stop=matched
                    )
                ],
            )
        if req.stream_options is not None and req.stream_options.include_usage:
            usage: UsageInfo = self.usage([finals[i] for i in range(len(reqs))], n)
            yield CompletionStreamResponse(id=rid, model=self.model_name, choices=[], usage=usage)
