"""Tokenize ``.jsonl`` / ``.jsonl.zst`` / ``.txt`` corpora into packed WebDataset shards.

A thin wrapper around :func:`ilm_megatron.data.preprocess.main`; see ``docs/data.md``.

Usage::

    python tools/preprocess_data.py --input pile/train --output data/pile-byte \
        --tokenizer byte --seq-len 2048 --workers 8

Exit codes: 0 on success, 2 on bad arguments or bad inputs.
"""

from __future__ import annotations

import sys

from ilm_megatron.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
