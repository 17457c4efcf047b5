"""Padding and bucketing of token lists: the few static shapes every jitted program sees.

Widths are bucketed (`bucket_length`) so a run compiles a handful of programs, not one per
length; rows of very different lengths can be batched in groups (`length_groups`); candidate
continuations are packed end to end (`pack_candidates`) so their padding costs no compute.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Bucket widths: powers of two and 1.5x powers of two, so padding wastes at most a third.
_BUCKETS = tuple(sorted({int(m * 2 ** e) for e in range(4, 16) for m in (1, 1.5)}))
# Rows per prefill group. Prefill throughput barely depends on the batch size at these lengths
# (tokens per matmul are in the thousands), so small groups cost little and cut padding.
GROUP_ROWS = 8


def bucket_length(n: int) -> int:
    """The smallest bucket width >= n (16, 24, 32, 48, 64, 96, ...)."""
    for width in _BUCKETS:
        if width >= n:
            return width
    raise ValueError(f"sequence of {n} tokens is longer than the largest bucket {_BUCKETS[-1]}")


def length_groups(lengths, group_rows: int = GROUP_ROWS) -> list[np.ndarray]:
    """Row indices to prefill together: sorted by length, at most `group_rows` per group.

    Args:
      lengths: `[B]` real tokens per row.
      group_rows: the most rows in a group (>= 1).
    Returns:
      Index arrays covering every row once. `[arange(B)]` (one group, rows in order) unless
      grouping saves at least a quarter of the padded bucket area, so that batches of similar
      rows keep one compiled program.
    """
    if group_rows < 1:
        raise ValueError(f"group_rows must be >= 1, got {group_rows}")
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    groups = [order[i:i + group_rows] for i in range(0, len(order), group_rows)]
    area = lambda rows: len(rows) * bucket_length(max(int(lengths[rows].max()), 1))
    if len(groups) > 1 and sum(map(area, groups)) <= 0.75 * area(order):
        return groups
    return [np.arange(len(lengths))]


def pad_right(sequences: Sequence[Sequence[int]], width: int | None = None,
              pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> right-padded `([B, W] int32 tokens, [B, W] bool mask)`, W bucketed."""
    longest = max(len(s) for s in sequences)
    width = bucket_length(longest) if width is None else width
    if longest > width:
        raise ValueError(f"sequence of {longest} tokens does not fit width {width}")
    tokens = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), bool)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = seq
        mask[row, :len(seq)] = True
    return tokens, mask


def pad_left(sequences: Sequence[Sequence[int]], width: int | None = None,
             pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> left-padded `([B, W] int32, [B, W] bool)`: every row ends at column W-1."""
    tokens, mask = pad_right([list(reversed(s)) for s in sequences], width, pad_id)
    return tokens[:, ::-1].copy(), mask[:, ::-1].copy()


def pad_candidates(candidates: Sequence[Sequence[Sequence[int]]]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per row a list of candidate token lists -> right-padded `([B, C, L] int32, [B, C, L]
    bool)`, C the most candidates of a row and L the longest candidate (rows with fewer get
    all-False candidates)."""
    width = max((len(ids) for row in candidates for ids in row), default=1)
    tokens = np.zeros((len(candidates), max(map(len, candidates)), width), np.int32)
    mask = np.zeros(tokens.shape, bool)
    for b, row in enumerate(candidates):
        for c, ids in enumerate(row):
            tokens[b, c, :len(ids)], mask[b, c, :len(ids)] = ids, True
    return tokens, mask


def pack_candidates(prefix, prefix_mask, candidates, candidate_mask
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A prefix and its candidate continuations, end to end in one bucketed `[B, W]` row.

    Row b holds its `n_prefix[b]` prefix tokens, then every non-empty candidate's tokens, then
    padding. Packing skips the padding of short candidates (a TextWorld step has 20-50 valid
    actions of 2-12 tokens), and one bucketed width W keeps the compiled programs few however
    the prefix, the number of candidates and their lengths vary.

    Args:
      prefix: `[B, T]` right-padded ids (>= 1 real token per row); prefix_mask: `[B, T]` bool.
      candidates: `[B, C, L]` right-padded candidate ids; candidate_mask: `[B, C, L]` bool (an
        all-False candidate is left out).
    Returns:
      `(tokens [B, W], n_prefix [B], segment [B, W], offset [B, W])`, int32: segment numbers
      each row's non-empty candidates densely (0, 1, ...; -1 on prefix and padding), offset is
      a token's index within its candidate (within the prefix, for prefix tokens).
    """
    prefix, prefix_mask = np.asarray(prefix), np.asarray(prefix_mask, bool)
    n_prefix = prefix_mask.sum(1).astype(np.int32)
    lengths = candidate_mask.sum(-1)  # [B, C]
    for mask, what in ((prefix_mask, "prefix"), (candidate_mask, "candidates")):
        if np.any(mask != (np.arange(mask.shape[-1]) < mask.sum(-1)[..., None])):
            raise ValueError(f"{what} must be right-padded (each row's real tokens first)")
    if np.any(n_prefix == 0):
        raise ValueError("every row needs at least one prefix token to condition on")
    width = bucket_length(int((n_prefix + lengths.sum(1)).max()))
    tokens, segment, offset = (np.zeros((len(lengths), width), np.int32) for _ in range(3))
    segment[:] = -1
    for b, row in enumerate(lengths):
        k, row = int(n_prefix[b]), row[row > 0]
        n = int(row.sum())
        tokens[b, :k], offset[b, :k] = prefix[b, :k], np.arange(k)
        tokens[b, k:k + n] = candidates[b][candidate_mask[b]]
        segment[b, k:k + n] = np.repeat(np.arange(len(row)), row)
        offset[b, k:k + n] = np.arange(n) - np.repeat(np.cumsum(row) - row, row)
    return tokens, n_prefix, segment, offset
