"""Reliability (issue 9): bad input fails loudly and names the fix, crashes lose nothing,
equal configs give equal bytes, parallel jobs file their MLflow runs correctly, and nothing
unsafe is loaded. docs/reliability.md has one row per case, naming its test here.

Most checks run in-process on the stage functions (seconds). Three use Snakemake: a dry
run with a misspelt key, a run whose data file is missing (no partial output), and the
crash test (kill -9 during gradient collection and during scoring, rerun, compare bytes
with the shared uninterrupted tiny run). The concurrency check reuses test_evidence's
two-seed sweep (4 parallel jobs, fresh MLflow store).
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import run_workflow, snakemake_cmd, workflow_env  # noqa: E402
from test_evidence import sweep_run, tiny_reference  # noqa: E402,F401


# ----------------------------------------------------------------------------- helpers

class FakeJob:
    """What a stage's run(job) needs, without Snakemake (see qkov_pipeline.jobs.Job)."""

    def __init__(self, slice_: dict, input: dict, output: dict, wildcards: dict | None = None,
                 rule: str = "test"):
        from qkov_pipeline.plan import digest

        self.slice, self.config_hash = slice_, digest(slice_)
        self.input, self.output = SimpleNamespace(**input), SimpleNamespace(**output)
        self.wildcards, self.rule, self.experiment = dict(wildcards or {}), rule, "test"
        self.exec, self.threads = {}, 1
        self.metrics, self.artifacts, self.tags = {}, [], {}
        self.held_locks, self.logging_process = [], None

    def exec_of(self, rule):
        return dict(self.exec)

    def metric(self, name, value):
        self.metrics[name] = value

    def artifact(self, path, directory=None):
        self.artifacts.append(str(path))

    def timed(self, name):
        return contextlib.nullcontext()

    def device(self):
        return "cpu"


def tiny_cfg(*overrides: str) -> dict:
    from qkov_pipeline.config import compose, validate

    cfg = compose(CONF, "tiny", list(overrides))
    validate(cfg, SCHEMA)
    return cfg


@pytest.fixture(scope="module")
def bpe():
    from interference.models import build_tokenizer

    return build_tokenizer("bpe", vocab_size=512)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- bad input

def test_unknown_architecture_names_the_patterns_and_the_fix():
    """Library: the seed's error, the patterns tried and how to register an adapter."""
    import transformers as T

    from interference.architectures import QKOVConfig

    cfg = T.MambaConfig(num_hidden_layers=1, hidden_size=16, vocab_size=50)   # no attention
    model = T.MambaForCausalLM(cfg).eval()
    with pytest.raises(KeyError) as err:
        QKOVConfig.from_model(model)
    msg = str(err.value)
    assert "Could not find parameter for L0 Q" in msg and "MambaForCausalLM" in msg
    assert "Patterns tried" in msg and "llama" in msg and "gpt2" in msg
    assert "register_layout" in msg and "_build_param_patterns" in msg


def test_unknown_architecture_in_the_workflow_leaves_no_model_folder(tmp_path):
    """prepare_model on a local folder of an unregistered architecture fails with the seed's
    error and leaves nothing in its output folder (Snakemake removes the declared outputs;
    the converted weights hf/ are not declared)."""
    import transformers as T

    from qkov_pipeline.stages import model as stage

    folder = tmp_path / "mamba"
    cfg = T.MambaConfig(num_hidden_layers=1, hidden_size=16, vocab_size=600)   # no attention
    T.MambaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    mcfg = dict(tiny_cfg()["model"], source="local", path=str(folder), name="mamba",
                tokenizer={"kind": "bpe", "vocab_size": 512})
    out = tmp_path / "results" / "_models" / "mamba-000000000000"
    job = FakeJob({"v": 1, "model": mcfg}, {}, {"manifest": str(out / "model.json")})
    with pytest.raises(KeyError, match="Could not find parameter for L0 Q"):
        stage.run(job)
    assert not out.exists() or files_under(out) == [], files_under(out)


def _checkpoint(tmp_path: Path, dtype=torch.float32) -> tuple[Path, dict, object]:
    """A user's checkpoint folder (a tiny LLaMA's safetensors, config and tokenizer, plus
    weights in another format and a subfolder, which are never read) and the model config
    naming it (source local)."""
    from interference.models import build_tokenizer, tiny_model

    folder = tmp_path / "ckpt"
    model = tiny_model("llama", vocab_size=512, seed=3).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer("bpe", vocab_size=512).save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle: never read")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.pth").write_bytes(b"never read")
    mcfg = dict(tiny_cfg()["model"], source="local", path=str(folder), name="ckpt",
                tokenizer={"kind": None})
    return folder, mcfg, model


def _prepare(mcfg: dict, out: Path):
    from qkov_pipeline.stages import model as stage

    job = FakeJob({"v": 1, "model": mcfg}, {}, {"manifest": str(out / "model.json")})
    stage.run(job)
    return json.loads((out / "model.json").read_text())


