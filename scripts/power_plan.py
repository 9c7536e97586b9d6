"""How many disruptors a target effect needs, or what effect a design can find (issue 17).

    PYTHONPATH=src .venv/bin/python scripts/power_plan.py --effect 0.6            # samples
    PYTHONPATH=src .venv/bin/python scripts/power_plan.py --n-b 48 --n-r 144      # MDE

Cohen's d of a lone conflicting cell found with --power probability by Benjamini-Hochberg
at --fdr-alpha over --cells distinct cells (two-sided p-values as the default test:
one-sided t at level fdr_alpha / (2 cells); --one-sided: fdr_alpha / cells;
interference.stats.power). SmolLM2-135M has 720 distinct cells.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from interference.stats.power import minimal_detectable_effect, samples_needed  # noqa: E402


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--effect", type=float, help="target Cohen's d: print the samples needed")
    ap.add_argument("--n-b", type=int, help="B disruptors (with --n-r: print the MDE)")
    ap.add_argument("--n-r", type=int, help="reference disruptors")
    ap.add_argument("--ratio", type=float, default=1.0, help="n_R / n_B for --effect")
    ap.add_argument("--cells", type=int, default=720)
    ap.add_argument("--fdr-alpha", type=float, default=0.05)
    ap.add_argument("--power", type=float, default=0.8)
    ap.add_argument("--one-sided", action="store_true",
                    help="for runs with stats.two_sided=false")
    args = ap.parse_args(argv)
    if args.effect is not None:
        n_b, n_r = samples_needed(args.effect, args.cells, args.fdr_alpha, args.power,
                                  args.ratio, two_sided=not args.one_sided)
        text = (f"d = {args.effect:g} at {args.power:.0%} power over {args.cells} cells "
                f"(fdr_alpha {args.fdr_alpha:g}): n_B = {n_b} task-B scored samples and "
                f"n_R = {n_r} reference samples")
    elif args.n_b and args.n_r:
        d = minimal_detectable_effect(args.n_b, args.n_r, args.cells, args.fdr_alpha,
                                      args.power, two_sided=not args.one_sided)
        text = (f"n_B = {args.n_b}, n_R = {args.n_r}, {args.cells} cells, fdr_alpha "
                f"{args.fdr_alpha:g}: minimal detectable Cohen's d at {args.power:.0%} "
                f"power = {d:.3f}")
    else:
        ap.error("give --effect, or --n-b and --n-r")
    print(text)
    return text


if __name__ == "__main__":
    main()
