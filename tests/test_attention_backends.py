"""Attention backend selection and the GPU path's host-side logic, on CPU (no flashinfer needed):
the FlashInfer page table against a plain per-sequence reference, "auto" resolution, and the
CUDA graph batch sizes. The kernels themselves are checked in test_gpu.py."""

from __future__ import annotations

import random

import pytest
import torch

from srt.layers.attention import create_attention_backend, resolve_attention_backend
from srt.layers.attention.flashinfer_backend import page_table
from srt.layers.attention.torch_native import TorchNativeAttnBackend
from srt.model_executor.cuda_graph_runner import capture_batch_sizes
from srt.server_args import ServerArgs


def reference_pages(table: torch.Tensor, rows: list[int], lens: list[int], page: int) -> tuple:
    indptr, indices, last = [0], [], []
    for row, n in zip(rows, lens, strict=True):
        pages = [int(table[row, j]) // page for j in range(0, n, page)]
        indices += pages
        indptr.append(indptr[-1] + len(pages))
        last.append(n - (len(pages) - 1) * page)
    return indptr, indices, last


@pytest.mark.parametrize("page", [1, 4, 16])
def test_page_table_matches_reference(page: int) -> None:
    rng = random.Random(page)
    n_rows, width = 9, 80
    table = torch.zeros(n_rows, width, dtype=torch.int32)
    free_pages = list(range(1, 1000))
    rng.shuffle(free_pages)
    for row in range(n_rows):  # page-aligned runs, as the allocator lays sequences out
        for j in range(0, width, page):
            p = free_pages.pop()
            table[row, j : j + page] = torch.arange(p * page, p * page + page)[: width - j]
    for _ in range(20):
        rows = rng.sample(range(n_rows), rng.randint(1, n_rows))
        lens = [rng.randint(1, width) for _ in rows]
        indptr, indices, last = page_table(
            table, torch.tensor(rows), torch.tensor(lens), lens, page
        )
        want = reference_pages(table, rows, lens, page)
        assert indptr.device.type == "cpu" and last.device.type == "cpu"
        assert indptr.dtype == indices.dtype == last.dtype == torch.int32
        assert (indptr.tolist(), indices.tolist(), last.tolist()) == want


def test_page_table_shares_prefix_pages() -> None:
    # Two rows holding the same cached prefix pages: each lists them (no dedup, no loss).
    table = torch.zeros(2, 16, dtype=torch.int32)
    table[0, :8] = torch.arange(8, 16)
    table[1, :8] = torch.arange(8, 16)
    table[1, 8:12] = torch.arange(40, 44)
    indptr, indices, last = page_table(
        table, torch.tensor([0, 1]), torch.tensor([7, 11]), [7, 11], 4
    )
    assert indptr.tolist() == [0, 2, 5]
    assert indices.tolist() == [2, 3, 2, 3, 10]
    assert last.tolist() == [3, 3]


def test_auto_backend_on_cpu_is_torch_native() -> None:
    assert resolve_attention_backend("auto", "cpu", torch.float32) == "torch_native"
    assert resolve_attention_backend("auto", "cpu", torch.bfloat16) == "torch_native"
    assert resolve_attention_backend("torch_native", "cuda", torch.bfloat16) == "torch_native"
    assert isinstance(create_attention_backend("torch_native"), TorchNativeAttnBackend)
    with pytest.raises(ValueError, match="unknown attention backend"):
        create_attention_backend("nope")


def test_flashinfer_backend_refuses_cpu(tiny_model_paths: dict[str, str]) -> None:
    from srt.configs.model_config import ModelConfig

    pytest.importorskip("flashinfer")
    config = ModelConfig(tiny_model_paths["llama"], dtype="bfloat16", device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        create_attention_backend("flashinfer", config)


def test_server_args_gpu_flags() -> None:
    args = ServerArgs(model_path="m")
    assert args.attention_backend == "auto" and not args.disable_cuda_graph
    assert args.cuda_graph_max_bs is None
    with pytest.raises(ValueError, match="attention-backend"):
        ServerArgs(model_path="m", attention_backend="triton")
    with pytest.raises(ValueError, match="cuda-graph-max-bs"):
        ServerArgs(model_path="m", cuda_graph_max_bs=0)


def test_capture_batch_sizes() -> None:
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(6) == [1, 2, 4, 6]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35
    assert all(b - a == 8 for a, b in zip(sizes[4:], sizes[5:], strict=False))


def _decode_case(dtype: torch.dtype, hq: int, hkv: int, d: int, seed: int) -> tuple:
    """A torch-native backend bound to pools holding random K/V, and a decode batch over rows
    in scattered order whose slots interleave (as decode tokens of many requests do)."""
    from srt.mem_cache.memory_pool import KVPool, ReqToTokenPool
    from srt.model_executor.forward_batch import ForwardBatch

    g = torch.Generator().manual_seed(seed)
    pool = KVPool(512, 1, 1, hkv, d, dtype, "cpu")
    table = ReqToTokenPool(8, 64, "cpu")
    for buf in (*pool.k_buffers, *pool.v_buffers):
        buf[1:] = torch.randn(buf[1:].shape, generator=g).to(dtype)
    rows, lens = [5, 0, 3, 6], [1, 17, 40, 63]
    free = (torch.randperm(500, generator=g) + 1).tolist()
    for row, n in zip(rows, lens, strict=True):
        table.req_to_token[row, : n - 1] = torch.tensor([free.pop() for _ in range(n - 1)])
    new_slots = [free.pop() for _ in rows]
    for row, n, slot in zip(rows, lens, new_slots, strict=True):
        table.req_to_token[row, n - 1] = slot
    backend = TorchNativeAttnBackend()
    backend.bind_pools(table, pool)
    batch = ForwardBatch.decode([1] * len(rows), new_slots, rows, lens, "cpu")
    q = torch.randn(len(rows), hq, d, generator=g).to(dtype)
    kv = torch.randn(2, len(rows), hkv, d, generator=g).to(dtype)
    return backend, batch, q, kv[0], kv[1]


def _reference_decode(backend: TorchNativeAttnBackend, batch, q, scaling: float) -> torch.Tensor:
    """Each sequence on its own: its keys by table lookup, softmax in float64."""
    assert backend.kv_pool is not None and backend.req_to_token_pool is not None
    k_buf, v_buf = backend.kv_pool.get_kv(0)
    outs = []
    rows, lens = batch.req_pool_indices.tolist(), batch.seq_lens.tolist()
    for b, (row, n) in enumerate(zip(rows, lens, strict=True)):
        slots = backend.req_to_token_pool.req_to_token[row, :n].long()
        keys, values = k_buf[slots].double(), v_buf[slots].double()  # [n, Hkv, D]
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys) * scaling
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values).reshape(-1))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 4, 16), (6, 2, 32), (8, 1, 64), (4, 2, 12)])
def test_torch_native_decode_kernels_match_reference(
    dtype: torch.dtype, hq: int, hkv: int, d: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The native kernel (CPU, fp32 / bf16 pools) and the gathered-SDPA path both against a
    # per-sequence float64 reference, with the new tokens' K/V stored by the step itself.
    from srt.layers.attention.layer import AttentionLayer

    backend, batch, q, k, v = _decode_case(dtype, hq, hkv, d, seed=hq * d)
    layer = AttentionLayer(backend, 0, hq, hkv, d, scaling=d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    outs = {}
    for native in (True, False):
        monkeypatch.setattr(TorchNativeAttnBackend, "_native_cpu", lambda self, n=native: n)
        backend.init_forward_metadata(batch)
        assert (backend._native is not None) == native
        outs[native] = backend.forward(q, k, v, layer, batch)
        assert outs[native].dtype == dtype and outs[native].shape == (4, hq * d)
    want = _reference_decode(backend, batch, q, layer.scaling)
    for native, out in outs.items():
        err = (out.double() - want).abs().max().item()
        assert err < tol, f"native={native}: off by {err}"


def _extend_case(dtype: torch.dtype, hq: int, hkv: int, d: int, seed: int) -> tuple:
    """A torch-native backend over pools with random cached prefixes, and an extend batch of
    uneven sequences (no prefix, a prefix, long) whose new K/V the step stores."""
    from srt.mem_cache.memory_pool import KVPool, ReqToTokenPool
    from srt.model_executor.forward_batch import ForwardBatch

    g = torch.Generator().manual_seed(seed)
    pool = KVPool(512, 1, 1, hkv, d, dtype, "cpu")
    table = ReqToTokenPool(8, 128, "cpu")
    for buf in (*pool.k_buffers, *pool.v_buffers):
        buf[1:] = torch.randn(buf[1:].shape, generator=g).to(dtype)
    rows, prefix, ext = [4, 1, 6], [0, 9, 30], [5, 40, 3]
    free = (torch.randperm(500, generator=g) + 1).tolist()
    out_loc = []
    for row, p, n in zip(rows, prefix, ext, strict=True):
        slots = [free.pop() for _ in range(p + n)]
        table.req_to_token[row, : p + n] = torch.tensor(slots)
        out_loc += slots[p:]
    backend = TorchNativeAttnBackend()
    backend.bind_pools(table, pool)
    t = sum(ext)
    batch = ForwardBatch.extend([1] * t, out_loc, rows, prefix, ext, "cpu")
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    kv = torch.randn(2, t, hkv, d, generator=g).to(dtype)
    return backend, batch, q, kv[0], kv[1]


def _reference_extend(backend: TorchNativeAttnBackend, batch, q, layer) -> torch.Tensor:
    """Each new token on its own: its visible keys by table lookup, softmax in float64."""
    assert backend.kv_pool is not None and backend.req_to_token_pool is not None
    k_buf, v_buf = backend.kv_pool.get_kv(0)
    outs = []
    rows = batch.req_pool_indices.tolist()
    prefix, ext = batch.extend_prefix_lens.tolist(), batch.extend_seq_lens.tolist()
    token = 0
    for row, p, n in zip(rows, prefix, ext, strict=True):
        for j in range(n):
            pos = p + j
            lo = 0 if not layer.sliding_window else max(0, pos - layer.sliding_window + 1)
            slots = backend.req_to_token_pool.req_to_token[row, lo : pos + 1].long()
            keys, values = k_buf[slots].double(), v_buf[slots].double()
            group = q.shape[1] // keys.shape[1]
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            scores = torch.einsum("hd,nhd->hn", q[token + j].double(), keys) * layer.scaling
            if layer.logit_softcap:
                scores = torch.tanh(scores / layer.logit_softcap) * layer.logit_softcap
            outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values).reshape(-1))
        token += n
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 4, 16), (6, 2, 32), (8, 1, 64)])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (7, None), (None, 2.0)])
def test_torch_native_extend_kernel_matches_reference(
    dtype: torch.dtype,
    hq: int,
    hkv: int,
    d: int,
    window: int | None,
    softcap: float | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The native extend kernel (one call for the batch) and the SDPA paths (padded or one per
    # sequence) against a per-token float64 reference.
    from srt.layers.attention.layer import AttentionLayer

    backend, batch, q, k, v = _extend_case(dtype, hq, hkv, d, seed=hq * d)
    layer = AttentionLayer(
        backend, 0, hq, hkv, d, scaling=d**-0.5, sliding_window=window, logit_softcap=softcap
    )
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    outs = {}
    for native in (True, False):
        monkeypatch.setattr(TorchNativeAttnBackend, "_native_cpu", lambda self, n=native: n)
        backend.init_forward_metadata(batch)
        assert (backend._native_extend is not None) == native
        outs[native] = backend.forward(q, k, v, layer, batch)
        assert outs[native].dtype == dtype and outs[native].shape == (q.shape[0], hq * d)
    want = _reference_extend(backend, batch, q, layer)
    for native, out in outs.items():
        err = (out.double() - want).abs().max().item()
        assert err < tol, f"native={native}: off by {err}"


def test_native_extend_kernel_rejects_what_does_not_fit() -> None:
    import numpy as np

    from srt._native import paged_extend_attention

    q = np.zeros((5, 4, 8), np.float32)
    kv = np.zeros((10, 2, 8), np.float32)
    table = np.zeros((3, 6), np.int32)
    rows, prefix, ext = (np.array(v, np.int64) for v in ([0, 2], [1, 3], [2, 3]))
    out = np.empty_like(q)
    paged_extend_attention(q, kv, kv, table, rows, prefix, ext, 0.5, out, 2)
    assert np.all(out == 0)
    table[2, 5] = 10  # one past the pool
    with pytest.raises(ValueError, match="KV slot 10"):
        paged_extend_attention(q, kv, kv, table, rows, prefix, ext, 0.5, out, 2)
    with pytest.raises(ValueError, match="row 3"):
        paged_extend_attention(q, kv, kv, table, np.array([0, 3]), prefix, ext, 0.5, out, 1)
    with pytest.raises(ValueError, match="do not fit the table"):
        paged_extend_attention(q, kv, kv, table, rows, np.array([1, 4]), ext, 0.5, out, 1)
    with pytest.raises(ValueError, match="expected"):  # 4 new tokens for 5 query rows
        paged_extend_attention(q, kv, kv, table, rows, prefix, np.array([2, 2]), 0.5, out, 1)
    with pytest.raises(ValueError, match="float32 or int16"):
        paged_extend_attention(q.astype(np.float64), kv, kv, table, rows, prefix, ext, 0.5, out, 1)


def test_native_decode_kernel_rejects_what_does_not_fit() -> None:
    import numpy as np

    from srt._native import paged_decode_attention

    q = np.zeros((2, 4, 8), np.float32)
    kv = np.zeros((10, 2, 8), np.float32)
    table = np.zeros((3, 6), np.int32)
    rows, lens = np.array([0, 2], np.int64), np.array([3, 6], np.int64)
    out = np.empty_like(q)
    paged_decode_attention(q, kv, kv, table, rows, lens, 0.5, out, 1)
    assert np.all(out == 0)  # zero values: zero output
    table[2, 5] = 10  # one past the pool
    with pytest.raises(ValueError, match="KV slot 10"):
        paged_decode_attention(q, kv, kv, table, rows, lens, 0.5, out, 2)
    with pytest.raises(ValueError, match="row 3"):
        paged_decode_attention(q, kv, kv, table, np.array([0, 3]), lens, 0.5, out, 1)
    with pytest.raises(ValueError, match="length 7"):
        paged_decode_attention(q, kv, kv, table, rows, np.array([3, 7]), 0.5, out, 1)
    with pytest.raises(ValueError, match="do not fit"):
        paged_decode_attention(q, kv[:, :, :4].copy(), kv, table, rows, lens, 0.5, out, 1)
    with pytest.raises(ValueError, match="float32 or int16"):
        paged_decode_attention(q.astype(np.float64), kv, kv, table, rows, lens, 0.5, out, 1)
