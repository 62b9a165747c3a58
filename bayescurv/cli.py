"""Command line: ``bayescurv demo``. Thin: it calls the library."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bayescurv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Laplace on a digits MLP: MAP vs Laplace table")
    demo.add_argument("--out", default="outputs", help="folder for the reliability diagram")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=60)
    demo.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from bayescurv import demo as demo_mod

        demo_mod.run(args.out, seed=args.seed, epochs=args.epochs, progress=args.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
