"""A freshly built ``tp`` model starts from the single-process model's initial weights.

The TP equivalence tests load the single-process weights into the TP model, so they cannot see
how the TP layers initialise themselves. Here nothing is copied: each TP layer draws the whole
weight as :class:`ilm_megatron.models.layers.Linear` does (Kaiming-uniform with the *global*
fan-in) and keeps its shard, so the gathered weight equals the single-process layer's from the
same seed; a row-parallel layer that drew only its ``(out, in / tp)`` shard would have the fan-in
``in / tp`` and a std ``sqrt(tp)`` too large.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import tiny_config

# TP=2 layouts: Mamba2 needs ngroups divisible by the TP size
CASES = {"mamba2": ("model.ngroups=2",), "llama": ()}
SEED = 5


def _std_and_se(w: torch.Tensor) -> tuple[float, float]:
    """Sample std of ``w`` and its standard error (delta method: ``s sqrt((m4/s^4 - 1) / 4n)``)."""
    x = w.detach().double().flatten()
    x = x - x.mean()
    s2 = x.pow(2).mean()
    kurt = (x.pow(4).mean() / s2**2).item()
    s = s2.sqrt().item()
    return s, s * math.sqrt(max(kurt - 1.0, 0.0) / (4 * x.numel()))


def _compare_init(local_sd: dict, tp_sd: dict, layout: dict) -> dict:
    """Per sharded parameter: bitwise equal, TP std, local std, their allowed difference."""
    out = {}
    for name, (dim, _) in layout.items():
        a, b = tp_sd[name], local_sd[name]
        assert a.shape == b.shape, (name, a.shape, b.shape)
        sa, ea = _std_and_se(a)
        sb, eb = _std_and_se(b)
        out[name] = {
            "dim": dim,
            "ndim": a.dim(),
            "equal": bool(torch.equal(a, b)),
            "std_tp": sa,
            "std_local": sb,
            # 5 standard errors of the difference of two independent estimates
            "tol": 5.0 * math.hypot(ea, eb),
        }
    return out


@pytest.mark.parametrize("arch", sorted(CASES))
def test_tp1_builds_the_local_model(arch: str) -> None:
    """Without a TP group (TP=1) ``backend=tp`` draws exactly the ``local`` model's weights."""
    from ilm_megatron.models.lm import build_model

    cfg = tiny_config(arch, overrides=CASES[arch])
    torch.manual_seed(SEED)
    local = build_model(cfg.model).state_dict()
    torch.manual_seed(SEED)
    tp = build_model(dataclasses.replace(cfg.model, backend="tp")).state_dict()
    assert local.keys() == tp.keys()
    for name in local:
        assert torch.equal(local[name], tp[name]), name


def _units(cfg, pp_rank: int, pp_size: int) -> frozenset[str]:
    from ilm_megatron.models.init import stage_units

    m = cfg.model
    return stage_units(m.n_layers, m.implicit, m.tie_embeddings, pp_rank, pp_size)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_stage_builds_hold_only_their_units(arch: str) -> None:
    """A pipeline stage's build (``keep=``) materialises its units only, each equal to the
    single-process model's from the same seed; the other units stay on meta."""
    from ilm_megatron.models.lm import build_model

    cfg = tiny_config(arch, overrides=("model.n_layers=3",))
    torch.manual_seed(SEED)
    full = build_model(cfg.model).state_dict()
    held: set[str] = set()
    for pp_rank in range(3):
        torch.manual_seed(SEED)
        part = build_model(cfg.model, keep=_units(cfg, pp_rank, 3))
        real = {k for k, v in part.state_dict().items() if not v.is_meta}
        layers = {k.split(".")[2] for k in real if k.startswith("stack.layers.")}
        assert layers == {str(pp_rank)}, (pp_rank, layers)
        assert ("embedding.weight" in real) == (pp_rank in (0, 2)), pp_rank  # tied: first, last
        assert ("stack.final_norm.weight" in real) == (pp_rank == 2)
        for k in real:
            assert torch.equal(part.state_dict()[k], full[k]), (pp_rank, k)
        held |= real
    assert held == set(full)


