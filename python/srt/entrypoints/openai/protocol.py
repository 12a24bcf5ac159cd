"""OpenAI API shapes (pydantic): requests, responses, stream chunks, errors, and SSE framing.

Requests are lenient where vLLM's and SGLang's users expect it and strict where it matters:
- an unknown field is ignored (`ignored_fields`; the server logs one line naming them);
- a field whose silent omission would change the output is a 400 naming it unless it holds
  its null / default value: OpenAI's (suffix, audio, best_of > n, ...) and other
  servers' extensions srt does not implement (`OUTPUT_CHANGING`: beam search, guided_grammar,
  LoRA, ...);
- types are strict: `"stream": "yes"` or `"n": "2"` is a 400, not a coercion.
srt's own sampling knobs (top_k, min_p, repetition_penalty, min_tokens, stop_token_ids,
ignore_eos, stop_regex, ...) are accepted as extra top-level fields, which is where the openai
client puts `extra_body`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
)

from srt.sampling_params import SamplingParams

SSE_DONE = "data: [DONE]\n\n"


class RequestError(Exception):
    """A client mistake: becomes an OpenAI error body with `status_code`."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code


class ErrorResponse(BaseModel):
    object: Literal["error"] = "error"
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    return ErrorResponse(message=message, type=type, param=param, code=code).model_dump()


