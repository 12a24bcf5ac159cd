"""Tests of `srt._native.SlotAllocator` through the Python bindings: behaviour and errors.

The Rust core has its own unit and randomized model tests; these check the binding layer:
argument defaults, conversions, exceptions and their messages.
"""

import pytest

from srt._native import SlotAllocator


def test_alloc_free_and_available() -> None:
    a = SlotAllocator(8)
    assert (a.size(), a.page_size, a.available()) == (8, 1, 8)
    slots = a.alloc(3)
    assert slots == [1, 2, 3]  # slot 0 is the reserved padding sink
    assert a.available() == 5
    a.free(slots)
    assert a.available() == 8
    assert a.alloc(0) == []


def test_pages() -> None:
    a = SlotAllocator(16, page_size=4)
    assert a.page_size == 4
    slots = a.alloc(5)
    assert slots == [4, 5, 6, 7, 8]
    assert a.available() == 8
    assert a.pages_needed(5, 3) == 0
    assert a.pages_needed(5, 4) == 1
    assert a.alloc_extend(5, slots[-1], 4) == [9, 10, 11, 12]
    assert a.available() == 4
    a.free([9])  # frees the whole page 8..11
    assert a.available() == 8
    a.reset()
    assert a.available() == 16


def test_out_of_memory_is_memory_error() -> None:
    a = SlotAllocator(4)
    a.alloc(3)
    with pytest.raises(MemoryError, match="out of KV cache memory: requested 2 slots, 1 available"):
        a.alloc(2)
    with pytest.raises(MemoryError):
        a.alloc_extend(3, 3, 2)
    assert a.available() == 1


def test_bad_frees_are_value_errors_and_change_nothing() -> None:
    a = SlotAllocator(8)
    a.alloc(2)
    with pytest.raises(
        ValueError, match=r"slot 5 is not allocated \(double free or never handed out\)"
    ):
        a.free([1, 5])
    assert a.available() == 6
    with pytest.raises(ValueError, match="slot 0 is outside the pool"):
        a.free([0])
    with pytest.raises(ValueError, match="slot 9 is outside the pool"):
        a.free([9])
    a.free([1, 2])
    with pytest.raises(ValueError, match="slot 1 is not allocated"):
        a.free([1])
    assert a.available() == 8


def test_bad_config_and_misaligned_extend() -> None:
    with pytest.raises(ValueError, match="invalid allocator configuration"):
        SlotAllocator(10, page_size=4)
    with pytest.raises(ValueError, match="invalid allocator configuration"):
        SlotAllocator(8, page_size=0)
    a = SlotAllocator(8, page_size=4)
    slots = a.alloc(2)
    with pytest.raises(ValueError, match="cannot be the last slot of a 3-token sequence"):
        a.alloc_extend(3, slots[-1], 1)
