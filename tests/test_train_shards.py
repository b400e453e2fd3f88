"""ilm-train on preprocessed text shards: manifest check, next-token loss, exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import CONFIGS

from ilm_megatron.config import load_config
from ilm_megatron.data.loader import ManifestMismatchError
from ilm_megatron.data.preprocess import main as preprocess
from ilm_megatron.train.loop import train

TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = root / "raw"
    src.mkdir()
    for i in range(6):
        (src / f"doc{i}.jsonl").write_text(
            "\n".join(json.dumps({"text": f"{i} " + TEXT * (3 + j)}) for j in range(4)) + "\n"
        )
    out = root / "shards"
    assert preprocess(["--input", str(src), "--output", str(out), "--tokenizer", "byte",
                       "--seq-len", "32", "--samples-per-shard", "16"]) == 0  # fmt: skip
    return out


def _cfg(run_dir, shards, *extra):
    return load_config(
        [],
        [
            f"run_dir={run_dir}",
            "data.task=shards",
            f"data.path={shards}",
            "data.seq_len=32",
            "data.val_fraction=0.1",
            "model.vocab_size=257",
            "model.pad_vocab_multiple=16",
            "model.d_model=32",
            "model.headdim=8",
            "model.d_state=8",
            "solver.f_max_iter=4",
            "solver.phantom_steps=1",
            "train.batch_size=4",
            "train.log_interval=1",
            "train.eval_batches=2",
            "train.tensorboard=false",
            *extra,
        ],
    )


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trains_on_shards_and_resumes_exactly(tmp_path, shards):
    full = tmp_path / "full"
    res = train(_cfg(full, shards, "train.max_steps=6"), full, quiet=True)
    assert res.final["eval"][0]["ppl"] > 1.0  # validation perplexity on the held-out split
    part = tmp_path / "part"
    train(_cfg(part, shards, "train.max_steps=6", "train.save_interval=3"), part, quiet=True)
    root = part / "checkpoints"
    for d in root.glob("step-*"):
        if d.name != "step-00000003":
            shutil.rmtree(d)
    (root / "latest").write_text("step-00000003\n")
    lines = (part / "metrics.jsonl").read_text().splitlines()[:3]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train(_cfg(part, shards, "train.max_steps=6", "train.save_interval=3"), part, quiet=True)
    assert _losses(part) == _losses(full)


def test_vocab_mismatch_with_manifest_is_refused(tmp_path, shards):
    with pytest.raises(ManifestMismatchError, match="vocab"):
        train(_cfg(tmp_path, shards, "model.vocab_size=300", "train.max_steps=1"), tmp_path)


def test_demo_config_loads():
    cfg = load_config([CONFIGS / "train" / "demo_shakespeare.yaml"])
    assert cfg.data.task == "shards" and cfg.model.vocab_size == 257


def test_export_of_a_shards_run_carries_its_tokenizer(tmp_path, shards):
    """The run's byte tokenizer is found from the data manifest and written as HF files; the
    export's loss on a training sample equals ilm-megatron's."""
    import torch

    transformers = pytest.importorskip("transformers")
    from ilm_megatron.data.tokenizer import ByteTokenizer
    from ilm_megatron.hf.export import export
    from ilm_megatron.train import checkpoint as ckpt

    run = tmp_path / "run"
    train(_cfg(run, shards, "train.max_steps=2"), run, quiet=True)
    res = export(run, tmp_path / "hf")
    assert res.tokenizer == "byte"
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "Now is the winter — ünïcode ✓"
    assert tok(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(text)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ByteTokenizer.eod_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), trust_remote_code=True
    ).eval()
    ours = ckpt.load_model(res.weights).eval()
    ids = torch.tensor([ByteTokenizer().encode(TEXT[:40])])
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(ours(ids).logits[0, :-1, :257], ids[0, 1:]).item()
        got = hf(ids, labels=ids).loss.item()
    assert got == pytest.approx(want, abs=1e-5)
