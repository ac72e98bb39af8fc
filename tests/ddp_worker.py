"""``pyro-vae`` for the distributed tests, run by ``torchrun`` (or alone, as one
process): ``python tests/ddp_worker.py [--kill-at K] -- train ...``.

Defines ``DeltaEncoder``, a guide without noise (q(z|x) a point mass at the network's
output; ``--guide __main__:DeltaEncoder``): training is then deterministic, and two
processes must give one process's parameters up to float rounding. ``--kill-at K``:
process 0 kills itself (SIGKILL) just before its K-th training step.
"""

import argparse
import os
import signal
import sys

from torch import nn

import pyro.distributions as dist


class DeltaEncoder(nn.Module):
    def __init__(self, x_dim: int, z_dim: int, hidden=(32,)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim, hidden[0]), nn.Tanh(),
                                 nn.Linear(hidden[0], z_dim))

    def forward(self, x):
        return dist.Delta(self.net(x), event_dim=1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    from pyro_vae import cli, train

    if args.kill_at and os.environ.get("RANK", "0") == "0":
        step_call, calls = train.Step.__call__, [0]

        def step(*a, **kw):
            calls[0] += 1
            if calls[0] == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step_call(*a, **kw)

        train.Step.__call__ = step
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
