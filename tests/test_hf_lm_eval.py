"""``ilm-eval lm-eval``: lm-evaluation-harness on a Hugging Face folder, checked by hand.

A tiny multiple-choice task (a jsonl file and a task YAML written here) is run through
``ilm-eval lm-eval`` on a tiny random ``LlamaForCausalLM`` with the byte tokenizer, and lm-eval's
accuracy is recomputed from the model's own logits: for every document and choice, the summed
log-softmax of the continuation bytes ``" " + choice`` given the context, argmax over choices,
compared with the gold index. Everything is offline: the data set is a local json file, read into a
``datasets`` cache under ``tmp_path``; the model and tokenizer are local files.

To run the same check on an exported implicit model, replace :func:`build_model` with a function
that writes the export into the folder.
"""

from __future__ import annotations

import json
import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's HFLM imports it

from ilm_megatron.data.tokenizer import ByteTokenizer  # noqa: E402
from ilm_megatron.hf.lm_eval import SOLVER_ATTRS  # noqa: E402
from ilm_megatron.hf.tokenizer import write_hf_tokenizer  # noqa: E402
from ilm_megatron.tasks.eval import main  # noqa: E402

TASK = "ilm_toy_mc"
DOCS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "Two plus two is", "choices": ["four", "five", "a fish"], "label": 0},
    {"question": "Cats say", "choices": ["woof", "meow"], "label": 1},
    {"question": "Ice is", "choices": ["hot", "cold", "purple"], "label": 1},
    {"question": "  héllo wörld ✓ means", "choices": ["hi ✓", "bye"], "label": 0},
    {"question": "Fire is\nvery", "choices": ["wet", "hot"], "label": 1},
    {"question": "The sun rises in the", "choices": ["west", "east", "north", "south"], "label": 1},
    {"question": "Water boils at", "choices": ["100 °C", "0 °C", "50 °C"], "label": 0},
]
LIMIT = 7  # lm-eval evaluates the first LIMIT documents
#: Solver-like settings stored in the tiny model's config.json (Llama ignores them); f_tol is
#: overridden on the command line, so the recorded value must be the override.
SETTINGS = {"arch": "llama", "implicit": False, "f_max_iter": 30, "f_tol": 1e-3}
#: ``--override`` of the run; the reference model is loaded with the same keyword arguments.
OVERRIDES = {"f_tol": 1e-4}
SEED = 0


def build_model(folder: Path) -> Path:
    """Write a tiny random Llama with the byte tokenizer into ``folder`` (swap for an export)."""
    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=256,
        **SETTINGS,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the 0.02 init: log-likelihoods spread out
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    write_hf_tokenizer(folder, "byte")
    return folder


def write_task(folder: Path, cache: Path) -> Path:
    """A jsonl of :data:`DOCS` and its multiple-choice task YAML in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8"
    )
    yaml = f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
  cache_dir: {json.dumps(str(cache))}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    (folder / "toy.yaml").write_text(yaml, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("hf"))


@pytest.fixture
def task_dir(tmp_path) -> Path:
    return write_task(tmp_path / "tasks", tmp_path / "datasets_cache")


def context_and_choices(doc: dict) -> tuple[str, list[str]]:
    """The request strings of lm-eval's multiple_choice: context, ``" " + choice`` (0-shot)."""
    return f"Question: {doc['question']}\nAnswer:", [" " + c for c in doc["choices"]]


