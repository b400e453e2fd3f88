"""State carried across windows: simultaneous mode from an initial cache.

Solving window 1, then window 2 from the caches window 1 returned, must give what the model gives
on the concatenation (simultaneous and sequential mode) at window 2's positions, and the caches
``prefill`` returns for the concatenation. The phantom gradient of a window-2 loss is checked
against phantom steps written out here with the caches as constants.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from ilm_kernels.backend import triton_interpreter
from ilm_megatron.models.cache import (
    KVCache,
    Mamba2Cache,
    caches_from_state,
    caches_to_state,
)
from ilm_megatron.models.lm import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

# (arch, implicit): the implicit models and an explicit Mamba2
MODELS = [("mamba2", True), ("llama", True), ("mamba2", False)]
TOL = 1e-12  # float64 solves run to this residual, so the two routes agree to ~1e-10
L1, L2 = 12, 9


def _model(arch: str, implicit: bool = True, overrides: tuple[str, ...] = ()):
    solver = (
        f"solver.eval_tol={TOL}",
        f"solver.f_tol={TOL}",
        "solver.f_max_iter=600",
        "solver.eval_max_iter_mult=1.0",
    )
    cfg = tiny_config(arch, implicit, (*solver, *overrides))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver).double().eval()
    return model, cfg


def _ids(cfg, seed: int = 1, length: int = L1 + L2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (3, length), generator=g)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _loss(logits: torch.Tensor, y: torch.Tensor, cfg) -> torch.Tensor:
    return F.cross_entropy(logits[..., : cfg.model.vocab_size].flatten(0, 1), y.flatten())


def _cache_diff(a, b) -> float:
    """Largest difference between two per-layer cache lists (same kinds, same positions)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert type(x) is type(y)
        if isinstance(x, Mamba2Cache):
            worst = max(worst, _max_diff(x.conv, y.conv), _max_diff(x.ssm, y.ssm))
        else:
            assert (x.length, x.start) == (y.length, y.start)
            (kx, vx), (ky, vy) = x.view(), y.view()
            worst = max(worst, _max_diff(kx, ky), _max_diff(vx, vy))
    return worst


@pytest.mark.parametrize(("arch", "implicit"), MODELS)
def test_two_windows_equal_the_concatenation(arch, implicit):
    model, cfg = _model(arch, implicit)
    ids = _ids(cfg)
    full = model(ids)
    w1 = model(ids[:, :L1], return_caches=True)
    w2 = model(ids[:, L1:], caches=w1.caches, return_caches=True)
    if implicit:
        assert full.stats.converged.all() and w2.stats.converged.all()
    # (a) the simultaneous solve of the concatenation, at window 2's positions
    assert _max_diff(w2.logits, full.logits[:, L1:]) < 1e-9
    # (b) sequential mode over the concatenation
    seq = model.forward_sequential(ids)
    assert _max_diff(w2.logits, seq.logits[:, L1:]) < 1e-9
    # the caches after window 2 are prefill's for the concatenation
    assert _cache_diff(w2.caches, model.prefill(ids).caches) < 1e-9
    # the state matters: window 2 alone (an empty state) is far from the concatenation
    alone = model(ids[:, L1:])
    assert _max_diff(alone.logits, full.logits[:, L1:]) > 1e-3


@pytest.mark.parametrize(("arch", "implicit"), MODELS)
def test_three_windows_and_cache_round_trip(arch, implicit):
    """Carrying twice, through the checkpoint form of the caches, still equals one solve."""
    model, cfg = _model(arch, implicit)
    ids = _ids(cfg, seed=2, length=3 * 7)
    full = model(ids)
    caches, logits = None, []
    for w in range(3):
        out = model(ids[:, 7 * w : 7 * (w + 1)], caches=caches, return_caches=True)
        caches = caches_from_state(caches_to_state(out.caches))
        logits.append(out.logits)
    assert _max_diff(torch.cat(logits, 1), full.logits) < 1e-9


