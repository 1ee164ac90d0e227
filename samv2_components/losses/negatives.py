"""Negative selection shared by the voxel-wise InfoNCE losses: the hardest candidates, then a random subset.

SAM's appearance loss (paper Eq. 1) and CrossSAM's cross-modal loss (Eq. 8) both rank every candidate voxel by its
similarity to the anchor, keep the ``num_hard`` most similar ones and draw ``num_random`` of those at random
("hard and diverse" negatives). Ranking needs the full ``(N, M)`` similarity matrix; the loss needs only the
``(N, K)`` chosen entries. The matrix is therefore computed without gradient, and the chosen similarities are
computed again from the chosen candidates' rows: the backward pass then touches ``N x K`` rows instead of
multiplying two ``N x M`` matrices (fine head: M = 73,728 candidates, K = 500; the fine loss's forward and
backward 268 -> 244-251 ms per batch of two pairs on 2 CPU cores).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["hard_then_random_negatives", "random_permutation", "random_uniform"]

#: the chosen similarities are recomputed from gathered rows when at most 1/_GATHER_RATIO of the candidates are
#: chosen, else taken from a product with every candidate (coarse head: 200 of 576; fine: 500 of 73,728)
_GATHER_RATIO = 8


def random_permutation(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``torch.randperm(n)`` on ``device``, drawn from ``generator`` (on its own device) or the global RNG."""
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def random_uniform(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``torch.rand(*shape)`` on ``device``, drawn from ``generator`` (on its own device) or the global RNG."""
    if generator is None:
        return torch.rand(*shape, device=device)
    return torch.rand(*shape, generator=generator, device=generator.device).to(device)


def hard_then_random_negatives(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    keep: torch.Tensor,
    num_hard: int | None,
    num_random: int | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Similarities of each anchor to its negatives: the ``num_hard`` most similar kept candidates (all if None),
    then ``num_random`` of those uniformly at random (all if None or if fewer remain).

    Args:
        anchors: ``(N, C)`` anchor embeddings.
        candidates: ``(M, C)`` candidate embeddings (the same space as ``anchors``).
        keep: ``(N, M)`` bool, which candidates may be a negative of which anchor.
        num_hard: size of the hard pool per anchor, None for every candidate.
        num_random: negatives drawn from the hard pool per anchor, None for the whole pool.
        generator: random source of the draw (global RNG if None).

    Returns:
        ``(N, K)`` dot products ``anchors[i] . candidates[j]`` of the chosen negatives, ``-inf`` where an anchor has
        fewer than K kept candidates (``exp`` of it adds nothing to an InfoNCE denominator). Differentiable with
        respect to ``anchors`` and ``candidates``; the choice itself is not (it is a ranking).
    """
    if num_hard is None and num_random is None:  # every kept candidate is a negative: the full product is the loss's
        return (anchors @ candidates.t()).masked_fill(~keep, float("-inf"))
    n_anchors, n_candidates = keep.shape
    k_hard = n_candidates if num_hard is None else min(num_hard, n_candidates)
    k_chosen = k_hard if num_random is None else min(num_random, k_hard)
    # few candidates, many of them chosen (the coarse head): one differentiable product, ranked on a copy;
    # otherwise the product only ranks and the chosen rows are gathered below
    product = anchors @ candidates.t() if k_chosen * _GATHER_RATIO > n_candidates else None  # (N, M)
    with torch.no_grad():
        ranked = anchors @ candidates.t() if product is None else product.detach().clone()
        ranked.masked_fill_(~keep, float("-inf"))
        hard_val, hard_idx = ranked.topk(k_hard, dim=1)
        del ranked
        hard_ok = torch.isfinite(hard_val)
        if k_chosen < k_hard:
            keys = random_uniform((n_anchors, k_hard), generator, anchors.device).masked_fill(~hard_ok, -1.0)
            pick = keys.topk(k_chosen, dim=1).indices
            hard_idx, hard_ok = hard_idx.gather(1, pick), hard_ok.gather(1, pick)
    if product is not None:
        similarity = product.gather(1, hard_idx)
    else:
        chosen = candidates.index_select(0, hard_idx.reshape(-1)).view(*hard_idx.shape, candidates.shape[1])  # (N, K, C)
        similarity = torch.bmm(chosen, anchors.unsqueeze(2)).squeeze(2)  # (N, K)
    return similarity.masked_fill(~hard_ok, float("-inf"))