def test_prepare_model_links_a_checkpoint_without_reading_its_weights(tmp_path, monkeypatch):
    """prepare_model of a checkpoint folder (source local) describes the model from its
    config and hard-links its safetensors into hf/ (no weight is read: every loader fails
    here); model.json equals the description of the loaded model and records the links; a
    job then reads the same weights, bitwise, in the configured dtype."""
    import safetensors.torch
    import transformers as T

    from interference.models import build_from_config, describe, load_prepared, with_pad_token

    folder, mcfg, model = _checkpoint(tmp_path)
    want = describe(*[with_pad_token(x) if k else x
                      for k, x in enumerate(build_from_config(mcfg))], prove=False)
    out = tmp_path / "results" / "_models" / "ckpt-000000000000"

    def read(*a, **k):
        raise AssertionError("prepare_model read the checkpoint's weights")

    with monkeypatch.context() as m:
        for owner, name in ((T.AutoModelForCausalLM, "from_pretrained"),
                            (T.PreTrainedModel, "from_pretrained"),
                            (safetensors.torch, "load_file"), (safetensors, "safe_open")):
            m.setattr(owner, name, read)
        info = _prepare(mcfg, out)
    for k in ("class", "qkov_config", "layers", "n_attention_params", "n_params",
              "tokenizer_digest", "max_positions", "pad_token_id"):
        assert info[k] == want[k], k
    assert info["layout_proof"]["on"] == "shrunk copy"
    linked = out / "hf" / "model.safetensors"
    assert os.path.samefile(linked, folder / "model.safetensors")
    assert info["checkpoint"] == {"folder": str(folder.resolve()), "files": {
        "model.safetensors": {"bytes": linked.stat().st_size,
                              "mtime_ns": linked.stat().st_mtime_ns, "how": "linked"}}}
    assert not (out / "hf" / "pytorch_model.bin").exists()
    assert not (out / "hf" / "original").exists()
    for dtype in ("float32", "bfloat16"):
        loaded, _ = load_prepared(out, dict(mcfg, dtype=dtype))
        got, ref = loaded.state_dict(), model.state_dict()
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k].to(getattr(torch, dtype))), (dtype, k)


def test_a_checkpoint_rewritten_after_prepare_model_is_refused(tmp_path, monkeypatch):
    """A hard-linked weight file shares the user's file: rewritten in place after
    prepare_model, a job refuses it (naming the file) instead of reading other weights than
    model.json describes. Where the file system cannot link, the files are copied, and the
    copy is unaffected."""
    from interference.models import load_prepared

    folder, mcfg, model = _checkpoint(tmp_path)
    out = tmp_path / "linked"
    _prepare(mcfg, out)
    original = folder / "model.safetensors"
    data = original.read_bytes()
    time.sleep(0.01)
    with open(original, "r+b") as f:         # in place: the same inode, a new mtime
        f.write(data)
    with pytest.raises(ValueError, match=r"model\.safetensors changed after prepare_model "
                                         r"linked it .* Rerun prepare_model"):
        load_prepared(out, mcfg)

    def no_links(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    copied = tmp_path / "copied"
    info = _prepare(mcfg, copied)
    assert info["checkpoint"]["files"]["model.safetensors"]["how"] == "copied"
    assert not os.path.samefile(copied / "hf" / "model.safetensors", original)
    with open(original, "r+b") as f:
        f.write(b"\0" * 64)                   # the user's file changes; the copy does not
    loaded, _ = load_prepared(copied, mcfg)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values()))


def test_a_folder_without_safetensors_is_refused(tmp_path):
    from interference.models import build_from_config

    folder, mcfg, _ = _checkpoint(tmp_path)
    (folder / "model.safetensors").unlink()
    for weights in (True, False):
        with pytest.raises(ValueError, match=r"holds no safetensors weights .*, only "
                                             r"\['pytorch_model.bin'\]: only safetensors"):
            build_from_config(mcfg, weights=weights)


