"""Run under two processes: each fits and targets on its own shard; rank 0 saves what it got.

torchrun --nproc_per_node 2 tests/dist_engine.py OUT.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from conftest import build_llama
from test_influence import CANDIDATES, FIT, TARGET

from hfinfluence import Influence, InfluenceConfig


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = Influence(build_llama(), InfluenceConfig(sketch="gaussian", sketch_dims=(6, 8)))
    fit_rows = {k: v[rank::world] for k, v in FIT.items()}
    target_rows = {k: v[rank::world] for k, v in TARGET.items()}
    engine.fit([fit_rows]).set_target([target_rows])
    scores = engine.score(CANDIDATES)
    gathered = [torch.zeros_like(scores) for _ in range(world)]
    dist.all_gather(gathered, scores)
    if rank == 0:
        factors = {n: c.gradient_covariance for n, c in engine.curvature.items()}
        torch.save({"world": world, "scores": gathered, "factors": factors}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
