"""The data pipeline as a list of steps (tasks/lib/steps.py), built from a data spec: a full build from every file,
or an increment of new files on top of a manifest. No Prefect: the data flow (flows/data.py) plans and runs these
lists, and a plain script can build them (`build_step`), as tests/scripts/build_data.py does."""

from __future__ import annotations

from tasks.append import Base
from tasks.decontaminate import reference_sets
from tasks.lib.manifest import DataLineage, Increment
from tasks.lib.sources import ResolvedSource
from tasks.lib.steps import Step, step
from tasks.spec import DataSpec
from tasks.tokenizer import pin_pretrained


def cleaning_steps(spec: DataSpec, resolved: dict[str, ResolvedSource]) -> list[Step]:
    """Download and clean each given source."""
    store, steps = str(spec.artifacts_path()), []
    for source in spec.sources:
        if source.name in resolved:
            downloaded = step("download", source.name, resolved=resolved[source.name], executor=spec.executor,
                              artifacts_dir=store)
            steps += [downloaded, step("clean", source.name, downloaded=downloaded.ref, source_name=source.name,
                                       cleaning=spec.cleaning_for(source), executor=spec.executor,
                                       artifacts_dir=store)]
    return steps


def dedup_steps(spec: DataSpec, cleaned: list[Step], base: Base | None) -> list[Step]:
    """Dedup across the cleaned sources (and against `base`'s index), then decontaminate if the spec says so; the
    last step's documents are the ones to tokenize."""
    store = str(spec.artifacts_path())
    deduped = step("dedup", cleaned={s.what: s.ref for s in cleaned if s.stage == "clean"}, config=spec.dedup,
                   executor=spec.executor, base=base.dedup if base else None, artifacts_dir=store)
    if not spec.decontamination.enabled:
        return [deduped]
    return [deduped, step("decontaminate", documents=deduped.ref, references=reference_sets(spec.decontamination),
                          config=spec.decontamination, executor=spec.executor, artifacts_dir=store)]


def full_build_steps(spec: DataSpec, resolved: dict[str, ResolvedSource], lineage: DataLineage) -> list[Step]:
    """A full build from every file: download -> clean -> dedup -> decontaminate -> tokenizer -> shard."""
    store = str(spec.artifacts_path())
    steps = cleaning_steps(spec, resolved)
    steps += dedup_steps(spec, steps, base=None)
    documents = steps[-1]
    if spec.tokenizer.pretrained:
        tokenizer = step("tokenizer", documents=None, config=spec.tokenizer, executor=spec.executor,
                         artifacts_dir=store, pretrained=pin_pretrained(spec.tokenizer))
    else:
        tokenizer = step("tokenizer", documents=documents.ref, config=spec.tokenizer, executor=spec.executor,
                         artifacts_dir=store)
    deduped = next(s for s in steps if s.stage == "dedup")
    lineage = lineage.model_copy(update={"dedup_dir": str(deduped.ref.dir),
                                         "upstream": {f"{s.stage}/{s.what}": s.ref.fingerprint for s in steps}})
    return [*steps, tokenizer, step("shard", documents=documents.ref, tokenizer=tokenizer.ref, config=spec.sharding,
                                    lineage=lineage, executor=spec.executor, artifacts_dir=store)]


def increment_steps(spec: DataSpec, resolved: dict[str, ResolvedSource], base: Base,
                    lineage: DataLineage) -> list[Step]:
    """Only the new files: download -> clean -> dedup against the base's index -> decontaminate -> shard with
    the base's tokenizer -> append to the base's manifest."""
    store = str(spec.artifacts_path())
    new = {name: r.model_copy(update={"files": base.new_files[name]})
           for name, r in resolved.items() if name in base.new_files}
    steps = cleaning_steps(spec, new)
    steps += dedup_steps(spec, steps, base=base)
    upstream = {f"{s.stage}/{s.what}": s.ref.fingerprint for s in steps}
    added = step("shard", "new documents", documents=steps[-1].ref, tokenizer=base.tokenizer, config=spec.sharding,
                 increment=True, lineage=DataLineage(spec_path=lineage.spec_path, new_files=base.new_files,
                                                     upstream=upstream),
                 executor=spec.executor, artifacts_dir=store)
    increments = [*base.manifest.lineage.increments,
                  Increment(data_version=base.manifest.data_version + 1, new_files=base.new_files,
                            shards=str(added.ref.dir), upstream=upstream)]
    deduped = next(s for s in steps if s.stage == "dedup")
    lineage = base.manifest.lineage.model_copy(update={**lineage.model_dump(exclude_unset=True),
                                                       "dedup_dir": str(deduped.ref.dir), "increments": increments})
    return [*steps, added, step("append", base=base.artifact, added=added.ref, config=spec.sharding,
                                lineage=lineage, artifacts_dir=store)]
