"""NativeStep: one prefill or decode step of a Llama-family model as one call into srt-kernels'
decoder (`srt._native.NativeDecoder`), on numpy arrays; importing it does not import torch.

Built from a model spec (the decoder's weights: numpy arrays and options, see
`cpu_step.model_spec`), the KV pool's layers and the request-to-token table, all shared, not
copied. `forward(...)` returns the logits the step's sampler needs: each sequence's last token,
then an extend step's extra logit rows (prompt logprobs), the layout of `ModelRunner.forward`.
Used by `CpuStepRunner` (inside the torch ModelRunner) and by `NativeRunner` (without torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from srt._native import NativeDecoder


class NativeStep:
    def __init__(
        self, spec: dict[str, Any], kv: list[tuple[np.ndarray, np.ndarray]], table: np.ndarray
    ) -> None:
        # NOTE: the decoder keeps the spec's arrays alive (and the pool's) as long as it lives.
        self.decoder = NativeDecoder(spec, kv)
        self.spec = spec
        self.table = table
        self.vocab = int(spec["vocab"])

    def forward(
        self,
        decode: bool,
        ids: np.ndarray,
        positions: np.ndarray,
        out_loc: np.ndarray,
        rows: np.ndarray,
        seq_lens: np.ndarray,
        prefix_lens: np.ndarray | None,
        extend_lens: np.ndarray | None,
        extra_rows: np.ndarray | None,
        threads: int,
    ) -> np.ndarray:
        """float32 logits of the step's sequences (`rows` of the table, `seq_lens` after the
        step), with the K/V of its tokens (`ids` at `positions`) stored at `out_loc`: for a
        decode step one row per sequence; for an extend step (sequence i computing
        `extend_lens[i]` tokens after `prefix_lens[i]`) each sequence's last token, then the
        tokens at `extra_rows`."""
        i64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)  # noqa: E731
        ids, positions, out_loc, rows = i64(ids), i64(positions), i64(out_loc), i64(rows)
        if decode:
            logits = np.empty((len(rows), self.vocab), dtype=np.float32)
            self.decoder.decode(
                ids, positions, out_loc, self.table, rows, i64(seq_lens), logits, threads
            )
            return logits
        assert prefix_lens is not None and extend_lens is not None
        extend_lens = i64(extend_lens)
        picked = np.cumsum(extend_lens) - 1
        if extra_rows is not None and len(extra_rows):
            picked = np.concatenate((picked, i64(extra_rows)))
        logits = np.empty((len(picked), self.vocab), dtype=np.float32)
        self.decoder.extend(
            ids,
            positions,
            out_loc,
            self.table,
            rows,
            i64(prefix_lens),
            extend_lens,
            picked,
            logits,
            threads,
        )
        return logits