@pytest.mark.parametrize(("arch", "implicit"), MODELS)
def test_phantom_gradient_reads_the_caches_as_constants(arch, implicit):
    """Training-mode window 2 from carried caches: the parameter gradients equal those of the
    phantom steps written out here (caches as constants), no gradient reaches the caches, and
    the caches it returns are prefill's of the concatenation."""
    model, cfg = _model(arch, implicit)
    s = model.solver_config
    ids = _ids(cfg, seed=3)
    caches = model(ids[:, :L1], return_caches=True).caches
    x2, y2 = ids[:, L1:], _ids(cfg, seed=4, length=L2)
    # caches that would take a gradient if the model let one through
    leaves = [
        Mamba2Cache(c.conv.clone().requires_grad_(), c.ssm.clone().requires_grad_())
        if isinstance(c, Mamba2Cache)
        else KVCache(c.view()[0].clone().requires_grad_(), c.view()[1].clone(), c.length)
        for c in caches
    ]
    model.train()
    out = model(x2, caches=leaves, return_caches=True)
    _loss(out.logits, y2, cfg).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    first = leaves[0].conv if isinstance(leaves[0], Mamba2Cache) else leaves[0].k
    assert first.grad is None
    assert _cache_diff(out.caches, model.prefill(ids).caches) < 1e-9

    # reference: the fixed point by plain iteration, then k damped steps with autograd
    model.zero_grad(set_to_none=True)
    const = [c.detach() for c in caches]
    e, u = model.embed(x2)
    if implicit:
        with torch.no_grad():
            z = torch.zeros_like(e)
            for _ in range(s.f_max_iter):
                z = model.stack(z, u, caches=const)[0]
        for _ in range(s.phantom_steps):
            fz = model.stack(z, u, caches=const)[0]
            z = s.phantom_damping * fz + (1 - s.phantom_damping) * z
    else:
        z = model.stack(e, caches=const)[0]
    _loss(model.head(z), y2, cfg).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        assert _max_diff(got[n], want[n]) < 1e-9 * max(1.0, want[n].abs().max().item()), n
    # and the caches matter for the gradient (a constant that is not read would pass above only
    # if window 2 did not depend on it)
    model.zero_grad(set_to_none=True)
    _loss(model(x2).logits, y2, cfg).backward()
    name = next(iter(want))
    assert _max_diff(model.get_parameter(name).grad, want[name]) > 1e-6


def test_kv_prefix_keeps_absolute_positions():
    """A KV cache cut to its last positions (``keep_last``) keeps RoPE's offsets: the window
    after it, solved at once, equals the same window token by token from that cache."""
    model, cfg = _model("llama")
    ids = _ids(cfg, seed=5)
    cut = [c.keep_last(5) for c in model(ids[:, :L1], return_caches=True).caches]
    assert all(c.length == 5 and c.start == L1 - 5 and c.next_position == L1 for c in cut)
    sim = model(ids[:, L1:], caches=cut)
    copies = [KVCache(*c.view(), 5, c.start) for c in cut]  # step appends to its caches
    seq = model.forward_sequential(ids[:, L1:], caches=copies)
    assert _max_diff(sim.logits, seq.logits) < 1e-9
    # positions matter: the same keys taken to start at 0 give another answer
    moved = [KVCache(*c.view(), 5, 0) for c in cut]
    assert _max_diff(model(ids[:, L1:], caches=moved).logits, sim.logits) > 1e-6


