"""What the ``ilm-eval`` analyses share: checkpoints and their stored run config, the device,
inputs (word problems, text shards), solver caps, command-line flags, figures and the summary's
last line.

Every check raises :class:`~ilm_megatron.errors.UserError` naming the flag or file at fault, so
``ilm-eval`` prints it and exits with code 2. Heavy imports (torch, the models, matplotlib) happen
inside the functions: the analyses import this module while ``ilm-eval --help`` builds its parser.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ilm_megatron.argtypes import fraction, non_negative_int, positive_float
from ilm_megatron.errors import UserError

if TYPE_CHECKING:
    import torch

    from ilm_megatron.data.loader import Manifest
    from ilm_megatron.models.lm import ImplicitLM

# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint given on the command line.

    Attributes:
        label: its name in the results and the plot.
        path: the ``model.safetensors`` file.
        run_dir: the run directory (None for a bare file).
        train_length: ``data.seq_len`` of the run that wrote it (None when not recorded).
    """

    label: str
    path: Path
    run_dir: Path | None
    train_length: int | None


def resolve(spec: str, label: str | None = None) -> Checkpoint:
    """The :class:`Checkpoint` of a run directory, checkpoint folder or ``.safetensors`` file.

    The default label is the run directory's name (for a bare file: its folder's name when it is
    ``model.safetensors``, else the file's stem).

    Raises:
        UserError: nothing loadable at ``spec`` (naming ``--checkpoint``).
    """
    from ilm_megatron.tasks.state_tracking import resolve_checkpoint

    try:
        path, run_dir = resolve_checkpoint(spec)
    except FileNotFoundError as e:
        raise UserError(f"--checkpoint {spec}: {e}") from None
    if label is None:
        if run_dir is not None:
            label = run_dir.name
        else:
            label = path.parent.name if path.name == "model.safetensors" else path.stem
    cfg = stored_run_config(path, run_dir)
    seq_len = None if cfg is None else cfg.get("data", {}).get("seq_len")
    return Checkpoint(label, path, run_dir, int(seq_len) if seq_len else None)


def stored_run_config(path: Path, run_dir: Path | None) -> Any:
    """The run config stored in the checkpoint ``path`` (or, for files written before configs
    were stored with the weights, ``run_dir/config.yaml``) as an OmegaConf node; None when
    neither has one."""
    from omegaconf import OmegaConf

    from ilm_megatron.train.checkpoint import stored_config_text

    try:
        text = stored_config_text(path)
    except Exception:  # not a safetensors file: load_checkpoint reports it
        text = None
    if text is None and run_dir is not None and (run_dir / "config.yaml").is_file():
        text = (run_dir / "config.yaml").read_text()
    return None if text is None else OmegaConf.create(text)


def resolve_device(spec: str) -> torch.device:
    """The torch device of ``--device`` (``cpu``, ``cuda`` or ``auto``: CUDA when there is one).

    Raises:
        UserError: CUDA asked for where there is none, or not a device name.
    """
    from ilm_megatron.train.device import resolve_device as train_device

    try:
        return train_device(spec)
    except (RuntimeError, ValueError) as e:  # torch.device raises RuntimeError for a bad name
        raise UserError(f"--device {spec}: {e}") from None


def load_checkpoint(
    ckpt: Checkpoint, device: str = "cpu", solver: Sequence[str] = ()
) -> ImplicitLM:
    """The model of ``ckpt`` in eval mode on ``device`` (``cpu``, ``cuda`` or ``auto``), its
    solver settings changed by ``solver`` (``--solver KEY=VALUE``, :func:`solver_overrides`).

    Raises:
        UserError: an unreadable checkpoint, CUDA asked for where there is none, or a bad
            ``--solver`` setting.
    """
    from ilm_megatron.train.checkpoint import load_model

    dev = resolve_device(device)  # before the load: a bad --device fails fast
    try:
        model = load_model(ckpt.path)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot load {ckpt.path}: {e}") from None
    if solver:
        model.solver_config = solver_overrides(model.solver_config, solver)
    return model.to(dev).eval()


