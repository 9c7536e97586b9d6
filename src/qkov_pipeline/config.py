"""Experiment configuration: Hydra composition, validation, errors that say what to fix.

:func:`compose` gives the resolved config of one experiment (``conf/config.yaml`` + groups +
``conf/experiment/NAME`` + overrides); :func:`validate` checks it against the schema and the
rules a schema cannot state, with messages that name the key, the nearest valid one and
where to change it. The plan of jobs built from it is qkov_pipeline.plan.
"""
from __future__ import annotations

import re
from pathlib import Path


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


MIN_BOOTSTRAP = 100
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")


def _check_names(cfg: dict) -> None:
    """Names that become folders (experiment, model, tasks): letters, digits, '_' and '.',
    starting with a letter or digit, so results never land outside the experiment's folder."""
    names = {"experiment": cfg.get("experiment", "default"), "model.name": cfg["model"]["name"],
             **{f"tasks.{t} (task name)": t for t in cfg["tasks"]}}
    for key, name in names.items():
        if not SAFE_NAME.match(str(name)):
            raise ValueError(f"{key}={name!r}: names become folders under workflow.results, so "
                             "they may hold only letters, digits, '_' and '.', and must start "
                             "with a letter or digit")


def _check_sources(tasks: dict) -> None:
    """Every task's source is registered (and a jsonl file exists) before any job runs."""
    from interference.data.tasks import TASKS

    for t, spec in tasks.items():
        src = spec.get("source")
        if src not in TASKS:
            raise ValueError(f"tasks.{t}.source={src!r} is not a registered task source "
                             f"(known: {sorted(TASKS)}{_did_you_mean(str(src), TASKS)}); "
                             "register one with interference.data.register_task")
        path = (spec.get("kwargs") or {}).get("path")
        if src == "jsonl" and path and not Path(path).expanduser().is_file():
            raise ValueError(f"tasks.{t}.kwargs.path: task file not found: {path} (task "
                             "source jsonl); give the path of a .jsonl, .jsonl.gz, .json or "
                             ".parquet file")


def _check_semantics(cfg: dict) -> None:
    from .plan import _data_spec, canonical

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
    _check_names(cfg)
    _check_sources(tasks)
    if cfg["stats"]["n_bootstrap"] < MIN_BOOTSTRAP:
        raise ValueError(
            f"stats.n_bootstrap={cfg['stats']['n_bootstrap']}: the bootstrap intervals "
            f"(ci_low, ci_high) need at least {MIN_BOOTSTRAP} resamples (0 would leave them "
            f"empty); set stats.n_bootstrap >= {MIN_BOOTSTRAP} (default 1000)")
    ref = cfg["stats"]["reference"]
    if ref != "within_task" and ref not in tasks:
        raise ValueError(f"stats.reference={ref!r} is neither 'within_task' nor a task name "
                         f"(known: {sorted(tasks)})")
    if len(set(cfg["data"]["split_seeds"])) != len(cfg["data"]["split_seeds"]):
        raise ValueError(f"data.split_seeds has duplicates: {cfg['data']['split_seeds']}")


# ----------------------------------------------------------------------------- keys


# ----------------------------------------------------------------------------- slices


# ----------------------------------------------------------------------------- the plan


