"""Padding and bucketing of token lists: the few static shapes every jitted program sees.

Widths are bucketed (`bucket_length`) so a run compiles a handful of programs, not one per
length; rows of very different lengths can be batched in groups (`length_groups`); candidate
continuations are packed as a prefix tree (`pack_candidates`) so neither their padding nor
their shared leading tokens cost compute.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

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


class PackedCandidates(NamedTuple):
    """A prefix and its candidates' prefix tree, in one bucketed `[B, W]` row each (int32)."""
    tokens: np.ndarray  # [B, W] prefix ids, then the tree's nodes in depth-first order
    n_prefix: np.ndarray  # [B] real prefix tokens
    position: np.ndarray  # [B, W] RoPE offset: i in the prefix, n_prefix + depth in the tree
    parent: np.ndarray  # [B, W] the token whose hidden state predicts this one
    end: np.ndarray  # [B, W] token j is seen by tokens j..end[j]-1 (its subtree; W in the prefix)
    leaf: np.ndarray  # [B, C] each candidate's last node (-1: an empty candidate)


def pack_candidates(prefix, prefix_mask, candidates, candidate_mask) -> PackedCandidates:
    """A prefix and its candidate continuations as a prefix tree, in one bucketed `[B, W]` row.

    Row b holds its `n_prefix[b]` prefix tokens, then one node per distinct candidate prefix,
    in depth-first order, then padding. Candidates that share leading tokens (a TextWorld
    step's 20-50 valid actions: "take ...", "open ...") share their nodes, so a shared token is
    computed once; padding costs nothing; and one bucketed width W keeps the compiled programs
    few however the prefix, the number of candidates and their lengths vary. A node sees the
    prefix and its ancestors, so each candidate is scored as if it were the only continuation,
    and its summed log-prob is the sum over the nodes on its path (`leaf`).

    Args:
      prefix: `[B, T]` right-padded ids (>= 1 real token per row); prefix_mask: `[B, T]` bool.
      candidates: `[B, C, L]` right-padded candidate ids; candidate_mask: `[B, C, L]` bool (an
        all-False candidate is left out).
    """
    prefix, prefix_mask = np.asarray(prefix), np.asarray(prefix_mask, bool)
    candidates, candidate_mask = np.asarray(candidates), np.asarray(candidate_mask, bool)
    n_prefix = prefix_mask.sum(1).astype(np.int32)
    for mask, what in ((prefix_mask, "prefix"), (candidate_mask, "candidates")):
        if np.any(mask != (np.arange(mask.shape[-1]) < mask.sum(-1)[..., None])):
            raise ValueError(f"{what} must be right-padded (each row's real tokens first)")
    if np.any(n_prefix == 0):
        raise ValueError("every row needs at least one prefix token to condition on")
    trees = [_prefix_tree(candidates[b], candidate_mask[b]) for b in range(len(n_prefix))]
    width = bucket_length(int(max(k + len(t[0]) for k, t in zip(n_prefix, trees))))
    shape = (len(n_prefix), width)
    tokens, position, parent = (np.zeros(shape, np.int32) for _ in range(3))
    end = np.broadcast_to(np.arange(width, dtype=np.int32), shape).copy()  # padding: unseen
    leaf = np.full(candidate_mask.shape[:2], -1, np.int32)
    for b, (k, (ids, depth, up, subtree_end, last)) in enumerate(zip(n_prefix, trees)):
        n = len(ids)
        tokens[b, :k], position[b, :k] = prefix[b, :k], np.arange(k)
        parent[b, :k], end[b, :k] = np.maximum(np.arange(k) - 1, 0), width
        # Tree node i sits at k + i; a root (up = -1) is predicted by the last prefix token.
        tokens[b, k:k + n], position[b, k:k + n] = ids, k + depth
        parent[b, k:k + n], end[b, k:k + n] = k + up, k + subtree_end
        leaf[b] = np.where(last >= 0, k + last, -1)
    return PackedCandidates(tokens, n_prefix, position, parent, end, leaf)


def _prefix_tree(candidates: np.ndarray, mask: np.ndarray):
    """The prefix tree of one row's candidates `[C, L]`, nodes in depth-first order.

    Returns `(ids, depth, parent, end, last)`: per node its token, depth, parent node (-1 for a
    root) and the node after its subtree; per candidate its last node (-1 when empty).
    """
    sequences = [tuple(candidates[c][mask[c]].tolist()) for c in range(len(candidates))]
    # Inserted in lexicographic order, the sequences sharing a prefix come in one run, so the
    # nodes are made in depth-first order and each subtree is a contiguous range.
    node_of: dict[tuple[int, ...], int] = {}
    ids, depth, parent = [], [], []
    for sequence in sorted(set(sequences)):
        for d in range(len(sequence)):
            if sequence[:d + 1] not in node_of:
                node_of[sequence[:d + 1]] = len(ids)
                ids.append(sequence[d])
                depth.append(d)
                parent.append(node_of.get(sequence[:d], -1))
    end = np.arange(1, len(ids) + 1)
    for node in reversed(range(len(ids))):  # children come after their parent
        if parent[node] >= 0:
            end[parent[node]] = max(end[parent[node]], end[node])
    return (np.asarray(ids, np.int64), np.asarray(depth, np.int64), np.asarray(parent, np.int64),
            end, np.asarray([node_of.get(seq, -1) for seq in sequences], np.int64))
