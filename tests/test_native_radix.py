"""Tests of `srt._native.RadixTree` through the Python bindings: behaviour and error messages.

The Rust core has its own unit and randomized model tests; these check the binding layer:
argument defaults, conversions, exceptions and their messages.
"""

import pytest

from srt._native import RadixTree


def test_insert_match_and_sizes() -> None:
    tree = RadixTree()
    assert tree.page_size == 1
    assert tree.insert([1, 2, 3], [10, 20, 30]) == 0
    values, node, length = tree.match_prefix([1, 2, 3, 4])
    assert (values, length) == ([10, 20, 30], 3)
    assert isinstance(node, int)
    # Existing values win; the return value says which of the caller's slots are duplicates.
    assert tree.insert([1, 2, 3, 4], [11, 21, 31, 41]) == 3
    assert tree.match_prefix([1, 2, 3, 4])[0] == [10, 20, 30, 41]
    assert (tree.total_size(), tree.evictable_size(), tree.protected_size()) == (4, 4, 0)


def test_empty_and_unmatched_keys() -> None:
    tree = RadixTree()
    assert tree.insert([], []) == 0
    assert tree.match_prefix([]) == ([], 0, 0)
    assert tree.match_prefix([7, 8]) == ([], 0, 0)


def test_split_inside_an_edge() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], [1, 2, 3, 4])
    leaf = tree.match_prefix([1, 2, 3, 4])[1]
    values, mid, length = tree.match_prefix([1, 2, 9])
    assert (values, length) == ([1, 2], 2)
    assert mid != leaf
    assert tree.match_prefix([1, 2, 3, 4])[1] == leaf


def test_page_size_aligns_matches_and_inserts() -> None:
    tree = RadixTree(page_size=4)
    assert tree.page_size == 4
    assert tree.insert([1, 2, 3, 4, 5, 6], [8, 9, 10, 11, 12, 13]) == 0
    assert tree.total_size() == 4
    assert tree.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])[0] == [8, 9, 10, 11]
    assert tree.match_prefix([1, 2, 3])[2] == 0


def test_namespaces_do_not_share() -> None:
    tree = RadixTree()
    tree.insert([1, 2], [1, 2], namespace="salt")
    assert tree.match_prefix([1, 2])[2] == 0
    assert tree.match_prefix([1, 2], "other")[2] == 0
    assert tree.match_prefix([1, 2], namespace="salt")[0] == [1, 2]


def test_lock_protects_and_evict_is_lru() -> None:
    tree = RadixTree()
    tree.insert([1], [1])
    tree.insert([2], [2])
    tree.insert([3], [3])
    node = tree.match_prefix([1])[1]
    tree.lock(node)
    assert (tree.evictable_size(), tree.protected_size()) == (2, 1)
    assert tree.evict(1) == [2]
    assert tree.evict(100) == [3]
    assert tree.evict(100) == []
    tree.unlock(node)
    assert tree.evict(1) == [1]
    assert tree.total_size() == 0


def test_reset_returns_every_slot() -> None:
    tree = RadixTree()
    tree.insert([1, 2], [5, 6])
    tree.insert([1, 3], [7, 8], "x")
    assert sorted(tree.reset()) == [5, 6, 7, 8]
    assert tree.total_size() == 0


def test_long_key_round_trip() -> None:
    # Long enough to take the GIL-releasing path.
    n = 100_000
    tree = RadixTree()
    key = list(range(n))
    assert tree.insert(key, key) == 0
    assert tree.match_prefix(key)[2] == n
    assert len(tree.evict(n)) == n


def test_errors_are_value_errors_with_the_core_message() -> None:
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        RadixTree(page_size=0)
    tree = RadixTree()
    with pytest.raises(ValueError, match="key has 2 tokens but values has 1"):
        tree.insert([1, 2], [1])
    with pytest.raises(ValueError, match="unknown or evicted node handle 12345"):
        tree.lock(12345)
    with pytest.raises(ValueError, match="unlock of node 0 whose lock count is already zero"):
        tree.unlock(0)
    tree.insert([1], [1])
    node = tree.match_prefix([1])[1]
    tree.evict(1)
    with pytest.raises(ValueError, match=f"unknown or evicted node handle {node}"):
        tree.unlock(node)


def test_bad_argument_types() -> None:
    tree = RadixTree()
    with pytest.raises(OverflowError):
        tree.insert([-1], [0])
    with pytest.raises(TypeError):
        tree.match_prefix("abc")  # type: ignore[arg-type]