def init_worker(rank: int, result_path: str) -> None:
    """TP=2 rank: fresh TP layers and models against single-process ones from the same seed."""
    from ilm_megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from ilm_megatron.models.layers import Linear
    from ilm_megatron.models.lm import build_model
    from ilm_megatron.parallel.checkpoint import full_state_dict, gather_tensors, tp_layout

    res: dict = {"layers": {}, "models": {}}
    # single layers: a packed column-parallel projection and a row-parallel one, with default
    # (Kaiming-uniform) and normal init, with a bias
    for init_std in (0.0, 0.02):
        for cls, parts, (n_in, n_out) in (
            (ColumnParallelLinear, (16, 16, 8, 8, 4), (24, 52)),
            (RowParallelLinear, (64,), (64, 24)),
        ):
            kw = {"config": None, "bias": True, "init_std": init_std, "partition_sizes": parts}
            torch.manual_seed(SEED)
            layer = cls(n_in, n_out, **kw)
            torch.manual_seed(SEED)
            ref = Linear(n_in, n_out, **kw)
            shards = {"weight": layer.weight, "bias": layer.bias}
            full = gather_tensors(layer, shards)
            layout = tp_layout(layer)
            key = f"{cls.__name__}-{init_std}"
            res["layers"][key] = _compare_init(ref.state_dict(), full, layout)
            res["layers"][key]["bias_equal"] = bool(torch.equal(full["bias"], ref.bias))
    # whole models, fresh
    for arch, overrides in CASES.items():
        cfg = tiny_config(arch, overrides=(*overrides, "parallel.tp=2"))
        assert cfg.model.backend == "tp"
        torch.manual_seed(SEED)
        local = build_model(dataclasses.replace(cfg.model, backend="local"))
        torch.manual_seed(SEED)
        model = build_model(cfg.model)
        full = full_state_dict(model)
        res["models"][arch] = _compare_init(local.state_dict(), full, tp_layout(model))
        res["models"][arch]["__all_equal__"] = all(
            torch.equal(v, local.state_dict()[k]) for k, v in full.items()
        )
        # TP=2 x PP=2 shares: each stage's units only, the rest on meta
        staged = {}
        for pp_rank in range(2):
            torch.manual_seed(SEED)
            part = build_model(cfg.model, keep=_units(cfg, pp_rank, 2))
            real = {k: v for k, v in part.state_dict().items() if not v.is_meta}
            got = gather_tensors(part, real)
            staged[pp_rank] = {
                "names": sorted(got),
                "equal": all(torch.equal(v, local.state_dict()[k]) for k, v in got.items()),
            }
        res["staged"] = {**res.get("staged", {}), arch: staged}
        res["names"] = {**res.get("names", {}), arch: sorted(local.state_dict())}
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(res, f)


@pytest.mark.slow
def test_tp2_fresh_init_matches_single_process(tmp_path) -> None:
    """2 gloo processes, nothing copied: gathered TP=2 weights against the local model's."""
    from _dist import run_workers

    path = tmp_path / "init.json"
    run_workers(init_worker, 2, str(path), tp=2)
    res = json.loads(path.read_text())

    # every sharded matrix (linear layers split along the output or the input, the embedding) has
    # the single-process init std; a row-parallel weight drawn at its local fan-in is sqrt(2) off
    for arch, params in res["models"].items():
        linears = {n: r for n, r in params.items() if n != "__all_equal__" and r["ndim"] == 2}
        rows = [n for n, r in linears.items() if r["dim"] == 1]
        assert rows and len(rows) < len(linears), (arch, sorted(linears))
        for name, r in linears.items():
            diff = abs(r["std_tp"] - r["std_local"])
            assert diff < r["tol"], (arch, name, r)

    # a TP layer on its own: the gathered weight *is* the single-process layer's weight
    for key, params in res["layers"].items():
        assert params.pop("bias_equal"), key
        for name, r in params.items():
            assert r["equal"], (key, name, r)
    # build_model initialises every unit from its own seed at global shapes and keeps this
    # rank's shard, so the whole TP model (Mamba2's per-head dt_bias, A_log and its depthwise
    # conv included) equals the local one from the same seed
    for arch in CASES:
        assert res["models"][arch]["__all_equal__"], (arch, res["models"][arch])
        stages = res["staged"][arch]
        assert all(s["equal"] for s in stages.values()), (arch, stages)
        held = set(stages["0"]["names"]) | set(stages["1"]["names"])
        assert held == set(res["names"][arch]), arch  # every tensor is held by some stage
