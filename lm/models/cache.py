"""The layout of a `Decoder`'s decode cache, for code that picks, gathers or inserts rows
(beam search, serving slots).

The cache is stored as the decode step reads it: keys [..., B*G, K, S] and values
[..., B*G, S, K], rows and key/value heads merged (`lm.models.attention`), and the mask's
`segment_ids` / `positions` [B, S]. `split_rows` views every key/value leaf as
[..., B, G, ...] so that each row-carrying leaf has its rows on one axis (`row_axis`);
`merge_rows` restores the stored layout. Both are reshapes (free under jit). A leading
axis (stacked layers of a scanned stack) is kept.
"""

from __future__ import annotations

from typing import Any

import jax

# In `split_rows`' view: rows on axis ndim - n, the sequence `SEQ_AFTER_ROW` axes later.
ROW_AXIS_FROM_END = {"cached_key": 4, "cached_value": 4, "segment_ids": 2, "positions": 2}
SEQ_AFTER_ROW = {"cached_key": 3, "cached_value": 2, "segment_ids": 1, "positions": 1}
# the write indices (attention's key/value cache, the decoder's mask cache): no rows
INDEX_LEAVES = ("cache_index", "index")
_MERGED = ("cached_key", "cached_value")


def leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def row_axis(path, leaf) -> int | None:
    """The row axis of a leaf of the split view; None for leaves without rows (indices)."""
    name = leaf_name(path)
    return leaf.ndim - ROW_AXIS_FROM_END[name] if name in ROW_AXIS_FROM_END else None


def split_rows(cache: Any) -> Any:
    """Key/value leaves viewed [..., B, G, ...]; B is read from the `segment_ids` leaf."""
    rows = {leaf.shape[-2] for path, leaf in jax.tree_util.tree_leaves_with_path(cache)
            if leaf_name(path) == "segment_ids"}
    if len(rows) != 1:
        raise ValueError(f"split_rows: expected one segment_ids row count, got {rows}")
    (b,) = rows

    def split(path, leaf):
        if leaf_name(path) not in _MERGED:
            return leaf
        axis = leaf.ndim - 3
        return leaf.reshape(*leaf.shape[:axis], b, leaf.shape[axis] // b, *leaf.shape[axis + 1:])
    return jax.tree_util.tree_map_with_path(split, cache)


def merge_rows(cache: Any) -> Any:
    """The inverse of `split_rows`: the stored [..., B*G, ...] layout."""
    def merge(path, leaf):
        if leaf_name(path) not in _MERGED:
            return leaf
        axis = leaf.ndim - 4
        return leaf.reshape(*leaf.shape[:axis], leaf.shape[axis] * leaf.shape[axis + 1],
                            *leaf.shape[axis + 2:])
    return jax.tree_util.tree_map_with_path(merge, cache)


def gather_rows(cache: Any, index_N: jax.Array) -> Any:
    """Every row-carrying leaf re-picked by `index_N` (row i of the result is row
    index_N[i]); indices untouched. Beam search's reordering of beams."""
    def take(path, leaf):
        axis = row_axis(path, leaf)
        return leaf if axis is None else leaf.take(index_N, axis=axis)
    return merge_rows(jax.tree_util.tree_map_with_path(take, split_rows(cache)))
