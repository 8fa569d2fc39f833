"""Token merging math (ToMe's bipartite soft matching) on plain tensors; nothing here knows models.

Tokens are split alternately into sets A (even positions) and B (odd positions). Each A token's
most similar B token (cosine similarity of a metric, e.g. the attention keys averaged over heads)
is its match; the r A tokens with the most similar matches are merged into them. Merged features
are size-weighted means, and sizes add, so that later blocks can use proportional attention
(log(size) added to the attention logits of each key).

The first P prefix tokens (CLS, then e.g. a distillation token) are never merged: prefix tokens in A
never leave, prefix tokens in B never receive a merge, and the merged sequence starts with them again
in their original order (as ToMe's ``distill_token`` handling does for P = 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Matching", "bipartite_matching", "merge_into_kept"]


@dataclass
class Matching:
    """The result of one matching: which A tokens merge into which B tokens (batched indices)."""

    unmerged: Tensor  # (B, nA - r) indices into A of tokens kept as they are, ascending
    merged: Tensor  # (B, r) indices into A of tokens merged away
    targets: Tensor  # (B, r) indices into B that each merged A token joins
    num_prefix: int = 1  # protected tokens moved back to the front after a merge

    def merge(self, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
        """Apply the matching to features x (B, N, C) with token sizes (B, N, 1) (None: all 1).

        Returns the new tokens [unmerged A..., B...] (size-weighted means) and their sizes; with
        ``num_prefix`` P > 1 the P prefix tokens are moved to the front in their original order.
        Whole rows are copied (one ``index_select`` builds the output, one ``index_add_`` adds the merged
        tokens onto their targets, in the order of ``merged``), then one in-place division.
        """
        B, N, C = x.shape
        n_keep, n_b = self.unmerged.shape[1], N // 2
        n_out = n_keep + n_b
        dev = x.device
        base = torch.arange(B, device=dev).unsqueeze(1)
        rows = torch.cat([2 * self.unmerged, torch.arange(1, N, 2, device=dev).expand(B, -1)], dim=1)
        rows = rows.add_(base * N).flatten()  # output row t of image b is input row rows[b * n_out + t]
        from_rows = (2 * self.merged + base * N).flatten()
        to_rows = (self.targets + n_keep + base * n_out).flatten()
        flat = x.reshape(B * N, C)
        out = flat.index_select(0, rows)
        moved = flat.index_select(0, from_rows)
        if size is None:  # every size 1: x * size and the division of unmerged tokens are exact no-ops
            new_size = x.new_ones(B * n_out, 1).index_add_(0, to_rows, x.new_ones(from_rows.shape[0], 1))
            out.index_add_(0, to_rows, moved)
            out.view(B, n_out, C)[:, n_keep:].div_(new_size.view(B, n_out, 1)[:, n_keep:])
        else:
            s = size.reshape(B * N, 1)
            new_size = s.index_select(0, rows)
            moved_size = s.index_select(0, from_rows)
            out.mul_(new_size)
            out.index_add_(0, to_rows, moved.mul_(moved_size))
            new_size.index_add_(0, to_rows, moved_size)
            out.div_(new_size)
        out, new_size = out.view(B, n_out, C), new_size.view(B, n_out, 1)
        if self.num_prefix > 1:
            order = _prefix_first(self.num_prefix, n_keep, n_out, dev)
            out, new_size = out.index_select(1, order), new_size.index_select(1, order)
        return out, new_size


def _prefix_first(num_prefix: int, num_keep: int, total: int, device: torch.device) -> Tensor:
    """Order of [unmerged A..., B...] that puts prefix tokens 0..P-1 first (prefix token t is A's t//2,
    the t//2-th unmerged A token, for even t, B's t//2 for odd t), then the rest in place."""
    front = [t // 2 if t % 2 == 0 else num_keep + t // 2 for t in range(num_prefix)]
    taken = set(front)
    return torch.tensor(front + [i for i in range(total) if i not in taken], device=device)


def bipartite_matching(
    metric: Tensor, r: int, protect_first: bool = True, bonus: Tensor | None = None, *, num_prefix: int = 1
) -> Matching:
    """Match r tokens of set A into set B by cosine similarity of ``metric`` (B, N, D).

    With ``protect_first`` the first ``num_prefix`` tokens (token 0 = CLS, in A; token 1, e.g. a
    distillation token, in B; ...) are never merged and receive no merge. r is capped at the number of
    mergeable A tokens. Unmerged A tokens keep their original order, so CLS stays first, and
    ``Matching.merge`` puts every prefix token back in front.
    ``bonus`` (B, nA) is added to each A token's best similarity when choosing which r merge
    (entropy-aware merging: diffuse-attention tokens go first); the match itself stays the most similar.
    """
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, ::2], m[:, 1::2]
    n_a = a.shape[1]
    P = num_prefix if protect_first else 0
    p_a, p_b = (P + 1) // 2, P // 2  # protected tokens in A (even positions) and in B (odd positions)
    r = max(0, min(r, n_a - p_a, b.shape[1] - p_b))
    scores = a @ b.transpose(-1, -2)  # (B, nA, nB) cosine similarities
    if p_a:
        scores[:, :p_a] = -torch.inf
    if p_b:
        scores[:, :, :p_b] = -torch.inf
    best, best_idx = scores.max(dim=-1)
    if bonus is not None:
        best = best + bonus
    order = best.argsort(dim=-1, descending=True)
    merged = order[:, :r]
    unmerged = order[:, r:].sort(dim=-1).values
    return Matching(unmerged, merged, best_idx.gather(1, merged), num_prefix=max(P, 1))


def merge_into_kept(
    x: Tensor, size: Tensor | None, metric: Tensor, kept: Tensor, n: int, num_prefix: int = 1
) -> tuple[Tensor, Tensor]:
    """Merge every pruned patch into its most similar kept patch (size-weighted); prefix tokens untouched.

    x (B, P + n, C) with sizes (B, P + n, 1) (None: all 1), P = ``num_prefix`` (CLS, then e.g. a
    distillation token); ``metric`` (B, P + n, D) for the similarity; ``kept`` (B, k) sorted indices
    into patches 0..n-1. Returns [prefix..., kept...] and their sizes.
    """
    B, _, C = x.shape
    P = num_prefix
    k = kept.shape[1]
    pruned_mask = torch.ones(B, n, dtype=torch.bool, device=x.device).scatter(1, kept, False)
    m = metric[:, P:] / metric[:, P:].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    m_kept = m.gather(1, kept.unsqueeze(-1).expand(-1, -1, m.shape[-1]))
    target = (m @ m_kept.transpose(-1, -2)).argmax(dim=-1)  # (B, n): best kept match of every patch
    # kept patches "merge" into themselves; pruned ones into their match; summing does the rest
    own = torch.full((B, n), -1, dtype=torch.long, device=x.device).scatter(
        1, kept, torch.arange(k, device=x.device).expand(B, -1))
    target = torch.where(pruned_mask, target, own)
    # output row of every patch in the flattened (B * (P + k), C) result; rows are added in patch order
    rows = target.add_(torch.arange(B, device=x.device).unsqueeze(1) * (P + k) + P).flatten()
    out = x.new_empty(B, P + k, C)
    out[:, :P] = x[:, :P]
    out[:, P:] = 0
    patches, sizes = x[:, P:], (x.new_ones(B, n, 1) if size is None else size[:, P:])
    weighted = patches.reshape(B * n, C) if size is None else (patches * sizes).reshape(B * n, C)
    out.view(B * (P + k), C).index_add_(0, rows, weighted)
    new_size = x.new_zeros(B * (P + k), 1).index_add_(0, rows, sizes.reshape(B * n, 1)).view(B, P + k, 1)
    new_size[:, :P] = 1.0 if size is None else size[:, :P]
    out[:, P:].div_(new_size[:, P:])
    return out, new_size