def test_weights_that_do_not_fit_their_device_are_refused_before_reading(tmp_path,
                                                                           monkeypatch):
    """A model larger than its device's free memory is refused before a weight is read, with
    its size; an out-of-memory error while reading becomes the same error, counted from
    the model's shapes."""
    import transformers as T

    import interference.device as device
    import interference.gradients.collect as collect
    from interference.models import ModelDoesNotFitError, load_prepared, weights_fit

    _, mcfg, model = _checkpoint(tmp_path)
    out = tmp_path / "prepared"
    _prepare(mcfg, out)
    n = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(collect, "available_memory", lambda: 1000)

    def read(*a, **k):
        raise AssertionError("weights read")

    monkeypatch.setattr(T.AutoModelForCausalLM, "from_pretrained", read)
    with pytest.raises(ModelDoesNotFitError, match=rf"the model's weights \({n:,} parameters "
                                                  r"in float32, 0\.0 GiB\) do not fit the "
                                                  r"host \(0\.0 GiB free\)\. A job holds"):
        load_prepared(out, mcfg)
    # a 7B model in bfloat16 on an 80 GiB card with 10 GiB free; then one read out of memory
    monkeypatch.setattr(device, "free_memory_mb", lambda d: 10 * 1024)
    with pytest.raises(ModelDoesNotFitError, match=r"\(7,000,000,000 parameters in "
                                                  r"bfloat16, 13\.0 GiB\) do not fit cuda:0 "
                                                  r"\(10\.0 GiB free\)"):
        with weights_fit("cuda:0", torch.bfloat16, 7_000_000_000):
            pytest.fail("read although it cannot fit")
    # a job's two GPUs together: 20 GiB free hold the 7B model, not a 13B one
    with weights_fit(["cuda:0", "cuda:1"], torch.bfloat16, 7_000_000_000):
        pass
    with pytest.raises(ModelDoesNotFitError, match=r"\(13,000,000,000 parameters in "
                                                  r"bfloat16, 24\.2 GiB\) do not fit cuda:0, "
                                                  r"cuda:1 \(20\.0 GiB free\)"):
        with weights_fit(["cuda:0", "cuda:1"], torch.bfloat16, 13_000_000_000):
            pytest.fail("read although it cannot fit")
    meta = model.to("meta")
    with pytest.raises(ModelDoesNotFitError, match=rf"\({n:,} parameters in bfloat16, .* "
                                                  r"out of memory while reading them"):
        with weights_fit("cuda:0", torch.bfloat16, lambda: meta):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")


def test_manual_config_contradicting_the_weights_names_both_shapes(llama_model):
    """A QKOVConfig whose geometry does not fit the weights: expected and actual shapes."""
    from interference.architectures import QKOVConfig, QKOVIndexer

    wrong = QKOVConfig(num_layers=2, num_heads=4, head_dim=8, num_kv_heads=2, layout="llama")
    with pytest.raises(ValueError) as err:
        QKOVIndexer(llama_model, wrong)
    msg = str(err.value)
    assert re.search(r"implies model\.layers\.0\.self_attn\.q_proj\.weight of shape \(32, 32\)"
                     r".* the weight's shape is \(48, 32\)\. Check num_heads", msg), msg
    assert "QKOVConfig.from_model(model)" in msg


def test_config_typo_and_unknown_option_name_the_key_and_the_fix(tmp_path):
    from qkov_pipeline.config import compose, validate

    with pytest.raises(ValueError) as err:          # a typo in an override (Hydra)
        compose(CONF, "tiny", ["metric.ridge_lamda=1e-2"])
    assert "unknown config key 'metric.ridge_lamda'" in str(err.value)
    assert "did you mean 'ridge_lambda'" in str(err.value)
    with pytest.raises(ValueError) as err:          # an unknown option of a config group
        compose(CONF, "tiny", ["metric=defualt"])
    assert "unknown option 'defualt' for config group 'metric'" in str(err.value)
    assert "did you mean 'default'" in str(err.value) and "conf/metric/defualt.yaml" in str(err.value)
    with pytest.raises(ValueError, match="unknown experiment 'tinyy'"):
        compose(CONF, "tinyy")
    # a key added with '+' or set in a file is caught by the schema, with a suggestion
    cfg = compose(CONF, "tiny", ["+metric.ridge_lamda=1e-2"])
    with pytest.raises(ValueError) as err:
        validate(cfg, SCHEMA)
    assert "metric.ridge_lamda: unknown key (did you mean 'ridge_lambda'?)" in str(err.value)
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nmetrc:\n  variant: signed\n")
    with pytest.raises(ValueError) as err:
        validate(compose(conf, "typo"), SCHEMA)
    assert "metrc: unknown key (did you mean 'metric'?)" in str(err.value)
    assert "conf/experiment/typo.yaml" in str(err.value)
    # a wrong value names the key and the allowed values
    with pytest.raises(ValueError, match=r"metric.variant: 'nonsense' is not one of"):
        validate(compose(CONF, "tiny", ["metric.variant=nonsense"]), SCHEMA)


@pytest.mark.slow
def test_config_typo_stops_the_workflow_before_any_job(tmp_path):
    res = run_workflow(tmp_path, "-n", "--config", "experiment=tiny",
                        "overrides=[stats.fdr_alpah=0.1]", timeout=120)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "unknown config key 'stats.fdr_alpah'" in out and "did you mean 'fdr_alpha'" in out
    assert not (tmp_path / "results").exists()


def _data_slice(cfg, task="math", seed=0):
    from qkov_pipeline.plan import data_slice

    return data_slice(cfg, task, seed)


