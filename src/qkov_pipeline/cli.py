"""``qkov``: run the workflow, show a composed config, browse MLflow.

    qkov run [-e EXPERIMENT ...] [-o OVERRIDE ...] [-n] [-- SNAKEMAKE ARGS]
    qkov config [-e EXPERIMENT] [-o OVERRIDE ...]     print the composed, validated config
    qkov plan [-e EXPERIMENT] [-o OVERRIDE ...] [--gpu-gib G]
                                                      the chunk jobs' placement, passes,
                                                      memory and time, before any run
    qkov ui [--results results]                       mlflow ui on 127.0.0.1
    qkov ui --explorer [ANALYSIS] [-e EXPERIMENT]     open an analysis's cell explorer

``qkov run`` is ``snakemake --profile profiles/default`` in the repository root with
``--config experiment=... overrides=[...]``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _config_args(experiments: list[str], overrides: list[str]) -> list[str]:
    out = []
    if experiments:
        out.append("experiment=" + (experiments[0] if len(experiments) == 1
                                    else "[" + ",".join(experiments) + "]"))
    if overrides:
        out.append("overrides=[" + ",".join(overrides) + "]")
    return ["--config", *out] if out else []


def find_explorers(results: Path, experiment: str | None = None) -> list[Path]:
    """The cell explorers (``<exp>/<model>/<analysis>/figures/explorer.html``) under
    ``results``, of one experiment if given; main analyses before their controls."""
    pattern = f"{experiment or '*'}/*/*/figures/explorer.html"
    return sorted(results.glob(pattern), key=lambda p: (p.parts[-3].endswith(".control"),
                                                          str(p)))


def open_explorer(results: Path, experiment: str, analysis: str) -> int:
    """Open the explorer of ``analysis`` (a pair like math__code, or empty: the first main
    analysis) of ``experiment`` in the default browser; it is one file, no server."""
    import webbrowser

    pages = [p for p in find_explorers(results, experiment)
             if not analysis or p.parts[-3] == analysis]
    if not pages:
        print(f"no cell explorer for experiment {experiment!r}"
              + (f", analysis {analysis!r}" if analysis else "") + f" under {results}: draw "
              f"it with `snakemake figures --config experiment={experiment}`", file=sys.stderr)
        return 1
    uri = pages[0].resolve().as_uri()
    print(f"cell explorer: {pages[0]}\n  {uri}")
    if not webbrowser.open(uri):
        print("  (no browser found here: open that file in any browser; it works offline)")
    return 0


def _show(args, parser) -> int:
    """``qkov config``: the composed, validated config; ``qkov plan``: the chunk jobs' plan."""
    if len(args.experiment) > 1:
        parser.error(f"qkov {args.command} takes one experiment")
    experiment = args.experiment[0] if args.experiment else None
    if args.command == "plan":
        from .dry_plan import dry_plan, print_dry_plan

        print_dry_plan(dry_plan(experiment, args.override, args.gpu_gib))
        return 0
    import yaml

    from .config import compose, validate

    cfg = compose(ROOT / "conf", experiment, args.override)
    validate(cfg, ROOT / "workflow" / "schemas" / "config.schema.yaml")
    print(yaml.safe_dump(cfg, sort_keys=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qkov", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the workflow (snakemake)")
    show = sub.add_parser("config", help="print the composed config of an experiment")
    dry = sub.add_parser("plan", help="print what the chunk jobs of an experiment will do on "
                                      "GPUs of --gpu-gib GiB: placement, passes, memory, "
                                      "time (nothing runs, no weight is read)")
    dry.add_argument("--gpu-gib", type=float, default=79.1,
                     help="each GPU's memory (default 79.1: an 80 GB H100; an H200: 139.8)")
    for p in (run, show, dry):
        p.add_argument("-e", "--experiment", action="append", default=[],
                       help="a file of conf/experiment (repeat for a sweep)")
        p.add_argument("-o", "--override", action="append", default=[],
                       help="a Hydra override, e.g. metric.variant=signed")
    run.add_argument("-n", "--dry-run", action="store_true")
    run.add_argument("--profile", default="profiles/default")
    run.add_argument("snakemake_args", nargs=argparse.REMAINDER,
                     help="after --: passed to snakemake")
    ui = sub.add_parser("ui", help="mlflow ui on the embedded store (127.0.0.1 only), or "
                                   "with --explorer an analysis's cell explorer")
    ui.add_argument("--results", default="results")
    ui.add_argument("--port", default="5000")
    ui.add_argument("--explorer", nargs="?", const="", metavar="ANALYSIS",
                    help="open the cell explorer (self-contained HTML) of ANALYSIS, e.g. "
                         "math__code (default: the experiment's first) instead of mlflow")
    ui.add_argument("-e", "--experiment", default="default",
                    help="the experiment of --explorer (default: default)")
    args = parser.parse_args(argv)

    if args.command in ("config", "plan"):
        try:
            return _show(args, parser)
        except (ValueError, KeyError) as err:     # a bad experiment or override: no trace
            print(f"qkov {args.command}: error: {err}", file=sys.stderr)
            return 2
    if args.command == "ui":
        if args.explorer is not None:
            return open_explorer(Path(args.results), args.experiment, args.explorer)
        for page in find_explorers(Path(args.results)):
            print(f"cell explorer (no server needed): {page.resolve().as_uri()}")
        db = Path(args.results).resolve() / "mlflow.db"
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}",
               "--host", "127.0.0.1", "--port", args.port]
        return subprocess.call(cmd)
    extra = [a for a in args.snakemake_args if a != "--"]
    cmd = [sys.executable, "-m", "snakemake", "--profile", args.profile,
           *_config_args(args.experiment, args.override), *(["-n"] if args.dry_run else []),
           *extra]
    print(" ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd, cwd=ROOT, env=dict(os.environ))


if __name__ == "__main__":
    sys.exit(main())
