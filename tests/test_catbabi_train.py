"""ilm-train on CatbAbI (QA mode) and ilm-eval catbabi on the result."""

from __future__ import annotations

import json

from conftest import CONFIGS, make_catbabi

from ilm_megatron.config import load_config
from ilm_megatron.tasks.eval import main as ilm_eval
from ilm_megatron.train.loop import train


def _make_data(tmp_path):
    return make_catbabi(tmp_path / "catbabi", "--stories", "3", "--seed", "0")


def test_train_and_eval_catbabi(tmp_path, capsys):
    data = _make_data(tmp_path)
    cfg = load_config(
        [CONFIGS / "tasks" / "catbabi_implicit_mamba2.yaml"],
        [f"run_dir={tmp_path / 'run'}", f"data.path={data}", "data.seq_len=32",
         "model.d_model=32", "model.headdim=8", "model.d_state=8", "solver.f_max_iter=4",
         "train.batch_size=4", "train.max_steps=3", "train.log_interval=1",
         "train.eval_batches=1", "train.save_interval=0", "train.tensorboard=false"],
    )  # fmt: skip
    res = train(cfg, tmp_path / "run", quiet=True)
    assert len(res.history) == 3 and all(0.0 <= r["acc"] <= 1.0 for r in res.history)
    assert res.final["eval"][0]["length"] == 32  # validation on the valid split
    args = ["catbabi", "--checkpoint", str(tmp_path / "run"), "--data", str(data),
            "--seq-len", "32", "--batch-size", "2", "--max-windows", "3", "--json"]  # fmt: skip
    code = ilm_eval(args)
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answers"] > 0 and 0.0 <= out["accuracy"] <= 1.0
    assert set(out) >= {"per_task", "per_length", "iters_mean"}


def test_qa_targets_only_answers(tmp_path):
    from ilm_megatron.tasks.catbabi import VOCAB
    from ilm_megatron.train.data import IGNORE, CatbabiData

    data = _make_data(tmp_path)
    cfg = load_config(
        [CONFIGS / "tasks" / "catbabi_implicit_mamba2.yaml"],
        [f"data.path={data}", "data.seq_len=32", "train.batch_size=2"],
    )
    src = CatbabiData(cfg)
    x, y = src.next_batch()
    q = VOCAB.index("?")
    assert torch_all((y != IGNORE) == (x == q))
    state = src.state_dict()
    x2, y2 = src.next_batch()
    again = CatbabiData(cfg)
    again.load_state_dict(state)
    x3, y3 = again.next_batch()
    assert torch_all(x2 == x3) and torch_all(y2 == y3)  # exact resume


def torch_all(t) -> bool:
    return bool(t.all())


def test_data_stream_uses_the_folder_vocab(tmp_path):
    """The generator-free stream encodes exactly as the generator's, from ``vocab.json`` alone;
    a story word missing from the vocabulary and a vocabulary that is not the generator's are
    refused with the file named."""
    import pytest

    from ilm_megatron.data import catbabi as data_catbabi
    from ilm_megatron.tasks import catbabi as task_catbabi

    folder = _make_data(tmp_path)
    # reference: the generator's own encoding of each story, one row in file order
    stories = data_catbabi.read_stories(str(folder / "train.txt"))
    want = [i for st in stories for i in [task_catbabi.EOS_ID, *task_catbabi.encode(st.tokens)]]
    ours = data_catbabi.load_stream(str(folder), "train", 1, 32)
    got = ours.x[0][ours.story_pos[0] >= 0].tolist()
    assert got == want and len(want) > 32
    assert torch_all(ours.is_answer == (ours.x == task_catbabi.VOCAB.index("?")))

    vocab = json.loads((folder / "vocab.json").read_text())
    dropped = data_catbabi.read_stories(str(folder / "train.txt"))[0].tokens[0]
    vocab["tokens"] = [t for t in vocab["tokens"] if t != dropped]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"train\.txt: token .* is not in vocab\.json"):
        data_catbabi.load_stream(str(folder), "train", 4, 32)
    with pytest.raises(ValueError, match="does not match this generator's vocabulary"):
        task_catbabi.load_stream(str(folder), "train", 4, 32)
    (folder / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match=r"vocab\.json is not a CatbAbI vocabulary"):
        data_catbabi.read_vocab(str(folder))


def test_eval_reports_iterations_per_story_length(tmp_path, capsys):
    """``ilm-eval catbabi`` averages, per story-length bucket, the iterations behind each
    answer: the row's solve in simultaneous mode, the answer token's own solve in sequential
    mode (both with the state carried across windows). Reference: the same windows run here
    and averaged in a plain loop over the answers."""
    import torch

    from ilm_megatron.data.catbabi import iter_batches, load_stream
    from ilm_megatron.models.lm import build_model
    from ilm_megatron.train.checkpoint import save_model

    data = _make_data(tmp_path)
    cfg = load_config(
        [CONFIGS / "tasks" / "catbabi_implicit_mamba2.yaml"],
        ["model.d_model=32", "model.headdim=8", "model.d_state=8", "solver.f_tol=1e-3"],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver).eval()
    save_model(model, cfg, tmp_path / "m.safetensors")
    bins = (60, 120)
    for mode in ("simultaneous", "sequential"):
        args = ["catbabi", "--checkpoint", str(tmp_path / "m.safetensors"), "--data", str(data),
                "--seq-len", "40", "--batch-size", "2", "--max-windows", "3", "--carry-state",
                "--mode", mode, "--length-bins", "60,120", "--json"]  # fmt: skip
        assert ilm_eval(args) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["mode"] == mode and got["carry_state"] is True
        sums: dict[int, list[float]] = {}
        caches = None
        stream = load_stream(str(data), "test", 2, 40)
        with torch.no_grad():
            for i, b in enumerate(iter_batches(stream)):
                if i == 3:
                    break
                if mode == "sequential":
                    out = model.forward_sequential(b.x, caches=caches)
                    it = out.stats.sample_iters
                else:
                    out = model(b.x, caches=caches, return_caches=True)
                    it = out.stats.sample_iters[:, None].expand(b.x.shape)
                caches = out.caches
                for r, t in zip(*torch.nonzero(b.is_answer, as_tuple=True)):
                    k = sum(int(b.story_len[r, t]) > edge for edge in bins)
                    sums.setdefault(k, []).append(float(it[r, t]))
        names = ["<=60", "<=120", ">120"]
        want = {names[k]: sum(v) / len(v) for k, v in sums.items()}
        assert got["iters_per_length"].keys() == want.keys()
        for k, v in want.items():
            assert abs(got["iters_per_length"][k] - v) < 1e-9, (mode, k)