def test_task_without_samples_or_file_names_the_task_and_the_key(tmp_path, bpe):
    from qkov_pipeline.stages.data import prepare_group

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    gone = tmp_path / "gone.jsonl"
    base = ["+task@tasks.mine=jsonl", "pairs=[[math,mine]]"]
    cases = {empty: r"tasks\.mine .*has no records",
             gone: r"tasks\.mine .*task file not found: .*gone\.jsonl"}
    for path, pattern in cases.items():
        gone.touch()
        cfg = tiny_cfg(*base, f"tasks.mine.kwargs.path={path}")
        gone.unlink()         # removed after the config check
        with pytest.raises(ValueError, match=pattern) as err:
            prepare_group(_data_slice(cfg, "mine"), bpe)
        assert "Fix tasks.mine" in str(err.value)
    # a file missing when the config is checked: refused before any job
    with pytest.raises(ValueError, match=r"tasks\.mine\.kwargs\.path: task file not found: "
                                         r".*missing\.jsonl"):
        tiny_cfg(*base, f"tasks.mine.kwargs.path={tmp_path / 'missing.jsonl'}")
    # fewer samples than the roles need: how many exist and how to get more
    cfg = tiny_cfg("tasks.math.kwargs.n=30")
    with pytest.raises(ValueError, match=r"tasks\.math .*records exist but the split needs 52.*"
                                         r"ask the source for more"):
        prepare_group(_data_slice(cfg), bpe)


@pytest.mark.slow
def test_missing_data_file_fails_the_run_without_partial_output(tmp_path):
    """End to end: the config check refuses the run before any job, naming the task and the
    path, and no data, store or result file exists afterwards."""
    res = run_workflow(tmp_path, "--cores", "2", "--config", "experiment=tiny",
                        'overrides=["+task@tasks.mine=jsonl","tasks.mine.kwargs.path=/no/such.jsonl",'
                        '"pairs=[[math,mine]]"]', timeout=300)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "tasks.mine" in out and "task file not found: /no/such.jsonl" in out
    results = tmp_path / "results"
    left = [f for f in files_under(results) if f.startswith(("_data", "_stores", "tiny/"))]
    assert left == [], left
    assert not list(results.rglob("config.prepare_data.yaml"))


def test_sequence_longer_than_the_model_allows(tmp_path):
    from qkov_pipeline.stages import data as stage

    cfg = tiny_cfg("data.max_length=512")     # the tiny LLaMA allows 256 positions
    out = tmp_path / "_data" / "math-x"
    job = FakeJob(_data_slice(cfg), {}, {"manifest": str(out / "manifest.json")})
    with pytest.raises(ValueError) as err:
        stage.run(job)
    msg = str(err.value)
    assert "data.max_length=512" in msg and "max_position_embeddings" in msg
    assert "set data.max_length <= 256" in msg
    assert not out.exists()


def test_nan_or_inf_names_the_sample_and_the_layer(llama_model):
    from interference.gradients import FisherCollector, NonFiniteGradientError
    from interference.gradients.objectives import CausalLMObjective
    from conftest import padded_batch

    batch = padded_batch(3, 10, 0, "math:s")
    # a gradient that is NaN while the loss is finite: d sqrt|w| / dw at w = 0, times 0
    model = llama_model
    w = dict(model.named_parameters())["model.layers.1.self_attn.q_proj.weight"]
    with torch.no_grad():
        w[0, 0] = 0.0

    class Poisoned(CausalLMObjective):
        def loss(self, model, sample):
            q = dict(model.named_parameters())["model.layers.1.self_attn.q_proj.weight"]
            return super().loss(model, sample) + 0.0 * q[0, 0].abs().sqrt()

    fc = FisherCollector(enable_cross_task_analysis=True, objective=Poisoned(), engine="loop")
    with pytest.raises(NonFiniteGradientError, match=r"sample 'math:s:0': non-finite gradient "
                                                     r"at layer 1 block Q"):
        fc.collect_fisher(model, batch, task="math", role="scored")
    # a non-finite loss: the sample and the weights (with their layer) that hold NaN
    with torch.no_grad():
        dict(model.named_parameters())["model.layers.0.self_attn.k_proj.weight"][1, 2] = float("nan")
    fc = FisherCollector(enable_cross_task_analysis=True, engine="loop")
    with pytest.raises(NonFiniteGradientError, match=r"sample 'math:s:0': loss is nan; non-finite "
                                                     r"weights in \['model\.layers\.0\.self_attn"
                                                     r"\.k_proj\.weight'\]"):
        fc.collect_fisher(model, batch, task="math", role="scored")


def test_a_collector_that_cannot_keep_what_a_role_asks_refuses_before_any_pass(llama_model,
                                                                                monkeypatch):
    """role='scored' without enable_cross_task_analysis ran every sample's forward and
    backward and kept nothing; store_device='cuda' without CUDA failed with torch's
    AssertionError after the first micro-batch. Both now refuse before any pass."""
    from interference.gradients import FisherCollector, PerSampleGradients
    from conftest import padded_batch

    passes = []
    monkeypatch.setattr(PerSampleGradients, "_micro_batches",
                        lambda self, *a, **k: passes.append(1) or iter(()))
    batch = padded_batch(3, 10, 0, "math:s")
    for role in ("scored", "reference", "control"):
        with pytest.raises(ValueError, match=rf"role='{role}' keeps per-sample gradients.*"
                                             r"enable_cross_task_analysis=True"):
            FisherCollector().collect_fisher(llama_model, batch, task="math", role=role)
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1"):
            with pytest.raises(RuntimeError, match=rf"store_device={device} but no CUDA device "
                                                   r"is visible; use auto or cpu"):
                FisherCollector(enable_cross_task_analysis=True, store_device=device) \
                    .collect_fisher(llama_model, batch, task="math", role="scored")
    assert passes == []


