"""The seed's quick reference (docs/QUICK_REFERENCE.md, a verbatim copy of the user's seed)
runs as written: every ```python block, in order, with its import lines unchanged.

Only two things are supplied around the blocks: the objects the seed takes as given
(``model``, ``math_batch``, ``code_batch``; ``contribs, grads, fisher`` for the statistics
call, and task A's reference samples) and the seed's literal ``...`` placeholder in the
diagnostics call, which is filled with real arguments.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "QUICK_REFERENCE.md"
SEED = ROOT.parent / "shared" / "seeds" / "000_5ad95f31a37bfd48.txt"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_copy_is_the_seed_verbatim():
    if not SEED.exists():
        pytest.skip("shared/ seed not beside this checkout")
    assert DOC.read_text() == SEED.read_text()


PRELUDE = '''
import matplotlib
matplotlib.use("Agg")
import torch, transformers as T
torch.manual_seed(0)
# GPT-2-small geometry (12 layers, 12 heads, d_k 64, d 768), so that the seed's manual
# QKOVConfig(num_layers=12, num_heads=12, head_dim=64, hidden_dim=768) describes it too
_cfg = T.GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=101, n_positions=32)
_cfg._attn_implementation = "eager"
model = T.GPT2LMHeadModel(_cfg).eval()
def _batch(seed, n=4, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 101, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long); mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}
math_batch, code_batch = _batch(1), _batch(2)
'''

# What the seed takes as given before its statistics call: the three inputs, and task A's
# held-out reference samples (SPEC 7: test_heatmap's reference defaults to them).
BEFORE_STATS = '''
contribs = fisher_collector.contribution_cache
grads = fisher_collector.gradient_manager
fisher = fisher_collector.fisher
_ref = _batch(3, n=5)
_ref["sample_ids"] = [f"math:ref{k}" for k in range(5)]
fisher_collector.collect_fisher(model, _ref, task="math", mode="ema", role="reference")
'''


def build_script() -> str:
    blocks = python_blocks(DOC.read_text())
    parts = [PRELUDE]
    for block in blocks:
        if "stats.test_heatmap" in block:
            parts.append(BEFORE_STATS)
        if "compute_block_head_score(...)" in block:
            block = block.replace(
                "compute_block_head_score(...)",
                "compute_block_head_score('math', 0, 'code', 0, 3, 5, 'Q')")
        if "model.layers[0].self_attn.q_proj.weight" in block:
            # the seed's troubleshooting snippet reads a LLaMA-style base model
            parts.append("model = T.LlamaModel(T.LlamaConfig(num_hidden_layers=4, "
                         "num_attention_heads=4, num_key_value_heads=2, hidden_size=32, "
                         "intermediate_size=64, vocab_size=101))\n"
                         "config = QKOVConfig.from_model(model)\n")
        parts.append(block)
    return "\n".join(parts)


def test_quick_reference_runs_verbatim(tmp_path):
    script = build_script()
    assert "from fisher.qkov import (" in script
    assert "from fisher.core.fisher_collector import FisherCollector" in script
    (tmp_path / "seed.py").write_text(script)
    env_path = str(ROOT / "src")
    proc = subprocess.run([sys.executable, "seed.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin",
                               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert re.search(r"Q: \d+ significant conflicts", out)
    assert "Fisher min:" in out and "Contrib norm:" in out and "Grad norm:" in out
    for name in ("Q_interference.pdf", "block_comparison.pdf"):
        assert (tmp_path / name).stat().st_size > 1000


def test_example_script_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "qkov_interference_example.py"),
                           "--out", str(tmp_path), "--quick"],
                          capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin",
                               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "cells.csv").exists()
    assert (tmp_path / "Q_interference.png").exists()
