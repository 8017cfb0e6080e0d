"""Why a stage reruns: the plan of a data-flow run, one row per stage, before anything is built.

A stage is reused when its artifact `<stage>/<fingerprint>` verifies. Otherwise the plan compares the key it
would build (`_artifact.json`'s "key": the code definitions the stage reaches and the parameters it hashes) with
the nearest earlier artifact of the same stage, the one with the fewest differences, and names them:

    code        tasks/lib/blocks.py (keep_in_sample)
    setting     sharding.seq_len: 128 -> 256
    upstream    dedup 3f2a9c1d -> 77b0e412
    input       new data/raw/more.jsonl; changed ...; removed ...

The plan walks the data flow's step list (tasks/lib/steps.py, made by tasks/data_steps.py) before it runs:
`flows/data.py` makes it at the start of every run (logged, and a Prefect table artifact), and `--plan` /
`plan: true` stops there.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.lib.artifacts import FAILED_PREFIX, RECORD_NAME, TMP_PREFIX, stage_key, verify
from tasks.lib.steps import Step


@dataclass(frozen=True)
class PlanRow:
    stage: str
    what: str  # the source, or "all sources"
    decision: str  # "reuse" or "build"
    fingerprint: str
    reason: str


def plan(steps: list[Step], full: bool = False) -> list[PlanRow]:
    """The decision for each step, in order. `full`: check reused artifacts by sha256, not only by stat (a `verify`
    plan that stops there; the plan that starts a run checks by stat, and each step hashes as it is reached)."""
    return [plan_row(s.stage, s.what, s.params, s.ref.dir, full) for s in steps]


# The name a stage parameter has in the data spec, where it differs ("": the part below it is the spec's own).
SPEC_FIELD = {("dedup", "config"): "dedup", ("decontaminate", "config"): "decontamination",
              ("tokenizer", "config"): "tokenizer", ("shard", "config"): "sharding", ("append", "config"): "sharding",
              ("download", "resolved"): "", ("decontaminate", "references"): "decontamination.against"}


def plan_row(stage: str, what: str, params: dict, path: Path, full: bool = False) -> PlanRow:
    """The decision for one stage: reuse the artifact at `path` if it verifies, else build, and why."""
    problem = verify(path, full=full)
    if problem is None:
        return PlanRow(stage, what, "reuse", path.name, "")
    if (path / RECORD_NAME).is_file():  # built before, now changed on disk
        return PlanRow(stage, what, "build", path.name, problem)
    return PlanRow(stage, what, "build", path.name, why_build(stage, stage_key(stage, params), path.parent))


def why_build(stage: str, key: dict, stage_dir: Path) -> str:
    """What differs between `key` and the nearest earlier artifact of the stage, as one line."""
    earlier = []
    for manifest in stage_dir.glob(f"*/{RECORD_NAME}"):
        if manifest.parent.name.startswith((FAILED_PREFIX, TMP_PREFIX)):
            continue
        with contextlib.suppress(ValueError, OSError, KeyError):  # a record being written, or unreadable
            meta = json.loads(manifest.read_text())
            earlier.append((differences(stage, meta["key"], key), -meta["built_at"], meta["fingerprint"]))
    if not earlier:
        return "no earlier build of this stage"
    found, _, fingerprint = min(earlier, key=lambda e: (len(e[0]), e[1]))
    return f"vs {fingerprint[:8]}: " + "; ".join(found) if found else f"same key as {fingerprint[:8]}"


def differences(stage: str, old: dict, new: dict) -> list[str]:
    """Named differences, code first, then settings, upstream artifacts and input files."""
    code = [k for k in old["code"].keys() | new["code"].keys() if old["code"].get(k) != new["code"].get(k)]
    by_module: dict[str, list[str]] = {}
    for definition in sorted(code):
        module, name = definition.split(":", 1)
        by_module.setdefault(module, []).append(name)
    found = [f"code {module.replace('.', '/')}.py ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
             for module, names in by_module.items()]
    before, after = flatten(old["params"]), flatten(new["params"])
    settings, upstream, files = [], [], {"new": [], "changed": [], "removed": []}
    for path in sorted(before.keys() | after.keys(), key=str):
        was, now = before.get(path, "<unset>"), after.get(path, "<unset>")
        if was == now:
            continue
        if "files" in path[:-1]:
            kind = "new" if path not in before else "removed" if path not in after else "changed"
            files[kind].append(path[-1])
        elif is_ref(was) or is_ref(now):
            if is_ref(was) and is_ref(now) and was["stage"] == now["stage"]:
                upstream.append(f"upstream {now['stage']} {was['fingerprint'][:8]} -> {now['fingerprint'][:8]}")
            else:
                upstream.append(f"upstream {'.'.join(map(str, path))}: {ref_text(was)} -> {ref_text(now)}")
        else:
            field = ".".join(str(p) for p in (SPEC_FIELD.get((stage, path[0]), path[0]), *path[1:]) if p)
            settings.append(f"{field}: {short(was)} -> {short(now)}")
    found += settings + upstream
    if any(files.values()):
        found.append("input files " + ", ".join(
            f"{kind} {', '.join(names[:3])}{f' (+{len(names) - 3} more)' if len(names) > 3 else ''}"
            for kind, names in files.items() if names))
    return found


def is_ref(value: Any) -> bool:
    """An upstream artifact as a key holds it (ArtifactRef.fingerprint_payload)."""
    return isinstance(value, dict) and value.keys() == {"stage", "fingerprint"}


def ref_text(value: Any) -> str:
    return f"{value['stage']} {value['fingerprint'][:8]}" if is_ref(value) else "none"


def flatten(value: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """{("a", "b"): leaf}; list items are keyed by position; an upstream artifact is one leaf."""
    if isinstance(value, dict) and not is_ref(value):
        items = value.items()
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: dict[tuple, Any] = {}
    for k, v in items:
        flat.update(flatten(v, prefix + (k,)))
    return flat


def short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def format_plan(rows: list[PlanRow]) -> str:
    """One aligned line per stage: `reuse <fingerprint>` or `build <fingerprint>  <reason>`. (No square
    brackets: `prefect deployment run --watch` reads them as console markup and drops them.)"""
    width = max((len(f"{r.stage} ({r.what})") for r in rows), default=0)
    return "\n".join(f"{f'{r.stage} ({r.what})':<{width}}  {r.decision:<5} {r.fingerprint}"
                     + (f"  {r.reason}" if r.reason else "") for r in rows)
