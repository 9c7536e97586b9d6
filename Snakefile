"""QK-OV interference: data -> gradients and Fisher -> scores -> statistics -> figures.

    snakemake --profile profiles/default                         # the default experiment
    snakemake --profile profiles/default --config experiment=tiny
    snakemake --profile profiles/default --config experiment='[fisher_source_a,variant_signed]'
    snakemake --profile profiles/default --config overrides='[metric.ridge_lambda_rel=1e-2]'
    snakemake --profile profiles/default figures                 # redraw figures only
    snakemake --profile profiles/default ablation_summary --config experiment='[a,b]'
    snakemake --profile profiles/default --report report.html    # self-contained HTML report

The experiment configuration lives in conf/ (Hydra). This file composes it, validates it
(workflow/schemas), plans every job with the config slice that determines its output
(qkov_pipeline.plan, the only module the rule files use) and includes one rule file per stage. See docs/workflow.md.
"""
import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("8.0")

SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))

from qkov_pipeline import hooks  # noqa: E402
from qkov_pipeline import plan as qp  # noqa: E402

validate({k: v for k, v in config.items() if not k.startswith("_")},
         "workflow/schemas/cli.schema.yaml")
PLAN = qp.build_plan(Path(workflow.basedir) / "conf",
                     Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml",
                     qp.as_list(config.get("experiment")), qp.as_list(config.get("overrides")))
R = PLAN.results
# The run file: tracking settings and each job's execution settings, written once per
# invocation (by the scheduling process, not by a job re-reading this file on a cluster node)
# and an input of every job; ancient: rewriting it never reruns a job.
TRACKING = hooks.configure_tracking(PLAN, main=not workflow.remote_exec)
RUN = ancient(hooks.run_file(PLAN))
SWEEP = qp.sweep_plan(PLAN)   # two or more experiments: what the ablation summary compares


wildcard_constraints:
    key=r"[A-Za-z0-9_.]+-[0-9a-f]{12}",
    exp=r"[A-Za-z0-9][A-Za-z0-9_.]*",
    model=r"[A-Za-z0-9_.]+",
    pair=r"[A-Za-z0-9_]+__[A-Za-z0-9_]+(\.control)?",
    seed=r"\d+",


include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/gradients.smk"
include: "workflow/rules/scores.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/validation.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        PLAN.targets(),
        [f"{SWEEP['dir']}/ablation.json"] if SWEEP else [],


onstart:
    hooks.on_start(PLAN, TRACKING, local_exec=getattr(workflow, "local_exec", True))


onsuccess:
    hooks.on_end(PLAN, True)


onerror:
    hooks.on_end(PLAN, False)
