"""The plan of a run: every job, its config slice, key and paths; the only module the
Snakefile and the rule files import.

From the composed and validated experiments (qkov_pipeline.config), :func:`build_plan` derives
every job the workflow runs, each with the SLICE of the config that determines its output
(its ``params.slice`` in the rules, so a config change reruns exactly the jobs whose slice
changed). Shared stages are stored under a hash of their slice:

- model   ``_models/<name>-<hash>``   : the model section;
- data    ``_data/<task>-<hash>``      : model + task + split seed + role sizes + tokens
                                        (+ the other tasks when lengths are matched);
- store   ``_stores/<task>-<hash>``    : data + fisher settings (gradients and Fisher);
- eval    ``_eval/<task>-<hash>``      : data + the validation's held-out sample count;

and the analyses under the experiment: ``<exp>/<model>/<a>__<b>[.control]/split<seed>/``
(scores: stores + metric; stats: + statistics; validation: + eval + validation), then
tables, figures and the summary. So a metric- or statistics-only ablation finds the same
store keys and reuses the stores. Also here: the shard plan of the collect jobs, the sweep
of an ablation summary, and the report() wrappers of the figure outputs.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interference._tables import ROLES

from .config import compose, validate

ROLE_ORDER = ROLES  # a store's samples, role by role in this order (collect units, shards)


# ----------------------------------------------------------------------------- keys and slices

SLICE_VERSION = 1  # bump when the meaning of a slice changes (forces new keys)


# rule -> its section of `resources` in conf/config.yaml
RESOURCE_SECTION = {"prepare_model": "prepare_model", "prepare_data": "prepare_data",
                    "prepare_eval": "prepare_data", "collect": "collect",
                    "chunk_scores": "collect", "scores": "scores",
                    "stats": "stats", "validate": "validate", "tables": "summary",
                    "draw_figures": "figures", "draw_validation": "figures",
                    "summary": "summary", "track": "summary"}


def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): the text slices are hashed and compared as."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in str(text))


def model_slice(cfg: dict) -> dict:
    return {"v": SLICE_VERSION, "model": copy.deepcopy(cfg["model"])}


def _roles_of(cfg: dict, task: str) -> dict[str, int]:
    """Role sizes task needs: fisher + scored always; reference when it is a task A (or the
    named reference task); control when it is a task A and the control is on."""
    d, c = cfg["data"], cfg["control"]
    is_a = any(a == task for a, _ in cfg["pairs"])
    ref = cfg["stats"]["reference"]
    needs_ref = (is_a and ref == "within_task") or ref == task
    return {"fisher": d["n_fisher"], "scored": d["n_scored"],
            "reference": d["n_reference"] if needs_ref else 0,
            "control": c["n_control"] if (is_a and c["enabled"]) else 0}


def pair_tasks(cfg: dict) -> list[str]:
    """Tasks that get data and gradients: those of the pairs and the reference task."""
    names = []
    for a, b in cfg["pairs"]:
        names += [a, b]
    ref = cfg["stats"]["reference"]
    if ref != "within_task":
        names.append(ref)
    return list(dict.fromkeys(names))


def _data_spec(spec: dict) -> dict:
    """What determines a task's samples: its source and kwargs (not packing or truncation)."""
    return {"source": spec["source"], "kwargs": spec["kwargs"]}


def _task_data(cfg: dict, task: str) -> dict:
    return {"task": task, "spec": copy.deepcopy(cfg["tasks"][task]),
            "roles": _roles_of(cfg, task)}


def data_slice(cfg: dict, task: str, seed: int) -> dict:
    d = cfg["data"]
    group = pairs = None
    if d["match_lengths"]:
        group = [_task_data(cfg, t) for t in pair_tasks(cfg)]
        pairs = _compared(cfg)
    return {"v": SLICE_VERSION, "model": model_slice(cfg)["model"],
            **_task_data(cfg, task), "split_seed": int(seed),
            "max_length": d["max_length"], "loss_tokens": d["loss_tokens"],
            "match_lengths": group, "compared": pairs}


def _compared(cfg: dict) -> list[list[str]]:
    """Task pairs whose samples must differ: each pair, and task A with a named reference."""
    ref = cfg["stats"]["reference"]
    out = [list(p) for p in cfg["pairs"]]
    if ref != "within_task":
        out += [[a, ref] for a, _ in cfg["pairs"] if a != ref]
    return out


def store_slice(cfg: dict, task: str, seed: int) -> dict:
    return {"v": SLICE_VERSION, "data": data_slice(cfg, task, seed),
            "fisher": copy.deepcopy(cfg["fisher"])}


