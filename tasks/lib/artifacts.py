"""Content-addressed stage outputs, and the Prefect cache that points at them.

Every stage writes one directory, `<artifacts_dir>/<stage>/<fingerprint>`, where the fingerprint hashes the stage's
code, its config and its upstream fingerprints. The directory is built under a temporary name and renamed into
place only when complete, with `_artifact.json` (its build record) listing each file's size, sha256 and mtime, the
key the fingerprint hashed, and its inputs: the upstream artifacts it was built from, as `stage/fingerprint`.
(Prefect caches the task's return value under the same fingerprint: tasks/prefect_tasks.py.)

A build holds a lock per fingerprint, so concurrent runs of a stage build it once; a build killed mid-way leaves
its temporary directory, which the next build of that stage removes once the owning process is gone. A build that
fails keeps its evidence (quarantine, logs, partial output) in `<stage>/failed-<fingerprint>/`, which errors name
and the next successful build of that fingerprint removes. `python -m tasks.gc` removes what nothing refers to
any more, failed builds included.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

import psutil
from pydantic import BaseModel

from tasks.lib.code_version import code_version, stage_code_parts
from tasks.lib.log import get_logger

RECORD_NAME = "_artifact.json"  # an artifact's build record (not a shard manifest.json)
TMP_PREFIX = ".tmp-"  # a build in progress: .tmp-<fingerprint>-<host>-<pid>
TMP_NAME = re.compile(r"\.tmp-(?P<fingerprint>[0-9a-f]+)-(?P<host>.+)-(?P<pid>\d+)")
FAILED_PREFIX = "failed-"  # a failed build's evidence: failed-<fingerprint>


class ArtifactRef(BaseModel):
    """What a stage returns: where its output lives and which fingerprint produced it."""

    stage: str
    fingerprint: str
    path: str

    @property
    def dir(self) -> Path:
        return Path(self.path)

    @property
    def id(self) -> str:
        """`stage/fingerprint`: how build records and train states name it as an input."""
        return f"{self.stage}/{self.fingerprint}"

    def meta(self) -> dict:
        return json.loads((self.dir / RECORD_NAME).read_text())

    def fingerprint_payload(self) -> dict:
        """Downstream keys name an upstream artifact by fingerprint, never by where the store lives."""
        return {"stage": self.stage, "fingerprint": self.fingerprint}


class PinnedFiles(BaseModel):
    """Files of a folder outside the store (a pretrained model or tokenizer), pinned to their content: a key
    follows their bytes, not where the folder lives."""

    directory: str
    files: dict[str, str]  # name -> sha256

    def fingerprint_payload(self) -> dict:
        return {"files": self.files}


def pin_files(directory: str | Path, names: list[str], setting: str) -> PinnedFiles:
    """Checksum `names` (those that exist) in `directory`; `setting` is what to change when it is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{setting}: {directory} is not a directory")
    found = {name: sha256_file(directory / name) for name in names if (directory / name).is_file()}
    if not found:
        raise FileNotFoundError(f"{setting}: {directory} holds none of {', '.join(names)}")
    return PinnedFiles(directory=str(directory), files=found)