@pytest.mark.skipif(
    not torch.cuda.is_available() and not triton_interpreter(),
    reason="needs a GPU or the Triton interpreter (TRITON_INTERPRET=1)",
)
def test_triton_kernels_take_the_initial_state():
    """The Triton conv1d and SSD scan read the carried window/state as the reference does."""
    device = "cuda" if torch.cuda.is_available() and not triton_interpreter() else "cpu"
    cfg = tiny_config("mamba2", overrides=("model.n_layers=1", "solver.f_max_iter=5"))
    torch.manual_seed(0)
    ref = build_model(dataclasses.replace(cfg.model, kernel_backend="reference"), cfg.solver)
    tri = build_model(dataclasses.replace(cfg.model, kernel_backend="triton"), cfg.solver)
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), device=device)
    outs = []
    for model in (ref.to(device).eval(), tri.to(device).eval()):
        c = model(ids[:, :8], return_caches=True).caches
        outs.append(model(ids[:, 8:], caches=c, return_caches=True))
    scale = outs[0].logits.abs().max()
    assert (outs[0].logits - outs[1].logits).abs().max() / scale < 1e-4
    assert _cache_diff(outs[0].caches, outs[1].caches) < 1e-4


# --------------------------------------------------------------------------- trainer


def _catbabi(tmp_path):
    from conftest import make_catbabi

    return make_catbabi(tmp_path / "cb", "--stories", "4", "--tasks", "1,2", "--seed", "0")


def _train_cfg(data, run_dir, *extra):
    from conftest import CONFIGS

    from ilm_megatron.config import load_config

    return load_config(
        [CONFIGS / "tasks" / "catbabi_implicit_mamba2.yaml"],
        [f"run_dir={run_dir}", f"data.path={data}", "data.seq_len=64", "data.catbabi_mode=lm",
         "data.carry_state=true", "model.d_model=32", "model.headdim=8", "model.d_state=8",
         "solver.f_max_iter=6", "solver.phantom_steps=2", "train.batch_size=4",
         "parallel.microbatches=2", "train.log_interval=1", "train.eval_batches=2",
         "train.eval_interval=0", "train.save_interval=0", "train.tensorboard=false",
         "train.warmup_steps=1", *extra],
    )  # fmt: skip


def _step_losses(run_dir) -> dict[int, float]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {json.loads(x)["step"]: json.loads(x)["loss"] for x in lines}


def test_trainer_carries_each_rows_state(tmp_path):
    """With the weights held still (a negligible learning rate), every training step's loss and
    the validation loss are those of the model run here window by window, each micro-batch's
    rows from their state after the previous window, empty again at each new epoch's stream."""
    from ilm_megatron.data.catbabi import IGNORE, PAD_ID, iter_batches, load_stream
    from ilm_megatron.train.engines import token_loss
    from ilm_megatron.train.loop import train

    data = _catbabi(tmp_path)
    cfg = _train_cfg(data, tmp_path / "run", "train.max_steps=6", "train.lr=1e-30")
    res = train(cfg, tmp_path / "run", quiet=True)
    got = [r["loss"] for r in res.history]

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.solver).train()
    vocab = cfg.model.vocab_size

    def targets(batch):
        return torch.where(batch.y == PAD_ID, torch.full_like(batch.y, IGNORE), batch.y)

    def windows(split, seed):
        return list(iter_batches(load_stream(str(data), split, 4, 64, seed)))

    want, want_alone, epoch = [], [], 0
    stream = windows("train", cfg.train.seed)
    assert 2 <= len(stream) < 6  # the run crosses an epoch boundary
    caches = [None, None]
    while len(want) < 6:
        if not stream:
            epoch += 1
            stream, caches = windows("train", cfg.train.seed + epoch), [None, None]
        batch = stream.pop(0)
        losses, alone = [], []
        for j, (x, y) in enumerate(zip(batch.x.chunk(2), targets(batch).chunk(2))):
            out = model(x, caches=caches[j], return_caches=True)
            caches[j] = out.caches
            losses.append(token_loss(out.logits, y, vocab).item())
            alone.append(token_loss(model(x).logits, y, vocab).item())
        want.append(sum(losses) / 2)
        want_alone.append(sum(alone) / 2)
    # a window of padding only has no target: NaN loss (a skipped step) on both sides
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6, nan_ok=True)
    assert got[1] != pytest.approx(want_alone[1], rel=1e-4)  # the carried state counts

    # validation: the valid split's first windows, carried from an empty state (micro-batches
    # of batch_size / microbatches rows)
    model.eval()
    total = count = 0.0
    caches = [None, None]
    for batch in windows("valid", None)[: cfg.train.eval_batches]:
        for j, (x, y) in enumerate(zip(batch.x.chunk(2), targets(batch).chunk(2))):
            out = model(x, caches=caches[j], return_caches=True)
            caches[j] = out.caches
            n = (y != IGNORE).sum().item()
            if n:  # rows of padding only: nothing to score
                total += token_loss(out.logits, y, vocab).item() * n
                count += n
    assert res.final["eval"][0]["loss"] == pytest.approx(total / count, rel=1e-5)


