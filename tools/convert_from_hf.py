"""Convert a Hugging Face folder into an ilm-megatron checkpoint (the same as ``ilm-import``).

Usage::

    python tools/convert_from_hf.py --hf-dir exports/my-run --out ckpt/my-run --tp 2 --pp 2
    python tools/convert_from_hf.py --hf-dir local/mamba2-130m --out ckpt/imp --implicit

See ``docs/huggingface.md`` and ``python tools/convert_from_hf.py --help``.
"""

from __future__ import annotations

import sys

from ilm_megatron.hf.importer import main

if __name__ == "__main__":
    sys.exit(main())
