"""Write the tokenizer shipped for random and tiny models (interference.models.DEFAULT_BPE):
the 512-token byte-level BPE trained on the default corpus, and its provenance beside it.

    python scripts/make_default_bpe.py

Run it only to change that tokenizer on purpose: every prepared dataset of a random or tiny
model records the tokenizer's digest, and a new one makes them differ from older results.
"""
import json

from interference.models import DEFAULT_BPE, write_default_bpe

if __name__ == "__main__":
    print(json.dumps(write_default_bpe(DEFAULT_BPE), indent=1))
    print(f"wrote {DEFAULT_BPE}")