def sse_event(data: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying `data` as JSON."""
    if isinstance(data, BaseModel):
        payload = data.model_dump_json()
    else:
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- requests ----------------------------------------------------------------------------


# Fields of other servers' APIs (vLLM, SGLang) that srt does not implement and whose silent
# omission would change the output -> the value that asks for nothing. Any other value is a 400.
OUTPUT_CHANGING: dict[str, Any] = {
    "prompt_logprobs": None,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "lora_path": None,
    "return_hidden_states": False,
    "return_routed_experts": False,
    "truncate_prompt_tokens": None,
    "logits_processors": None,
    "bad_words": None,
    "allowed_token_ids": None,
    "max_thinking_tokens": None,
    "web_search_options": None,
    "chat_template": None,
    "documents": None,
}


def asks_for_nothing(value: Any, default: Any) -> bool:
    """`value` is null, `default`, or (a batch's per-prompt list) only those."""
    if value is None:
        return True
    if isinstance(value, list) and not isinstance(default, list):
        return all(asks_for_nothing(v, default) for v in value)
    if isinstance(default, float) and type(value) is int:
        return value == default
    # NOTE: by type too, so 0 is not taken for False nor 1 for True.
    return value == default and type(value) is type(default)


class _Lenient(BaseModel):
    """Strict types; unknown fields are kept aside (`model_extra`) to be reported, not used."""

    model_config = ConfigDict(extra="allow", strict=True)

    def _unknown(self, prefix: str = "") -> list[str]:
        return [prefix + k for k in (self.model_extra or {}) if k not in OUTPUT_CHANGING]


class StreamOptions(_Lenient):
    include_usage: bool = False
    # vLLM's usage on every chunk: not implemented (a 400 when true).
    continuous_usage_stats: bool = False


class _SamplingFields(_Lenient):
    """Fields shared by both endpoints; OpenAI's own first, then srt's extras."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # chat: bool with top_logprobs; completions: an int (top alternatives), see logprobs.py
    logprobs: Any = None
    top_logprobs: int | None = None
    # Known OpenAI fields srt does not implement: a 400 when set.
    best_of: int | None = None
    # srt extensions (the openai client's `extra_body`).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    # vLLM's name for no_stop_trim.
    include_stop_str_in_output: bool = False
    stop_regex: str | list[str] | None = None
    cache_salt: str = ""
    # Structured output (srt.constrained.grammar), at most one of: OpenAI's response_format
    # (text, json_object, json_schema, and SGLang's structural_tag), SGLang's `regex` and
    # `ebnf`, vLLM's guided_json / guided_regex / guided_choice / guided_grammar and their
    # newer form structured_outputs {json, regex, choice, grammar, structural_tag}.
    response_format: dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            default = OUTPUT_CHANGING.get(name, value)
            if not asks_for_nothing(value, default):
                raise RequestError(
                    f"{name} is not supported (only {json.dumps(default)} is accepted)",
                    param=name,
                )
        if self.best_of is not None and self.best_of > 1 and self.best_of != self.n:
            raise RequestError("best_of > 1 is not supported", param="best_of")
        if self.stream_options is not None:
            if not self.stream:
                raise RequestError("stream_options needs stream=true", param="stream_options")
            if self.stream_options.continuous_usage_stats:
                raise RequestError(
                    "stream_options.continuous_usage_stats is not supported",
                    param="stream_options",
                )

    def ignored_fields(self) -> list[str]:
        """The unknown fields of the request, which change nothing (the server logs them)."""
        out = self._unknown()
        if self.stream_options is not None:
            out += self.stream_options._unknown("stream_options.")
        return out

    @field_validator("temperature")
    @classmethod
    def _openai_temperature(cls, v: float | None) -> float | None:
        # NOTE: OpenAI's upper bound (the native /generate has none); the lower bound and
        # finiteness are SamplingParams.verify's.
        if v is not None and v > 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {v}")
        return v

    def sampling_params(self, max_new_tokens: int | None) -> SamplingParams:
        """The SamplingParams for one choice; ValueError names a bad field."""
        d: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": self.min_tokens,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "no_stop_trim": self.no_stop_trim or self.include_stop_str_in_output,
            "stop_regex": self.stop_regex,
            "seed": self.seed,
            "logit_bias": self.logit_bias,
            "n": self.n,
        }
        optional = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        d.update({k: v for k, v in optional.items() if v is not None})
        grammars = self.grammars()
        if len(grammars) > 1:
            names = ", ".join(sorted({field for field, _, _ in grammars}))
            raise ValueError(f"give at most one output constraint, got {names}")
        for _, kind, spec in grammars:
            d[kind] = spec
        return SamplingParams.from_dict(d)

    def grammars(self) -> list[tuple[str, str, str]]:
        """(request field, SamplingParams grammar kind, spec) of every output constraint the
        request gives; RequestError for a malformed one."""
        out: list[tuple[str, str, str]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                out.append(("response_format", "json_schema", '{"type": "object"}'))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict) or not isinstance(js.get("schema"), dict | bool):
                    raise RequestError(
                        "response_format json_schema needs json_schema.schema (an object)",
                        param="response_format",
                    )
                out.append(("response_format", "json_schema", json.dumps(js["schema"])))
            elif kind == "structural_tag":
                tag = {k: v for k, v in rf.items() if k != "type"}
                if "format" in tag:  # xgrammar's shape: {"type": "structural_tag", "format"}
                    tag = rf
                out.append(("response_format", "structural_tag", json.dumps(tag)))
            elif kind != "text":
                raise RequestError(
                    f"response_format type {kind!r} is not supported (text, json_object, "
                    "json_schema, structural_tag)",
                    param="response_format",
                )
        so = dict(self.structured_outputs or {})
        vllm = {
            "json": self.guided_json if self.guided_json is not None else so.pop("json", None),
            "regex": self.guided_regex if self.guided_regex is not None else so.pop("regex", None),
            "choice": self.guided_choice
            if self.guided_choice is not None
            else so.pop("choice", None),
            "grammar": self.guided_grammar
            if self.guided_grammar is not None
            else so.pop("grammar", None),
            "structural_tag": so.pop("structural_tag", None),
        }
        unknown = sorted(k for k, v in so.items() if v not in (None, False))
        if unknown:
            raise RequestError(
                f"structured_outputs.{unknown[0]} is not supported (json, regex, choice, "
                "grammar, structural_tag)",
                param="structured_outputs",
            )
        field = "structured_outputs" if self.structured_outputs else "guided"
        if self.regex is not None:
            out.append(("regex", "regex", self.regex))
        if self.ebnf is not None:
            out.append(("ebnf", "ebnf", self.ebnf))
        if vllm["json"] is not None:
            js = vllm["json"]
            out.append(
                (f"{field}_json", "json_schema", js if isinstance(js, str) else json.dumps(js))
            )
        if vllm["regex"] is not None:
            out.append((f"{field}_regex", "regex", vllm["regex"]))
        if vllm["choice"] is not None:
            choices = vllm["choice"]
            if (
                not isinstance(choices, list)
                or not choices
                or not all(isinstance(c, str) for c in choices)
            ):
                raise RequestError(
                    "guided_choice is a non-empty list of strings", param="guided_choice"
                )
            out.append((f"{field}_choice", "regex", "|".join(_regex_literal(c) for c in choices)))
        if vllm["grammar"] is not None:
            out.append((f"{field}_grammar", "ebnf", vllm["grammar"]))
        if vllm["structural_tag"] is not None:
            tag = vllm["structural_tag"]
            out.append(
                (
                    f"{field}_structural_tag",
                    "structural_tag",
                    tag if isinstance(tag, str) else json.dumps(tag),
                )
            )
        return out


def _regex_literal(text: str) -> str:
    """`text` as a regex that matches exactly it (xgrammar's regex dialect)."""
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}/" else c for c in text)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    # Not implemented: a 400 when set.
    suffix: str | None = None

    def logprob_request(self) -> tuple[bool, int]:
        """(return logprobs, top alternatives per token)."""
        if self.logprobs is None:
            return False, 0
        return True, int(self.logprobs)

    def check_supported(self) -> None:
        super().check_supported()
        lp = self.logprobs
        if lp is not None and (
            isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 20
        ):
            raise RequestError("logprobs must be an integer in [0, 20]", param="logprobs")
        if self.top_logprobs is not None:
            raise RequestError(
                "top_logprobs is a chat field; use logprobs=<int> on completions",
                param="top_logprobs",
            )
        if self.echo and self.stream:
            raise RequestError("echo is not supported with stream=true", param="echo")
        if self.suffix:
            raise RequestError("suffix is not supported", param="suffix")

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a non-empty list of texts or of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("the prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_template_dict(self, index: int) -> dict[str, Any]:
        """The message as a dict for the chat template: text content (multimodal parts are a
        400), and the tool fields (srt.function_call.tools renders those)."""
        param = f"messages[{index}]"
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text":
                    raise RequestError(
                        f"content parts of type {part.get('type')!r} are not supported (text only)",
                        param=f"{param}.content",
                    )
                try:
                    texts.append(TextPart.model_validate(part).text)
                except ValidationError as e:  # a client mistake (e.g. no "text"), not a 500
                    raise RequestError(
                        f"invalid text content part: {e.errors()[0].get('msg')}",
                        param=f"{param}.content",
                    ) from e
            content = "".join(texts)
        # NOTE: "developer" is OpenAI's newer name for "system"; templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        if self.tool_calls and role != "assistant":
            raise RequestError("only assistant messages carry tool_calls", param=param)
        out: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if self.name is not None:
                out["name"] = self.name
        return out


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]
# chat_template_kwargs srt sets itself.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tokenize",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "tools",
        "documents",
        "return_dict",
        "return_assistant_tokens_mask",
    }
)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    # The chat template's render (vLLM's and SGLang's extensions): the assistant header after
    # the messages (add_generation_prompt), or the last (assistant) message left open to be
    # continued (continue_final_message); chat_template_kwargs are the template's variables
    # (e.g. enable_thinking), reasoning_effort one of them.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None
    add_special_tokens: bool = False
    # The last message's content before the generated one, when both are the assistant's.
    echo: bool = False
    # Function calling (srt.function_call): OpenAI's fields, and the older functions /
    # function_call, which map to them.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    # With --reasoning-parser: the reasoning goes to reasoning_content unless
    # separate_reasoning is false; stream_reasoning=false sends it in one piece when it ends
    # (SGLang's fields).
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    # Known OpenAI fields srt does not implement: a 400 when set.
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    # metadata-only fields: accepted and ignored, as they change nothing about the output
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def logprob_request(self) -> tuple[bool, int]:
        """(return logprobs, top alternatives per token)."""
        if not self.logprobs:
            return False, 0
        return True, self.top_logprobs or 0

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            raise RequestError("logprobs must be a boolean", param="logprobs")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= 20:
                raise RequestError("top_logprobs must be in [0, 20]", param="top_logprobs")
            if not self.logprobs:
                raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        if self.audio:
            raise RequestError("audio is not supported", param="audio")
        if self.modalities and self.modalities != ["text"]:
            raise RequestError("only the text modality is supported", param="modalities")
        if not self.messages:
            raise RequestError("messages must not be empty", param="messages")
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise RequestError(
                    "continue_final_message needs add_generation_prompt=false",
                    param="continue_final_message",
                )
            if self.messages[-1].role != "assistant":
                raise RequestError(
                    "continue_final_message needs an assistant message last",
                    param="continue_final_message",
                )
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs or {}))
        if reserved:
            raise RequestError(
                f"chat_template_kwargs may not set {', '.join(reserved)}",
                param="chat_template_kwargs",
            )

    def ignored_fields(self) -> list[str]:
        out = super().ignored_fields()
        for i, m in enumerate(self.messages):
            out += m._unknown(f"messages[{i}].")
        return out

    def template_kwargs(self) -> dict[str, Any]:
        """The chat template's extra variables."""
        kw = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kw.setdefault("reasoning_effort", self.reasoning_effort)
        return kw

    def echo_prefix(self, messages: list[dict[str, Any]]) -> str:
        """With echo, the content the response starts with: the last message's, when it is
        the assistant's (the role that answers), else nothing (vLLM's rule)."""
        if self.echo and messages and messages[-1]["role"] == "assistant":
            return messages[-1]["content"]
        return ""

    def max_new_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


