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


def pack_candidates(candidates, candidate_mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`[B, C, L]` right-padded candidates -> one bucketed `[B, P]` chunk per row, end to end.

    Packing skips the padding of short candidates (a TextWorld step has 20-50 valid actions of
    2-12 tokens), and bucketing P keeps the compiled programs few however C and L vary.
    Returns:
      `(tokens, segment, offset)`, each `[B, P]` int32: the candidate of each token (-1 on
      padding) and the token's position within its candidate.
    """
    lengths = candidate_mask.sum(-1)  # [B, C]
    if np.any(candidate_mask != (np.arange(candidate_mask.shape[2]) < lengths[..., None])):
        raise ValueError("candidates must be right-padded (each candidate's real tokens first)")
    width = bucket_length(max(int(lengths.sum(1).max()), 1))
    tokens, segment, offset = (np.zeros((len(lengths), width), np.int32) for _ in range(3))
    segment[:] = -1
    for b, row in enumerate(lengths):
        n = int(row.sum())
        tokens[b, :n] = candidates[b][candidate_mask[b]]
        segment[b, :n] = np.repeat(np.arange(len(row)), row)
        offset[b, :n] = np.arange(n) - np.repeat(np.cumsum(row) - row, row)
    return tokens, segment, offset