def test_task_a_equal_to_task_b_is_decided_by_sample_ids_and_texts(bpe):
    from qkov_pipeline.config import compose, validate
    from qkov_pipeline.stages.data import prepare_group

    with pytest.raises(ValueError, match=r"task A equals task B; the negative control"):
        tiny_cfg("pairs=[[math,math]]")
    # another name for the same source and kwargs: refused before anything runs
    cfg = compose(CONF, "tiny", ["+task@tasks.math2=math", "tasks.math2.kwargs.n=160",
                                 "pairs=[[math,math2]]"])
    with pytest.raises(ValueError, match=r"tasks 'math' and 'math2' have the same source and kwargs"):
        validate(cfg, SCHEMA)
    # kwargs that differ but yield overlapping samples (math is prefix-stable in n): the data
    # stage compares ids AND texts of the samples
    cfg = tiny_cfg("+task@tasks.math2=math", "tasks.math2.kwargs.n=170", "pairs=[[math,math2]]")
    with pytest.raises(ValueError, match=r"tasks 'math' and 'math2' share \d+ of \d+ samples "
                                         r"\(same dataset id and text"):
        prepare_group(_data_slice(cfg), bpe)
    # another generation seed: the same ids ("math:packed:000000-000001"), other texts: allowed
    cfg = tiny_cfg("+task@tasks.math2=math", "tasks.math2.kwargs.seed=1", "pairs=[[math,math2]]")
    out = prepare_group(_data_slice(cfg), bpe)
    ids = {t: {i for recs in r.values() for i in (x["id"] for x in recs)} for t, (_, r, _) in out.items()}
    assert ids["math"] & ids["math2"]


@pytest.mark.slow
def test_scores_stage_refuses_a_or_b_samples_shared_but_allows_the_control(sweep_run):
    """At scoring time (always, also without length matching): B's disruptors and the
    reference disruptors must not be task-A samples; A' (the control split) is not."""
    from interference.gradients import FisherCollector
    from interference.scores.arms import check_disjoint_tasks
    from qkov_pipeline.stages.scores import store_contents, store_metas

    dirs = [d for d in sorted((sweep_run["results"] / "_stores").glob("*/grads"))
            if json.loads((d / "index.json").read_text())["meta"]["data"]["split_seed"] == 0]
    metas = store_contents(store_metas(dirs))
    fc = FisherCollector.from_saved(dirs)
    ref = fc.sample_ids("math", "reference")
    check_disjoint_tasks(fc, metas, "math", "code", fc.sample_ids("code", "scored"), "math", ref)
    check_disjoint_tasks(fc, metas, "math", "math", fc.sample_ids("math", "control"), "math", ref)
    with pytest.raises(ValueError, match=r"are also samples of task A \('math'\) with the same "
                                         r"text: task A equals task B"):
        check_disjoint_tasks(fc, metas, "math", "math", fc.sample_ids("math", "scored"), "math", ref)
    # task B under another name holding A's samples (ids and texts equal)
    fake = {"math": metas["math"], "math2": metas["math"]}
    with pytest.raises(ValueError, match="task A equals task B"):
        check_disjoint_tasks(fc, fake, "math", "math2", fc.sample_ids("math", "scored"), "math", ref)


def test_too_few_permutations_warn_with_the_smallest_reachable_p():
    from interference.stats import QKOVStatistics
    from interference.stats.statistics import PermutationResolutionWarning
    from qkov_pipeline.stages.summary import markdown

    rng = np.random.default_rng(0)
    layers, heads, kv = [0, 1], [0, 1, 2, 3], [0, 0, 1, 1]

    def scores(n_b):   # K/V columns repeat over the query heads of a GQA group
        return {b: (np.repeat(rng.random((5, n_b, 2, 2)), 2, axis=3) if b in "KV"
                    else rng.random((5, n_b, 2, 4))) for b in "QKVO"}
    sb, sr = scores(6), scores(6)
    with pytest.warns(PermutationResolutionWarning) as rec:
        res = QKOVStatistics(n_permutations=99, n_bootstrap=0).test_scores(sb, sr, layers, heads, kv)
    msg = str(rec[0].message)
    assert "99 permutations for 24 distinct cells: the smallest reachable p-value is 0.01" in msg
    assert "cannot reject fewer than" in msg and "use n_permutations >= 10000" in msg
    assert res["summary"]["warnings"] == [msg]
    # the run summary repeats it
    doc = {"schema_version": "1.1", "experiment": "x", "config_hash": "h", "control": {},
           "tasks": {}, "analyses": {"a__b": {"arm": "main", "seeds": {0: dict(
               res["summary"], block_means={b: 0.0 for b in "QKVO"},
               **{"global": {"ratio": 1.0, "p_value": 0.5}})}}}}
    assert "smallest reachable p-value is 0.01" in markdown(doc).split("## Warnings")[1]


