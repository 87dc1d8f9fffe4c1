"""Masked-item sampling for BERT4Rec-style training: a pure function of the batch and a seeded generator.

Rules: only real (non-padding) positions are masked, at least one per sequence, never all of a
sequence with two or more items. With probability `last_prob` a sequence instead has only its last item
masked, which is exactly the next-item task the model is evaluated on.
"""

from __future__ import annotations

import torch


def mask_items(
    seqs: torch.Tensor, p: float, mask_token: int, generator: torch.Generator, last_prob: float = 0.0, pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """seqs (B, T) item indices, left-padded with `pad`. Returns (inputs, labels), both (B, T):
    inputs has masked positions replaced by `mask_token`; labels holds the original item at masked
    positions and `pad` elsewhere (pad = not a target)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"mask probability must be in (0, 1), got {p}")
    real = seqs != pad  # (B, T)
    n_real = real.sum(1)  # (B,)
    if (n_real == 0).any():
        raise ValueError("every sequence needs at least one item")
    u = torch.rand(seqs.shape, generator=generator)  # (B, T)
    masked = (u < p) & real

    # At least one per sequence: where none was drawn, mask the real position with the smallest draw.
    none = ~masked.any(1)
    if none.any():
        pick = u.masked_fill(~real, 2.0).argmin(1)  # (B,) a uniformly random real position
        masked[none, pick[none]] = True
    # Never all: where every real position is masked (and there are >= 2), unmask the largest draw.
    full = (masked.sum(1) == n_real) & (n_real >= 2)
    if full.any():
        keep = u.masked_fill(~real, -1.0).argmax(1)
        masked[full, keep[full]] = False

    if last_prob > 0:
        # Left padding puts every sequence's last item in the last column.
        last = torch.rand(seqs.shape[0], generator=generator) < last_prob  # (B,)
        masked[last] = False
        masked[last, -1] = True

    inputs = seqs.masked_fill(masked, mask_token)
    labels = torch.where(masked, seqs, torch.full_like(seqs, pad))
    return inputs, labels


def append_mask(history: torch.Tensor, mask_token: int, pad: int = 0) -> torch.Tensor:
    """(B, T) left-padded histories -> (B, T) with the oldest column dropped and [MASK] appended:
    the position whose output is the user's next-item query."""
    out = torch.roll(history, shifts=-1, dims=1)
    out[:, -1] = mask_token
    return out
