"""Weight decay applies to weight matrices only, in every optimizer the engines build.

With zero gradients AdamW's update is exactly zero, so one step changes a parameter only through
its decoupled weight decay ``p <- p * (1 - lr * wd)``: which parameters moved is which decayed.
"""

from __future__ import annotations

import pytest
import torch
from _dist import run_workers

from ilm_megatron.config import load_config
from ilm_megatron.models.lm import build_model
from ilm_megatron.train.engines import LocalEngine, new_optimizer

LR, WD = 0.1, 0.5

# written out by hand from the layer definitions: the matrices of each tiny model
DECAYED = {
    "mamba2": {
        "stack.layers.0.mixer.in_proj.weight",
        "stack.layers.0.mixer.conv1d.weight",
        "stack.layers.0.mixer.out_proj.weight",
        "injection.weight",
    },
    "llama": {
        "stack.layers.0.mixer.qkv_proj.weight",
        "stack.layers.0.mixer.out_proj.weight",
        "stack.layers.0.mlp.fc1.weight",
        "stack.layers.0.mlp.fc2.weight",
        "injection.weight",
        "lm_head.weight",  # untied output layer: a weight matrix, decays as in Megatron
    },
    "mamba2_wn": {  # weight norm: the directions v decay, the magnitudes g do not
        "stack.layers.0.mixer.in_proj.parametrizations.weight.original1",
        "stack.layers.0.mixer.conv1d.parametrizations.weight.original1",
        "stack.layers.0.mixer.out_proj.parametrizations.weight.original1",
        "injection.parametrizations.weight.original1",
    },
}
OVERRIDES = {
    "mamba2": [],
    "llama": ["model.arch=llama", "model.tie_embeddings=false"],
    "mamba2_wn": ["model.weight_norm=true"],
}


def _cfg(kind: str, *extra: str):
    return load_config([], [*OVERRIDES[kind], f"train.lr={LR}", f"train.weight_decay={WD}", *extra])


def _moved_after_zero_grad_step(named, opt) -> set[str]:
    before = {n: p.detach().clone() for n, p in named}
    for _, p in named:
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = set()
    for n, p in named:
        if not torch.equal(p.detach(), before[n]):
            moved.add(n)
            torch.testing.assert_close(p.detach(), before[n] * (1 - LR * WD), rtol=1e-6, atol=0)
    return moved


@pytest.mark.parametrize("kind", sorted(DECAYED))
def test_only_weight_matrices_decay_single_process(kind):
    engine = LocalEngine(_cfg(kind), torch.device("cpu"))
    named = list(engine.model.named_parameters())
    assert _moved_after_zero_grad_step(named, engine.opt) == DECAYED[kind]
    # and nothing moves without weight decay
    cfg0 = load_config([], [*OVERRIDES[kind], f"train.lr={LR}"])
    model = build_model(cfg0.model, cfg0.solver)
    named0 = list(model.named_parameters())
    assert _moved_after_zero_grad_step(named0, new_optimizer(named0, cfg0)) == set()


def test_optimizer_state_names_its_parameters(tmp_path):
    """The saved AdamW state carries parameter names per group (resume maps by name)."""
    engine = LocalEngine(_cfg("mamba2"), torch.device("cpu"))
    groups = engine.opt.state_dict()["param_groups"]
    assert [g["weight_decay"] for g in groups] == [WD, 0.0]
    assert set(groups[0]["param_names"]) == DECAYED["mamba2"]
    names = {n for n, _ in engine.model.named_parameters()}
    assert set(groups[1]["param_names"]) == names - DECAYED["mamba2"]


def _sharded_worker(rank: int, kind: str, stage: int) -> None:
    import os

    from ilm_megatron.train.engines.zero import DeepSpeedZero

    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed reads it (torchrun would set it)

    cfg = _cfg(kind, f"parallel.zero_stage={stage}")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver)
    named = list(model.named_parameters())
    zero = DeepSpeedZero(model, named, cfg, per_rank_batch=1)

    class Step:  # the zero gradients go through DeepSpeed's reduction, as a backward's do
        def step(self) -> None:
            with zero.accumulate():
                pass
            zero.step()

    assert _moved_after_zero_grad_step(named, Step()) == DECAYED[kind]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "stage"), [("mamba2", 2), ("mamba2_wn", 1)])
def test_only_weight_matrices_decay_zero_sharded(kind, stage):
    """DeepSpeed ZeRO-1/2 at DP=2: each rank's partitions of both groups decay (or not) like one
    process."""
    run_workers(_sharded_worker, 2, kind, stage, tp=1)