def test_a_store_from_another_model_or_config_is_refused(tmp_path, gpt2_model, llama_model):
    from conftest import padded_batch
    from interference.gradients import FisherCollector

    dirs = []
    for name, model in (("math", gpt2_model), ("code", llama_model)):
        fc = FisherCollector(enable_cross_task_analysis=True, engine="loop")
        fc.collect_fisher(model, padded_batch(3, 8, 0, f"{name}:f"), task=name, role="fisher")
        fc.collect_fisher(model, padded_batch(2, 8, 1, f"{name}:s"), task=name, role="scored")
        fc.save_task(name, tmp_path / name)
        dirs.append(tmp_path / name)
    with pytest.raises(ValueError, match="was collected with another model or config than"):
        FisherCollector.from_saved(dirs)


@pytest.mark.slow
def test_the_workflow_detects_a_stale_store(sweep_run, tmp_path):
    """A store whose recorded config hash is not the one the analysis needs (copied from
    another run, model or version) is refused before scoring, naming it and the fix."""
    from qkov_pipeline.plan import scores_slice
    from qkov_pipeline.stages.scores import check_stores, store_metas

    cfg = sweep_run["plan"].experiments["tiny"]
    s = scores_slice(cfg, "math", "code", 0, "main")
    plan = sweep_run["plan"]
    dirs = [sweep_run["results"] / "_stores" / k / "grads"
            for k in plan.analysis_stores("tiny", "tiny", "math__code", 0).values()]
    check_stores(s, store_metas(dirs))   # the right stores pass
    stale = tmp_path / "code" / "grads"
    shutil.copytree(dirs[1], stale)
    index = json.loads((stale / "index.json").read_text())
    index["meta"]["store_slice_hash"] = "0123456789ab"
    (stale / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"gradient store .*code/grads is stale: it was collected "
                                         r"for config hash '0123456789ab' but this analysis needs"
                                         r".*--forcerun collect"):
        check_stores(s, store_metas([dirs[0], stale]))
    # a store of another split seed is stale for this analysis too
    other = [sweep_run["results"] / "_stores" / k / "grads"
             for k in plan.analysis_stores("tiny", "tiny", "math__code", 1).values()]
    with pytest.raises(ValueError, match="is stale"):
        check_stores(s, store_metas(other))


def test_disk_check_refuses_with_the_size_it_needs(tmp_path):
    from interference.gradients.collect import check_disk, disk_plan

    plan = disk_plan(n_params=10**9, n_stored=10**4, store_dtype="float32")
    with pytest.raises(RuntimeError, match=r"not enough disk for the gradient store .* it needs "
                                           r"up to 36\.4 TB .*store_dtype=bfloat16"):
        check_disk(tmp_path, plan, 0.9)
    check_disk(tmp_path, disk_plan(10, 10, "float32"), 0.9)


# ----------------------------------------------------------------------------- crashes

IGNORED = ("logs/", "benchmarks/", "mlflow.db", "mlartifacts/", ".qkov/")   # .qkov: run file
VOLATILE = ("store.json", "tracking.json")   # timings and run ids inside


def comparable(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every result file that must not change between two runs
    of one config: data, stores, scores, tables, stats, figures' data, resolved configs,
    PNGs. Excluded: logs, benchmarks, MLflow records and store, store.json / tracking.json
    (timings, run ids), PDFs (creation dates) and Snakemake's / the lock's hidden files.
    Safetensors files are compared byte for byte (fisher.safetensors keeps its metadata in
    one key, so the header order cannot vary between processes)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if (not p.is_file() or rel.startswith(IGNORED) or p.name.startswith(("mlflow.", "."))
                or p.name in VOLATILE or p.suffix == ".pdf"):
            continue
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_same_results(ref: Path, new: Path) -> int:
    a, b = comparable(ref), comparable(new)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:20]
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"{len(differ)} files differ, e.g. {differ[:10]}"
    return len(a)


def hidden_leftovers(root: Path) -> list[str]:
    """Temporary names (.name.xxx) that a finished run should not leave behind."""
    return [str(p.relative_to(root)) for p in root.rglob(".*")
            if p.name not in (".mlflow.lock", ".mlflow.db.init.lock", ".snakemake_timestamp",
                              ".qkov")]


