"""Experiment configuration: Hydra composition, validation, per-stage slices and their keys.

One composed config per experiment (``conf/config.yaml`` + groups + ``conf/experiment/NAME``
+ overrides). From it, :func:`build_plan` derives every job the workflow runs, each with
the SLICE of the config that determines its output (its ``params.slice`` in the Snakefile,
so a config change reruns exactly the jobs whose slice changed). Shared stages are stored
under a hash of their slice:

- model   ``_models/<name>-<hash>``   : the model section;
- data    ``_data/<task>-<hash>``      : model + task + split seed + role sizes + tokens
                                        (+ the other tasks when lengths are matched);
- store   ``_stores/<task>-<hash>``    : data + fisher settings (gradients and Fisher);

and the analyses under the experiment: ``<exp>/<model>/<a>__<b>[.control]/split<seed>/``
(scores: stores + metric; stats: + statistics), then tables, figures and the summary.
So a metric- or statistics-only ablation finds the same store keys and reuses the stores.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLICE_VERSION = 1  # bump when the meaning of a slice changes (forces new keys)
# rule -> its section of `resources` in conf/config.yaml
RESOURCE_SECTION = {"prepare_model": "prepare_model", "prepare_data": "prepare_data",
                    "prepare_eval": "prepare_data", "collect": "collect", "scores": "scores",
                    "stats": "stats", "validate": "validate", "tables": "summary",
                    "draw_figures": "figures", "draw_validation": "figures",
                    "summary": "summary", "track": "summary"}



# ----------------------------------------------------------------------------- compose

def compose(conf_dir: str | Path, experiment: str | None = None,
            overrides: list[str] | None = None, _explain: bool = True) -> dict:
    """The resolved config (plain dict) of one experiment.

    ``experiment``: a file name of ``conf/experiment/`` (None or 'default': none).
    ``overrides``: Hydra overrides, e.g. ``['metric.variant=signed']``.
    The result gains ``experiment`` (the name results go under) and ``overrides``.
    """
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    conf_dir = Path(conf_dir).resolve()
    over = list(overrides or [])
    name = experiment or "default"
    if experiment and experiment != "default":
        if not (conf_dir / "experiment" / f"{experiment}.yaml").is_file():
            known = sorted(p.stem for p in (conf_dir / "experiment").glob("*.yaml"))
            raise ValueError(f"unknown experiment {experiment!r}: no conf/experiment/"
                             f"{experiment}.yaml (known: {', '.join(known)})")
        over = [f"experiment={experiment}"] + over
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = hcompose(config_name="config", overrides=over)
    except HydraException as err:
        if not _explain:
            raise
        raise ValueError(f"experiment {name!r}: " + _explain_hydra_error(
            str(err), conf_dir, experiment, over)) from None
    finally:
        GlobalHydra.instance().clear()
    out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    out.pop("experiment", None)
    out["experiment"] = name
    out["overrides"] = list(overrides or [])
    return out


def _did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _explain_hydra_error(msg: str, conf_dir: Path, experiment: str | None,
                         over: list[str]) -> str:
    """Hydra's composition error, restated with the key or option at fault and the fix."""
    import re

    m = re.search(r"Could not override '([^']+)'", msg)
    if m:   # a key that is not in the config: usually a typo
        key = m.group(1)
        parent, _, leaf = key.rpartition(".")
        known: list[str] = []
        try:
            base = compose(conf_dir, experiment, _explain=False)
            node = base
            for part in parent.split(".") if parent else []:
                node = node[part]
            known = sorted(node) if isinstance(node, dict) else []
        except Exception:   # noqa: BLE001 - only for the hint
            pass
        where = f"{parent!r}" if parent else "the top level"
        return (f"unknown config key {key!r}{_did_you_mean(leaf, known)}; the keys of {where} are "
                f"{known}. Fix the override's spelling (a genuinely new key, such as a new task, is "
                f"added with a leading '+', e.g. +task@tasks.mine=jsonl).")
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", msg)
    if m:   # an option of a config group that has no file
        group, option = m.group(1), m.group(2)
        options = sorted(p.stem for p in (conf_dir / group.split("@")[0]).glob("*.yaml"))
        return (f"unknown option {option!r} for config group {group!r}"
                f"{_did_you_mean(option, options)}: there is no conf/{group}/{option}.yaml "
                f"(available: {', '.join(options)}).")
    hint = ""
    if any("[" in o or "," in o for o in over):
        hint = ("\nOverride values with brackets or commas must be quoted inside the list, e.g. "
                "--config overrides='[\"data.split_seeds=[0,1]\", metric.variant=signed]'")
    return f"cannot apply overrides {over}: {msg}{hint}"


