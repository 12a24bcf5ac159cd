"""What /v1/completions and /v1/chat/completions share (main process): the model-name check
(another name is served with a warning), turning prompts x n choices into tokenized requests
(all validated before any is sent), running them together, and the SSE wrapper that ends every
stream with `data: [DONE]`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from srt.entrypoints.openai.protocol import (
    SSE_DONE,
    ModelCard,
    ModelList,
    RequestError,
    UsageInfo,
    error_body,
    sse_event,
)
from srt.managers.io_struct import TokenizedGenerateReqInput
from srt.managers.tokenizer_manager import (
    Disconnectable,
    GenerateReqInput,
    RuntimeDeadError,
    TokenizerManager,
    final_output,
    merge_streams,
    run_all,
)
from srt.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class OpenAIServingBase:
    def __init__(self, tokenizer_manager: TokenizerManager) -> None:
        self.tm = tokenizer_manager

    @property
    def model_name(self) -> str:
        return self.tm.served_model_name

    def check_model(self, model: str | None) -> None:
        """A request naming another model is served all the same (as SGLang does; clients
        often send a placeholder name), with a warning."""
        if model is not None and model != self.model_name:
            logger.warning(
                "request for model %r served by %r (the only model here)", model, self.model_name
            )

    @staticmethod
    def log_ignored(req: Any) -> None:
        """One log line naming the request's unknown fields, which srt ignores."""
        names = req.ignored_fields()
        if names:
            logger.warning("ignoring unknown request fields: %s", ", ".join(names))

    def require_model(self, model: str) -> None:
        """RequestError (404) unless `model` is the served one (GET /v1/models/{id})."""
        if model != self.model_name:
            raise RequestError(
                f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                status_code=404,
                type="NotFoundError",
                param="model",
                code="model_not_found",
            )

    def model_list(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=self.model_name,
                    root=self.tm.model_path,
                    max_model_len=self.tm.context_len,
                )
            ]
        )

    async def tokenize_choices(
        self,
        prompts: list[GenerateReqInput],
        sampling_params: SamplingParams,
        add_special_tokens: bool,
    ) -> list[TokenizedGenerateReqInput]:
        """One tokenized request per (prompt, choice), choice-major within a prompt (index =
        prompt * n + choice). Raises RequestError before anything is sent."""
        n = sampling_params.n
        reqs: list[TokenizedGenerateReqInput] = []
        for obj in prompts:
            obj.sampling_params = sampling_params
            try:
                first = await self.tm.tokenize_request(obj, add_special_tokens)
            except ValueError as e:
                raise RequestError(str(e)) from e
            reqs.extend(self.tm.fan_out(first, n))
        return reqs

    async def run_choices(
        self, reqs: list[TokenizedGenerateReqInput], request: Disconnectable | None
    ) -> list[dict[str, Any]]:
        """Final outputs of every request; an aborted one or a dead runtime raises."""
        try:
            outs = await run_all(
                [final_output(self.tm.generate_tokenized(r, request)) for r in reqs]
            )
        except RuntimeDeadError as e:
            raise RequestError(str(e), status_code=503, type="server_error") from e
        for out in outs:
            fr = out["meta_info"]["finish_reason"]
            if fr is not None and fr.get("type") == "abort":
                raise abort_error(fr)
        return outs

    def stream_choices(
        self, reqs: list[TokenizedGenerateReqInput]
    ) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        for r in reqs:
            r.stream = True
        return merge_streams([self.tm.generate_tokenized(r) for r in reqs])

    @staticmethod
    def usage(outs: list[dict[str, Any]], n: int) -> UsageInfo:
        """Prompt tokens once per prompt, completion tokens of every choice."""
        metas = [o["meta_info"] for o in outs]
        prompt = sum(m["prompt_tokens"] for m in metas[::n])
        cached = sum(m["cached_tokens"] for m in metas[::n])
        completion = sum(m["completion_tokens"] for m in metas)
        return UsageInfo.of(prompt, completion, cached)


def abort_error(fr: dict[str, Any]) -> RequestError:
    """The error for a request that ended in an abort: the status the scheduler gave when the
    client is at fault (400, e.g. it can never fit in the KV cache), else a server error."""
    message = f"the request was aborted: {fr.get('message') or 'no reason given'}"
    status = fr.get("status_code")
    if isinstance(status, int) and 400 <= status < 500:
        return RequestError(message, status_code=status)
    return RequestError(message, status_code=500, type="server_error")


async def sse_stream(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """Frames each event as SSE and ends with [DONE]; an error mid-stream becomes an error
    event (the status line has already gone out)."""
    try:
        async for ev in events:
            yield sse_event(ev)
    except RequestError as e:
        yield sse_event({"error": error_body(e.message, e.type, e.param, e.code)})
    except RuntimeDeadError as e:
        yield sse_event({"error": error_body(str(e), "server_error")})
    except Exception as e:  # a bug: tell the client instead of cutting the stream
        logger.exception("stream failed")
        yield sse_event({"error": error_body(f"internal error: {e}", "server_error")})
    yield SSE_DONE
