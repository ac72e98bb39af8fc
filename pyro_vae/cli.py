"""The ``pyro-vae`` command line (also ``python -m pyro_vae``).

``pyro-vae train`` has one option per field of ``TrainConfig``, generated from it, so the
command line and the Python API cannot drift apart.
"""

import argparse
import dataclasses
import logging
import signal
import sys
import typing
from pathlib import Path
from typing import List, Optional

from . import __version__, datasets, distributed
from .compiled import PRECISIONS
from .errors import ArgumentError, MissingData
from .train import TrainingInterrupted
from .config import GROUPS, RESUMABLE_CHANGES, TrainConfig, flag, parse_options
from .runs import WEIGHTS, evaluate_run, read_config, resume_run, train_run


def _field_type(name: str):
    """``Optional[X]`` -> X; ``Tuple[int, ...]`` -> tuple; ``Dict[...]`` -> dict; otherwise
    the annotation."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _flag_of(name: str) -> str:
    """``prior_options`` -> ``--prior-option`` (given once per option); else --name."""
    return "--" + flag(name[:-1] if name.endswith("_options") else name)


def _add_config_options(parser: argparse.ArgumentParser, defaults: bool = True) -> dict:
    """One option per ``TrainConfig`` field, in a group per ``GROUPS`` entry (returned
    by name); ``defaults=False``: absent options stay out of the parsed namespace (to tell
    which were given)."""
    groups = {name: parser.add_argument_group(f"{name} options", about)
              for name, about in GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        group = groups[f.metadata["group"]]
        option = _flag_of(f.name)
        kind = _field_type(f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        kw = dict(default=default if defaults else argparse.SUPPRESS,
                  help=f.metadata["help"], dest=f.name)
        if f.metadata.get("derived"):  # recorded in config.json, not chosen by hand
            kw["help"] = argparse.SUPPRESS
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if kind is bool:
            action = group.add_argument(option, action=argparse.BooleanOptionalAction, **kw)
        elif kind is tuple:
            action = group.add_argument(option, type=int, nargs="+", metavar="N", **kw)
        elif kind is dict:
            action = group.add_argument(option, action="append", metavar="KEY=VALUE", **kw)
        else:
            action = group.add_argument(option, type=kind, **kw)
        if defaults and default is not None and kind not in (bool, dict) and not f.metadata.get(
                "derived"):
            action.help += " (default: %(default)s)"
    return groups


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (the full usage is a screen long; --help shows it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_TRUST = ("let the run folder read (--resume, --init-from, evaluate) name classes by "
          "import path, and import them: only for folders whose code you trust")


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-vae", description="Variational autoencoders in Pyro.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a VAE and write a run folder",
                           description="Train a VAE and write a run folder.")
    run = _add_config_options(train, defaults)["run"]
    run.add_argument("--resume", metavar="RUN",
                       help="continue the run in folder RUN from its last checkpoint, with "
                            "its settings; only " + ", ".join(
                                "--" + flag(name) for name in RESUMABLE_CHANGES
                                if name not in ("out", "overwrite")) + " may change")
    run.add_argument("--quiet", action="store_true",
                     help="no progress bar, no per-epoch lines, and only warnings of the log")
    run.add_argument("--trust-imports", action="store_true", help=_TRUST)

    evaluate = sub.add_parser(
        "evaluate", help="log-likelihood, ELBO surgery and active units of a run folder")
    evaluate.add_argument("run", help="run folder written by pyro-vae train")
    evaluate.add_argument("--samples", type=int, default=5000,
                          help="importance samples per data point (default: %(default)s)")
    evaluate.add_argument("--chunk", type=int, default=100,
                          help="samples drawn at once; lower it to save memory "
                               "(default: %(default)s)")
    evaluate.add_argument("--split", default="test", choices=("train", "valid", "test"),
                          help="the split of the run's data set to evaluate "
                               "(default: %(default)s)")
    evaluate.add_argument("--limit", type=int, help="evaluate the first N points only")
    evaluate.add_argument("--surgery-points", type=int,
                          help="ELBO surgery on the first N of those points (default: all; "
                               "it costs N^2 posterior densities, and for a flow guide "
                               "each is an inversion: use a few thousand at most)")
    evaluate.add_argument("--weights", choices=WEIGHTS,
                          help="the best validated epoch's weights (best.pt) or the last "
                               "epoch's (checkpoint.pt) (default: those of the run's "
                               "summary: best with --early-stopping, else last)")
    evaluate.add_argument("--data-dir", metavar="DIR",
                          help="data root to read the split from (default: the run's "
                               "data-dir where it exists, read only; else "
                               f"${datasets.ENV_VAR}, else ~/.cache/pyro_vae)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--seed", type=int, default=0,
                          help="seed of the Monte Carlo draws (default: %(default)s)")
    evaluate.add_argument("--compile", action="store_true",
                          help="compile the networks and densities with torch.compile")
    evaluate.add_argument("--precision", default="float32", choices=PRECISIONS,
                          help="bf16: the networks' matrix products in bfloat16, the "
                               "densities in float32 (default: %(default)s)")
    evaluate.add_argument("--quiet", action="store_true",
                          help="no progress bar, and only warnings of the log")
    evaluate.add_argument("--trust-imports", action="store_true", help=_TRUST)
    return parser


def _config_values(values: dict) -> dict:
    """Parsed option values as ``TrainConfig`` takes them: tuples, option dicts."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for name, value in values.items():
        if isinstance(value, list) and _field_type(name) is dict:
            value = parse_options(value, _flag_of(name)[2:])
        elif isinstance(value, list):
            value = tuple(value)
        elif value is None and fields[name].default_factory is not dataclasses.MISSING:
            value = fields[name].default_factory()
        out[name] = value
    return out