def _schema_at(schema: dict, path) -> dict:
    """The sub-schema of a config path (for the keys a typo could have meant)."""
    node = schema
    for part in path:
        props = node.get("properties", {})
        if part in props:
            node = props[part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif "items" in node:
            node = node["items"]
        else:
            return {}
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def validate(cfg: dict, schema_path: str | Path) -> None:
    """jsonschema validation with a message that names the key and the fix."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors[:10]:
            where = ".".join(str(p) for p in e.absolute_path) or "<top>"
            if e.validator == "additionalProperties":
                allowed = sorted(_schema_at(schema, e.absolute_path).get("properties", {}))
                extra = sorted(set(e.instance) - set(allowed))
                for key in extra:
                    full = f"{where}.{key}" if where != "<top>" else key
                    lines.append(f"  {full}: unknown key{_did_you_mean(key, allowed)}; allowed "
                                 f"keys here: {allowed}")
                continue
            lines.append(f"  {where}: {e.message}")
        raise ValueError(f"experiment {cfg.get('experiment')!r}: the config does not match "
                         f"{schema_path} (set in conf/, conf/experiment/{cfg.get('experiment')}"
                         f".yaml or an override):\n" + "\n".join(lines))
    _check_semantics(cfg)


def _find_targets(obj, path="") -> list[str]:
    """Config paths of Hydra ``_target_`` keys (instantiation is not used: refused)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{path}.{k}" if path else str(k)
            if k in ("_target_", "_partial_", "_recursive_", "_convert_", "_args_"):
                out.append(here)
            out += _find_targets(v, here)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _find_targets(v, f"{path}.{i}")
    return out


def _check_semantics(cfg: dict) -> None:
    targets = _find_targets(cfg)
    if targets:
        raise ValueError(f"config keys {targets}: Hydra instantiation (_target_ and friends) is "
                         "not used by this workflow and is refused, so a config can never name "
                         "code to run; remove them")
    tasks = cfg["tasks"]
    for a, b in cfg["pairs"]:
        for t in (a, b):
            if t not in tasks:
                raise ValueError(f"pair [{a}, {b}] names task {t!r}, which is not in tasks "
                                 f"(known: {sorted(tasks)}{_did_you_mean(t, tasks)}); add it "
                                 f"with +task@tasks.{t}=<file of conf/task>")
        if a == b:
            raise ValueError(f"pair [{a}, {b}]: task A equals task B; the negative control "
                             "A vs A' is built in (control.enabled)")
        # Same samples under two names: the same source with the same kwargs. (At run time the
        # data and scores stages also compare the samples' ids and texts.)
        if canonical(_data_spec(tasks[a])) == canonical(_data_spec(tasks[b])):
            raise ValueError(f"pair [{a}, {b}]: tasks {a!r} and {b!r} have the same source and "
                             "kwargs, so their samples are the same: task A equals task B. The "
                             "negative control A vs A' (a held-out split of A) is built in "
                             "(control.enabled); to compare two variants of one source, change "
                             "its kwargs (e.g. the generation seed)")
    for t, spec in tasks.items():
        if spec.get("pack") and cfg["data"]["loss_tokens"] != "all":
            raise ValueError(f"tasks.{t}.pack=true joins several problems into one sample, so "
                             f"the loss covers all tokens; set data.loss_tokens=all or "
                             f"tasks.{t}.pack=false")
    for t in tasks:
        if "__" in t or "/" in t or "-" in t:
            raise ValueError(f"task name {t!r} may not contain '__', '-' or '/'")
    ref = cfg["stats"]["reference"]
    if ref != "within_task" and ref not in tasks:
        raise ValueError(f"stats.reference={ref!r} is neither 'within_task' nor a task name "
                         f"(known: {sorted(tasks)})")
    if len(set(cfg["data"]["split_seeds"])) != len(cfg["data"]["split_seeds"]):
        raise ValueError(f"data.split_seeds has duplicates: {cfg['data']['split_seeds']}")


# ----------------------------------------------------------------------------- keys

def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): the text slices are hashed and compared as."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in str(text))


# ----------------------------------------------------------------------------- slices

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


# ----------------------------------------------------------------------------- the plan

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
                "stores": [self.store_key(cfg, t, s) for s in seeds for t in tasks]}

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
        res = self.experiments[self.owner(wc)]["resources"][RESOURCE_SECTION[rule]]
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
            exec_[exp] = {rule: copy.deepcopy(cfg["resources"][sec])
                          for rule, sec in RESOURCE_SECTION.items()}
            exec_[exp]["collect"]["disk_safety"] = cfg["workflow"]["disk_safety"]
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
