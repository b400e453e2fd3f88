"""Shared check: a run directory exports to a Hugging Face folder whose logits equal the model."""

from __future__ import annotations

from pathlib import Path

import torch

from ilm_megatron.hf.export import export
from ilm_megatron.train import checkpoint as ckpt


def assert_export_matches(run: Path, out: Path, atol: float = 1e-5) -> None:
    """Export ``run`` (its newest checkpoint), load it with transformers and compare logits
    with ilm-megatron's model loaded from that checkpoint."""
    import transformers

    res = export(run, out)
    ours = ckpt.load_model(res.weights).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), trust_remote_code=res.format == "ilm"
    ).eval()
    v = ours.config.vocab_size
    x = torch.randint(0, v, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(x).logits[..., :v]
        got = hf(x, use_cache=False).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= atol * max(1.0, want.abs().max().item())