def _descendants(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def run_and_kill(work: Path, args: list[str], trigger, timeout: float = 400):
    """Start Snakemake in its own process group; when trigger(proc) returns a target, kill
    -9 it ('group': Snakemake and every job, like a crash; an int: that job's process
    alone, like the kernel's OOM killer). Returns (what was killed, output)."""

    proc = subprocess.Popen(snakemake_cmd(work, *args), env=workflow_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed, t0 = None, time.time()
    while proc.poll() is None and killed is None and time.time() - t0 < timeout:
        target = trigger(proc)
        if target == "group":
            os.killpg(proc.pid, signal.SIGKILL)
            killed = target
        elif target is not None:
            os.kill(target, signal.SIGKILL)
            killed = target
        else:
            time.sleep(0.05)
    out, _ = proc.communicate(timeout=timeout)
    return killed, out


@pytest.mark.slow
def test_kill_9_during_collection_and_scoring_then_rerun_gives_identical_bytes(
        tiny_reference, tmp_path_factory):
    work = tmp_path_factory.mktemp("qkov-kill")
    results = work / "results"
    config = ["--config", "experiment=tiny"]

    seen = []

    def collecting(proc):   # a gradient job is collecting; its store is not saved
        for log in (results / "logs" / "collect").glob("*.log"):
            if re.search(r"g_i stored|Fisher only", log.read_text(errors="ignore")) and \
                    not (results / "_stores" / log.stem / "store.json").exists():
                seen.append(log.stem)
                return "group"
        return None

    killed, out = run_and_kill(work, ["--cores", "2", *config], collecting)
    assert killed == "group", "the gradient job was never seen running:\n" + out[-3000:]
    assert not (results / "_stores" / seen[0] / "store.json").exists()
    # the killed Snakemake left its lock: unlock (docs/reliability.md), then rerun; this time
    # kill -9 only the scoring job (chunk_scores, reading the stores) while it computes
    assert run_workflow(work, "--unlock", *config, timeout=120).returncode == 0

    def scoring(proc):
        for p in _descendants(proc.pid):
            with contextlib.suppress(Exception):
                if any(".chunk_scores.py" in part for part in p.cmdline()):
                    return p.pid
        return None

    killed, out = run_and_kill(work, ["--cores", "2", "--rerun-incomplete", *config], scoring)
    assert isinstance(killed, int), "no scoring job was seen running:\n" + out[-3000:]
    assert "Error in rule chunk_scores" in out, out[-3000:]
    res = run_workflow(work, "--cores", "2", "--rerun-incomplete", *config, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    n = assert_same_results(tiny_reference["results"], results)
    assert n > 60
    assert hidden_leftovers(results) == []
    # and the uninterrupted run left nothing behind either
    assert hidden_leftovers(tiny_reference["results"]) == []


def test_saved_scores_are_bitwise_reproducible(tmp_path, monkeypatch):
    """Equal arrays give equal bytes: scores.npz carries no clock and heatmap.json no
    per-process token (np.savez stamps the current time into the zip)."""
    from interference.results import load_heatmap, save_heatmap

    rng = np.random.default_rng(0)
    heat = {b: {"scores": rng.random((2, 3, 2, 4)), "layer_head_avg": rng.random((2, 4)),
                "top_conflicts": []} for b in "QKVO"}
    heat["meta"] = {"layers": [0, 1], "heads": [0, 1, 2, 3], "collector_token": os.urandom(8).hex(),
                    "compute": {"device": "cpu", "backend": "torch"}}
    save_heatmap(tmp_path / "a", heat)
    monkeypatch.setattr(time, "time", lambda: 1e9)   # another day
    heat["meta"]["collector_token"] = "another process"
    heat["meta"]["compute"] = {"device": "cuda:1", "backend": "triton"}   # how, not what
    save_heatmap(tmp_path / "b", heat)
    for name in ("scores.npz", "heatmap.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    loaded, _ = load_heatmap(tmp_path / "b")
    assert np.array_equal(loaded["Q"]["scores"], heat["Q"]["scores"])


# ----------------------------------------------------------------------------- concurrency

@pytest.mark.slow
def test_parallel_jobs_file_every_mlflow_run_once_under_the_right_parent(sweep_run):
    """Two experiments, two split seeds, 4 concurrent jobs on a fresh sqlite store: every
    job's record is logged exactly once, under its own experiment's parent run, with the
    rule and wildcards of the job that wrote it."""
    from mlflow.tracking import MlflowClient

    results = sweep_run["results"]
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    records = [json.loads(p.read_text()) | {"_path": str(p)} for p in results.rglob("mlflow.*.json")]
    records = [r for r in records if "record_id" in r]   # job records (not the sweep's ablation)
    counts = sweep_run["counts"]   # every job of these rules wrote one record
    rules = {r["rule"] for r in records}
    assert {"prepare_model", "prepare_data", "collect", "scores", "stats", "tables",
            "draw_figures", "summary"} <= rules, rules
    for rule in rules:
        assert sum(r["rule"] == rule for r in records) == counts[rule], (rule, counts)
    assert all(r["status"] == "logged" for r in records), [r["_path"] for r in records
                                                            if r["status"] != "logged"]
    by_id = {r["record_id"]: r for r in records}
    assert len(by_id) == len(records)
    for exp in ("tiny", "tiny_fisher_source_a"):
        mexp = client.get_experiment_by_name(f"qkov/{exp}")
        runs = client.search_runs([mexp.experiment_id], max_results=5000)
        parents = [r for r in runs if r.data.tags.get("qkov.kind") == "workflow"]
        children = [r for r in runs if r.data.tags.get("qkov.kind") == "job"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        mine = [r for r in records if r["experiment"] == exp]
        assert len(children) == len(mine) > 0
        for run in children:
            rec = by_id[run.data.tags["qkov.record_id"]]
            assert rec["experiment"] == exp and rec["mlflow"]["run_id"] == run.info.run_id
            assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            assert run.data.tags["qkov.rule"] == rec["rule"]
            assert run.data.tags["qkov.wildcards"] == rec["tags"]["qkov.wildcards"]
            assert run.info.status == "FINISHED"


# ----------------------------------------------------------------------------- safety

SCANNED = ("src", "scripts", "examples", "benchmarks", "workflow")


def _python_files():
    for top in SCANNED:
        yield from (p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_pickle_no_unsafe_loads_no_remote_code_in_the_code():
    """AST scan: no pickle/dill/joblib/cloudpickle/marshal import or pd.read_pickle;
    torch.load only with weights_only=True; np.load only with allow_pickle=False;
    from_pretrained never with trust_remote_code=True or use_safetensors=False; no Hydra
    instantiate."""
    bad = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle", "marshal",
                                           "shelve") for n in names):
                    bad.append(f"{where}: imports {names}")
                if any(n == "instantiate" or n.startswith("hydra.utils") for n in names):
                    bad.append(f"{where}: Hydra instantiate")
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if fn.endswith("torch.load") and kw.get("weights_only") != "True":
                    bad.append(f"{where}: torch.load without weights_only=True")
                if fn in ("np.load", "numpy.load") and kw.get("allow_pickle") != "False":
                    bad.append(f"{where}: np.load without allow_pickle=False")
                if fn.endswith(("read_pickle", "to_pickle")):
                    bad.append(f"{where}: {fn}")
                if kw.get("trust_remote_code") == "True" or kw.get("use_safetensors") == "False":
                    bad.append(f"{where}: {fn}({kw})")
    assert not bad, "\n".join(bad)
    conf_text = "\n".join(p.read_text() for p in CONF.rglob("*.yaml"))
    assert "_target_" not in conf_text


def test_remote_code_is_off_unless_the_config_turns_it_on(tmp_path):
    from interference.models import load_pretrained
    from qkov_pipeline.config import compose

    for f in sorted((CONF / "model").glob("*.yaml")):
        cfg = compose(CONF, None, [f"model={f.stem}"])
        assert cfg["model"]["trust_remote_code"] is False, f.name
    # a checkpoint that asks for its own code is refused, and its code never runs
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    (folder / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_pretrained(folder)
    assert not marker.exists()


def test_hydra_instantiation_keys_are_refused():
    with pytest.raises(ValueError, match=r"config keys \['model.overrides._target_'\]: Hydra "
                                         r"instantiation .* is refused"):
        tiny_cfg("+model.overrides._target_=os.system")


def test_mlflow_ui_binds_to_localhost_only(monkeypatch):
    from qkov_pipeline import cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    assert cli.main(["ui", "--results", "somewhere"]) == 0
    cmd = calls[0]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    docs = (ROOT / "docs" / "workflow.md").read_text() + (ROOT / "docs" / "reliability.md").read_text()
    assert re.search(r"mlflow ui .*--host 127\.0\.0\.1", docs)


def test_the_reliability_table_names_existing_tests():
    """docs/reliability.md: every test its table names exists."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", text))
    assert len(named) >= 15
    source = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    missing = sorted(n for n in named if f"def {n}(" not in source)
    assert not missing, missing


_HEAP_PROBE = r"""
import resource, sys, psutil, torch
if sys.argv[1] != "default":
    from qkov_pipeline.jobs import set_freed_memory
    assert set_freed_memory(sys.argv[1])
rss = lambda: psutil.Process().memory_info().rss / 2**20
big = torch.ones(9 * 2**18); del big      # one 9 MB free raises glibc's dynamic threshold
base = rss()
blocks, pins = [], []
for _ in range(60):
    blocks.append(torch.ones(9 * 2**18))  # 9 MB blocks, touched: 540 MB
    pins.append(torch.ones(1024))          # small ones kept: the heap's top cannot shrink
del blocks
held = round(rss() - base)
torch.ones(2**24)                          # a 64 MB block made, written and freed: then
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):                        # 10 times more
    torch.ones(2**24)
pages = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (2**26 / 4096)
print(held, round(pages, 1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_job_frames_heap_gives_freed_blocks_back_or_keeps_them_by_the_rules_setting():
    """Sixty freed 9 MB tensors stay resident under glibc's default (its mmap threshold
    rises after the first large free) and under 'keep', and go back to the system under
    'return' (jobs.set_freed_memory: blocks of 8 MB and more are mapped on their own). A
    64 MB block made ten times page-faults ten times over under glibc's default and
    'return' (mapped afresh each time), about once under 'keep' (reused)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    got = {}
    for how in ("default", "return", "keep"):
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, how], env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        got[how] = (int(out[0]), float(out[1]))       # (MB held, block-sized page faults)
    assert got["default"][0] > 400 and got["return"][0] < 50 and got["keep"][0] > 400, got
    # at most one round re-faults under 'keep' (seen on a loaded machine), all ten otherwise
    assert got["default"][1] > 8 and got["return"][1] > 8 and got["keep"][1] < 1.5, got
    with pytest.raises(ValueError, match="freed_memory"):
        from qkov_pipeline.jobs import set_freed_memory
        set_freed_memory("hold")
