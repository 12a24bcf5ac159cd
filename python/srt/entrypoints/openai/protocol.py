"""OpenAI API shapes (pydantic): requests, responses, stream chunks, errors, and SSE framing.

Requests are strict: an unknown field is a 400, and a known field srt does not implement
(tools, suffix, ...) is a 400 naming it, rather than being silently ignored. srt's own
sampling knobs (top_k, min_p, repetition_penalty, min_tokens, stop_token_ids, ignore_eos, ...)
are accepted as extra top-level fields, which is where the openai client puts `extra_body`.
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints; OpenAI's own first, then srt's extras."""

    model_config = ConfigDict(extra="forbid")

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
    cache_salt: str = ""
    # Structured output: OpenAI's response_format (text, json_object, json_schema), or srt's
    # `regex` extension; see srt.constrained.grammar.
    response_format: dict[str, Any] | None = None
    regex: str | None = None

    def check_supported(self) -> None:
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of is not supported", param="best_of")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options needs stream=true", param="stream_options")

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
            "no_stop_trim": self.no_stop_trim,
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
        schema = self.json_schema_string()
        if schema is not None and self.regex is not None:
            raise ValueError("give at most one of response_format (JSON) and regex")
        if schema is not None:
            d["json_schema"] = schema
        if self.regex is not None:
            d["regex"] = self.regex
        return SamplingParams.from_dict(d)

    def json_schema_string(self) -> str | None:
        """The JSON schema response_format asks for, as a string; None for plain text."""
        rf = self.response_format
        if rf is None:
            return None
        kind = rf.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return '{"type": "object"}'
        if kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), dict | bool):
                raise RequestError(
                    "response_format json_schema needs json_schema.schema (an object)",
                    param="response_format",
                )
            return json.dumps(js["schema"])
        raise RequestError(
            f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
            param="response_format",
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    # Known OpenAI fields srt does not implement: a 400 when set.
    echo: bool = False
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
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_template_dict(self, index: int) -> dict[str, str]:
        """The role/content dict a chat template expects; multimodal parts are a 400."""
        param = f"messages[{index}]"
        if self.role == "tool" or self.tool_calls or self.tool_call_id:
            raise RequestError("tool messages are not supported", param=param)
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
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    # Known OpenAI fields srt does not implement: a 400 when set.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
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
        for name in ("tools", "functions", "function_call", "audio"):
            if getattr(self, name):
                raise RequestError(f"{name} is not supported", param=name)
        if self.tool_choice not in (None, "none"):
            raise RequestError("tool_choice is not supported", param="tool_choice")
        if self.modalities and self.modalities != ["text"]:
            raise RequestError("only the text modality is supported", param="modalities")
        if not self.messages:
            raise RequestError("messages must not be empty", param="messages")

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
