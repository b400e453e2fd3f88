"""AdamW for the engines: no-decay groups, state by parameter name (the layout-free
checkpoint format)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ilm_megatron.config import Config


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether ``train.weight_decay`` applies to the parameter ``name``.

    Only weight matrices decay (projections, the MLP, the convolution filters and an untied LM
    head), as in Megatron and Mamba: parameters with fewer than two dimensions (biases, norm
    gains, Mamba2's ``A_log``, ``D`` and ``dt_bias``), the embedding and the magnitudes ``g`` of
    weight-normalised layers (``...parametrizations.weight.original0``) do not.
    """
    if param.ndim < 2 or name.startswith("embedding."):
        return False
    return not name.endswith("parametrizations.weight.original0")


def param_groups(named: Sequence[tuple[str, nn.Parameter]], cfg: Config) -> list[dict[str, Any]]:
    """AdamW parameter groups: decayed weights (``train.weight_decay``), then the rest (0).

    Each group carries ``param_names``, so a saved optimizer state maps back to parameter names.
    Empty groups are left out.
    """
    named = list(named)
    groups = []
    for wd, keep in ((cfg.train.weight_decay, True), (0.0, False)):
        chosen = [(n, p) for n, p in named if decays(n, p) == keep]
        if chosen:
            groups.append(
                {
                    "params": [p for _, p in chosen],
                    "param_names": [n for n, _ in chosen],
                    "weight_decay": wd,
                }
            )
    return groups


def new_optimizer(
    named: Sequence[tuple[str, nn.Parameter]] | Any, cfg: Config
) -> torch.optim.Optimizer:
    """AdamW with the ``train`` section's hyper-parameters over ``named`` (name, parameter)
    pairs, in the no-decay groups of :func:`param_groups`."""
    t = cfg.train
    return torch.optim.AdamW(
        param_groups(named, cfg), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay
    )


OPTIMIZER_FILE = "optimizer.pt"  # AdamW state of the whole model by parameter name


def adamw_state_by_name(
    opt: torch.optim.Optimizer, named: Sequence[tuple[str, nn.Parameter]]
) -> dict[str, dict[str, torch.Tensor | float]]:
    """This rank's AdamW moments keyed by parameter name: ``{"exp_avg": {name: t}, ...}``.

    Parameters without state (never updated) are left out; the tensors are the local shards.
    """
    out: dict[str, dict] = {"exp_avg": {}, "exp_avg_sq": {}, "step": {}}
    for name, p in named:
        st = opt.state.get(p)
        if not st:
            continue
        out["exp_avg"][name] = st["exp_avg"]
        out["exp_avg_sq"][name] = st["exp_avg_sq"]
        out["step"][name] = float(st["step"])
    return out


def load_adamw_state_by_name(
    opt: torch.optim.Optimizer,
    named: Sequence[tuple[str, nn.Parameter]],
    full: dict[str, dict],
    tp_rank: int = 0,
    tp_size: int = 1,
    copy: bool = True,
) -> None:
    """Set AdamW's state of ``named`` from a whole-model, by-name state (any layout it came from).

    A TP-sharded parameter takes its shard of each moment (the same split as the weights), a
    replicated one the whole tensor. Raises ValueError naming a parameter whose moment has another
    shape than the whole parameter.
    """
    for p, st in local_adamw_state(named, full, tp_rank, tp_size, copy).values():
        opt.state[p] = st


def local_adamw_state(
    named: Sequence[tuple[str, nn.Parameter]],
    full: dict[str, dict],
    tp_rank: int = 0,
    tp_size: int = 1,
    copy: bool = True,
) -> dict[str, tuple[nn.Parameter, dict[str, torch.Tensor]]]:
    """``{name: (parameter, AdamW state)}`` of ``named`` cut from a whole-model by-name state.

    ``copy=False``: the moments are used as they are where device and dtype already match (the
    caller's fresh buffers, e.g. read from shards); otherwise each is copied (a memory-mapped or
    shared file must not become the optimizer's state)."""
    from ilm_megatron.core.tensor_parallel import get_tp_layout, shard_tensor

    out = {}
    for name, p in named:
        if name not in full["exp_avg"]:
            continue
        lay = get_tp_layout(p)
        st: dict[str, torch.Tensor] = {}
        for key in ("exp_avg", "exp_avg_sq"):
            t = full[key][name]
            if lay is not None and tp_size > 1:
                t = shard_tensor(t, lay[0], lay[1], tp_rank, tp_size)
            if t.shape != p.shape:
                raise ValueError(
                    f"optimizer state {key} of {name} has shape {tuple(t.shape)}, "
                    f"parameter has {tuple(p.shape)}"
                )
            moved = t.to(device=p.device, dtype=p.dtype)
            st[key] = moved.clone() if copy else moved
        st["step"] = torch.tensor(full["step"][name], dtype=torch.float32)
        out[name] = (p, st)
    return out


def adamw_state_from_single_process(model: nn.Module, opt_state: dict) -> dict[str, dict]:
    """Convert a single-process ``AdamW.state_dict()`` (indexed by parameter order) to by-name.

    The groups' ``param_names`` name the indices; a state saved without them (one group over
    ``model.named_parameters()``) is read in the model's parameter order.
    """
    names = [n for n, _ in model.named_parameters()]
    by_index: dict[int, str] = {}
    for g in opt_state["param_groups"]:
        if "param_names" in g:
            by_index.update(zip(g["params"], g["param_names"]))
    out: dict[str, dict] = {"exp_avg": {}, "exp_avg_sq": {}, "step": {}}
    for idx, st in opt_state["state"].items():
        name = by_index.get(int(idx)) or names[int(idx)]
        out["exp_avg"][name] = st["exp_avg"]
        out["exp_avg_sq"][name] = st["exp_avg_sq"]
        out["step"][name] = float(st["step"])
    return out