# Library arguments whose command-line option has another name.
_FLAGS = {"num_particles": "particles"}


def _as_flags(e: Exception) -> str:
    """The error's first line (torch's allocation errors run to several), naming a bad
    library argument by its command-line option."""
    if isinstance(e, ArgumentError):
        return e.named("--" + _FLAGS.get(e.argument, e.argument).replace("_", "-"))
    if isinstance(e, MissingData):
        return e.named("--data-dir")
    if isinstance(e, MemoryError):
        return f"out of memory ({str(e) or 'MemoryError'}); lower the sizes asked for"
    return (str(e).splitlines() or [type(e).__name__])[0]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    # --quiet: no progress bar, and of the log only warnings and errors.
    logging.basicConfig(level=logging.WARNING if args.get("quiet") else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args["command"] == "train":
            _train(args, argv)
        elif args["command"] == "evaluate":
            _evaluate(args)
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        _ignore_signals()  # a second Ctrl-C while this one is handled: one line
        # A KeyboardInterrupt raised while a TrainingInterrupted unwinds: the second
        # signal came just after training stopped, at its checkpoint.
        stop = e if isinstance(e, TrainingInterrupted) else e.__context__
        if isinstance(stop, TrainingInterrupted):
            run = args.get("resume") or args.get("out")
            parser.exit(130, f"pyro-vae: {stop}; continue with: pyro-vae train --resume "
                             f"{run}\n")
        parser.exit(130, "pyro-vae: interrupted\n")  # outside training: nothing to resume
    except (ValueError, OSError, RuntimeError, MemoryError) as e:
        parser.exit(2, f"pyro-vae: error: {_as_flags(e)}\n")
    return 0


def _named_folder(value: Optional[str], option: str) -> None:
    """Refuse an empty folder name (it would mean the working folder)."""
    if value is not None and not value.strip():
        raise ValueError(f"{option}: give the run folder (got an empty name)")


def _ignore_signals() -> None:
    """From here to the exit, SIGINT and SIGTERM print one line each and do nothing else
    (not a traceback from wherever the interpreter is shutting down)."""
    def ignore(signum, frame):
        sys.stderr.write(f"pyro-vae: {signal.Signals(signum).name} ignored: already "
                         f"stopping\n")
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, ignore)


