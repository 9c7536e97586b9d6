"""One model over several devices (interference.placement): the plan, random weights that
do not depend on where modules are made, and a job holding several GPUs. The placed
model's Fisher, per-sample gradients and heatmaps equal the one-device results on a GPU
host (benchmarks/check_placement.py: a [cpu, cuda:0] placement; RESULTS.md)."""
from __future__ import annotations

import pytest
import torch
import yaml

from conftest import ROOT, padded_batch, tiny_gpt2, tiny_llama

GIB = 2**30


def _meta(name):
    from interference.models import DTYPES, random_config, random_model

    mcfg = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    return random_model(random_config(mcfg), 0, DTYPES[mcfg["dtype"]], "meta")


def test_llama2_70b_is_placed_over_two_80gb_gpus_in_whole_balanced_layers():
    """LLaMA-2-70B in bfloat16 (128.5 GiB) over two H100s (76.9 GiB free each): whole
    decoder layers, contiguous, the embeddings on the first card and the head on the last,
    each card within 90% of its free memory and the two within one layer of each other;
    the summary logged by the job gives each card's blocks and GiB; one card, or one H200
    (139.8 GiB), cannot hold it: refused with the sizes."""
    from interference.models import ModelDoesNotFitError
    from interference.placement import WEIGHT_SHARE, placement_summary, plan_placement

    model = _meta("llama2_70b")
    free = {"cuda:0": 76.9 * GIB, "cuda:1": 76.9 * GIB}
    placed = plan_placement(model, list(free), torch.bfloat16, free)
    layers = [placed[f"model.layers.{k}"] for k in range(80)]
    assert set(placed) == {"model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head",
                           *(f"model.layers.{k}" for k in range(80))}
    assert layers == sorted(layers) and set(layers) == set(free)         # contiguous, both
    assert placed["model.embed_tokens"] == "cuda:0" and placed["lm_head"] == "cuda:1"
    held = {d: sum(p.numel() * 2 for n, p in model.named_parameters()
                   if placed[next(b for b in placed if n.startswith(b + "."))] == d)
            for d in free}
    layer_bytes = sum(p.numel() * 2 for p in model.model.layers[0].parameters())
    assert all(held[d] <= WEIGHT_SHARE * free[d] for d in free)
    assert abs(held["cuda:0"] - held["cuda:1"]) <= 2 * layer_bytes, held
    model.hf_device_map = placed
    where = placement_summary(model)
    assert list(where) == ["cuda:0", "cuda:1"]
    assert where["cuda:0"]["blocks"][0] == "model.embed_tokens"
    assert where["cuda:1"]["blocks"][1] == "lm_head"
    assert sum(e["n_blocks"] for e in where.values()) == len(placed)
    assert [round(where[d]["gib"] * 2**30) for d in free] == [held[d] for d in free]
    with pytest.raises(ModelDoesNotFitError, match=r"68,976,648,192 parameters in bfloat16, "
                                                   r"128\.5 GiB\) do not fit 1 device"):
        plan_placement(model, ["cuda:0"], torch.bfloat16, {"cuda:0": 139.8 * GIB})
    with pytest.raises(ValueError, match="distinct"):
        plan_placement(model, ["cuda:0", "cuda:0"], torch.bfloat16, free)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_random_weights_come_from_each_modules_own_seed(family):
    """Each module's random weights come from (seed, its name): the first two layers of a
    4-layer model equal a 2-layer model's (GPT-2's residual projections: the same draws at
    its depth's scale), whatever else the model holds or where it is; a
    placement given as a device list of one device is the one-device model; another seed
    gives other weights."""
    from interference.models import random_model, tiny_config

    layers = {"llama": "num_hidden_layers", "gpt2": "n_layer"}[family]
    two = dict(random_model(tiny_config(family, **{layers: 2}), 5).named_parameters())
    four = random_model(tiny_config(family, **{layers: 4}), 5)
    listed = random_model(tiny_config(family, **{layers: 4}), 5, torch.float32, ["cpu"])
    other = dict(random_model(tiny_config(family, **{layers: 2}), 6).named_parameters())
    for name, p in four.named_parameters():
        if name in two and ".2." not in name and ".3." not in name:
            if family == "gpt2" and "c_proj" in name:   # the same draws, std / sqrt(2 n_layer)
                assert torch.allclose(p * 8**0.5, two[name] * 4**0.5, rtol=1e-6), name
            else:
                assert torch.equal(p, two[name]), name
    for (name, p), q in zip(four.named_parameters(), listed.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(two[next(n for n in two if "proj" in n or "attn" in n)],
                           other[next(n for n in two if "proj" in n or "attn" in n)])
    # modules of one shape have their own draws: layer 0's weights are not layer 1's
    first = next(n for n in two if ".0." in n and n.endswith("weight") and two[n].dim() == 2)
    assert not torch.equal(two[first], two[first.replace(".0.", ".1.", 1)])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_random_weights_follow_the_familys_initialisation(family):
    """Per-module random weights have the distribution of the family's own initialisation
    (transformers' construction): constants (norms, biases) equal, normal weights of the
    same scale (GPT-2's 1/sqrt(2 n_layer) residual projections included), buffers equal,
    tied weights still one tensor; a parameter the family's _init_weights leaves unset is
    an error naming it."""
    import transformers

    from interference.models import random_model, tiny_config
    from interference.placement import make_random_weights

    cfg = tiny_config(family, **({"n_embd": 128} if family == "gpt2" else
                                 {"hidden_size": 128, "head_dim": 32}))
    ours = random_model(cfg, 1)
    torch.manual_seed(1)
    theirs = transformers.AutoModelForCausalLM.from_config(cfg)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        if q.std() == 0:
            assert torch.equal(p, q), name
        else:
            p, q = p.detach(), q.detach()
            assert abs(float(p.std() / q.std()) - 1) < 0.1, name
            assert abs(float(p.mean())) < 4 * float(q.std()) / p.numel() ** 0.5, name
    for (name, b), (_, c) in zip(ours.named_buffers(), theirs.named_buffers()):
        assert torch.equal(b, c), name
    if family == "gpt2":
        assert ours.lm_head.weight is ours.transformer.wte.weight
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.extra = torch.nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match=r"left 1 parameter\(s\) unset, e.g. \['extra'\]"):
        make_random_weights(model, 0, {"": "cpu"})