def hand_loglikelihoods(model, doc: dict) -> list[float]:
    """Sum of log-softmax of each choice's bytes given the context, from the model's logits."""
    ref = ByteTokenizer()
    ctx, conts = context_and_choices(doc)
    out = []
    for cont in conts:
        ctx_ids, cont_ids = ref.encode(ctx), ref.encode(cont)
        # lm-eval encodes context + continuation whole and splits at len(encode(context)); with
        # bytes, encoding is additive, so that is the same as encoding the two apart
        assert ref.encode(ctx + cont) == ctx_ids + cont_ids
        ids = torch.tensor([ctx_ids + cont_ids[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        pos = torch.arange(len(ctx_ids) - 1, len(ctx_ids) - 1 + len(cont_ids))
        out.append(float(logp[pos, torch.tensor(cont_ids)].sum()))
    return out


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["lm-eval", *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_lm_eval_accuracy_matches_hand_computation(hf_dir, task_dir, tmp_path, capsys):
    out_file = tmp_path / "results" / "lm_eval.json"
    code, out, err = run_cli(
        capsys,
        "--hf-dir", str(hf_dir),
        "--tasks", TASK,
        "--include-path", str(task_dir),
        "--limit", str(LIMIT),
        "--batch-size", "2",
        *[a for k, v in OVERRIDES.items() for a in ("--override", f"{k}={v}")],
        "--output", str(out_file),
        "--log-samples",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert json.loads(out_file.read_text()) == result
    assert [p.name for p in out_file.parent.iterdir()] == ["lm_eval.json"]  # no temp file left

    # the reference: the same weights, read back by transformers, scored by hand
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, trust_remote_code=True, local_files_only=True, **OVERRIDES
    ).eval()
    docs = DOCS[:LIMIT]
    lls = [hand_loglikelihoods(model, d) for d in docs]
    preds = [max(range(len(ll)), key=ll.__getitem__) for ll in lls]
    correct = [float(p == d["label"]) for p, d in zip(preds, docs)]
    hand_acc = sum(correct) / len(correct)
    assert 0.0 < hand_acc < 1.0, f"degenerate random model (acc {hand_acc}); change SEED"
    assert result["results"][TASK]["acc,none"] == hand_acc

    samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    for s, doc, ll, ok in zip(samples, docs, lls, correct):
        ctx, conts = context_and_choices(doc)
        assert s["arguments"] == [[ctx, c] for c in conts]
        got = [r[0] for r in s["filtered_resps"]]
        assert got == pytest.approx(ll, rel=1e-5, abs=1e-4)
        assert s["acc"] == ok
    assert result["n_samples"][TASK] == {"original": len(DOCS), "effective": LIMIT}

    # what is recorded with the numbers
    assert {**SETTINGS, **OVERRIDES}.items() <= result["solver"].items()
    assert result["solver"] == {
        a: getattr(model.config, a) for a in SOLVER_ATTRS if hasattr(model.config, a)
    }
    assert result["model_overrides"] == OVERRIDES
    assert result["hf_dir"] == str(hf_dir.resolve())
    assert result["tasks"] == [TASK] and result["limit"] == LIMIT
    assert result["versions"]["lm_eval"] == "0.4.13"
    assert result["versions"]["transformers"] == transformers.__version__
    assert result["versions"]["torch"] == torch.__version__


def test_table_output(hf_dir, task_dir, capsys):
    code, out, err = run_cli(
        capsys, "--hf-dir", str(hf_dir), "--tasks", TASK, "--include-path", str(task_dir),
        "--limit", "2",
    )  # fmt: skip
    assert code == 0, err
    assert all(f"{k}={v}" in out for k, v in SETTINGS.items())
    row = [ln for ln in out.splitlines() if ln.startswith(TASK)]
    assert len(row) == 1 and row[0].split()[1] == "acc"


def test_missing_folder_and_config(tmp_path, capsys):
    missing = tmp_path / "no_such_export"
    code, _, err = run_cli(capsys, "--hf-dir", str(missing), "--tasks", "piqa")
    assert code == 2
    assert f"ilm-eval: error: Hugging Face folder {missing} does not exist" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "--hf-dir", str(empty), "--tasks", "piqa")
    assert code == 2 and f"no config.json in {empty}" in err


def test_bad_override(hf_dir, task_dir, capsys):
    code, _, err = run_cli(
        capsys, "--hf-dir", str(hf_dir), "--tasks", TASK, "--include-path", str(task_dir),
        "--override", "no_such_knob=3",
    )  # fmt: skip
    assert code == 2
    assert "no_such_knob" in err and str(hf_dir / "config.json") in err
    code, _, err = run_cli(capsys, "--hf-dir", str(hf_dir), "--tasks", TASK, "--override", "f_tol")
    assert code == 2 and "KEY=VALUE" in err


def test_unknown_task(hf_dir, task_dir, capsys):
    """Indexes lm-eval's ~15k built-in task configs (~20 s on 2 cores) to rule the name out."""
    code, _, err = run_cli(
        capsys, "--hf-dir", str(hf_dir), "--tasks", f"{TASK},no_such_task_xyz",
        "--include-path", str(task_dir),
    )  # fmt: skip
    assert code == 2
    assert "unknown lm-eval task(s) 'no_such_task_xyz'" in err
    assert str(task_dir) in err and TASK + "'" not in err


def test_lm_eval_on_an_implicit_export_matches_our_own_logits(tmp_path, task_dir, capsys):
    """The whole path: an ilm-megatron implicit Mamba2 checkpoint -> ilm-export (byte
    tokenizer) -> ilm-eval lm-eval; the accuracy and log-likelihoods recomputed by hand from
    ilm-megatron's own model (not the export) with the same solver override."""
    import dataclasses

    from ilm_megatron.config import Config, ModelConfig, SolverConfig
    from ilm_megatron.hf.export import export
    from ilm_megatron.models.lm import ImplicitLM
    from ilm_megatron.train import checkpoint as ckpt

    torch.manual_seed(SEED)
    mcfg = ModelConfig(
        vocab_size=257, pad_vocab_multiple=16, d_model=32, n_layers=1, d_state=8, headdim=8,
        chunk_size=16, iterate_init_scale=0.5,
    )  # fmt: skip
    scfg = SolverConfig(f_max_iter=10, f_tol=1e-2)
    model = ImplicitLM(mcfg, scfg)
    with torch.no_grad():
        model.embedding.weight.normal_(0.0, 1.0)  # spread the log-likelihoods out
    path = tmp_path / "ck" / "model.safetensors"
    ckpt.save_state_dict(model.state_dict(), Config(model=mcfg, solver=scfg), path)
    export(path, tmp_path / "hf", tokenizer="byte")
    code, out, err = run_cli(
        capsys, "--hf-dir", str(tmp_path / "hf"), "--tasks", TASK, "--include-path",
        str(task_dir), "--limit", str(LIMIT), "--batch-size", "1", "--override", "f_tol=1e-3",
        "--log-samples", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["solver"]["f_tol"] == 1e-3 and result["solver"]["implicit"] is True

    ours = ckpt.load_model(path).eval()
    ours.solver_config = dataclasses.replace(ours.solver_config, f_tol=1e-3)

    class Ours:  # our logits, cut to the tokenizer's vocabulary as the export is
        def __call__(self, ids):
            class Out:
                logits = ours(ids).logits[..., :257]

            return Out()

    docs = DOCS[:LIMIT]
    lls = [hand_loglikelihoods(Ours(), d) for d in docs]
    preds = [max(range(len(ll)), key=ll.__getitem__) for ll in lls]
    hand_acc = sum(float(p == d["label"]) for p, d in zip(preds, docs)) / len(docs)
    assert 0.0 < hand_acc < 1.0, f"degenerate random model (acc {hand_acc}); change SEED"
    assert result["results"][TASK]["acc,none"] == hand_acc
    samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
    for s, ll in zip(samples, lls):
        assert [r[0] for r in s["filtered_resps"]] == pytest.approx(ll, rel=1e-5, abs=1e-5)
