"""Writing an analysis's outputs: one JSON file, PNG figures and TensorBoard images.

Everything is rendered first and each file written atomically (temporary file, then rename),
the JSON last, so a failed analysis leaves no half-written file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; outputs are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(
    out_dir: str | Path | None,
    name: str,
    result: dict[str, Any],
    figures: Mapping[str, Any] | None = None,
    step: int = 0,
) -> dict[str, Any]:
    """Write ``result`` as ``OUT/NAME.json``, each figure as ``OUT/FIG.png`` and as a TensorBoard
    image ``NAME/FIG`` under ``OUT/tensorboard``; close the figures.

    Args:
        out_dir: the output folder (None: write nothing, only close the figures).
        name: the analysis's name (file stem and TensorBoard tag prefix).
        result: the JSON-able result; the written paths are added under ``"outputs"``.
        figures: ``{stem: matplotlib figure}``.
        step: the TensorBoard step of the images.

    Returns:
        ``result`` with ``"outputs"`` (``{"json": path, "png": [paths], "tensorboard": dir}``)
        when ``out_dir`` is given.
    """
    figures = dict(figures or {})
    try:
        if out_dir is None:
            return result
        import io

        from ilm_megatron.tasks.plots import figure_to_array

        out = Path(out_dir)
        tb_dir = out / "tensorboard"
        json_path = out / f"{name}.json"
        pngs = {stem: out / f"{stem}.png" for stem in figures}
        result = {
            **result,
            "outputs": {
                "json": str(json_path),
                "png": [str(p) for p in pngs.values()],
                "tensorboard": str(tb_dir) if figures else None,
            },
        }
        # everything is rendered before anything is written: a result that is not JSON (a NaN)
        # or a figure that fails to draw leaves the folder as it was
        text = json.dumps(result, indent=2, allow_nan=False) + "\n"
        rendered = {}
        for stem, fig in figures.items():
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            rendered[stem] = (buf.getvalue(), figure_to_array(fig))
        out.mkdir(parents=True, exist_ok=True)
        for stem, (png, _) in rendered.items():
            _atomic_bytes(pngs[stem], png)
        if rendered:
            from torch.utils.tensorboard import SummaryWriter

            w = SummaryWriter(log_dir=str(tb_dir))
            try:
                for stem, (_, image) in rendered.items():
                    w.add_image(f"{name}/{stem}", image, step, dataformats="HWC")
            finally:
                w.close()
        _atomic_bytes(json_path, text.encode())  # last: its presence means the rest is there
        return result
    finally:
        if figures:
            from ilm_megatron.tasks.plots import close

            for fig in figures.values():
                close(fig)