def test_a_job_holds_as_many_gpus_as_its_gpu_resource(monkeypatch, tmp_path):
    """resources.collect.gpu = 2 on a host of 4 GPUs: a job takes two free ones by lock
    (its slot's first), a second job the other two; under SLURM, the first two visible;
    more than the host has is an error."""
    import torch.cuda

    from qkov_pipeline import jobs

    monkeypatch.setenv("QKOV_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda k: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda k: "card")
    first, second = [], []
    a, info = jobs.choose_devices(first, "cuda", 0, 2)
    b, _ = jobs.choose_devices(second, "cuda", 0, 2)
    assert a == ["cuda:0", "cuda:1"] and info["gpus"] == ["0", "1"]
    assert sorted(b) == ["cuda:2", "cuda:3"] and len(first) == len(second) == 2
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert jobs.choose_devices([], "cuda", 3, 2)[0] == ["cuda:0", "cuda:1"]
    with pytest.raises(RuntimeError, match="asks for 5 GPUs"):
        jobs.choose_devices([], "cuda", 0, 5)
    for fh in first + second:
        fh.close()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_a_placed_model_on_one_device_collects_as_before(make):
    """The cross-device steps (pieces of several layers brought to one device, the loss on
    the head's device) leave a one-device collection bit for bit as it was: the Fisher and
    heatmap of a model placed over ['cpu'] equal the plain model's exactly."""
    from interference.architectures import QKOVConfig
    from interference.gradients import FisherCollector
    from interference.placement import place, placement_summary
    from interference.scores import QKOVInterferenceMetric

    def run(model):
        fc = FisherCollector(enable_cross_task_analysis=True, engine="hooks",
                             config=QKOVConfig.from_model(model), micro_batch=4)
        for k, (task, role) in enumerate([("a", "fisher"), ("b", "fisher"), ("a", "scored"),
                                          ("b", "scored")]):
            fc.collect_fisher(model, padded_batch(6, 16, k, f"{task}:{role}"), task=task,
                              mode="mean", role=role)
        heat = QKOVInterferenceMetric(fc.config, fc, ridge_lambda=1e-6).compute_heatmap("a", "b")
        return fc.fisher.get("a"), heat

    f1, h1 = run(make())
    placed = place(make(), ["cpu"], free_bytes={"cpu": GIB})
    assert set(placed.hf_device_map.values()) == {"cpu"} and placement_summary(placed) is None
    f2, h2 = run(placed)
    assert torch.equal(f1, f2)
    for b in "QKVO":
        assert (h1[b]["scores"] == h2[b]["scores"]).all()


def test_a_checkpoint_is_read_block_by_block_where_the_placement_puts_it(monkeypatch, tmp_path):
    """A checkpoint for several devices: the placement is planned on the model of its config
    (meta device, nothing read) for those devices, and the weights are read with it as
    transformers' device_map; here every block's device is then the CPU (a host without
    GPUs), and the model equals the one-device read."""
    from interference import placement
    from interference.models import load_pretrained

    model = tiny_llama(n_layer=4)
    model.save_pretrained(tmp_path, safe_serialization=True)
    asked = {}
    real = placement.plan_placement

    def plan(shapes, devices, dtype, free_bytes=None):
        asked.update(devices=devices, meta={p.device.type for p in shapes.parameters()})
        placed = real(shapes, devices, dtype, {d: GIB for d in devices})
        asked["placed"] = dict(placed)
        return {k: "cpu" for k in placed}

    monkeypatch.setattr(placement, "plan_placement", plan)
    import transformers as T

    read = T.AutoModelForCausalLM.from_pretrained
    maps = []

    def spy(*a, **k):
        maps.append(k.get("device_map"))
        return read(*a, **k)

    monkeypatch.setattr(T.AutoModelForCausalLM, "from_pretrained", spy)
    got, _ = load_pretrained(tmp_path, device=["cuda:0", "cuda:1"])
    assert maps == [{k: "cpu" for k in asked["placed"]}]      # read with the placement
    want, _ = load_pretrained(tmp_path)
    assert asked["devices"] == ["cuda:0", "cuda:1"] and asked["meta"] == {"meta"}
    assert set(asked["placed"].values()) == {"cuda:0", "cuda:1"}
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_dry_plan_places_the_model_as_a_job_would(tmp_path, capsys):
    """qkov plan (qkov_pipeline.dry_plan) with resources.collect.gpu = 2: the model (random
    weights, or a local checkpoint's config: no weight read) placed over two cards as a job
    would place it, every layer planned, and the budget that of the card with the least
    memory left after its weights; the command prints it."""
    from qkov_pipeline import cli
    from qkov_pipeline import dry_plan as dp

    tiny_llama(n_layer=4).save_pretrained(tmp_path, safe_serialization=True)
    for over, n_layers in ((["model=tiny_random", "resources.collect.gpu=2"], 2),
                           (["model=tiny_random", "model.source=local", f"model.path={tmp_path}",
                             "resources.collect.gpu=2"], 4)):
        row = dp.dry_plan("tiny", over, 1.0)
        assert row["gpus_per_job"] == 2 and list(row["placement"]) == ["cuda:0", "cuda:1"]
        left = min((1.0 - dp.CUDA_CONTEXT_GIB - e["gib"]) * GIB
                   for e in row["placement"].values())
        assert row["budget_bytes"] == pytest.approx(0.8 * left)
        planned = [l for ch in row["chunks"] for p in ch["passes"] for l in p]
        assert planned == list(range(n_layers))
        capsys.readouterr()
        assert cli.main(["plan", "-e", "tiny", "--gpu-gib", "1.0",
                         *[x for o in over for x in ("-o", o)]]) == 0
        printed = capsys.readouterr().out
        assert "on 2 1.0 GiB GPUs per job" in printed and "cuda:1:" in printed
        for c, ch in enumerate(row["chunks"]):
            assert (f"chunk {c}: layers {ch['layers'][0]}-{ch['layers'][-1]} in "
                    f"{len(ch['passes'])} pass(es), micro-batch {ch['micro_batch']}, about "
                    f"{ch['estimate_s']:.0f} s") in printed


def test_qkov_config_and_plan_report_a_bad_experiment_or_override_in_one_line(capsys):
    """`qkov config` and `qkov plan` with an unknown experiment, an unknown key or a value
    the schema refuses: exit status 2 and one error line naming it, no traceback."""
    from qkov_pipeline import cli

    for argv, says in ((["config", "-e", "nosuch"], "unknown experiment 'nosuch'"),
                       (["plan", "-e", "tiny", "-o", "model.nosuch=1"],
                        "unknown config key 'model.nosuch'"),
                       (["config", "-o", "stats.fdr_alpha=2"], "stats.fdr_alpha: 2")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"qkov {argv[0]}: error: ") and says in err
        assert "Traceback" not in err