# ---- responses ---------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> UsageInfo:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class _StreamChunk(BaseModel):
    """Common to stream chunks: `usage` appears only on the final include_usage chunk."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: UsageInfo | None = None

    @model_serializer(mode="wrap")
    def _drop_null_usage(self, handler: Any) -> dict[str, Any]:
        d = handler(self)
        if d.get("usage") is None:
            d.pop("usage", None)
        return d


class CompletionStreamResponse(_StreamChunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionStreamChoice]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    # With --reasoning-parser; left out when there is none.
    reasoning_content: str | None = None
    # Each {"id", "type": "function", "function": {"name", "arguments"}}; left out when none.
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: Any) -> dict[str, Any]:
        d = handler(self)
        for key in ("reasoning_content", "tool_calls"):
            if d.get(key) is None:
                d.pop(key, None)
        return d


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    # The first delta of a call has its index, id, type and function name; the next ones
    # {"index", "function": {"arguments": fragment}}.
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class ChatCompletionStreamResponse(_StreamChunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionStreamChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "srt"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def openai_finish_reason(fr: dict[str, Any] | None) -> tuple[str | None, int | str | None]:
    """srt's finish_reason dict -> OpenAI's finish_reason string and the matched stop."""
    if fr is None:
        return None, None
    kind = fr.get("type")
    if kind == "length":
        return "length", None
    if kind == "stop":
        return "stop", fr.get("matched")
    return "abort", None
