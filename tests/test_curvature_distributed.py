"""Sums over data are all-reduced across ``torch.distributed`` ranks: two gloo CPU
processes, each with half the data, get the single-process curvature."""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bayescurv.curvature import compute

STRUCTURES = ("diag", "kfac", "kfac-reduce", "ekfac", "full", "lowrank", "diag+lowrank")


class Net(nn.Module):
    """A module (``extra``) that only batches of 3 reach: rank 1 never calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                  nn.Linear(15, 4))
        self.extra = nn.Linear(4, 4)

    def forward(self, x):
        h = self.body(x)
        return h + self.extra(torch.tanh(h)) if x.shape[0] == 3 else h


def _problem():
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(10, 2, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    return model, x, y


def _results(data, model) -> dict[str, torch.Tensor]:
    out = {}
    for s in STRUCTURES:
        # lowrank with rank >= N * C is exact; diag+lowrank truncates (rank 6 < 40)
        c = compute(model, "classification", data, structure=s,
                    rank=40 if s == "lowrank" else 6)
        out[s] = c.matrix.to_dense()
        out[s + ":loss"] = c.loss
        out[s + ":n"] = torch.tensor(c.num_data)
    return out


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x, y = _problem()
        half = slice(0, 6) if rank == 0 else slice(6, 10)  # unequal halves, two batches
        xs, ys = x[half], y[half]
        cut = 3 if rank == 0 else 2
        data = [(xs[:cut], ys[:cut]), (xs[cut:], ys[cut:])]
        torch.save(_results(data, model), os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_single_process():
    model, x, y = _problem()
    ref = _results([(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:8], y[6:8]), (x[8:], y[8:])], model)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
        for r in range(2):
            got = torch.load(os.path.join(tmp, f"rank{r}.pt"))
            for key, want in ref.items():
                if key.startswith("diag+lowrank") and not key.endswith((":loss", ":n")):
                    # the low-rank part is a streamed truncation: its diagonal is exact
                    torch.testing.assert_close(torch.diagonal(got[key]), torch.diagonal(want))
                    continue
                torch.testing.assert_close(got[key], want, msg=f"rank {r}, {key}")
