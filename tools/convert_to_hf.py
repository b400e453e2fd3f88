"""Convert an ilm-megatron checkpoint into a Hugging Face folder (the same as ``ilm-export``).

Usage::

    python tools/convert_to_hf.py --checkpoint runs/my-run --out exports/my-run

See ``docs/huggingface.md`` and ``python tools/convert_to_hf.py --help``.
"""

from __future__ import annotations

import sys

from ilm_megatron.hf.export import main

if __name__ == "__main__":
    sys.exit(main())