def validated_tasks(cfg: dict) -> list[str]:
    """Tasks that need held-out eval samples: both tasks of every pair."""
    return list(dict.fromkeys(t for pair in cfg["pairs"] for t in pair))


def analyses(cfg: dict) -> list[dict]:
    """The analysis folders of an experiment: each pair A vs B (arm 'main') and, beside it,
    its negative control A vs A' (arm 'control', folder '<a>__<b>.control')."""
    out = []
    for a, b in cfg["pairs"]:
        out.append({"pair": f"{a}__{b}", "a": a, "b": b, "arm": "main"})
        if cfg["control"]["enabled"]:
            out.append({"pair": f"{a}__{b}.control", "a": a, "b": b, "arm": "control"})
    return out


def scores_slice(cfg: dict, a: str, b: str, seed: int, arm: str) -> dict:
    ref = cfg["stats"]["reference"]
    stores = {t: store_slice(cfg, t, seed) for t in dict.fromkeys(
        [a, b] + ([] if ref == "within_task" else [ref]))}
    return {"v": SLICE_VERSION, "task_a": a, "task_b": b, "arm": arm, "reference": ref,
            "stores": stores, "metric": copy.deepcopy(cfg["metric"])}


def layer_chunks(cfg: dict) -> int:
    """resources.collect.layer_chunks: the chunk_scores jobs per pair and split seed (K > 1
    collect and score their layers without stores, :func:`without_stores`)."""
    return int(cfg["resources"]["collect"].get("layer_chunks", 1) or 1)


def loads_prepared(mcfg: dict) -> bool:
    """Whether a chunk job loads what prepare_model wrote (a converted or copied checkpoint):
    every model source but ``random``, whose weights each job makes on its own device from
    ``model.seed`` and whose config it builds from the model config
    (interference.models.load_prepared). Such chunk jobs start without waiting for
    prepare_model (the 7B shape's layout proof: 7-8 s on B2's critical path); the scores
    job that joins their chunks waits for it instead."""
    return mcfg["source"] != "random"


def without_stores(cfg: dict) -> bool:
    """True when the chunk_scores jobs collect and score their own layers and no gradient
    store is written: resources.collect.gradient_stores false, or auto with layer_chunks
    K > 1. Else (the default) collect writes the stores and one chunk_scores job per pair
    and split seed scores every layer from them."""
    stores = cfg["resources"]["collect"].get("gradient_stores", "auto")
    return stores is False or (stores == "auto" and layer_chunks(cfg) > 1)


def resource_section(rule: str, cfg: dict) -> str:
    """The section of ``resources`` that sizes ``rule``'s jobs: chunk_scores is a scoring job
    (resources.scores) when it reads the stores, a collection job (resources.collect) when
    it collects its layers (layer chunks)."""
    if rule == "chunk_scores" and not without_stores(cfg):
        return "scores"
    return RESOURCE_SECTION[rule]


def chunk_slice(cfg: dict, a: str, b: str, seed: int) -> dict:
    """What one chunk_scores job of pair A vs B computes: both arms' scores (main and, when
    on, the control) and the reference scores, from the stores' data and Fisher settings,
    for chunk c of K (K = 1: every layer, read from the stores)."""
    arms = ["main"] + (["control"] if cfg["control"]["enabled"] else [])
    main = scores_slice(cfg, a, b, seed, "main")
    return {"v": SLICE_VERSION, "task_a": a, "task_b": b, "arms": arms,
            "reference": main["reference"], "stores": main["stores"], "metric": main["metric"],
            "layer_chunks": layer_chunks(cfg)}


def stats_slice(cfg: dict, a: str, b: str, seed: int, arm: str) -> dict:
    return {"v": SLICE_VERSION, "scores": scores_slice(cfg, a, b, seed, arm),
            "stats": copy.deepcopy(cfg["stats"])}


def tables_slice(cfg: dict, a: str, b: str, arm: str) -> dict:
    seeds = list(cfg["data"]["split_seeds"])
    return {"v": SLICE_VERSION, "split_seeds": seeds, "primary_split_seed": seeds[0],
            "stats": {str(s): stats_slice(cfg, a, b, s, arm) for s in seeds}}


def figures_slice(cfg: dict, a: str, b: str, arm: str) -> dict:
    return {"v": SLICE_VERSION, "tables": tables_slice(cfg, a, b, arm),
            "figures": copy.deepcopy(cfg["figures"])}


def eval_slice(cfg: dict, task: str, seed: int) -> dict:
    """The held-out ``eval`` samples of a task (validation): drawn after every other role of
    the same split, so they are disjoint from all of them and the other roles (and the
    stores) stay exactly those of the run without validation."""
    return {"v": SLICE_VERSION, "data": data_slice(cfg, task, seed),
            "n_eval": cfg["validation"]["n_eval"]}