def _train(args: dict, argv) -> None:
    quiet = args.pop("quiet")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    _named_folder(args["resume"], "--resume")
    try:
        if args["resume"] is not None:
            # Only the options given on the command line count as changes.
            given = vars(build_parser(defaults=False).parse_args(argv))
            changes = _config_values({k: v for k, v in given.items() if k in fields})
            if "out" in changes and Path(changes["out"]).resolve() != Path(
                    args["resume"]).resolve():
                raise ValueError(f"--out {changes['out']}: a resumed run stays in its "
                                 f"folder {args['resume']}")
            summary = resume_run(args["resume"], changes, progress=not quiet,
                                 trust_imports=args["trust_imports"])
            config = read_config(Path(args["resume"]) / "config.json", trust_imports=True)
        else:
            config = TrainConfig(**_config_values({k: v for k, v in args.items()
                                                   if k in fields}))
            summary = train_run(config, progress=not quiet,
                                trust_imports=args["trust_imports"])
    finally:
        distributed.teardown()
    if not summary:  # not process 0 of a torchrun
        return
    print(f"run folder: {config.out}")
    if "test_iwae" in summary:
        print(f"test IWAE bound (K = {config.particles}): {summary['test_iwae']:.4f} "
              f"nats per data point")
    bits = (f", {summary['test_elbo_bits_per_dim']:.4f} bits/dim"
            if "test_elbo_bits_per_dim" in summary else "")
    print(f"test ELBO: {summary['test_elbo']:.4f} {summary['units']} (log-"
          f"{summary['likelihood_of']}{bits}; {summary['num_test']} test points; "
          f"{_weights(summary)})")
    if "test_error" in summary:
        print(f"test error: {summary['test_error']:.2f}% (classifier q(y|x), "
              f"{summary['labels']} training labels)")


def _evaluate(args: dict) -> None:
    _named_folder(args["run"], "evaluate RUN")
    r = evaluate_run(args["run"], args["samples"], args["chunk"], args["split"],
                     args["limit"], args["device"], args["seed"],
                     progress=not args["quiet"], surgery_points=args["surgery_points"],
                     trust_imports=args["trust_imports"], compile=args["compile"],
                     precision=args["precision"], data_dir=args["data_dir"],
                     which=args["weights"])
    n = f"{r['num_points']} {r['split']} points"
    print(f"model:           {_weights(r)}")
    print(f"ELBO:            {r['test_elbo']:.4f}   ({r['elbo_estimator']}, {n})")
    if "reconstruction" in r:
        print(f"ELBO surgery, one z ~ q(z|x) per point ({r['surgery_points']} points):")
        print(f"  reconstruction:  {r['reconstruction']:.4f}")
        print(f"  average KL:      {r['avg_kl']:.4f} = I(n; z) "
              f"{r['mutual_information']:.4f} + KL(q(z) || p(z)) {r['marginal_kl']:.4f}"
              f"   (log N = {r['log_n']:.4f})")
        print(f"  reconstruction - average KL: {r['surgery_elbo']:.4f}")
    if "active_units" in r:
        print(f"active units:    {r['active_units']}")
    if "test_error" in r:
        print(f"error of q(y|x): {r['test_error']:.2f}%   ({n})")
    for part in ("surgery", "active_units"):
        if f"{part}_skipped" in r:
            print(f"{'ELBO surgery' if part == 'surgery' else 'active units'} skipped: "
                  f"{r[part + '_skipped']}")
    print(f"{' and '.join(r['written'])} in {args['run']}")
    print(f"log-likelihood: {r['log_likelihood']:.4f} +- {r['log_likelihood_stderr']:.4f} "
          f"{r['units']} (log-{r['likelihood_of']}; {n}, S = {r['num_samples']})")
    if "log_likelihood_bits_per_dim" in r:
        print(f"                = {r['log_likelihood_bits_per_dim']:.4f} +- "
              f"{r['log_likelihood_stderr_bits_per_dim']:.4f} bits/dim "
              f"(D = {r['dims']})")


def _weights(results: dict) -> str:
    """Whose numbers: "the last epoch's weights (epoch 30)"."""
    return f"the {results['weights']} epoch's weights (epoch {results['weights_epoch']})"


if __name__ == "__main__":
    sys.exit(main())
