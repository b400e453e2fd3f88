"""Hugging Face interoperability: export, import, tokenizer files and lm-eval-harness."""