def validation_slice(cfg: dict, a: str, b: str, seed: int) -> dict:
    settings = {k: v for k, v in cfg["validation"].items() if k not in ("enabled", "n_eval")}
    return {"v": SLICE_VERSION, "stats": stats_slice(cfg, a, b, seed, "main"),
            "eval": {t: eval_slice(cfg, t, seed) for t in (a, b)},
            "validation": copy.deepcopy(settings)}


def validation_figures_slice(cfg: dict, a: str, b: str) -> dict:
    seeds = list(cfg["data"]["split_seeds"])
    return {"v": SLICE_VERSION, "validation": validation_slice(cfg, a, b, seeds[0]),
            "figures": copy.deepcopy(cfg["figures"])}


def summary_slice(cfg: dict) -> dict:
    return {"v": SLICE_VERSION, "experiment": cfg["experiment"],
            "analyses": {x["pair"]: figures_slice(cfg, x["a"], x["b"], x["arm"])
                         for x in analyses(cfg)}}


@dataclass
class Plan:
    """Every job of one or more experiments, keyed as the Snakefile's wildcards are.

    models / data / stores / evals: key -> {'slice', 'hash', ...};
    analyses[(exp, model, pair)]: {'cfg', 'a', 'b', 'arm', 'seeds'}; experiments[name]: the
    composed config.
    """

    results: str
    experiments: dict[str, dict] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)
    data: dict[str, dict] = field(default_factory=dict)
    stores: dict[str, dict] = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)
    analyses: dict[tuple[str, str, str], dict] = field(default_factory=dict)

    def add(self, cfg: dict) -> None:
        exp = cfg["experiment"]
        if exp in self.experiments:
            raise ValueError(f"experiment {exp!r} given twice")
        self.experiments[exp] = cfg
        mslice = model_slice(cfg)
        mkey = self.model_key(cfg)
        self.models.setdefault(mkey, {"slice": mslice, "hash": digest(mslice), "owner": exp})
        for seed in cfg["data"]["split_seeds"]:
            for task in pair_tasks(cfg):
                dslice = data_slice(cfg, task, seed)
                self.data.setdefault(self.data_key(cfg, task, seed), {
                    "slice": dslice, "hash": digest(dslice), "task": task,
                    "model_key": mkey, "seed": seed, "owner": exp})
                sslice = store_slice(cfg, task, seed)
                self.stores.setdefault(self.store_key(cfg, task, seed), {
                    "slice": sslice, "hash": digest(sslice), "task": task, "model_key": mkey,
                    "data_key": self.data_key(cfg, task, seed), "seed": seed, "owner": exp})
                if cfg["validation"]["enabled"] and task in validated_tasks(cfg):
                    eslice = eval_slice(cfg, task, seed)
                    self.evals.setdefault(self.eval_key(cfg, task, seed), {
                        "slice": eslice, "hash": digest(eslice), "task": task,
                        "model_key": mkey, "data_key": self.data_key(cfg, task, seed),
                        "seed": seed, "owner": exp})
        for x in analyses(cfg):
            self.analyses[(exp, cfg["model"]["name"], x["pair"])] = dict(
                x, cfg=cfg, seeds=list(cfg["data"]["split_seeds"]), model_key=mkey)

    # -- keys ------------------------------------------------------------------------
    @staticmethod
    def model_key(cfg: dict) -> str:
        return f"{safe_name(cfg['model']['name'])}-{digest(model_slice(cfg))}"

    @staticmethod
    def data_key(cfg: dict, task: str, seed: int) -> str:
        return f"{task}-{digest(data_slice(cfg, task, seed))}"

    @staticmethod
    def store_key(cfg: dict, task: str, seed: int) -> str:
        return f"{task}-{digest(store_slice(cfg, task, seed))}"

    @staticmethod
    def eval_key(cfg: dict, task: str, seed: int) -> str:
        return f"{task}-{digest(eval_slice(cfg, task, seed))}"

    def validated(self, exp: str | None = None) -> list[tuple[str, str, str]]:
        """(exp, model, pair) of every main analysis whose validation is on."""
        return [k for k, x in self.analyses.items() if x["arm"] == "main"
                and x["cfg"]["validation"]["enabled"] and (exp is None or k[0] == exp)]

    def validation_inputs(self, wc) -> dict[str, list[str]]:
        """The validate job's inputs: model, B's data, both tasks' eval samples and stores,
        and the map's cells.csv."""
        x = self.analysis(wc.exp, wc.model, wc.pair)
        cfg, seed, r = x["cfg"], int(wc.seed), self.results
        stores = self.analysis_stores(wc.exp, wc.model, wc.pair, seed)
        return {"model": [f"{r}/_models/{x['model_key']}/model.json"],
                "train": [f"{r}/_data/{self.data_key(cfg, x['b'], seed)}/manifest.json"],
                "eval": [f"{r}/_eval/{self.eval_key(cfg, t, seed)}/manifest.json"
                         for t in (x["a"], x["b"])],
                "grads": [f"{r}/_stores/{k}/grads" for k in stores.values()],
                "stores": [f"{r}/_stores/{k}/store.json" for k in stores.values()],
                "cells": [f"{self.analysis_dir(wc.exp, wc.model, wc.pair)}/split{seed}/cells.csv"]}

    def validation_files(self, exp: str, name: str, figures: bool = False) -> list[str]:
        """<analysis>/split<seed>/validation/<name> (figures: <analysis>/figures/<name>) of
        every validated analysis of ``exp``."""
        out = []
        for (e, model, pair) in self.validated(exp):
            base = self.analysis_dir(e, model, pair)
            seeds = self.analyses[(e, model, pair)]["seeds"]
            out += ([f"{base}/figures/{name}"] if figures else
                    [f"{base}/split{s}/validation/{name}" for s in seeds])
        return out

    def analysis(self, exp: str, model: str, pair: str) -> dict:
        try:
            return self.analyses[(exp, model, pair)]
        except KeyError:
            raise ValueError(f"no analysis {pair!r} of model {model!r} in experiment {exp!r}; "
                             f"planned: {sorted(self.analyses)}") from None

    def analysis_stores(self, exp: str, model: str, pair: str, seed: int) -> dict[str, str]:
        """task -> store key, for the tasks one analysis's scores read."""
        x = self.analysis(exp, model, pair)
        cfg = x["cfg"]
        ref = cfg["stats"]["reference"]
        tasks = dict.fromkeys([x["a"], x["b"]] + ([] if ref == "within_task" else [ref]))
        return {t: self.store_key(cfg, t, int(seed)) for t in tasks}

    def analysis_data(self, exp: str, model: str, pair: str, seed: int) -> dict[str, str]:
        """task -> data key (texts of the samples, for the forensics table)."""
        x = self.analysis(exp, model, pair)
        return {t: self.data_key(x["cfg"], t, int(seed)) for t in dict.fromkeys([x["a"], x["b"]])}

    def experiment_jobs(self, exp: str) -> dict[str, list[str]]:
        """Keys of the shared jobs (model, data, stores) one experiment needs."""
        cfg = self.experiments[exp]
        seeds = cfg["data"]["split_seeds"]
        tasks = pair_tasks(cfg)
        return {"models": [self.model_key(cfg)],
                "data": [self.data_key(cfg, t, s) for s in seeds for t in tasks],
                "stores": [] if without_stores(cfg) else
                [self.store_key(cfg, t, s) for s in seeds for t in tasks]}

    @property
    def model_priority(self) -> int:
        """Snakemake priority of prepare_model: 1 where a job that reads the data also reads
        the prepared model (collect; chunk jobs of a converted checkpoint), so on few cores
        the model converts beside the first data job instead of after all of them (the
        default run on 2 cores: two 12 s data jobs, then the 16 s conversion, before
        collection could start); 0 where only the scores job that joins the chunks waits
        for it (random weights, made in each chunk job: the data come first)."""
        return int(any(self.experiment_jobs(exp)["stores"] or loads_prepared(cfg["model"])
                       for exp, cfg in self.experiments.items()))

    # -- chunk_scores jobs: both arms of a pair, per layer chunk ------------------------
    def chunk_dirs(self, exp: str, model: str, pair: str, seed) -> list[str]:
        """``<main analysis>/split<seed>/chunks/<c>`` of every chunk of the analysis ``pair``
        (main or control; both read the main pair's chunks): K layer chunks, or one chunk
        of every layer scored from the stores (layer_chunks = 1)."""
        base = pair.removesuffix(".control")
        cfg = self.analysis(exp, model, pair)["cfg"]
        k = layer_chunks(cfg) if without_stores(cfg) else 1
        return [f"{self.analysis_dir(exp, model, base)}/split{seed}/chunks/{c}"
                for c in range(k)]

    def scores_inputs(self, wc) -> dict[str, list[str]]:
        """The scores job's inputs: the pair's chunk folders, which it joins, and without
        stores the model's model.json: its layout proof and tokenizer digest gate the
        joined scores even where the chunk jobs did not wait for it (:func:`loads_prepared`)."""
        x = self.analysis(wc.exp, wc.model, wc.pair)
        chunks = {"chunks": self.chunk_dirs(wc.exp, wc.model, wc.pair, wc.seed)}
        if not without_stores(x["cfg"]):
            return chunks
        return chunks | {"model": [f"{self.results}/_models/{x['model_key']}/model.json"]}

    def chunk_inputs(self, wc) -> dict[str, list[str]]:
        """A chunk job's inputs: the stores' ``grads`` and ``store.json`` of the pair's tasks
        (A, B and the reference task), or without stores their data and the prepared model
        (not for random weights, which the job makes itself: :func:`loads_prepared`)."""
        x = self.analysis(wc.exp, wc.model, wc.pair)
        r, cfg = self.results, x["cfg"]
        tasks = self.analysis_stores(wc.exp, wc.model, wc.pair, wc.seed)
        if not without_stores(cfg):
            return {"grads": [f"{r}/_stores/{k}/grads" for k in tasks.values()],
                    "manifests": [f"{r}/_stores/{k}/store.json" for k in tasks.values()]}
        data = {"data": [f"{r}/_data/{self.data_key(cfg, t, int(wc.seed))}/manifest.json"
                         for t in tasks]}
        if not loads_prepared(cfg["model"]):
            return data
        return {"model": [f"{r}/_models/{x['model_key']}/model.json"]} | data

    # -- what the rules ask ------------------------------------------------------------
    def owner(self, wc) -> str:
        """The experiment a job belongs to (shared jobs: the first that planned them)."""
        if "exp" in wc.keys():
            return wc.exp
        for table in (self.models, self.data, self.stores, self.evals):
            if wc.key in table:
                return table[wc.key]["owner"]
        raise ValueError(f"unknown key {wc.key!r}: not planned by any experiment")

    def resource(self, rule: str, wc, name: str, default=None):
        """resources.<rule>.<name> of the job's experiment (threads, mem_mb, runtime, gpu)."""
        cfg = self.experiments[self.owner(wc)]
        res = cfg["resources"][resource_section(rule, cfg)]
        return res.get(name, default)

    def params(self, rule: str, wc) -> str:
        """The rule's resolved config slice as canonical JSON (its ``params.slice``)."""
        if rule == "prepare_model":
            return canonical(self.models[wc.key]["slice"])
        if rule == "prepare_data":
            return canonical(self.data[wc.key]["slice"])
        if rule == "prepare_eval":
            return canonical(self.evals[wc.key]["slice"])
        if rule == "collect":
            return canonical(self.stores[wc.key]["slice"])
        if rule == "summary":
            return canonical(summary_slice(self.experiments[wc.exp]))
        if rule == "track":   # the parent run's params: the composed config
            return canonical({k: v for k, v in self.experiments[wc.exp].items()
                              if k != "resources"})
        x = self.analysis(wc.exp, wc.model, wc.pair)
        cfg, a, b, arm = x["cfg"], x["a"], x["b"], x["arm"]
        if rule == "scores":
            return canonical(scores_slice(cfg, a, b, int(wc.seed), arm))
        if rule == "chunk_scores":
            return canonical(chunk_slice(cfg, a, b, int(wc.seed)))
        if rule == "stats":
            return canonical(stats_slice(cfg, a, b, int(wc.seed), arm))
        if rule == "tables":
            return canonical(tables_slice(cfg, a, b, arm))
        if rule == "draw_figures":
            return canonical(figures_slice(cfg, a, b, arm))
        if rule == "validate":
            return canonical(validation_slice(cfg, a, b, int(wc.seed)))
        if rule == "draw_validation":
            return canonical(validation_figures_slice(cfg, a, b))
        raise ValueError(f"no config slice for rule {rule!r}")

    def analysis_dir(self, exp: str, model: str, pair: str) -> str:
        return f"{self.results}/{exp}/{model}/{pair}"

    def seed_files(self, wc, name: str) -> list[str]:
        """<analysis>/split<seed>/<name> for every split seed of the analysis."""
        x = self.analysis(wc.exp, wc.model, wc.pair)
        return [f"{self.analysis_dir(wc.exp, wc.model, wc.pair)}/split{s}/{name}" for s in x["seeds"]]

    def control_cells(self, wc) -> list[str]:
        """The negative control's cells.csv beside a main analysis (none for a control)."""
        ctrl = f"{wc.pair}.control"
        return ([f"{self.results}/{wc.exp}/{wc.model}/{ctrl}/cells.csv"]
                if (wc.exp, wc.model, ctrl) in self.analyses else [])

    def validation_cells(self, wc) -> list[str]:
        """The primary split seed's validation_cells.csv where the analysis is validated."""
        if (wc.exp, wc.model, wc.pair) not in self.validated(wc.exp):
            return []
        return self.seed_files(wc, "validation/validation_cells.csv")[:1]

    def experiment_files(self, exp: str, name: str, per_seed: bool = False) -> list[str]:
        out = []
        for (e, model, pair), x in self.analyses.items():
            if e != exp:
                continue
            base = self.analysis_dir(e, model, pair)
            out += ([f"{base}/split{s}/{name}" for s in x["seeds"]] if per_seed
                    else [f"{base}/{name}"])
        return out

    def records(self, exp: str) -> list[str]:
        """Every tracking record of one experiment's jobs (the track rule's inputs)."""
        jobs = self.experiment_jobs(exp)
        out = [f"{self.results}/_models/{k}/mlflow.prepare_model.json" for k in jobs["models"]]
        out += [f"{self.results}/_data/{k}/mlflow.prepare_data.json" for k in jobs["data"]]
        out += [f"{self.results}/_stores/{k}/mlflow.collect.json" for k in jobs["stores"]]
        out += self.experiment_files(exp, "mlflow.scores.json", per_seed=True)
        out += self.experiment_files(exp, "mlflow.stats.json", per_seed=True)
        out += self.experiment_files(exp, "mlflow.tables.json")
        out += self.experiment_files(exp, "figures/mlflow.draw_figures.json")
        if self.validated(exp):
            cfg = self.experiments[exp]
            out += [f"{self.results}/_eval/{self.eval_key(cfg, t, s)}/mlflow.prepare_eval.json"
                    for s in cfg["data"]["split_seeds"] for t in validated_tasks(cfg)]
            out += self.validation_files(exp, "mlflow.validate.json")
            out += self.validation_files(exp, "mlflow.draw_validation.json", figures=True)
        out.append(f"{self.results}/{exp}/mlflow.summary.json")
        return list(dict.fromkeys(out))

    def targets(self) -> list[str]:
        """What ``rule all`` asks for: each experiment's summary and tracking sync."""
        return [f"{self.results}/{exp}/{f}" for exp in self.experiments
                for f in ("summary.md", "tracking.json")]

    def temp_stores(self) -> bool:
        return any(cfg["workflow"]["temp_stores"] for cfg in self.experiments.values())

    # -- what jobs need at run time (Snakemake config, not params) ---------------------
    def job_meta(self) -> dict:
        owners = {}
        for table in (self.models, self.data, self.stores, self.evals):
            owners.update({k: v["owner"] for k, v in table.items()})
        exec_ = {}
        for exp, cfg in self.experiments.items():
            exec_[exp] = {rule: copy.deepcopy(cfg["resources"][resource_section(rule, cfg)])
                          for rule in RESOURCE_SECTION}
            for rule in ("collect", "chunk_scores"):
                exec_[exp][rule]["disk_safety"] = cfg["workflow"]["disk_safety"]
        return {"owners": owners, "exec": exec_}


