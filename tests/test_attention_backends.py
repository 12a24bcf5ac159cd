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