def canonical(value: Any, keyed: bool = True) -> Any:
    """A JSON-able form of task parameters with a stable order. `keyed` (for hashing into a key): a model that
    has a `fingerprint_payload` contributes only that, the fields that change the output; else (for records that
    people and `tasks.gc` read) everything, paths included."""
    if keyed and hasattr(value, "fingerprint_payload"):
        return canonical(value.fingerprint_payload())
    if isinstance(value, BaseModel):
        return canonical(value.model_dump(mode="json"), keyed)
    if isinstance(value, dict):
        return {str(k): canonical(v, keyed) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canonical(v, keyed) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Parameters that describe a run without changing its output: where it is stored, and lineage records that are
# already implied by the upstream fingerprints.
UNKEYED_PARAMS = {"artifacts_dir", "lineage"}


def stage_key(stage: str, params: dict) -> dict:
    """What a stage run's fingerprint hashes: each code definition the stage reaches, by hash, and the parameters
    that change its output. `_artifact.json` records it, and a plan (tasks/lib/plan.py) compares it."""
    return {"code": stage_code_parts(stage),
            "params": canonical({k: v for k, v in params.items() if k not in UNKEYED_PARAMS})}


def stage_fingerprint(stage: str, params: dict) -> str:
    """Fingerprint of one stage run: its code, its config and its upstream fingerprints."""
    key = stage_key(stage, params)
    payload = json.dumps({"stage": stage, "code": code_version(key["code"]), "params": key["params"]},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def artifact_path(stage: str, params: dict) -> Path:
    return Path(params["artifacts_dir"]) / stage / stage_fingerprint(stage, params)


def store_of(artifact_dir: str | Path) -> Path:
    """The store (artifacts_dir) that holds an artifact: `<store>/<stage>/<fingerprint>`."""
    return Path(artifact_dir).parents[1]


def verify(path: Path, full: bool = False) -> str | None:
    """None if the artifact at `path` is complete and unmodified, else a sentence saying what is wrong.

    By default it checks what a stat shows: every file present, with the size and mtime recorded at build; a file
    whose stat differs is hashed. `full` hashes every file (the data flow's and `tasks.gc`'s `--verify`). A file
    rewritten to the same size with its mtime restored passes the stat check: that is its accepted blind spot."""
    manifest = path / RECORD_NAME
    if not manifest.is_file():
        return f"{path} is missing or incomplete (no {RECORD_NAME})"
    try:
        files = {rel: (size, digest, mtime_ns) for rel, (size, digest, mtime_ns)
                 in json.loads(manifest.read_text())["files"].items()}
    except (ValueError, KeyError, TypeError) as err:  # not JSON, or not [size, sha256, mtime] per file
        return f"{manifest} is unreadable: {err}"
    for rel, (size, digest, mtime_ns) in files.items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        stat = f.stat()
        if stat.st_size != size:
            return f"{f} has {stat.st_size} bytes, expected {size}"
        if (full or stat.st_mtime_ns != mtime_ns) and sha256_file(f) != digest:
            return f"{f} fails its sha256 check"
    return None


def input_refs(value: Any) -> list[ArtifactRef]:
    """The upstream artifacts among a stage's parameters (nested in dicts and lists too), in order."""
    if isinstance(value, ArtifactRef):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [ref for item in items for ref in input_refs(item)]


def build_artifact(stage: str, params: dict, build: Callable[[Path], dict]) -> ArtifactRef:
    """Return the verified artifact for (stage, params), building it with `build(tmp_dir) -> summary` if needed.
    The summary is stored in `_artifact.json`, with the inputs: the upstream artifacts among `params`."""
    log = get_logger()
    final = artifact_path(stage, params)
    ref = ArtifactRef(stage=stage, fingerprint=final.name, path=str(final))
    if verify(final) is None:
        log.info(f"{stage}: reusing verified artifact {final}")
        return ref
    final.parent.mkdir(parents=True, exist_ok=True)
    with fingerprint_lock(final):
        problem = verify(final)  # again: a run we waited for may have built it
        if problem is None:
            log.info(f"{stage}: reusing verified artifact {final}, built meanwhile by another run")
            return ref
        if final.exists():
            log.warning(f"{stage}: rebuilding because {problem}")
        remove_stale_temporaries(final.parent)
        return _build(stage, params, build, final, ref)


def _build(stage: str, params: dict, build: Callable[[Path], dict], final: Path, ref: ArtifactRef) -> ArtifactRef:
    log = get_logger()
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        summary = build(tmp)
        summary["seconds"] = round(time.perf_counter() - started, 2)
        files = {str(p.relative_to(tmp)): file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        # "key" is what the fingerprint hashed, per code definition: what a plan compares a new build with.
        meta = {"stage": stage, "fingerprint": final.name, "params": canonical(params, keyed=False),
                "key": stage_key(stage, params), "inputs": [r.id for r in input_refs(params)],
                "summary": summary, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "built_at": time.time()}
        (tmp / RECORD_NAME).write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as err:
        keep_failed_build(tmp, final, err)
        raise
    except BaseException:  # interrupted: nothing to learn from the partial output
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(failed_path(final), ignore_errors=True)  # an earlier failure's evidence
    log.info(f"{stage}: built {final} in {summary['seconds']} s")
    return ref


def file_record(path: Path) -> tuple[int, str, int]:
    """(size, sha256, mtime in ns) of a built file, as `_artifact.json` lists it and `verify` checks it."""
    stat = path.stat()
    return stat.st_size, sha256_file(path), stat.st_mtime_ns


def failed_path(final: Path) -> Path:
    """Where a failed build of the artifact `final` keeps its files."""
    return final.parent / f"{FAILED_PREFIX}{final.name}"


def keep_failed_build(tmp: Path, final: Path, err: Exception) -> None:
    """Move a failed build's directory to `<stage>/failed-<fingerprint>/` (replacing an earlier failure's) and
    make the error name the files there: it was raised while they lay under the temporary name."""
    failed = failed_path(final)
    shutil.rmtree(failed, ignore_errors=True)
    os.replace(tmp, failed)
    err.args = tuple(a.replace(str(tmp), str(failed)) if isinstance(a, str) else a for a in err.args)
    err.add_note(f"the failed build's files (quarantine, logs, partial output) are kept in {failed}")
    get_logger().error(f"{final.parent.name}: build failed; its files are kept in {failed}")


@contextlib.contextmanager
def fingerprint_lock(final: Path):
    """Hold `<stage dir>/.lock-<fingerprint>` while building: a second run of the same stage waits for the first
    and then reuses its output instead of building it again. The kernel releases the lock if its holder dies."""
    lock_path = final.parent / f".lock-{final.name}"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            get_logger().info(f"{final.parent.name}: another run is building {final}; waiting for it ({lock_path})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_stale_temporaries(stage_dir: Path) -> list[Path]:
    """Remove the temporary build directories in `stage_dir` whose process is gone (killed mid-build): those made
    on this host by a process id that no longer runs. Returns what was removed."""
    removed = []
    for tmp in stage_dir.glob(f"{TMP_PREFIX}*"):
        owner = TMP_NAME.fullmatch(tmp.name)
        if owner is None or owner["host"] != socket.gethostname():
            continue  # not ours to judge: another host's process may be alive
        if not psutil.pid_exists(int(owner["pid"])):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            get_logger().info(f"{stage_dir.name}: removed {tmp}, left by a run that no longer exists")
    return removed


def stage_row(label: str, ref: ArtifactRef) -> dict:
    """A stage's summary in the columns every stage shares (for the data-flow table and progress lines)."""
    meta = ref.meta()
    s = meta["summary"]
    return {"stage": ref.stage, "what": label,
            "docs in": s.get("docs_in", s.get("records", "")),
            "docs out": s.get("docs_out", s.get("docs", s.get("docs_train", ""))),
            "MB in": _mb(s.get("bytes_in")), "MB out": _mb(s.get("bytes_out", s.get("bytes"))),
            "quarantined/dropped": s.get("quarantined", s.get("dropped", s.get("removed", ""))),
            "tokens": s.get("tokens", ""), "seconds": s.get("seconds", ""),
            "built": meta["created"], "artifact": ref.fingerprint}


def _mb(value) -> str:
    return f"{value / 1e6:.2f}" if isinstance(value, (int, float)) else ""
