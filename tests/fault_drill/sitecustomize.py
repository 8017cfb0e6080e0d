"""A fault drill for the recovery tests, installed from outside the product: a test puts this folder on the ranks'
PYTHONPATH (Python imports `sitecustomize` at start-up) and sets TRAIN_FAULT, e.g. `kill:1:4`: rank 1 SIGKILLs
itself once it has finished step 4; `stall` sleeps there instead; `kill-launcher` SIGKILLs torchrun's agent. Only in
a run that started from step 0, so the run that resumes from a checkpoint before that step goes through.

It wraps `model.metrics.Heartbeat.beat` (a rank's "step N done") as that module is imported; the trainer knows
nothing of it."""

import importlib.abc
import importlib.machinery
import os
import sys
import time

FAULT = os.environ.get("TRAIN_FAULT")


def drilled(beat, kind: str, rank: int, step: int):
    def beat_then_fault(self, at: int, done: bool) -> None:
        beat(self, at, done)
        self.first_step = getattr(self, "first_step", at)
        if not done or self.first_step != 1 or (self.rank, at) != (rank, step):
            return
        print(f"[rank {rank}] fault drill: {kind} after step {step}", file=sys.stderr, flush=True)
        if kind == "kill":
            os.kill(os.getpid(), 9)
        elif kind == "kill-launcher":
            os.kill(os.getppid(), 9)
        else:
            time.sleep(3600)
    return beat_then_fault


class InstallDrill(importlib.abc.MetaPathFinder):
    """Finds `model.metrics` as usual, and wraps its Heartbeat once the module has run."""

    def __init__(self, kind: str, rank: int, step: int):
        self.fault = (kind, rank, step)

    def find_spec(self, name, path, target=None):
        if name != "model.metrics":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.Heartbeat.beat = drilled(module.Heartbeat.beat, *self.fault)
        spec.loader.exec_module = exec_module
        return spec


if FAULT:
    kind, rank, step = FAULT.split(":")
    if kind not in ("kill", "kill-launcher", "stall"):
        raise ValueError(f"TRAIN_FAULT={FAULT}: the kind must be kill, kill-launcher or stall")
    sys.meta_path.insert(0, InstallDrill(kind, int(rank), int(step)))
