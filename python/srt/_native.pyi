"""Typed stubs of `srt._native`, the PyO3 bindings of the Rust core (rust/srt-py)."""

__version__: str

# --- sched ---

class PrefillEntry:
    """One request's part of a prefill step.

    Computes `tokens[prefix_len : prefix_len + extend_len]`; `slots` are the KV slots of
    `tokens[slots_from : prefix_len + extend_len]` (the last `extend_len` are written).
    """

    @property
    def rid(self) -> int: ...
    @property
    def prefix_len(self) -> int: ...
    @property
    def extend_len(self) -> int: ...
    @property
    def cached_len(self) -> int: ...
    @property
    def slots_from(self) -> int: ...
    @property
    def slots(self) -> list[int]: ...
    @property
    def is_last_chunk(self) -> bool: ...

class Plan:
    """The next step: kind "idle", "prefill" (entries) or "decode" (ids, slots, retracted)."""

    @property
    def kind(self) -> str: ...
    @property
    def entries(self) -> list[PrefillEntry]: ...
    @property
    def ids(self) -> list[int]: ...
    @property
    def slots(self) -> list[int]: ...
    @property
    def retracted(self) -> list[int]: ...

class BatchScheduler:
    """Waiting queue, prefix cache, KV slot allocator and batch assembly.

    Per step: add_request(...) for new requests, schedule() -> Plan, commit() the token of
    every request that sampled, finish() requests that ended (in any state).
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
        init_new_token_ratio: float = 0.7,
        min_new_token_ratio: float = 0.1,
        new_token_ratio_decay: float = 0.001,
        clip_max_new_tokens: int = 4096,
    ) -> None: ...
    def add_request(
        self, rid: int, tokens: list[int], max_new_tokens: int, namespace: str = ""
    ) -> None: ...
    def schedule(self) -> Plan: ...
    def commit(self, rids: list[int], tokens: list[int]) -> None: ...
    def finish(self, rid: int) -> None: ...
    def contains(self, rid: int) -> bool: ...
    def __contains__(self, rid: int) -> bool: ...
    def stats(self) -> dict[str, int | float]: ...
    def flush_cache(self) -> None: ...
    def check_invariants(self) -> None: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...

# --- end sched ---