def build_plan(conf_dir: str | Path, schema: str | Path, experiments: list[str | None],
               overrides: list[str] | None = None) -> Plan:
    """Compose, validate and plan each experiment (they must share the results root)."""
    plan = None
    for exp in experiments or [None]:
        cfg = compose(conf_dir, exp, overrides)
        validate(cfg, schema)
        if plan is None:
            plan = Plan(results=cfg["workflow"]["results"].rstrip("/"))
        elif cfg["workflow"]["results"].rstrip("/") != plan.results:
            raise ValueError("all experiments of one run must share workflow.results")
        plan.add(cfg)
    return plan


def as_list(value) -> list:
    """A --config value given as a scalar, a list or nothing -> list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


# ----------------------------------------------------------------------------- collect shards

MICRO_BATCH = 8          # samples per batched forward of the gradient engine (and shard unit)


def shard_plan(role_sizes: dict[str, int], shards: int,
               micro_batch: int = MICRO_BATCH) -> list[dict[str, tuple[int, int]]]:
    """Split a task's samples into at most ``shards`` contiguous groups of whole units.

    A unit is ``micro_batch`` consecutive samples of one role (the last one of a role may be
    shorter); units are ordered by role (ROLE_ORDER) then position. Returns one
    ``{role: (start, stop)}`` per shard (each role's range contiguous), as many shards as
    requested but at most one per unit, balanced by sample count.
    """
    if int(shards) < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    units = []
    for role in ROLE_ORDER:
        n = int(role_sizes.get(role, 0) or 0)
        units += [(role, a, min(a + micro_batch, n)) for a in range(0, n, micro_batch)]
    if not units:
        raise ValueError(f"no samples to collect (role sizes {role_sizes})")
    k = min(int(shards), len(units))
    total = sum(b - a for _, a, b in units)
    groups, j, done = [], 0, 0
    for s in range(k):
        left = k - s - 1                       # shards after this one, one unit each
        take = [units[j]]
        j, done = j + 1, done + units[j][2] - units[j][1]
        target = total * (s + 1) / k
        while j < len(units) - left and (s == k - 1 or
                                         done + (units[j][2] - units[j][1]) / 2 <= target):
            take.append(units[j])
            done += units[j][2] - units[j][1]
            j += 1
        groups.append(take)
    out = []
    for take in groups:
        ranges: dict[str, tuple[int, int]] = {}
        for role, a, b in take:
            lo, _ = ranges.get(role, (a, b))
            ranges[role] = (lo, b)
        out.append(ranges)
    return out


def planned_shards(store_slice: dict, shards: int) -> int:
    """How many shard jobs a store gets (0: collected in one job), from its config slice."""
    if int(shards or 1) <= 1:
        return 0
    if store_slice["fisher"]["mode"] != "mean":
        raise ValueError(
            f"resources.collect.shards={shards} but fisher.mode={store_slice['fisher']['mode']!r}: "
            "the EMA Fisher depends on the order of its updates, so partial EMAs of separate "
            "jobs do not combine into the EMA of one run. Use fisher.mode=mean (exact, "
            "order-free; the default) or resources.collect.shards=1")
    n = len(shard_plan(store_slice["data"]["roles"], shards))
    return n if n > 1 else 0


def n_shards(plan, wc) -> int:
    """Shard jobs of store ``wc.key`` of a workflow Plan (0: collected in one job)."""
    return planned_shards(plan.stores[wc.key]["slice"], plan.resource("collect", wc, "shards", 1))


def shard_files(plan, wc, name: str) -> list[str]:
    """``_stores/<key>/shards/<i>/<name>`` of every shard of store ``wc.key`` (the gather's
    inputs; none when the store is collected in one job)."""
    return [f"{plan.results}/_stores/{wc.key}/shards/{i}/{name}"
            for i in range(n_shards(plan, wc))]


def resource(plan, wc, name: str, gathered):
    """resources.collect.<name> of rule collect, or ``gathered`` when it only gathers."""
    return gathered if n_shards(plan, wc) else plan.resource("collect", wc, name, 0)


def check_plan(plan) -> None:
    """Refuse, before any job starts, stores that cannot be sharded (fisher.mode=ema) and
    layer chunks with a setting that needs every layer at once."""
    for store in plan.stores.values():
        shards = plan.experiments[store["owner"]]["resources"]["collect"].get("shards", 1)
        planned_shards(store["slice"], shards)
    for exp, cfg in plan.experiments.items():
        check_chunks(cfg)


def check_chunks(cfg: dict) -> None:
    """Chunk jobs that collect their own layers keep no stores (:func:`without_stores`):
    refuse a contradiction (layer chunks with gradient_stores true) and what needs a
    whole-model gradient (metric.gj_norm=l2 divides by it) or the stores (validation reads
    them)."""
    k = layer_chunks(cfg)
    stores = cfg["resources"]["collect"].get("gradient_stores", "auto")
    where = (f"experiment {cfg['experiment']!r}: resources.collect.layer_chunks={k}, "
             f"gradient_stores={stores}")
    if stores is True and k > 1:
        raise ValueError(f"{where}: layer chunks collect their own layers and write no store; "
                         "set gradient_stores to auto or false, or layer_chunks=1")
    if not without_stores(cfg):
        return
    if cfg["metric"]["gj_norm"] == "l2":
        raise ValueError(f"{where} but metric.gj_norm=l2 divides each g_j by its norm over "
                         "all layers, which a chunk job's passes never hold at once: use the "
                         "gradient stores (layer_chunks=1, gradient_stores auto) or gj_norm=none")
    if cfg["validation"]["enabled"]:
        raise ValueError(f"{where} but validation.enabled reads the gradient stores, which "
                         "these chunk jobs do not write: use the stores (layer_chunks=1, "
                         "gradient_stores auto) for a validated run")
    if cfg["resources"]["collect"].get("shards", 1) > 1:
        raise ValueError(f"{where} and resources.collect.shards > 1: choose one way to split "
                         "the collection (layer chunks spread over GPUs as well)")


# ----------------------------------------------------------------------------- figures and sweeps

# config sections that never change what an analysis finds (not compared across variants)
NOT_ABLATED = ("resources", "experiment", "overrides", "workflow", "tracking", "figures")


ABLATION_DIR = "_ablations"


MAX_SWEEP_NAME = 100


def code_digest() -> str:
    """Hash of the figure code (interference.figures and the figure stages): a rule
    parameter, so editing how a figure is drawn redraws the figures (and nothing upstream)."""
    here = Path(__file__).resolve().parent
    files = (sorted((here.parent / "interference" / "figures").glob("*.py"))
             + [here / "stages" / "figures.py", here / "stages" / "draw_validation.py"])
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def figure_report(results: str, name: str, caption: str, label: tuple[str, str]):
    """An output of draw_figures shown in the HTML report: category = what it shows,
    subcategory = experiment / analysis, caption = workflow/report/<caption>.rst."""
    from snakemake.io import report

    return report(f"{results}/{{exp}}/{{model}}/{{pair}}/figures/{name}",
                  caption=f"../report/{caption}.rst", category=label[0],
                  subcategory="{exp} / {pair}", labels={"figure": label[1], "model": "{model}"})


def stability_files(plan, exp: str | None = None, name: str = "stability.png") -> list[str]:
    """<analysis>/figures/<name> of every analysis with two or more split seeds."""
    return [f"{plan.analysis_dir(e, m, p)}/figures/{name}"
            for (e, m, p), x in plan.analyses.items()
            if len(x["seeds"]) > 1 and (exp is None or e == exp)]


def no_sweep():
    raise ValueError("the ablation summary compares two or more experiments (with a task "
                     "pair in common): snakemake ablation_summary --config experiment='["
                     "fisher_source_pooled,fisher_source_a,fisher_source_b]' (docs/ablations.md)")


def _flat(obj, prefix: str = "") -> dict[str, object]:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = obj
    return out


def ablated_settings(configs: dict[str, dict]) -> dict[str, dict[str, object]]:
    """{experiment: {key: value}} for every flattened config key whose value differs between
    the experiments (execution, tracking and figure settings left out)."""
    flat = {e: _flat({k: v for k, v in c.items() if k not in NOT_ABLATED})
            for e, c in configs.items()}
    keys = sorted(set().union(*flat.values()))
    canon = lambda v: json.dumps(v, sort_keys=True)  # noqa: E731
    varied = [k for k in keys if len({canon(f.get(k)) for f in flat.values()}) > 1]
    return {e: {k: f.get(k) for k in varied} for e, f in flat.items()}


def sweep_name(experiments: list[str]) -> str:
    """The sweep's folder name: the experiment names joined by '+' (long lists: the first
    ones and a hash of all)."""
    name = "+".join(experiments)
    if len(name) <= MAX_SWEEP_NAME:
        return name
    h = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = "+".join(experiments[:3])[:MAX_SWEEP_NAME - 20]
    return f"{head}+{len(experiments) - 3}more-{h}"


def sweep_plan(plan) -> dict | None:
    """What the ablation summary of a sweep compares (None for a single experiment).

    Variants are the experiments in the order given (the first is the baseline); for every
    analysis name (``math__code``, ``math__code.control``) that two or more variants have,
    their primary split seed's maps and the analysis's cells table are compared."""
    variants = list(plan.experiments)
    if len(variants) < 2:
        return None
    name = sweep_name(variants)
    groups: dict[str, list[dict]] = {}
    for (exp, model, pair), x in plan.analyses.items():
        base = plan.analysis_dir(exp, model, pair)
        entry = {"exp": exp, "model": model, "cells": f"{base}/cells.csv",
                 "stats": f"{base}/split{x['seeds'][0]}/stats.json"}
        if (exp, model, pair) in plan.validated():
            entry["validation"] = f"{base}/split{x['seeds'][0]}/validation/validation.json"
        groups.setdefault(pair, []).append(entry)
    groups = {p: g for p, g in groups.items() if len(g) >= 2}
    if not groups:
        import sys

        print(f"qkov: experiments {variants} share no analysis (task pair): no ablation "
              "summary", file=sys.stderr)
        return None
    configs = plan.experiments
    out = f"{plan.results}/{ABLATION_DIR}/{name}"
    slice_ = {"v": 1, "sweep": name, "variants": variants, "baseline": variants[0],
              "ablated": ablated_settings(configs),
              "flip": [e for e in variants if configs[e]["metric"]["variant"] == "signed"],
              "analyses": groups}
    return {"name": name, "dir": out, "variants": variants, "pairs": list(groups),
            "slice": json.dumps(slice_, sort_keys=True, separators=(",", ":")),
            "cells": [e["cells"] for g in groups.values() for e in g],
            "stats": [e["stats"] for g in groups.values() for e in g],
            "validation": [e["validation"] for g in groups.values() for e in g
                           if "validation" in e]}