def solver_in_force(model: ImplicitLM, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The solver settings the analysis ran with, read back from ``model`` (every ``solver.*``
    key, after the ``--solver`` overrides), plus ``"overrides"``: those ``KEY=VALUE`` texts."""
    return {**asdict(model.solver_config), "overrides": list(overrides)}


def solver_overrides(cfg: Any, settings: Sequence[str]) -> Any:
    """``cfg`` (a frozen :class:`~ilm_megatron.config.SolverConfig`) with ``KEY=VALUE`` settings
    applied, each value converted to the type of the key's current value (``true``/``false`` for
    booleans) and the result validated as a config file's would be.

    Raises:
        UserError: naming the setting: not ``KEY=VALUE``, an unknown key, or a bad value.
    """
    import dataclasses

    changes: dict[str, Any] = {}
    for text in settings:
        key, eq, value = text.partition("=")
        key = key.strip().removeprefix("solver.")
        if not eq or not hasattr(cfg, key):
            keys = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise UserError(f"--solver {text}: expected KEY=VALUE with KEY one of {keys}")
        current = getattr(cfg, key)
        try:
            if isinstance(current, bool):
                if value.lower() not in ("true", "false"):
                    raise ValueError("expected true or false")
                changes[key] = value.lower() == "true"
            else:
                changes[key] = type(current)(value)
        except ValueError as e:
            raise UserError(f"--solver {text}: {e}") from None
    try:
        return dataclasses.replace(cfg, **changes)
    except ValueError as e:  # the config's own check, naming the key
        raise UserError(f"--solver: {e}") from None


def add_solver_argument(p: argparse.ArgumentParser) -> None:
    """``--solver KEY=VALUE`` (repeatable): a ``solver.*`` setting for this analysis."""
    p.add_argument(
        "--solver",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a solver setting for this analysis instead of the checkpoint's, e.g. "
        "method=anderson or early_exit=true (repeatable; docs/solver.md)",
    )


# --------------------------------------------------------------------------- word problems


def word_problem_group(
    ckpt: Checkpoint, vocab: int, group: str | None = None, hint: str = "", required: bool = True
) -> tuple[str | None, int | None]:
    """The word problem to draw inputs from, checked against the model's vocabulary.

    Args:
        ckpt: the checkpoint; its stored ``data.group`` is the default.
        vocab: the model's vocabulary size (the group's symbols are token ids 0..order-1).
        group: ``--group`` (None: the run's).
        hint: what to do instead, appended to the messages (e.g. ``"pass --data ..."``).
        required: raise when neither ``group`` nor the run names one (else return None).

    Returns:
        ``(group or None, the run's stored data.seq_len or None)``.

    Raises:
        UserError: no word problem (when ``required``), an unknown group, or more symbols than
            the model's vocabulary.
    """
    from ilm_megatron.data.word_problem import group_order
    from ilm_megatron.tasks.state_tracking import run_config_group

    stored, train_len = run_config_group(ckpt.run_dir, ckpt.path)
    chosen = group or stored
    tail = f": {hint}" if hint else ""
    if chosen is None:
        if not required:
            return None, train_len
        raise UserError(
            f"--checkpoint {ckpt.path}: not a word-problem run (no data.group stored with it)"
            + tail
        )
    try:
        n_sym = group_order(chosen)
    except (ValueError, KeyError) as e:
        raise UserError(f"--group: {e}") from None
    if n_sym > vocab:
        where = f"--group {chosen}" if group else str(ckpt.path)
        raise UserError(
            f"{where}: the {chosen} word problem's {n_sym} symbols do not fit the model's "
            f"vocabulary ({vocab})" + tail
        )
    return chosen, train_len


def word_problems(
    group: str, samples: int, length: int, seed: int, easy_frac: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``, each (samples, length) int64: word problems of ``group`` drawn from a generator
    seeded with ``seed`` (a pure function of the arguments), each token the identity with
    probability ``easy_frac``."""
    import torch

    from ilm_megatron.data.word_problem import sample_word_problem

    gen = torch.Generator().manual_seed(seed)
    return sample_word_problem(group, samples, length, gen, easy_frac=easy_frac)


# --------------------------------------------------------------------------- text shards


def assemble_sequences(
    data_dir: str | Path, length: int, samples: int, val_fraction: float = 0.0
) -> tuple[torch.Tensor, Manifest]:
    """``samples`` sequences of ``length + 1`` tokens from a shards folder.

    The samples of the split (the last ``val_fraction`` of the folder, or all of it when 0) are
    read in their stored order and concatenated, and the stream is cut into consecutive,
    non-overlapping sequences (the stored samples are themselves consecutive cuts of the token
    stream, so this restores the text's order).

    Returns:
        ``(tokens (samples, length + 1) int64, manifest)``.

    Raises:
        UserError: a missing or invalid folder, or too few tokens in the split (the message says
            how many there are).
    """
    import torch

    from ilm_megatron.data.loader import ShardDataset, load_manifest, split_range

    m = load_manifest(data_dir)
    split = "val" if val_fraction > 0 else "all"
    lo, hi = split_range(m.samples, split, val_fraction)
    need = samples * (length + 1)
    have = (hi - lo) * (m.seq_len + 1)
    if have < need:
        what = f"the last {hi - lo} samples" if split == "val" else f"the {hi - lo} samples"
        raise UserError(
            f"--data {data_dir}: {what} hold {have} tokens; {samples} sequences of {length} + 1 "
            f"tokens need {need}: lower --samples or --length"
        )
    ds = ShardDataset(data_dir, split=split, val_fraction=val_fraction, shuffle=False, num_epochs=1)
    chunks, n = [], 0
    for item in ds:
        chunks.append(item["tokens"])
        n += chunks[-1].numel()
        if n >= need:
            break
    return torch.cat(chunks)[:need].view(samples, length + 1), m


def check_vocabulary(
    ckpt: Checkpoint, vocab_size: int, manifest: Manifest, tokens: torch.Tensor
) -> None:
    """Raise :class:`UserError` naming both files when the model's vocabulary does not cover the
    shards' token ids (their tokenizer's vocabulary, or a larger id actually present in
    ``tokens``, any shape)."""
    top = int(tokens.max()) if tokens.numel() else -1
    if manifest.vocab_size > vocab_size or top >= vocab_size:
        raise UserError(
            f"{ckpt.path}: the model's vocabulary ({vocab_size} tokens) does not cover the token "
            f"ids of {manifest.path} (tokenizer {manifest.tokenizer_name!r}, vocab_size "
            f"{manifest.vocab_size}, largest id used {top})"
        )


# --------------------------------------------------------------------------- solver caps


def solver_caps(
    model: ImplicitLM, length: int, cap_mult: float, max_iter: int = 0
) -> tuple[int, int]:
    """``(per-token cap, per-sample cap)`` of the sequential and simultaneous solves.

    ``max_iter`` > 0 is both; else the model's eval cap per token and ``max(eval cap,
    ceil(cap_mult * length))`` per sample (a whole-sequence solve needs about as many iterations
    as the input is long: see ``state_tracking.eval_cap``).
    """
    from ilm_megatron.tasks.state_tracking import eval_cap

    return max_iter or model.eval_max_iter(), eval_cap(model, length, cap_mult, max_iter)


# --------------------------------------------------------------------------- command line

CHECKPOINT_HELP = "run directory written by ilm-train, or its .safetensors file"


def add_checkpoint_argument(p: argparse.ArgumentParser, repeatable: bool = False) -> None:
    """``--checkpoint`` (required; ``repeatable``: once per model)."""
    if repeatable:
        p.add_argument(
            "--checkpoint",
            action="append",
            required=True,
            metavar="RUN_OR_FILE",
            help=CHECKPOINT_HELP + " (repeatable: one line per model)",
        )
    else:
        p.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE", help=CHECKPOINT_HELP)


def add_data_arguments(p: argparse.ArgumentParser, required: bool, default: str = "") -> None:
    """``--data`` (a shards folder; ``default`` says what is used without it) and
    ``--val-fraction``."""
    folder = "shards folder written by preprocess_data.py"
    p.add_argument(
        "--data", required=required, help=f"{folder} (default: {default})" if default else folder
    )
    p.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.0,
        help="use the last fraction of the folder's samples (0: the whole folder)",
    )


def add_cap_arguments(p: argparse.ArgumentParser, max_iter_help: str) -> None:
    """``--cap-mult`` (the rule of the simultaneous cap) and ``--max-iter`` (a fixed cap)."""
    p.add_argument(
        "--cap-mult",
        type=positive_float,
        default=2.5,
        help="simultaneous solver cap = max(configured eval cap, ceil(CAP_MULT * length))",
    )
    p.add_argument("--max-iter", type=non_negative_int, default=0, help=max_iter_help)


def add_output_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """``--device``, ``--out`` (the report's folder: ``NAME.json`` and ``NAME.png``) and
    ``--json``."""
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--out", default=None, help=f"write {name}.json and {name}.png here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


# --------------------------------------------------------------------------- output


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (7, 4.5)) -> Any:
    """``(figure, axes)`` of ``pyplot.subplots`` at 100 dpi (a PNG of ``figsize * 100`` pixels).

    Raises:
        UserError: matplotlib is not installed.
    """
    from ilm_megatron.tasks.plots import PlotUnavailableError, pyplot

    try:
        plt = pyplot()
    except PlotUnavailableError as e:
        raise UserError(str(e)) from None
    return plt.subplots(nrows, ncols, figsize=figsize, dpi=100)


def show_outputs(result: dict[str, Any]) -> None:
    """The summary's last line: the files written under ``--out`` (nothing without it)."""
    outputs = result.get("outputs")
    if outputs:
        print(" ".join(["written:", outputs["json"], *outputs["png"]]))
