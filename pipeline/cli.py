"""`dpo-ray run|prepare|reference|train|evaluate|retrain|sweep|iterate CONFIG [--set dotted.key=value ...] [--address ADDR] [--json]`,
`dpo-ray doctor [CONFIG]`, `dpo-ray --version`.

A user mistake prints one line `dpo-ray: error: ...` and exits 2; bugs keep their traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpo_ray.errors import UserError

from . import doctor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpo-ray", description="DPO preference training on Ray, tracked in MLflow.")
    p.add_argument("--version", action="version", version=doctor.version())
    sub = p.add_subparsers(dest="command", required=True)
    helps = {
        "run": "all stages: prepare, reference, train, evaluate (done stages are reused)",
        "prepare": "tokenize and validate the JSONL data into Parquet",
        "reference": "prepare, then cache the reference model's log-probs",
        "train": "prepare and reference (cached), then train the policy and export it",
        "evaluate": "evaluate <output_dir>/model on the eval split against the reference",
        "retrain": "for schedulers: run on the current data, starting from the config's model (e.g. models:/NAME@champion), "
                   "register; does nothing when neither data nor model changed; refuses to overlap another run",
        "sweep": "Ray Tune search over config keys; prepare and reference once, shared by the trials; best trial -> <output_dir>/best",
        "iterate": "iterative (online) DPO: rounds of sample -> judge -> pair -> train -> evaluate (iterate: section); "
                   "the same command again continues an interrupted iteration",
    }
    for name, text in helps.items():
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("config", help="YAML experiment file, e.g. configs/demo.yaml")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
        s.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray runtime)")
        s.add_argument("--json", action="store_true", help="print the whole summary as JSON on stdout (for scripts)")
        if name == "sweep":  # adds to the config's sweep: section
            s.add_argument("--grid", action="append", default=[], metavar="KEY=[A,B]", help="every value is tried, e.g. train.beta=[0.05,0.1]")
            s.add_argument("--sample", action="append", default=[], metavar="KEY=DIST", help="drawn per trial, e.g. 'train.lr=loguniform(1e-5,1e-3)'")
            s.add_argument("--samples", type=int, default=None, help="trials drawn from the --sample distributions (sweep.samples)")
            s.add_argument("--scheduler", choices=["none", "asha"], default=None, help="asha: stop weak trials early (sweep.scheduler)")
    d = sub.add_parser("doctor", help="check what a run needs (Python, torch, Ray, directories, MLflow, GPU memory): a line each")
    d.add_argument("config", nargs="?", default=None, help="YAML experiment file (default: the built-in defaults)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    d.add_argument("--address", default=None, help="Ray cluster address to check (default: $RAY_ADDRESS)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dpo_ray.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "doctor":
            return doctor.main(cfg, args.address)
        from . import console
        from .context import check_output_dir
        from .run import COMMANDS, run

        check_output_dir(Path(cfg.output_dir).resolve())
        console.setup(Path(cfg.output_dir).resolve(), args.command)
        if args.command == "sweep":
            from .sweep import sweep_from_args

            summary = sweep_from_args(cfg, args)
            if summary.get("interrupted"):
                print("dpo-ray: interrupted; run the same command again to continue the sweep", file=sys.stderr)
                return 130
        elif args.command == "iterate":
            from .iterate import iterate

            summary = iterate(cfg, address=args.address)
        else:
            summary = run(cfg, COMMANDS[args.command], address=args.address, retrain=args.command == "retrain")
    except UserError as e:
        print(f"dpo-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpo-ray: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False):  # a subcommand without --json (doctor returns earlier) prints the short summary
        print(json.dumps(summary, indent=2, default=str))
    elif args.command == "iterate":
        from .iterate import summary_lines

        print("\n".join(summary_lines(summary)))
    else:
        console.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
