"""The ``pyro-vae`` command line (also ``python -m pyro_vae``).

``pyro-vae train`` has one option per field of ``TrainConfig``, generated from it, so the
command line and the Python API cannot drift apart.
"""

import argparse
import dataclasses
import logging
import sys
import typing
from typing import List, Optional

from . import __version__
from .runs import TrainConfig, train_run


def _field_type(name: str):
    """``Optional[X]`` -> X; ``Tuple[int, ...]`` -> tuple; otherwise the annotation."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return tuple if typing.get_origin(hint) is tuple else hint


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f.name)
        kw = dict(default=f.default, help=f.metadata["help"], dest=f.name)
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind is tuple:
            parser.add_argument(flag, type=int, nargs="+", metavar="N", **kw)
        else:
            parser.add_argument(flag, type=kind, **kw)
        if kw["default"] is not None and kind is not bool:
            parser._actions[-1].help += " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-vae", description="Variational autoencoders in Pyro.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a VAE and write a run folder")
    _add_config_options(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args["command"] == "train":
        quiet = args.pop("quiet")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in args.items() if k in fields})
        if isinstance(config.hidden, list):
            config.hidden = tuple(config.hidden)
        try:
            summary = train_run(config, progress=not quiet)
        except (ValueError, OSError, RuntimeError) as e:
            parser.exit(2, f"pyro-vae: error: {e}\n")
        print(f"run folder: {config.out}")
        if "test_iwae" in summary:
            print(f"test IWAE bound (K = {config.particles}): {summary['test_iwae']:.4f} "
                  f"nats per data point")
        print(f"test ELBO: {summary['test_elbo']:.4f} nats per data point "
              f"({summary['num_test']} test points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
