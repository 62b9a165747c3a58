"""Command line: ``bayescurv demo``, ``bayescurv --version``. Thin: it calls the library."""

from __future__ import annotations

import argparse
import sys


def _checked(check):
    """An argparse ``type=`` that parses an int and validates it with ``check`` (a
    :mod:`bayescurv.demo` validator), so a bad value is refused with a usage message."""

    def parse(text: str) -> int:
        from bayescurv.errors import InvalidArgumentError

        try:
            return check(int(text))
        except ValueError as err:  # int() failure, or InvalidArgumentError (a ValueError)
            if isinstance(err, InvalidArgumentError):
                raise argparse.ArgumentTypeError(str(err)) from None
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None

    return parse


def version() -> str:
    """The installed distribution's version (:mod:`importlib.metadata`), else
    ``bayescurv.__version__`` (a source checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("bayescurv")
    except PackageNotFoundError:
        import bayescurv

        return getattr(bayescurv, "__version__", "unknown")


def main(argv: list[str] | None = None) -> int:
    from bayescurv import demo as demo_mod
    from bayescurv.errors import InvalidArgumentError

    parser = argparse.ArgumentParser(prog="bayescurv", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bayescurv {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Laplace on a digits MLP: MAP vs Laplace table")
    demo.add_argument("--out", default="outputs", help="folder for the reliability diagram")
    demo.add_argument("--seed", type=_checked(demo_mod.check_seed), default=0)
    demo.add_argument("--epochs", type=_checked(demo_mod.check_epochs), default=60)
    demo.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:  # before any training: a bad --out fails now, not after the run
            demo_mod.prepare_out_dir(args.out)
        except InvalidArgumentError as err:
            demo.error(f"argument --out: {err}")
        demo_mod.run(args.out, seed=args.seed, epochs=args.epochs, progress=args.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
