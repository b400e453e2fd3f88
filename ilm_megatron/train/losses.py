"""Token losses and accuracy of a training step, gathered or vocab-parallel logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ilm_megatron.core.tensor_parallel import (
    vocab_parallel_argmax,
    vocab_parallel_cross_entropy,
)
from ilm_megatron.train.data import IGNORE


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, vocab: int, sharded: bool = False
) -> torch.Tensor:
    """Cross-entropy over aligned targets (no shift). logits (b, l, V'), targets (b, l); targets
    equal to ``IGNORE`` do not count (0 when none counts).

    ``sharded``: ``logits`` are this TP rank's vocabulary columns (b, l, V' / tp); the loss is
    the vocab-parallel cross-entropy (no rank gathers the whole logits).
    """
    if sharded:
        return vocab_parallel_cross_entropy(logits, targets, vocab, IGNORE)
    # the mean over the targets that count; a micro-batch with none (a CatbAbI QA window without
    # a question) has loss 0 and zero gradients, not the NaN of an empty mean, which the loop
    # would count as a diverged step and skip
    total = F.cross_entropy(
        logits[..., :vocab].flatten(0, 1).float(), targets.flatten(), reduction="sum"
    )
    return total / (targets != IGNORE).sum().clamp(min=1)


def token_accuracy_tensor(
    logits: torch.Tensor, targets: torch.Tensor, vocab: int, sharded: bool = False
) -> torch.Tensor:
    """:func:`token_accuracy` as a 0-d tensor on the logits' device (no host sync)."""
    keep = targets != IGNORE
    pred = vocab_parallel_argmax(logits, vocab) if sharded else logits[..., :vocab].argmax(-1)
    hits = (pred == targets) & keep
    return hits.sum().double() / keep.sum().clamp(min=1).double()


def token_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, vocab: int, sharded: bool = False
) -> float:
    """Argmax accuracy over the targets that count (``-100`` targets are ignored).
    logits (b, l, V') (or this TP rank's columns with ``sharded``), targets (b, l)."""
    return token_accuracy_tensor(logits, targets, vocab, sharded).item()
