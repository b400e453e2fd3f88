"""Hugging Face export and import (``ilm-export`` / ``ilm-import``), offline on the CPU.

References: ilm-megatron's own model loaded from the same checkpoint (logits, ``generate``), and
transformers' own ``Mamba2ForCausalLM`` / ``LlamaForCausalLM`` for the native exports. Weights
are random with O(1) scales (``randomise_`` of test_hf_reference), so no mapping mistake hides
behind a unit gain or a zero bias.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_reference import randomise_  # noqa: E402

from ilm_megatron.config import Config, ModelConfig, SolverConfig  # noqa: E402
from ilm_megatron.hf import export as hfx  # noqa: E402
from ilm_megatron.hf import importer as hfi  # noqa: E402
from ilm_megatron.models.lm import ImplicitLM  # noqa: E402
from ilm_megatron.train import checkpoint as ckpt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 37  # padded to 48: the export must drop 11 rows
ATOL = 1e-5


def model_config(arch: str, implicit: bool = True, **kw) -> ModelConfig:
    base = dict(
        arch=arch,
        implicit=implicit,
        vocab_size=VOCAB,
        pad_vocab_multiple=16,
        d_model=32,
        n_layers=2,
        d_state=8,
        headdim=8,
        ngroups=2,
        chunk_size=4,
        n_heads=4,
        ffn_hidden_size=48,
        rope_theta=100.0,
    )
    return ModelConfig(**(base | kw))


def make_checkpoint(tmp: Path, mcfg: ModelConfig, solver: SolverConfig | None = None, seed=0):
    """A contractive random model of ``mcfg`` saved as a checkpoint file; returns (model, file)."""
    torch.manual_seed(seed)
    scfg = solver or SolverConfig(f_max_iter=8, f_tol=1e-3)
    model = ImplicitLM(mcfg, scfg)
    randomise_(model, seed + 1)
    with torch.no_grad():  # keep F contractive: damp what reads the iterate
        for name, p in model.named_parameters():
            if "in_proj" in name or "qkv_proj" in name or "fc1" in name:
                p.mul_(0.3)
    path = tmp / "ckpt" / "model.safetensors"
    ckpt.save_state_dict(model.state_dict(), Config(model=mcfg, solver=scfg), path)
    return ckpt.load_model(path).eval(), path


def load_hf(folder: Path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), trust_remote_code=True, **kw
    ).eval()


def ids(b: int, l: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, l), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("mamba2", {}),
        ("llama", {}),
        ("mamba2", {"weight_norm": True}),
        ("llama", {"tie_embeddings": False}),
    ],
)
def test_ilm_export_logits_and_generate_match(tmp_path: Path, arch: str, kw: dict) -> None:
    ours, path = make_checkpoint(tmp_path, model_config(arch, **kw))
    hfx.export(path, tmp_path / "hf")
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    assert {"configuration_ilm.py", "modeling_ilm.py", hfx.SIDE_FILE} <= files
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_ilm.IlmForCausalLM"
    hf = load_hf(tmp_path / "hf")
    assert hf.embedding.weight.shape[0] == VOCAB  # the padded rows are gone
    assert not any("parametrizations" in k for k in hf.state_dict())  # weight norm folded
    x = ids(2, 11)
    with torch.no_grad():
        want = ours(x).logits[..., :VOCAB]
        got = hf(x).logits
        assert (got - want).abs().max().item() <= ATOL
        assert want.abs().max().item() > 0.1
        # the pure-PyTorch path of the self-contained modeling file (no ilm_kernels)
        plain = load_hf(tmp_path / "hf", kernel_backend="torch")
        assert (plain(x).logits - want).abs().max().item() <= ATOL
    # sequential mode with the cache: greedy and sampling equal ImplicitLM.generate
    prompt = x[:, :5]
    assert torch.equal(
        hf.generate(prompt, max_new_tokens=6, do_sample=False), ours.generate(prompt, 6)
    )
    torch.manual_seed(3)
    a = ours.generate(prompt, 6, temperature=0.7)
    torch.manual_seed(3)
    b = hf.generate(prompt, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=0, top_p=1.0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["mamba2", "llama"])
def test_padded_batch_generate_equals_each_prompt_alone(tmp_path: Path, arch: str) -> None:
    """Left padding changes nothing for the real tokens (tight tolerance: the batch's stop
    decision couples samples only through the iteration count)."""
    tight = SolverConfig(f_max_iter=60, f_tol=1e-7, eval_max_iter_mult=1.0)
    ours, path = make_checkpoint(tmp_path, model_config(arch), tight)
    hfx.export(path, tmp_path / "hf")
    hf = load_hf(tmp_path / "hf")
    long, short = ids(1, 7, seed=1), ids(1, 4, seed=2)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[0], ours.generate(long, 5)[0])
    assert torch.equal(out[1, 3:], ours.generate(short, 5)[0])
    with torch.no_grad():  # and the logits of the real tokens, simultaneous mode
        lg = hf(batch, attention_mask=mask).logits
        ref = ours(short).logits[..., :VOCAB]
        assert (lg[1, 3:] - ref[0]).abs().max().item() <= ATOL


def test_solver_settings_travel_and_override_at_load(tmp_path: Path) -> None:
    solver = SolverConfig(f_max_iter=5, f_tol=1e-9, eval_max_iter_mult=2.0, eval_solver="reference")
    ours, path = make_checkpoint(tmp_path, model_config("mamba2"), solver)
    hfx.export(path, tmp_path / "hf")
    hf = load_hf(tmp_path / "hf")
    assert (hf.config.f_max_iter, hf.config.eval_solver) == (5, "reference")
    x = ids(2, 9)
    with torch.no_grad():
        out = hf(x)
        assert out.solver_iters.tolist() == [11, 11]  # 2 x 5 damped + the undamped call
        few = load_hf(tmp_path / "hf", f_max_iter=2, eval_solver="train")(x)
        assert few.solver_iters.tolist() == [4, 4]
        assert (out.logits - ours(x).logits[..., :VOCAB]).abs().max().item() <= ATOL


@pytest.mark.parametrize("arch", ["mamba2", "llama"])
def test_explicit_exports_to_transformers_native_classes(tmp_path: Path, arch: str) -> None:
    ours, path = make_checkpoint(tmp_path, model_config(arch, implicit=False))
    res = hfx.export(path, tmp_path / "hf")
    assert res.format == "native"
    assert not (tmp_path / "hf" / "modeling_ilm.py").exists()
    cls = transformers.Mamba2ForCausalLM if arch == "mamba2" else transformers.LlamaForCausalLM
    hf = cls.from_pretrained(str(tmp_path / "hf")).eval()  # no remote code
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert type(auto) is cls
    x = ids(2, 11)
    with torch.no_grad():
        want = ours(x).logits[..., :VOCAB]
        got = hf(x, use_cache=False).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= ATOL * want.abs().max().item()


@pytest.mark.parametrize(
    "arch,kw",
    [("mamba2", {}), ("llama", {"tie_embeddings": False}), ("mamba2", {"implicit": False})],
)
def test_export_import_export_is_exact(tmp_path: Path, arch: str, kw: dict) -> None:
    _, path = make_checkpoint(tmp_path, model_config(arch, **kw))
    hfx.export(path, tmp_path / "a")
    cfg, _ = hfi.import_hf(tmp_path / "a", tmp_path / "ck", tp=2, pp=2)
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    back = ckpt.load_state(tmp_path / "ck" / "model.safetensors")
    orig = ckpt.load_state(path)
    assert back.keys() == orig.keys()
    for k in orig:  # identical up to the padded vocabulary rows (zeros after import)
        n = VOCAB if k in ("embedding.weight", "lm_head.weight") else None
        assert torch.equal(back[k][:n], orig[k][:n]), k
    assert ckpt.read_configs(tmp_path / "ck" / "model.safetensors") == ckpt.read_configs(path)
    assert ckpt.verify_checkpoint(tmp_path / "ck") is None
    hfx.export(tmp_path / "ck", tmp_path / "b")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_weight_norm_round_trip_and_sharded_weights(tmp_path: Path) -> None:
    ours, path = make_checkpoint(tmp_path, model_config("mamba2", weight_norm=True))
    hfx.export(path, tmp_path / "a", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "a" / hfx.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "a" / "model.safetensors").exists()
    x = ids(2, 9)
    with torch.no_grad():
        want = ours(x).logits[..., :VOCAB]
        assert (load_hf(tmp_path / "a")(x).logits - want).abs().max().item() <= ATOL
        hfi.import_hf(tmp_path / "a", tmp_path / "ck")
        again = ckpt.load_model(tmp_path / "ck" / "model.safetensors").eval()
        assert again.config.weight_norm
        assert (again(x).logits[..., :VOCAB] - want).abs().max().item() <= ATOL


def test_native_explicit_model_initialises_an_implicit_one(tmp_path: Path) -> None:
    """A transformers Mamba2 made with save_pretrained -> implicit model whose first
    evaluation of F is the explicit model, then fine-tuned with ilm-train."""
    from ilm_megatron.config import load_config
    from ilm_megatron.train.loop import train

    hf_cfg = transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8,
        num_heads=8, n_groups=2, expand=2, conv_kernel=4, chunk_size=4,
        time_step_limit=(0.0, float("inf")), tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    native = transformers.Mamba2ForCausalLM(hf_cfg).eval()
    native.save_pretrained(tmp_path / "native")
    cfg, kind = hfi.import_hf(tmp_path / "native", tmp_path / "imp", implicit=True)
    assert cfg.model.implicit and cfg.model.iterate_init == "embedding"
    model = ckpt.load_model(tmp_path / "imp" / "model.safetensors").eval()
    x = ids(2, 10)
    with torch.no_grad():
        want = native(x, use_cache=False).logits
        one = model(x, max_iter=1).logits[..., :VOCAB]  # one evaluation of F from z0 = e
        assert (one - want).abs().max().item() <= ATOL * want.abs().max().item()
        assert (model(x).logits[..., :VOCAB] - want).abs().max().item() > 1e-3  # iterated
    batches = [ids(4, 17, seed=s) for s in range(2)]
    gap0 = hfi.loss_gap(tmp_path / "native", None, model, batches)
    assert gap0["explicit_loss"] == pytest.approx(
        hfi.mean_loss(lambda t: native(t, use_cache=False).logits, batches, VOCAB)
    )
    # a short implicit fine-tune from the imported weights: config.yaml read back from the run
    run = tmp_path / "run"
    tcfg = load_config(
        [str(tmp_path / "imp" / "config.yaml")],
        [f"train.init_checkpoint={tmp_path / 'imp'}", f"run_dir={run}", "train.max_steps=3",
         "train.batch_size=4", "data.seq_len=16", "data.eval_seq_len=0", "train.device=cpu",
         "train.tensorboard=false", "train.lr=1e-3", "train.warmup_steps=0"],
    )  # fmt: skip
    train(tcfg, run, quiet=True)
    saved = (run / "config.yaml").read_text()
    assert f"init_checkpoint: {tmp_path / 'imp'}" in saved
    gap1 = hfi.loss_gap(tmp_path / "native", run, None, batches)
    assert gap1["finite"] and gap1["explicit_loss"] == pytest.approx(gap0["explicit_loss"])
    # the run started from the imported weights (not from its seed): step-1 weights are close
    start = ckpt.load_state(tmp_path / "imp" / "model.safetensors")
    end = ckpt.load_state(run / "model.safetensors")
    assert (
        end["stack.layers.0.mixer.in_proj.weight"] - start["stack.layers.0.mixer.in_proj.weight"]
    ).abs().max() < 0.05  # noqa: E501
    assert end["injection.weight"].abs().max() > 0  # the injection is being learnt


def test_bad_checkpoints_are_refused_naming_the_file_or_key(tmp_path: Path) -> None:
    _, path = make_checkpoint(tmp_path, model_config("mamba2"))
    # truncated weights
    bad = tmp_path / "trunc" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(hfx.ConversionError, match="trunc/model.safetensors"):
        hfx.export(bad, tmp_path / "o1")
    # weights that do not match the stored config
    state = ckpt.load_state(path)
    state["stack.layers.1.mixer.D"] = torch.zeros(3)
    mcfg, scfg = ckpt.read_configs(path)
    wrong = tmp_path / "wrong.safetensors"
    ckpt.save_state_dict(state, Config(model=mcfg, solver=scfg), wrong)
    with pytest.raises(hfx.ConversionError, match=r"stack\.layers\.1\.mixer\.D has shape"):
        hfx.export(wrong, tmp_path / "o2")
    # a missing shard of a sharded export
    hfx.export(path, tmp_path / "sh", max_shard_bytes=20_000)
    first = sorted((tmp_path / "sh").glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(hfx.ConversionError, match=first.name):
        hfi.import_hf(tmp_path / "sh", tmp_path / "o3")
    # another architecture
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(hfx.ConversionError, match="model_type 'gpt2'"):
        hfi.import_hf(gpt2, tmp_path / "o4")
    # an implicit model has no native transformers class
    with pytest.raises(hfx.ConversionError, match="implicit"):
        hfx.export(path, tmp_path / "o5", fmt="native")
    # a damaged training checkpoint folder (manifest mismatch) is named
    hfi.import_hf(_exported(tmp_path, path), tmp_path / "ck")
    (tmp_path / "ck" / "config.yaml").write_text("oops\n")
    with pytest.raises(hfx.ConversionError, match="config.yaml"):
        hfx.export(tmp_path / "ck", tmp_path / "o6")
    # nothing half-written survives any of these failures
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]
    assert leftovers == [], leftovers


def _exported(tmp_path: Path, path: Path) -> Path:
    out = tmp_path / "exp"
    hfx.export(path, out)
    return out


def test_a_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    _, path = make_checkpoint(tmp_path, model_config("llama"))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hfx, "write_weights", boom)
    with pytest.raises(OSError, match="disk full"):
        hfx.export(path, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_cli_on_a_run_directory_resolves_the_newest_checkpoint(tmp_path: Path, capsys) -> None:
    from ilm_megatron.config import load_config
    from ilm_megatron.train.loop import train

    run = tmp_path / "run"
    cfg = load_config(
        [],
        [f"run_dir={run}", "train.max_steps=4", "train.save_interval=2", "train.batch_size=4",
         "train.device=cpu", "train.tensorboard=false", "data.eval_seq_len=0",
         "solver.f_max_iter=3"],
    )  # fmt: skip
    train(cfg, run, quiet=True)
    (run / "checkpoints" / "latest").write_text("step-00000002\n")  # a stale pointer
    assert hfx.main(["--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    side = json.loads((tmp_path / "hf" / hfx.SIDE_FILE).read_text())
    assert side["source"].endswith("step-00000004/model.safetensors")
    assert "latest" in capsys.readouterr().out
    ours = ckpt.load_model(run / "checkpoints" / "step-00000004" / "model.safetensors").eval()
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(x).logits[..., : cfg.model.vocab_size]
        assert (load_hf(tmp_path / "hf")(x).logits - want).abs().max().item() <= ATOL
    assert hfx.main(["--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert dataclasses.asdict(ours.config)["vocab_size"] == side["model"]["vocab_size"]


def test_init_checkpoint_and_iterate_init_are_checked(tmp_path: Path) -> None:
    from ilm_megatron.config import ConfigError, load_config
    from ilm_megatron.train.loop import train

    with pytest.raises(ConfigError, match="model.iterate_init"):
        load_config([], ["model.iterate_init=embedding", "parallel.pp=2", "model.n_layers=2"])
    _, path = make_checkpoint(tmp_path, model_config("llama"))
    cfg = load_config(
        [],
        [f"train.init_checkpoint={path}", f"run_dir={tmp_path / 'run'}", "train.device=cpu",
         "train.max_steps=1", "train.tensorboard=false"],
    )  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match=r"train.init_checkpoint=.*arch: checkpoint"):
        train(cfg, tmp_path / "run", quiet=True)
