"""Pretraining flow: the (cached) data flow, then Megatron-Core training launched with torchrun.

    python -m flows.pretrain --preset tiny
"""

from __future__ import annotations

import argparse

from prefect import flow

from flows.data import data_flow, require_server
from tasks.pretrain import PretrainConfig, preflight, pretrain
from tasks.spec import resolve_path


@flow(name="pretrain")
def pretrain_flow(spec_path: str = "data_specs/default.yaml", preset: str = "tiny", tp: int = 1, pp: int = 1,
                  nproc: int | None = None, gpus_required: bool = False, train: dict | None = None,
                  runs_dir: str = "runs", launch: dict | None = None) -> str:
    """Build (or reuse) the shards for `spec_path`, then train `preset` on them; returns the run directory.
    `launch` sets multi-node fields of PretrainConfig (nnodes, launcher, rdzv_endpoint, node_rank, slurm)."""
    config = PretrainConfig(preset=preset, tp=tp, pp=pp, nproc=nproc, gpus_required=gpus_required,
                            train=train or {}, **(launch or {}))
    preflight(config)
    manifest = data_flow(spec_path)
    return pretrain(manifest, config, str(resolve_path(runs_dir)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="data_specs/default.yaml")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    require_server()
    print(pretrain_flow(args.spec, args.preset, args.tp, args.pp,
                        train={"steps": args.steps} if args.steps else None))
