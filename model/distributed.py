"""Process-group helpers shared by training launchers and single-process tools (export, tests)."""

from __future__ import annotations

import os
import socket

from model import compat


def free_port() -> int:
    """torchrun's static rendezvous hangs with --master-port 0, so pick a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process() -> None:
    """A one-rank gloo group with Megatron's parallel state (TP=PP=1), for tools that build a model outside
    torchrun; a no-op if a group already exists."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    compat.apply()
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(1, 1)
    compat.manual_seed(0)  # Megatron's RNG tracker must exist to build layers