def test_resume_with_carried_state_is_bitwise(tmp_path):
    """The carried caches are part of the trainer state: a run resumed mid-epoch continues with
    the same losses, bit for bit."""
    import shutil

    from ilm_megatron.train.loop import train

    data = _catbabi(tmp_path)
    full = tmp_path / "full"
    train(_train_cfg(data, full, "train.max_steps=5"), full, quiet=True)
    part = tmp_path / "part"
    cfg = _train_cfg(data, part, "train.max_steps=5", "train.save_interval=2")
    train(cfg, part, quiet=True)
    root = part / "checkpoints"
    for d in root.glob("step-*"):
        if d.name != "step-00000002":
            shutil.rmtree(d)
    (root / "latest").write_text("step-00000002\n")
    state = torch.load(root / "step-00000002" / "trainer.pt", weights_only=True)
    assert state["data"]["window"] == 2 and set(state["carry"]) == {"0", "1"}
    res = train(cfg, part, quiet=True)
    assert [r["step"] for r in res.history] == [3, 4, 5]
    assert _step_losses(part) == _step_losses(full)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("data.task=shards", "data.path=x"), r"data\.carry_state: needs continuous rows"),
        (("data.task=word_problem",), r"data\.carry_state: needs continuous rows"),
    ],
)
def test_carry_state_refused_without_continuous_rows(overrides, match):
    from ilm_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config([], ["data.carry_state=true", *overrides])


def _tp_carry_worker(rank: int, arch: str, overrides: tuple[str, ...], out: str) -> None:
    """TP=2 rank: two windows with TP-local carried caches against one process on the
    concatenation (weights from the same seed, as :func:`build_model` guarantees)."""
    import json

    cfg = tiny_config(arch, overrides=(*overrides, "parallel.tp=2", "solver.eval_tol=1e-6"))
    local = dataclasses.replace(cfg.model, backend="local")
    torch.manual_seed(0)
    ref = build_model(local, cfg.solver).eval()
    torch.manual_seed(0)
    tp = build_model(cfg.model, cfg.solver).eval()
    ids = torch.randint(
        0, cfg.model.vocab_size, (2, 14), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        full = ref(ids).logits
        w1 = tp(ids[:, :8], return_caches=True)
        w2 = tp(ids[:, 8:], caches=w1.caches)
    shard = w1.caches[0]
    local_width = shard.conv.shape[1] if isinstance(shard, Mamba2Cache) else shard.k.shape[1]
    empty = ref.empty_caches(2)[0]
    full_width = empty.conv.shape[1] if isinstance(empty, Mamba2Cache) else cfg.model.n_heads
    if rank == 0:
        res = {"diff": (w2.logits - full[:, 8:]).abs().max().item(), "local": local_width,
               "full": full_width}  # fmt: skip
        with open(out, "w") as fh:
            json.dump(res, fh)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("mamba2", ("model.ngroups=2",)), ("llama", ())],
    ids=["mamba2", "llama"],
)
def test_tensor_parallel_carry_uses_local_shards(tmp_path, arch, overrides):
    import json

    from _dist import run_workers

    out = tmp_path / "res.json"
    run_workers(_tp_carry_worker, 2, arch, overrides, str(out))
    res = json.loads(out.read_text())
    assert res["local"] * 2 == res["full"]  # each rank carries its share of the state
    assert res["diff"] < 1e-4, res
