"""A pipeline is a list of steps: each a stage, its settings and its input steps' artifacts, built as values
before anything runs. Planning (tasks/lib/plan.py) and running walk the same list; a step's fingerprint, and so
where its artifact lives, is known from the list alone.

    steps = [download, clean, dedup, ...]      # tasks/data_steps.py builds them from the spec
    plan(steps)                                # reuse or build, and why: nothing runs
    for s in steps: build_step(s)              # plain: no Prefect (tests, scripts)
    run_steps(steps)                           # as Prefect tasks, cached (tasks/prefect_tasks.py)

Each stage module `tasks/<stage>.py` has a plain `build(out, **settings) -> summary`; a step runs it through the
artifact store (tasks/lib/artifacts.py: built under a temporary name, recorded, verified on reuse).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

from tasks.lib.artifacts import ArtifactRef, artifact_path, build_artifact, input_refs

ALL_SOURCES = "all sources"


@dataclass(frozen=True, eq=False)
class Step:
    """One stage run. `params` are its build function's arguments, every default filled in; the upstream
    artifacts among them are the input steps' `ref`s."""

    stage: str
    what: str  # the source it works on, or ALL_SOURCES
    params: dict

    @functools.cached_property
    def ref(self) -> ArtifactRef:
        """Where its artifact is (or will be): `<artifacts_dir>/<stage>/<fingerprint>`."""
        path = artifact_path(self.stage, self.params)
        return ArtifactRef(stage=self.stage, fingerprint=path.name, path=str(path))

    @property
    def inputs(self) -> list[ArtifactRef]:
        return input_refs(self.params)

    @property
    def name(self) -> str:
        """The task run's name: `clean-sotu`, or the stage alone for all sources."""
        return self.stage if self.what == ALL_SOURCES else f"{self.stage}-{self.what}"


def stage_module(stage: str):
    return importlib.import_module(f"tasks.{stage}")


def step(stage: str, what: str = ALL_SOURCES, **params) -> Step:
    """A step of `stage` with the arguments of its build function (checked against it, defaults filled in: the
    fingerprint covers parameters left at their defaults too)."""
    bound = inspect.signature(stage_module(stage).build).bind(Path(), **params)
    bound.apply_defaults()
    return Step(stage, what, {k: v for k, v in bound.arguments.items() if k != "out"})


def build_step(s: Step) -> ArtifactRef:
    """Build (or reuse) the step's artifact in this process, without Prefect."""
    build = stage_module(s.stage).build
    return build_artifact(s.stage, s.params, lambda out: build(out, **s.params))
