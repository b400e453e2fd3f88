"""The training loss of a micro-batch (``ilm_megatron.train.losses.token_loss``)."""

from __future__ import annotations

import torch


def test_a_micro_batch_without_targets_has_zero_loss_not_nan() -> None:
    """A CatbAbI QA window without a question has no target: its loss is 0 with zero
    gradients (the empty mean was NaN, and the loop skipped the step as diverged)."""
    from ilm_megatron.train.data import IGNORE
    from ilm_megatron.train.losses import token_loss

    logits = torch.randn(2, 5, 12, requires_grad=True)
    none = torch.full((2, 5), IGNORE)
    loss = token_loss(logits, none, 10)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    some = none.clone()
    some[0, 1], some[1, 4] = 3, 7
    ref = torch.nn.functional.cross_entropy(logits[..., :10].reshape(-1, 10), some.flatten())
    assert torch.allclose(token_loss(logits, some, 10), ref)
