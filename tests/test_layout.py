"""Pure tile layout maths over many (N, p), including N < p and N % p != 0."""

from __future__ import annotations

import itertools

import pytest

from foldcp_hpc.distributed.layout import TileLayout, block_bounds, block_size, padded_size, valid_bounds, valid_count

CASES = [(n, p) for n, p in itertools.product([0, 1, 2, 3, 5, 7, 8, 9, 10, 31, 64, 100, 127, 1000, 30001], range(1, 10))]


@pytest.mark.parametrize("n,p", CASES)
def test_padding_is_the_smallest_multiple(n, p):
    n_padded = padded_size(n, p)
    assert n_padded % p == 0
    assert n <= n_padded < n + p
    assert block_size(n, p) * p == n_padded


@pytest.mark.parametrize("n,p", CASES)
def test_blocks_partition_the_padded_and_the_real_range(n, p):
    covered, real = [], []
    for k in range(p):
        start, stop = block_bounds(n, p, k)
        covered.extend(range(start, stop))
        v_start, v_stop = valid_bounds(n, p, k)
        assert start <= v_start <= v_stop <= stop
        assert v_stop - v_start == valid_count(n, p, k)
        real.extend(range(v_start, v_stop))
    assert covered == list(range(padded_size(n, p)))
    assert real == list(range(n))


@pytest.mark.parametrize("n,p", CASES)
def test_layout_masks_tiles_and_owners_agree(n, p):
    layout = TileLayout(n, p)
    assert layout.n_pad == layout.n_padded - n
    masks = [layout.block_mask(k) for k in range(p)]
    assert sum(map(sum, masks)) == n
    for k, mask in enumerate(masks):
        assert len(mask) == layout.n_local
        assert mask == sorted(mask, reverse=True)  # real tokens first, then padding
        assert layout.valid_local(k).stop == sum(mask)
    for token in range(0, n, max(1, n // 50)):
        k = layout.owner(token)
        assert layout.block(k).start <= token < layout.block(k).stop
    rows, cols = layout.tile(p - 1, 0)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (layout.n_local, layout.n_local)


def test_fewer_tokens_than_ranks_leaves_whole_blocks_of_padding():
    layout = TileLayout(2, 3)
    assert (layout.n_padded, layout.n_local) == (3, 1)
    assert [valid_count(2, 3, k) for k in range(3)] == [1, 1, 0]


@pytest.mark.parametrize("args,message", [((-1, 2), "n_global"), ((5, 0), "grid side"), ((5, 2.0), "grid side")])
def test_bad_sizes_raise_with_the_value(args, message):
    with pytest.raises(ValueError, match=message):
        padded_size(*args)


def test_block_index_and_token_out_of_range():
    with pytest.raises(ValueError, match="block index 3 out of range for p=3"):
        block_bounds(10, 3, 3)
    with pytest.raises(ValueError, match="token 10 out of range for N=10"):
        TileLayout(10, 3).owner(10)
