"""The body of POST /generate (main process), SGLang's native request as its own clients send it.

SGLang's frontend (`sgl.RuntimeEndpoint`) and its bench client (`sglang.bench_serving --backend
sglang`) send fields srt does not implement (multimodal data, LoRA, disaggregation, hidden
states, ...), mostly as null / false. Each such field is accepted while it holds the value that
asks for nothing, and is a 400 naming it otherwise: srt never pretends to do what it cannot.
Fields that only label a request (metrics labels, trace headers, conversation ids) change
nothing about the output and are accepted with any value. Any other field is a 400.

`to_inputs` turns the body into one `GenerateReqInput` per prompt.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from srt.entrypoints.openai.protocol import RequestError, asks_for_nothing
from srt.managers.tokenizer_manager import GenerateReqInput

# SGLang GenerateReqInput fields srt does not implement -> the value that asks for nothing.
UNSUPPORTED_UNLESS_DEFAULT: dict[str, Any] = {
    "input_embeds": None,
    "image_data": None,
    "video_data": None,
    "audio_data": None,
    "mm_hashes": None,
    "mm_content_hashes": None,
    "use_audio_in_video": False,
    "video_config": None,
    "modalities": None,
    "mm_processor_kwargs": None,
    "images_config": None,
    "max_dynamic_patch": None,
    "min_dynamic_patch": None,
    "image_max_dynamic_patch": None,
    "video_max_dynamic_patch": None,
    "need_wait_for_mm_inputs": None,
    "num_items_assigned": None,
    "encoder_urls": None,
    "watermark": None,
    "token_ids_logprob": None,
    "return_sampling_mask": False,
    "sampling_logprobs_mode": None,
    "return_flat_raw_top_logprobs": False,
    "return_flat_raw_output_top_logprobs": False,
    "return_flat_raw_top_logprobs_b64": False,
    "return_hidden_states": False,
    "return_routed_experts": False,
    "routed_experts_start_len": 0,
    "return_indexer_topk": False,
    "return_entropy": False,
    "return_bytes": False,
    "return_prompt_token_ids": False,
    "session_params": None,
    "lora_path": None,
    "lora_id": None,
    "custom_logit_processor": None,
    "positional_embed_overrides": None,
    "bootstrap_host": None,
    "bootstrap_port": None,
    "bootstrap_room": None,
    "bootstrap_pair_key": None,
    "decode_tp_size": None,
    "routed_dp_rank": None,
    "data_parallel_rank": None,
    "disagg_prefill_dp_rank": None,
    "http_worker_ipc": None,
    "background": False,
    "require_reasoning": False,
    "max_thinking_tokens": None,
    "priority": None,
    "extra_key": None,
    "multi_item_delimiter_indices": None,
    "token_indices_to_pool": None,
    "kv_hints": None,
}

# SGLang fields that label a request and change nothing about its output: any value is fine.
LABELS = frozenset(
    {
        "log_metrics",
        "custom_labels",
        "conversation_id",
        "routing_key",
        "session_id",
        "external_trace_header",
        "received_time",
        "no_logs",
    }
)


def check_sglang_fields(extra: dict[str, Any]) -> None:
    """RequestError (400) naming the first field of `extra` (the body's fields beyond srt's
    own) that srt does not know, or that asks for something srt does not implement."""
    for name, value in extra.items():
        if name in LABELS:
            continue
        if name not in UNSUPPORTED_UNLESS_DEFAULT:
            raise RequestError(f"{name}: unknown field", param=name)
        default = UNSUPPORTED_UNLESS_DEFAULT[name]
        if not asks_for_nothing(value, default):
            raise RequestError(
                f"{name}={value!r} is not supported by srt (only {json.dumps(default)} is "
                "accepted)",
                param=name,
            )


class GenerateRequest(BaseModel):
    """POST /generate: one prompt or a batch (lists), as text or token ids. A null means the
    default, as in SGLang."""

    model_config = ConfigDict(extra="allow")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    rid: str | list[str] | None = None
    cache_salt: str | None = None
    return_logprob: bool | None = None
    top_logprobs_num: int | None = None
    logprob_start_len: int | None = None
    # Logprob entries are [logprob, token_id, text]; false gives a null text (SGLang's
    # default). srt's default (null) includes the text.
    return_text_in_logprobs: bool | None = None

    def to_inputs(self) -> tuple[list[GenerateReqInput], bool]:
        """The single requests, and whether the body was a batch. ValueError if malformed,
        RequestError for a field srt does not know or implement."""
        check_sglang_fields(self.model_extra or {})
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of `text` and `input_ids`")
        if self.text is not None:
            batch = isinstance(self.text, list)
            prompts: list[Any] = list(self.text) if batch else [self.text]
            key = "text"
        else:
            ids = self.input_ids or []
            batch = bool(ids) and isinstance(ids[0], list)
            prompts = list(ids) if batch else [ids]
            key = "input_ids"
        if batch and not prompts:
            raise ValueError(f"`{key}` is an empty batch")
        sps = self.sampling_params
        if isinstance(sps, list):
            if len(sps) != len(prompts):
                raise ValueError(
                    f"{len(sps)} sampling_params for {len(prompts)} prompts; give one per prompt"
                )
        else:
            sps = [sps] * len(prompts)
        rids: list[str | None] = [None] * len(prompts)
        if self.rid is not None:
            rids = [self.rid] if isinstance(self.rid, str) else list(self.rid)
            if len(rids) != len(prompts):
                raise ValueError("give one rid per prompt")
        objs = [
            GenerateReqInput(
                sampling_params=sp,
                stream=self.stream,
                rid=rid,
                cache_salt=self.cache_salt or "",
                return_logprob=bool(self.return_logprob),
                top_logprobs_num=self.top_logprobs_num or 0,
                logprob_start_len=(
                    -1 if self.logprob_start_len is None else self.logprob_start_len
                ),
                return_text_in_logprobs=self.return_text_in_logprobs is not False,
            )
            for sp, rid in zip(sps, rids, strict=True)
        ]
        for obj, p in zip(objs, prompts, strict=True):
            setattr(obj, key, p)
        return objs, batch
