"""Typed stubs of `srt._native`, the PyO3 bindings of the Rust core (rust/srt-py)."""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

# --- sched ---

STEP_SECTIONS: tuple[str, ...]
"""Names of a Step's int64 sections, in storage order (see srt_core::sched::step::Section)."""
STEP_FLOAT_SECTIONS: tuple[str, ...]
ADMIT_FLOATS: int
"""Floats per admitted row: temperature, top_p, min_p, repetition, frequency, presence."""
PROMPT_TAIL: int
"""Prompt tokens decoded as context before the first output token (stop strings, text)."""
FLAG_SAMPLED: int
FLAG_TOP_K_P: int
FLAG_MIN_P: int
FLAG_OUTPUT_PENALTY: int
FLAG_REPETITION_PENALTY: int
FLAG_LOGIT_BIAS: int
FLAG_MIN_TOKENS: int
FLAG_GREEDY: int
FLAG_PRESENCE_PENALTY: int
USER_FLAG_SHIFT: int
"""Bits from here up in a request's flags are the caller's (`add_request(user_flags=...)`)."""

class Step:
    """One planned step as arrays that share the Rust buffers: section i of `ints` is
    `ints[offsets[i]:offsets[i + 1]]` (names in STEP_SECTIONS), likewise `floats`."""

    @property
    def kind(self) -> str:
        """ "idle", "prefill" or "decode"."""
    @property
    def ints(self) -> npt.NDArray[np.int64]: ...
    @property
    def offsets(self) -> npt.NDArray[np.int64]: ...
    @property
    def floats(self) -> npt.NDArray[np.float32]: ...
    @property
    def float_offsets(self) -> npt.NDArray[np.int64]: ...
    @property
    def flags(self) -> int:
        """OR of the sampling sequences' flags."""
    @property
    def all_flags(self) -> int:
        """OR of every sequence's flags."""
    @property
    def top_k_max(self) -> int:
        """Largest top-k of the sampling rows that filter (0: none; 2**64 - 1: top-p alone)."""
    @property
    def num_seqs(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_samples(self) -> int: ...

class CommitResult:
    """A commit's decisions: `ids` / `tokens` of the requests that took a token; `first`
    (id, cached tokens) of first tokens; `finished` (id, kind, value, completion_tokens,
    cached_tokens) with kind "stop" (value: stop id or string) or "length" (value: length)."""

    @property
    def ids(self) -> npt.NDArray[np.int64]: ...
    @property
    def tokens(self) -> npt.NDArray[np.int64]: ...
    @property
    def first(self) -> list[tuple[int, int]]: ...
    @property
    def finished(self) -> list[tuple[int, str, int | str | None, int, int]]: ...

class BatchScheduler:
    """The scheduler process's request table: waiting queue, prefix cache, KV slot
    allocator, table rows, batch assembly and finish decisions.

    Per step: add_request(...) for new requests, schedule() -> Step, commit(tokens) with the
    token of every sampling sequence of the oldest uncommitted step (or abandon() if it
    failed), finish(id) for requests ended from outside (in any state). One step may stay
    uncommitted while the next is planned (overlap).
    """

    def __init__(
        self,
        pool_size: int,
        page_size: int = 1,
        policy: str = "fcfs",
        max_prefill_tokens: int = 16384,
        chunked_prefill_size: int | None = 8192,
        max_running_requests: int = 256,
        enable_radix_cache: bool = True,
        seed: int = 0,
        context_len: int | None = None,
        init_new_token_ratio: float = 0.7,
        min_new_token_ratio: float = 0.1,
        new_token_ratio_decay: float = 0.001,
        clip_max_new_tokens: int = 4096,
        tokenizer_path: str | None = None,
    ) -> None: ...
    def add_request(
        self,
        id: int,
        tokens: list[int],
        max_new_tokens: int,
        *,
        min_new_tokens: int = 0,
        stop_ids: list[int] = ...,
        stop: list[str] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        no_stop_trim: bool = False,
        namespace: str = "",
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: int = 0,
        logit_bias: list[tuple[int, float]] = ...,
        user_flags: int = 0,
        arrival: float = 0.0,
    ) -> None:
        """Adds a request to the waiting queue (ValueError: duplicate id, empty prompt, stop
        strings without a tokenizer)."""
    def schedule(self) -> Step: ...
    def commit(self, tokens: npt.NDArray[np.int64]) -> CommitResult: ...
    def abandon(self) -> list[tuple[int, str, None, int, int]]:
        """Drops the oldest uncommitted step (it failed); its requests still present end."""
    def finish(self, id: int) -> tuple[int, int]:
        """Ends a request in any state: (completion_tokens, cached_tokens)."""
    def requeue(self, id: int) -> None:
        """Back to the waiting queue without its KV; its samples in flight are dropped."""
    def expired(self, now: float, limit: float) -> list[int]: ...
    def contains(self, id: int) -> bool: ...
    def __contains__(self, id: int) -> bool: ...
    def request_ids(self) -> list[int]: ...
    def tokens(self, id: int) -> list[int] | None: ...
    def set_admission_paused(self, paused: bool) -> None: ...
    def stats(self) -> dict[str, int | float | bool]: ...
    def flush_cache(self) -> None: ...
    def check_invariants(self) -> None: ...
    @property
    def num_requests(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def in_flight(self) -> int: ...

# --- end sched ---

# --- radix / alloc ---

class PrefixIndex:
    """Approximate prefix index over data-parallel replicas (the router, main process).

    One radix tree per replica of the keys routed there (token ids, or UTF-8 bytes of a prompt);
    each keeps at most `max_tokens`, forgetting the least recently routed keys first. It never
    sees the replicas' real caches. ValueError on no replicas, a zero cap or a replica out of
    range.
    """

    def __init__(self, num_replicas: int, max_tokens: int) -> None: ...
    @property
    def num_replicas(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    def match_prefix(
        self, key: list[int], candidates: list[int], namespace: str = ""
    ) -> tuple[int, int] | None:
        """`(replica, matched length)` of the candidate holding the longest prefix of `key`
        (ties: the smallest tree, then the lowest index); None when `candidates` is empty.
        Refreshes the recency of the matched paths."""
    def insert(self, replica: int, key: list[int], namespace: str = "") -> int:
        """Records `key` as routed to `replica`, then evicts down to `max_tokens`; returns how
        much of it the replica already held."""
    def smallest(self, candidates: list[int]) -> int | None:
        """The candidate with the smallest tree (ties: the lowest index); None when empty."""
    def size(self, replica: int) -> int:
        """Tokens indexed for `replica`."""
    def clear(self, replica: int) -> None:
        """Forgets everything routed to `replica`."""

class RadixTree:
    """Prefix cache over token ids whose values are KV slot indices (scheduler process).

    Keys are truncated to whole pages and matches are page aligned. Requests in different
    namespaces never share prefixes. Not thread safe: one owner calls it.
    """

    def __init__(self, page_size: int = 1) -> None: ...
    @property
    def page_size(self) -> int: ...
    def match_prefix(self, key: list[int], namespace: str = "") -> tuple[list[int], int, int]:
        """`(values, node, length)` of the longest cached prefix; refreshes its LRU time.

        `node` is where the match ends (the namespace's root when nothing matched); lock it
        to keep the prefix cached. Unlocked node handles may be evicted later.
        """
    def insert(self, key: list[int], values: list[int], namespace: str = "") -> int:
        """Caches `key -> values`; returns how many leading tokens were already cached.

        The caller frees its duplicates `values[:returned]` and the unaligned tail beyond the
        last whole page. Raises ValueError when the lengths differ.
        """
    def lock(self, node: int) -> None:
        """Protects `node` and its ancestors from eviction. ValueError on a bad handle."""
    def unlock(self, node: int) -> None:
        """Undoes one `lock`. ValueError on a bad handle or a node that is not locked."""
    def evict(self, n_tokens: int) -> list[int]:
        """Frees least recently used unlocked leaves until at least `n_tokens` tokens are
        freed or nothing evictable is left; returns the freed KV slots."""
    def evictable_size(self) -> int: ...
    def protected_size(self) -> int: ...
    def total_size(self) -> int: ...
    def reset(self) -> list[int]:
        """Drops everything (every handle becomes invalid); returns all cached slots."""

class SlotAllocator:
    """KV slot allocator. Hands out slots `page_size .. page_size + size` (page 0 is the
    padding sink), in whole pages; freed pages are reused most recently freed first."""

    def __init__(self, size: int, page_size: int = 1) -> None:
        """ValueError unless `size` is a multiple of `page_size >= 1`."""
    @property
    def page_size(self) -> int: ...
    def size(self) -> int:
        """Usable slots (page 0 excluded)."""
    def available(self) -> int:
        """Free slots (free pages * page_size)."""
    def alloc(self, n: int) -> list[int]:
        """`n` slots from fresh pages, all or nothing. MemoryError when out of memory."""
    def alloc_extend(self, seq_len: int, last_slot: int, n_new: int) -> list[int]:
        """`n_new` more slots for a sequence of `seq_len` tokens ending at `last_slot`: the
        rest of its last page first, then fresh pages. MemoryError when out of memory,
        ValueError when `last_slot` cannot end such a sequence."""
    def pages_needed(self, seq_len: int, n_new: int) -> int:
        """Fresh pages `alloc_extend(seq_len, _, n_new)` would take."""
    def free(self, slots: list[int]) -> None:
        """Frees the pages of `slots`. ValueError (nothing freed) on a double free or a slot
        that was never handed out."""
    def reset(self) -> None: ...

# --- end radix / alloc ---

# --- detok ---

class Detokenizer:
    """Incremental detokenizer over a tokenizer.json, with per-request state keyed by rid.

    Deltas hold back incomplete UTF-8 and any tail that could start a stop string; a matched
    stop string is cut (kept with `no_stop_trim`) and nothing after it is ever returned.
    """

    def __init__(self, tokenizer_path: str) -> None:
        """Load a tokenizer.json file, or the one inside a folder (FileNotFoundError if none,
        ValueError if it does not parse)."""
    @staticmethod
    def from_json(json: str) -> Detokenizer:
        """Load a tokenizer from the text of a tokenizer.json (ValueError if invalid)."""
    def add(
        self,
        rid: int,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: list[str] | None = None,
        no_stop_trim: bool = False,
    ) -> None:
        """Start a request; the prompt's last ids are its decoding context (ValueError if the
        rid exists)."""
    def step(self, rid: int, new_ids: list[int]) -> tuple[str, int | None]:
        """Text that became final, and the index of the matched stop string (set from the
        step it matched on)."""
    def step_tokens(
        self, ids: npt.NDArray[np.int64], tokens: npt.NDArray[np.int64]
    ) -> tuple[list[str], list[tuple[int, str]]]:
        """One new token per request (`ids[i]` gets `tokens[i]`), without the GIL: the text
        that became final for each, and (index, message) of those that failed (text "")."""
    def step_batch(self, rids: list[int], new_ids: list[list[int]]) -> list[tuple[str, int | None]]:
        """`step` for many requests at once, without the GIL; every rid is checked first, so
        a ValueError (unknown rid) leaves all requests untouched."""
    def finish(self, rid: int) -> str:
        """Flush what was held back and forget the request."""
    def remove(self, rid: int) -> bool:
        """Forget a request without flushing (abort); False if it was unknown."""
    def num_requests(self) -> int: ...
    def contains(self, rid: int) -> bool: ...
    def __contains__(self, rid: int) -> bool: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Plain full decode."""

# --- kernels (srt-kernels) ---

def available_parallelism() -> int:
    """Threads this process can run at once: its CPU affinity and, on Linux, its cgroup's CPU
    quota (a container's `--cpus`), as Rust's `std::thread::available_parallelism` counts
    them; 1 where neither can be read."""

def paged_decode_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    table: npt.NDArray[np.int32],
    rows: npt.NDArray[np.int64],
    lens: npt.NDArray[np.int64],
    scale: float,
    out: np.ndarray,
    threads: int,
    window: int = 0,
    softcap: float = 0.0,
) -> None:
    """Decode attention over one layer of the paged KV pool, written into `out` ([B, Hq, D],
    q's layout): sequence b attends to the keys and values ([slots, Hkv, D]) at slots
    `table[rows[b], :lens[b]]`, scores scaled by `scale`, f32 arithmetic. q, k, v and out are
    all float32 or all int16 (bfloat16 bits: `tensor.view(torch.int16).numpy()`), C-contiguous.
    `threads` > 1 runs sequences in parallel (a pool kept for the process); the GIL is
    released. `window` > 0: only the last `window` positions of each sequence attend (its own
    included); `softcap` > 0: the scaled scores become `softcap * tanh(score / softcap)`.
    Raises ValueError when shapes, rows, lengths, slots or the soft-cap do not fit."""

def paged_extend_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    table: npt.NDArray[np.int32],
    rows: npt.NDArray[np.int64],
    prefix_lens: npt.NDArray[np.int64],
    extend_lens: npt.NDArray[np.int64],
    scale: float,
    out: np.ndarray,
    threads: int,
    window: int = 0,
    softcap: float = 0.0,
) -> None:
    """Extend (prefill) attention over one layer of the paged KV pool for a whole batch, into
    `out` ([T, Hq, D], q's layout): the `extend_lens[b]` new tokens of sequence b (rows of q,
    sequence after sequence) follow its `prefix_lens[b]` cached tokens and attend causally to
    the keys and values at `table[rows[b], :prefix + extend]` (the new tokens' own already
    stored). Arrays, `scale`, `window` and `softcap` as in `paged_decode_attention`; runs in
    parallel over (sequence, KV head, tile of new tokens), the GIL released. Raises ValueError
    when shapes, rows, lengths, slots or the soft-cap do not fit."""

def rope_neox_inplace(
    x: np.ndarray,
    positions: npt.NDArray[np.int64],
    cos: npt.NDArray[np.float32],
    sin: npt.NDArray[np.float32],
) -> None:
    """Rotary embedding (neox `rotate_half` form) in place over `x` ([T, H, D] float32, or
    int16 holding bf16; any strides, each head's D values contiguous): token t by the rows
    `positions[t]` of the float32 tables ([max_position, D]). Bit for bit
    `x * cos + rotate_half(x) * sin` with the tables cast to x's dtype. Raises ValueError on
    a position outside the tables or shapes that do not fit."""

def sample_draw(
    probs: npt.NDArray[np.float32],
    sorted: npt.NDArray[np.float32] | None,
    candidates: int,
    top_k: npt.NDArray[np.int64],
    top_p: npt.NDArray[np.float32],
    min_p: npt.NDArray[np.float32] | None,
    seeds: npt.NDArray[np.int64],
    steps: npt.NDArray[np.int64],
    threads: int = 1,
) -> npt.NDArray[np.int64]:
    """The sampled token of each row of `probs` ([S, V] softmax probabilities): top-k / top-p
    over `sorted` (each row ascending; None when no row filters so; no row keeps more than
    `candidates`), min-p (None: no row), one inverse-CDF draw in id order from the uniform of
    (seed, step). Bit for bit the torch path of `srt.layers.sampler` on the CPU. `threads` > 1
    splits the rows over that many threads (the same result)."""

def sample_softmax(
    logits: npt.NDArray[np.float32],
    temperature: npt.NDArray[np.float32],
    counts: npt.NDArray[np.float32] | None,
    rows: npt.NDArray[np.int64],
    frequency: npt.NDArray[np.float32],
    presence: npt.NDArray[np.float32] | None,
    threads: int = 1,
    out: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(probs [S, V], argmax [S]): the softmax of each row of `logits` less the frequency /
    presence penalties (`counts`, the output-token counts table, row `rows[i]` for row i; None:
    no penalty) over its temperature, and the first maximum of the penalised logits. `threads`
    as in `sample_draw`; `out` ([S, V] float32) receives the probabilities and is returned."""

def quant_matmul(
    qtype_name: str,
    w: npt.NDArray[np.uint8],
    k: int,
    x: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    col: int,
    threads: int,
) -> None:
    """`out[:, col:col + n] = x @ W.T` for GGUF-quantized weights W ([n, k]) given as their
    blocks `w` (uint8 [n, row_bytes]) of type `qtype_name` (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K);
    x float32 [b, k], out float32 [b, m], all C-contiguous. Each block is unpacked once and
    applied to every row of x; `threads` > 1 splits the rows of W; the GIL is released.
    Raises ValueError when a type or shape does not fit."""

def quant_dequantize(
    qtype_name: str,
    w: npt.NDArray[np.uint8],
    k: int,
    out: npt.NDArray[np.float32],
    threads: int,
) -> None:
    """The float32 weights [n, k] of GGUF blocks `w` (uint8 [n, row_bytes]) written into
    `out`, exactly as llama.cpp dequantizes them."""

def quant_pack(
    qtype_name: str, w: npt.NDArray[np.uint8], k: int
) -> tuple[int, npt.NDArray[np.uint8], np.ndarray, np.ndarray]:
    """GGUF blocks `w` (uint8 [n, row_bytes] of Q4_0, Q4_1, Q8_0 or Q4_K holding [n, k]
    weights) repacked once for `quant_matmul_packed`: (bits 4 or 8, data uint8 [n, bytes],
    d [n, blocks], m [n, blocks]), the weights being `d * q + m` per 32. The scales are
    uint16 f16 bits where f16 holds every one exactly (Q4_0, Q4_1, Q8_0), else float32 (Q4_K).
    Raises ValueError for other types (Q6_K stays in its blocks: `quant_matmul`)."""

def quant_matmul_packed(
    bits: int,
    data: npt.NDArray[np.uint8],
    d: np.ndarray,
    m: np.ndarray,
    k: int,
    x: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    col: int,
    threads: int,
) -> None:
    """`out[:, col:col + n] = x @ W.T` for weights packed by `quant_pack` ([n, k]), x float32
    [b, k]: on AVX-512 VNNI CPUs x is taken as int16 per 32 values below 8 rows, and from 8
    rows multiplies as f32 with the weights dequantized (AMX-BF16 tiles, bf16 weights and x in
    two bf16 parts, where the CPU has them); elsewhere as int8 per 32 values (AVX2 or plain
    code); the GIL is released. Raises ValueError when shapes do not fit."""

def quant_batch_tiles() -> bool:
    """Whether `quant_matmul_packed` multiplies batches of rows on AMX tiles here (its cost
    then grows little with the rows). SRT_DISABLE_AMX=1 turns them off."""

def rms_norm(
    x: np.ndarray,
    residual: np.ndarray | None,
    weight: np.ndarray,
    out: np.ndarray,
    eps: float,
    gemma: bool = False,
    threads: int = 1,
) -> None:
    """RMSNorm of the rows of `x` ([T, d]) into `out`: `weight * round(x / rms(x))`, or Gemma's
    `x / rms(x) * (1 + weight)` (`gemma`), f32 arithmetic. With `residual`, first
    `residual += x` in place and the norm of that sum. float32 or int16 (bf16 bits) arrays of
    one dtype, C-contiguous; the GIL is released. `threads` > 1 splits the rows over that many
    threads when there are enough (the same result)."""

def silu_and_mul(x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
    """`out = silu(x[:, :d]) * x[:, d:]` for `x` [T, 2d] (gate then up), float32 or int16
    (bf16 bits), C-contiguous; `threads` as in `rms_norm`."""

class NativeDecoder:
    """A Llama-family decoder's whole step in one call (srt-kernels' decoder), over the
    model's numpy arrays and its KV pool (kept referenced, read and written in place). The
    spec format is described in `srt.model_executor.cpu_step` and the binding's docs.
    ValueError when a shape does not fit."""

    def __init__(
        self,
        spec: dict[str, Any],
        kv: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]],
    ) -> None: ...
    def decode(
        self,
        ids: npt.NDArray[np.int64],
        positions: npt.NDArray[np.int64],
        out_loc: npt.NDArray[np.int64],
        table: npt.NDArray[np.int32],
        rows: npt.NDArray[np.int64],
        lens: npt.NDArray[np.int64],
        logits: npt.NDArray[np.float32],
        threads: int,
    ) -> None:
        """Logits [batch, vocab] of one token per sequence (ids, positions, KV slots
        `out_loc`), attending through `table[rows[i], :lens[i]]`; the K/V of the tokens go to
        their slots. The GIL is released; ValueError on inputs that do not fit."""
    def extend(
        self,
        ids: npt.NDArray[np.int64],
        positions: npt.NDArray[np.int64],
        out_loc: npt.NDArray[np.int64],
        table: npt.NDArray[np.int32],
        rows: npt.NDArray[np.int64],
        prefix_lens: npt.NDArray[np.int64],
        extend_lens: npt.NDArray[np.int64],
        logit_rows: npt.NDArray[np.int64],
        logits: npt.NDArray[np.float32],
        threads: int,
    ) -> None:
        """A prefill (extend) step: sequence i computes `extend_lens[i]` tokens (ids,
        positions, KV slots `out_loc`, sequence after sequence) after `prefix_lens[i]` already
        in the pool, attending causally through `table[rows[i]]`; logits
        [len(logit_rows), vocab] of the tokens at `logit_rows`. The GIL is released;
        ValueError on inputs that do not fit."""
