"""Vocab-parallel cross-entropy and argmax on gloo (TP=2 and TP=3) against ``F.cross_entropy``
and ``argmax`` on the whole logits in one process: loss, logits gradient, ignored targets,
padding columns past the real vocabulary, and ties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _dist import run_workers

IGNORE = -100


def _case(seed: int, n: int, padded: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, padded, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::5] = IGNORE
    logits[3, 1] = logits[3, padded - 2] = logits[3].max() + 1  # a tie across shards
    return logits, targets


def _worker(rank: int, n: int, padded: int, vocab: int, out: str) -> None:
    from ilm_megatron.core.parallel_state import tp_rank, tp_world_size
    from ilm_megatron.core.tensor_parallel import (
        vocab_parallel_argmax,
        vocab_parallel_cross_entropy,
    )

    tp = tp_world_size()
    logits, targets = _case(0, n, padded, vocab)
    vl = padded // tp
    for dtype in (torch.float32, torch.bfloat16):
        local = logits[:, tp_rank() * vl : (tp_rank() + 1) * vl].to(dtype).requires_grad_()
        loss = vocab_parallel_cross_entropy(local.view(2, n // 2, vl), targets.view(2, -1), vocab)
        (loss * 1.7).backward()
        ids = vocab_parallel_argmax(local.view(2, n // 2, vl), vocab)

        full = logits.to(dtype).double().requires_grad_()  # the same rounded values
        ref = F.cross_entropy(full[:, :vocab], targets, ignore_index=IGNORE)
        (ref * 1.7).backward()
        # both see the same rounded logits and the loss is computed in fp32: only the returned
        # gradient is rounded to the input dtype (bf16: 2**-8 relative)
        assert abs(loss.item() - ref.item()) <= 1e-6 * abs(ref.item()), (dtype, loss, ref)
        want = full.grad[:, tp_rank() * vl : (tp_rank() + 1) * vl]
        assert local.grad.dtype == dtype
        rtol = 1e-6 if dtype == torch.float32 else 2**-8
        torch.testing.assert_close(local.grad.double(), want, rtol=rtol, atol=1e-8)
        assert torch.equal(ids.flatten(), full[:, :vocab].argmax(-1)), dtype
    if rank == 0:
        with open(out, "w") as f:
            f.write("ok")


@pytest.mark.slow
@pytest.mark.parametrize("tp,padded,vocab", [(2, 16, 13), (3, 12, 7)])
def test_vocab_parallel_cross_entropy_matches_one_process(tmp_path, tp, padded, vocab) -> None:
    """TP=3 with vocab 7 of 12: the last rank's columns are all padding."""
    out = tmp_path / "ok"
    run_workers(_worker, tp, 10, padded, vocab, str(out), tp=tp)
    assert out.read_text() == "ok"


def test_one_rank_is_f_cross_entropy() -> None:
    from ilm_megatron.core.tensor_parallel import (
        vocab_parallel_argmax,
        vocab_parallel_cross_entropy,
    )

    logits, targets = _case(1, 10, 9, 7)
    got = vocab_parallel_cross_entropy(logits, targets, 7)
    want = F.cross_entropy(logits[:, :7], targets, ignore_index=IGNORE).item()
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert torch.equal(vocab_parallel_argmax(logits, 7), logits[:, :7].argmax(-1))
