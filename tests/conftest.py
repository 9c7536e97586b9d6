"""Shared fixtures: tiny random-init models (deterministic by seed) and padded batches."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.path.exists("/dev/nvidiactl"):
    # No GPU: the fused Triton kernel runs in Triton's CPU interpreter, so its CPU tests
    # check the same kernel source that CUDA compiles (set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

T.logging.set_verbosity_error()
torch.set_num_threads(int(os.environ.get("QKOV_TEST_THREADS", "2")))

VOCAB = 97


def tiny_gpt2(seed=0, n_layer=2, n_head=4, n_embd=32):
    torch.manual_seed(seed)
    cfg = T.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=VOCAB,
                       n_positions=64, bos_token_id=0, eos_token_id=0,
                       attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1)
    cfg._attn_implementation = "eager"
    return T.GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed=0, n_layer=2, n_head=4, n_kv=2, hidden=32, head_dim=12, bias=False):
    """LLaMA with GQA and head_dim != hidden / heads (bias=True: Qwen2-like q/k/v biases)."""
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(num_hidden_layers=n_layer, num_attention_heads=n_head,
                        num_key_value_heads=n_kv, hidden_size=hidden, head_dim=head_dim,
                        intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64,
                        attention_bias=bias, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return T.LlamaForCausalLM(cfg).eval()


def padded_batch(n, T_len, seed, prefix, pad_from=None):
    """Right-padded batch: sample k keeps T_len - (k % 3) tokens; labels -100 at padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T_len), generator=g)
    mask = torch.ones(n, T_len, dtype=torch.long)
    for k in range(n):
        keep = T_len - (k % 3) * 2
        mask[k, keep:] = 0
        ids[k, keep:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "sample_ids": [f"{prefix}:{k}" for k in range(n)]}


@pytest.fixture
def gpt2_model():
    return tiny_gpt2()


@pytest.fixture
def llama_model():
    return tiny_llama()


# ----------------------------------------------------------------------------- workflow

ROOT = Path(__file__).resolve().parents[1]


def workflow_env() -> dict:
    """The environment a workflow run gets: no inherited MLflow or qkov tracking variables
    (the workflow sets its own), offline, the repository's src on PYTHONPATH."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    for k in [k for k in env if k.startswith("QKOV_")]:
        env.pop(k)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    return env


def snakemake_cmd(workdir, *args: str) -> list[str]:
    """``python -m snakemake -s Snakefile -d workdir ARGS``."""
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d",
            str(workdir), *args]


def run_workflow(workdir, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run :func:`snakemake_cmd` in :func:`workflow_env`, capturing its output."""
    return subprocess.run(snakemake_cmd(workdir, *args), capture_output=True, text=True,
                          timeout=timeout, env=workflow_env())


@pytest.fixture(scope="session")
def tiny_run(request, tmp_path_factory):
    """ONE full run of the tiny experiment per test session, shared read-only by
    tests/test_workflow.py and tests/test_ablation.py (which copies it before adding to it).
    Under pytest-xdist the SLURM test's runs start here (see :func:`start_slurm_runs`)."""
    import time

    start_slurm_runs(request.session)
    work = tmp_path_factory.mktemp("qkov-workflow")
    t0 = time.time()
    res = run_workflow(work, "--cores", "2", "--config", "experiment=tiny", timeout=900)
    elapsed = time.time() - t0
    if res.returncode != 0:
        pytest.fail(f"tiny workflow failed after {elapsed:.0f} s:\n{res.stdout[-6000:]}\n"
                    f"{res.stderr[-6000:]}")
    results = work / "results"
    return {"work": work, "results": results, "elapsed": elapsed, "stdout": res.stdout,
            "stderr": res.stderr, "pair": results / "tiny" / "tiny" / "math__code",
            "control": results / "tiny" / "tiny" / "math__code.control"}


# ----------------------------------------------------------------------------- pytest-xdist

# A session-wide workflow run is made once per process that asks for it, so under
# pytest-xdist (`make test` runs two workers, `--dist loadgroup`) every test that reads one
# goes to the same worker: the tests of the two-seed sweep to one, those of the tiny run
# (or of its copies: the ablation, the faults) and the SLURM tests (one cluster; they
# compare with the tiny run) to one. Other tests spread over the workers.
def xdist_group_of(item) -> str | None:
    used = set(getattr(item, "fixturenames", ()))
    if "sweep_run" in used:
        return "sweep"
    if used & {"tiny_run", "tiny_reference"} or item.get_closest_marker("slurm"):
        return "tiny"
    return None


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook, which reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = xdist_group_of(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


# ----------------------------------------------------------------------------- SLURM

SLURM_RUNS = pytest.StashKey[object]()   # tests/test_slurm.py's runs, or why they did not start


def pytest_collection_finish(session):
    """Without pytest-xdist: start the SLURM test's runs as soon as the session is
    collected (:func:`start_slurm_runs`)."""
    if not session.config.option.collectonly and not hasattr(session.config, "workerinput"):
        start_slurm_runs(session)


def pytest_runtest_setup(item):
    """In an xdist worker, a grouped test fails before its fixtures when its group did not
    reach the scheduler: pytest-xdist 3.8 passes it as a suffix of the test's id, which
    pytest 9.2 ignores (pytest-xdist issue 1386; hence pytest < 9.2 in pyproject.toml)."""
    if (getattr(item.config.option, "loadgroup", False) and xdist_group_of(item)
            and "@" not in item.nodeid):
        pytest.fail("--dist loadgroup lost this test's group: every worker would make its own "
                    "workflow runs. pytest-xdist's loadgroup does not work with pytest 9.2 "
                    "(pytest-xdist issue 1386): install pytest<9.2, or run -p no:xdist.",
                    pytrace=False)


def start_slurm_runs(session) -> None:
    """When a SLURM test is selected and a cluster can start here, start it and the SLURM
    test's workflow runs now, in the background (tests/test_slurm.py ``start_runs``): they
    mostly wait on SLURM's scheduling and status polls (about 8 minutes), so the tests that
    run before them use the CPU meanwhile. An error is kept for the test to report. Once per
    process. A pytest-xdist worker collects every test, but only the worker given the
    "tiny" group runs the SLURM tests (they compare with the tiny run): there the tiny run,
    the group's first fixture, calls this."""
    if SLURM_RUNS in session.config.stash or not any(
            item.get_closest_marker("slurm") for item in session.items):
        return
    from slurm_cluster import unavailable_reason

    if unavailable_reason():
        return   # the test skips, or fails under QKOV_REQUIRE_SLURM=1
    import test_slurm

    try:
        runs = test_slurm.start_runs(session.config._tmp_path_factory)
    except Exception as err:   # noqa: BLE001  reported by the test, not by the collection
        runs = err
    session.config.stash[SLURM_RUNS] = runs


def pytest_sessionfinish(session):
    """Stop the background SLURM runs and their cluster (a no-op if the test did)."""
    runs = session.config.stash.get(SLURM_RUNS, None)
    if runs is not None and not isinstance(runs, BaseException):
        runs.stop()


def job_counts(output: str) -> dict[str, int]:
    """Rule -> count from the 'Job stats' table of a Snakemake (dry) run's output."""
    import re

    block = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    counts = {}
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    return counts
