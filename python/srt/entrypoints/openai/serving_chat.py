"""POST /v1/chat/completions (main process): ChatCompletionRequest in, the chat template applied
by the TokenizerManager, ChatCompletionResponse or a stream of chat.completion.chunk out.

The prompt is the chat template's render of the messages (add_generation_prompt,
continue_final_message, chat_template_kwargs and reasoning_effort go to it); with `echo`, a
response whose last message is the assistant's starts with that message's content.

Stream shape per choice: a first chunk whose delta is {"role": "assistant", "content": ""},
(with echo, a chunk with the echoed content,) content deltas, then one chunk with an empty delta and the finish_reason; with
stream_options.include_usage, one last chunk with `choices: []` and the usage.

`logprobs: true` (+ `top_logprobs: k`) adds choice.logprobs = {"content": [...]} (the content
deltas' tokens when streaming). They are RAW model logprobs, log_softmax of the logits before
temperature, penalties and filters (srt.entrypoints.openai.logprobs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from srt.entrypoints.openai.logprobs import chat_logprobs
from srt.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessageOut,
    DeltaMessage,
    RequestError,
    new_id,
    openai_finish_reason,
)
from srt.entrypoints.openai.serving_base import OpenAIServingBase, abort_error, sse_stream
from srt.managers.io_struct import TokenizedGenerateReqInput
from srt.managers.tokenizer_manager import Disconnectable, GenerateReqInput


class OpenAIServingChat(OpenAIServingBase):
    async def create(
        self, req: ChatCompletionRequest, raw_request: Disconnectable | None = None
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """A response, or (stream=true) an async iterator of SSE strings ending in [DONE].
        Raises RequestError for anything wrong with the request, before generating."""
        req.check_supported()
        self.log_ignored(req)
        self.check_model(req.model)
        try:
            sp = req.sampling_params(req.max_new_tokens())
        except ValueError as e:
            raise RequestError(str(e)) from e
        messages = [m.to_template_dict(i) for i, m in enumerate(req.messages)]
        try:
            prompt = self.tm.apply_chat_template(
                messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                **req.template_kwargs(),
            )
        except ValueError as e:
            raise RequestError(str(e), param="messages") from e
        want_lp, top = req.logprob_request()
        obj = GenerateReqInput(
            text=prompt, cache_salt=req.cache_salt, return_logprob=want_lp, top_logprobs_num=top
        )
        # NOTE: the template already holds the special tokens (BOS, role markers), so none
        # are added unless the client asks (vLLM's add_special_tokens).
        reqs = await self.tokenize_choices([obj], sp, add_special_tokens=req.add_special_tokens)
        echo = req.echo_prefix(messages)
        if req.stream:
            return sse_stream(self._stream(req, reqs, echo))
        outs = await self.run_choices(reqs, raw_request)
        choices = []
        for i, out in enumerate(outs):
            reason, matched = openai_finish_reason(out["meta_info"]["finish_reason"])
            choices.append(
                ChatCompletionResponseChoice(
                    index=i,
                    message=ChatMessageOut(content=echo + out["text"]),
                    logprobs=self._logprobs(out["meta_info"]) if want_lp else None,
                    finish_reason=reason,
                    matched_stop=matched,
                )
            )
        return ChatCompletionResponse(
            id=new_id("chatcmpl"),
            model=self.model_name,
            choices=choices,
            usage=self.usage(outs, sp.n),
        )

    @staticmethod
    def _logprobs(d: dict[str, Any]) -> dict[str, Any]:
        return chat_logprobs(d["output_token_logprobs"], d.get("output_top_logprobs"))

    def _chunk(
        self,
        rid: str,
        index: int,
        delta: DeltaMessage,
        reason: str | None = None,
        matched: int | str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=rid,
            model=self.model_name,
            choices=[
                ChatCompletionStreamChoice(
                    index=index,
                    delta=delta,
                    logprobs=logprobs,
                    finish_reason=reason,
                    matched_stop=matched,
                )
            ],
        )

    async def _stream(
        self, req: ChatCompletionRequest, reqs: list[TokenizedGenerateReqInput], echo: str
    ) -> AsyncIterator[ChatCompletionStreamResponse]:
        rid = new_id("chatcmpl")
        # The role comes first for every choice, before any waiting on the model (then the
        # echoed content, if any).
        for i in range(len(reqs)):
            yield self._chunk(rid, i, DeltaMessage(role="assistant", content=""))
            if echo:
                yield self._chunk(rid, i, DeltaMessage(content=echo))
        finals: dict[int, dict[str, Any]] = {}
        async for i, out in self.stream_choices(reqs):
            fr = out["meta_info"]["finish_reason"]
            reason, matched = openai_finish_reason(fr)
            if reason == "abort":
                raise abort_error(fr)
            text = out["delta"]["text"]
            lps = out["delta"].get("output_token_logprobs")
            if text or lps:
                logprobs = self._logprobs(out["delta"]) if lps is not None else None
                yield self._chunk(rid, i, DeltaMessage(content=text), logprobs=logprobs)
            if reason is not None:
                finals[i] = out
                yield self._chunk(rid, i, DeltaMessage(), reason, matched)
        if req.stream_options is not None and req.stream_options.include_usage:
            usage = self.usage([finals[i] for i in range(len(reqs))], req.n)
            yield ChatCompletionStreamResponse(
                id=rid, model=self.model_name, choices=[], usage=usage
            )
