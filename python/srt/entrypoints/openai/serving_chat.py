"""POST /v1/chat/completions (main process): ChatCompletionRequest in, the chat template applied
by the TokenizerManager, ChatCompletionResponse or a stream of chat.completion.chunk out.

The prompt is the chat template's render of the messages (add_generation_prompt,
continue_final_message, chat_template_kwargs and reasoning_effort go to it); with `echo`, a
response whose last message is the assistant's starts with that message's content.

Function calling (srt.function_call): `tools` are given to the template (or described in the
system message when the template has no tool support), the output is parsed in the server's
tool-call format (--tool-call-parser, else detected from the template) into
`message.tool_calls` with finish_reason "tool_calls"; tool_choice required / named and strict
tools constrain decoding with the format's structural tag. With --reasoning-parser the
reasoning goes to `reasoning_content` (srt.reasoning).

Stream shape per choice: a first chunk whose delta is {"role": "assistant", "content": ""},
(with echo, a chunk with the echoed content,) deltas of content, reasoning_content and
tool_calls, then one chunk with an empty delta and the finish_reason; with
stream_options.include_usage, one last chunk with `choices: []` and the usage.

`logprobs: true` (+ `top_logprobs: k`) adds choice.logprobs = {"content": [...]} (the content
deltas' tokens when streaming). They are RAW model logprobs, log_softmax of the logits before
temperature, penalties and filters (srt.entrypoints.openai.logprobs).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from srt.entrypoints.openai.chat_output import ChatOutputParser
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
from srt.function_call.formats import detect_format, format_named
from srt.function_call.tools import (
    ToolError,
    ToolPlan,
    template_messages,
    template_supports_tools,
)
from srt.managers.io_struct import TokenizedGenerateReqInput
from srt.managers.tokenizer_manager import Disconnectable, GenerateReqInput, TokenizerManager
from srt.reasoning import reasoning_parser
from srt.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class OpenAIServingChat(OpenAIServingBase):
    def __init__(self, tokenizer_manager: TokenizerManager) -> None:
        super().__init__(tokenizer_manager)
        # NOTE: None in tests whose TokenizerManager stand-in never renders a template.
        tokenizer = getattr(tokenizer_manager, "tokenizer", None)
        args = tokenizer_manager.server_args
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = "\n".join(str(t) for t in template.values())
        # The template renders tools itself; else they are written into the messages.
        self.native_tools = template_supports_tools(tokenizer)
        name = args.tool_call_parser or detect_format(template or "")
        if name is None:
            name = "hermes"
            if self.native_tools:
                logger.warning(
                    "the chat template's tool-call format is not one srt detects; tool calls "
                    "are read as hermes (<tool_call> JSON): pass --tool-call-parser if that "
                    "is wrong"
                )
        self.tool_format = format_named(name)
        special = set(getattr(tokenizer, "all_special_tokens", []) or [])
        special |= {
            t.content
            for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
            if getattr(t, "special", False)
        }
        # Markers the tokenizer holds as special tokens must survive detokenization.
        self._keep_special = any(m in special for m in self.tool_format.special_markers)
        self.reasoning = reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None

    def _plan(self, req: ChatCompletionRequest) -> ToolPlan | None:
        try:
            return ToolPlan.of(
                req.tools,
                req.tool_choice,
                req.parallel_tool_calls,
                req.functions,
                req.function_call,
            )
        except ToolError as e:
            raise RequestError(str(e), param=e.param) from e

    def _constrain(self, req: ChatCompletionRequest, plan: ToolPlan, sp: SamplingParams) -> None:
        """Sets the structural tag that enforces the request's tool_choice / strict tools."""
        try:
            tag = plan.grammar(self.tool_format)
        except ToolError as e:
            raise RequestError(str(e), param=e.param) from e
        except ValueError as e:  # a format that cannot be enforced
            raise RequestError(str(e), param="tool_choice") from e
        if tag is None:
            return
        if sp.grammar is not None:
            raise RequestError(
                "tool_choice required / a named function / strict tools cannot be combined "
                "with response_format or regex",
                param="tool_choice",
            )
        sp.structural_tag = tag

    def _output_parser(self, req: ChatCompletionRequest, plan: ToolPlan | None) -> ChatOutputParser:
        tools = None
        if plan is not None and plan.active:
            tools = (self.tool_format, plan.names)
        reasoning = self.reasoning if req.separate_reasoning else None
        forced = plan is not None and plan.choice not in ("none", "auto")
        return ChatOutputParser(reasoning, tools, req.stream_reasoning, forced)

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
        plan = self._plan(req)
        messages = [m.to_template_dict(i) for i, m in enumerate(req.messages)]
        try:
            rendered = template_messages(messages, plan, self.tool_format, self.native_tools)
        except ToolError as e:
            raise RequestError(str(e), param=e.param) from e
        kwargs = req.template_kwargs()
        if plan is not None and self.native_tools and plan.template_tools():
            kwargs["tools"] = plan.template_tools()
        try:
            prompt = self.tm.apply_chat_template(
                rendered,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                **kwargs,
            )
        except ValueError as e:
            raise RequestError(str(e), param="messages") from e
        if plan is not None and plan.active:
            self._constrain(req, plan, sp)
            if self._keep_special:
                sp.skip_special_tokens = False
        parser = self._output_parser(req, plan)
        want_lp, top = req.logprob_request()
        obj = GenerateReqInput(
            text=prompt, cache_salt=req.cache_salt, return_logprob=want_lp, top_logprobs_num=top
        )
        # NOTE: the template already holds the special tokens (BOS, role markers), so none
        # are added unless the client asks (vLLM's add_special_tokens).
        reqs = await self.tokenize_choices([obj], sp, add_special_tokens=req.add_special_tokens)
        echo = req.echo_prefix(messages)
        if req.stream:
            return sse_stream(self._stream(req, reqs, echo, parser))
        outs = await self.run_choices(reqs, raw_request)
        choices = []
        for i, out in enumerate(outs):
            reason, matched = openai_finish_reason(out["meta_info"]["finish_reason"])
            msg = parser.complete(out["text"])
            if msg.tool_calls and reason == "stop":
                reason = "tool_calls"
            content = msg.content if not echo else echo + (msg.content or "")
            choices.append(
                ChatCompletionResponseChoice(
                    index=i,
                    message=ChatMessageOut(
                        content=content,
                        reasoning_content=msg.reasoning,
                        tool_calls=msg.tool_calls or None,
                    ),
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
        self,
        req: ChatCompletionRequest,
        reqs: list[TokenizedGenerateReqInput],
        echo: str,
        parser: ChatOutputParser,
    ) -> AsyncIterator[ChatCompletionStreamResponse]:
        rid = new_id("chatcmpl")
        # The role comes first for every choice, before any waiting on the model (then the
        # echoed content, if any).
        for i in range(len(reqs)):
            yield self._chunk(rid, i, DeltaMessage(role="assistant", content=""))
            if echo:
                yield self._chunk(rid, i, DeltaMessage(content=echo))
        finals: dict[int, dict[str, Any]] = {}
        streams = [parser.stream() for _ in reqs]
        async for i, out in self.stream_choices(reqs):
            fr = out["meta_info"]["finish_reason"]
            reason, matched = openai_finish_reason(fr)
            if reason == "abort":
                raise abort_error(fr)
            text = out["delta"]["text"]
            lps = out["delta"].get("output_token_logprobs")
            if parser.passthrough:
                delta = DeltaMessage(content=text) if text else DeltaMessage()
            else:
                d = streams[i].update(text, final=reason is not None)
                delta = DeltaMessage(
                    content=d.content or None,
                    reasoning_content=d.reasoning or None,
                    tool_calls=d.tool_calls or None,
                )
            if delta.content or delta.reasoning_content or delta.tool_calls or lps:
                logprobs = self._logprobs(out["delta"]) if lps is not None else None
                yield self._chunk(rid, i, delta, logprobs=logprobs)
            if reason is not None:
                finals[i] = out
                if reason == "stop" and streams[i].has_calls:
                    reason = "tool_calls"
                yield self._chunk(rid, i, DeltaMessage(), reason, matched)
        if req.stream_options is not None and req.stream_options.include_usage:
            usage = self.usage([finals[i] for i in range(len(reqs))], req.n)
            yield ChatCompletionStreamResponse(
                id=rid, model=self.model_name, choices=[], usage=usage
            )
