"""Typed stub of `srt._native`, the PyO3 bindings of the Rust core (rust/srt-py)."""

__version__: str

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
    def step_batch(self, rids: list[int], new_ids: list[list[int]]) -> list[tuple[str, int | None]]:
        """`step` for many requests at once, without the GIL; every rid is checked first, so
        a ValueError (unknown rid) leaves all requests untouched."""
    def finish(self, rid: int) -> str:
        """Flush what was held back and forget the request."""
    def remove(self, rid: int) -> bool:
        """Forget a request without flushing (abort); False if it was unknown."""
    def num_requests(self) -> int: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Plain full decode."""
