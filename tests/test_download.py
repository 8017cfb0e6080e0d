"""Bad input at the door: every unusable record is quarantined with file, line and reason, or the source fails
with a message that says what to fix. Real files throughout."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.lib.artifacts import build_artifact, verify
from tasks.download import normalise_source
from tasks.lib.sources import SourceError, fetch_url, resolve_source
from tasks.spec import ExecutorConfig, SourceSpec, load_spec

from conftest import bundled_docs, write_jsonl


def source(**kw) -> SourceSpec:
    return SourceSpec(**{"name": "t", "kind": "local", "license": "test", **kw})


def run(src: SourceSpec, out: Path, tasks: int = 2) -> dict:
    out.mkdir()
    return normalise_source(resolve_source(src), out, ExecutorConfig(tasks=tasks), out.parent / "_dl")


def read_docs(out: Path) -> list[dict]:
    docs = []
    for p in sorted((out / "docs").glob("*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            docs += [json.loads(line) for line in f]
    return docs


def quarantine(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


def test_bad_records_are_quarantined_with_file_line_and_reason(tmp_path):
    good = bundled_docs("kjv", 20)
    raw = tmp_path / "in.jsonl"
    lines = [json.dumps(d).encode() for d in good[:10]]
    lines += [b'{"id": "broken", "text": "unterminated',                         # line 11: malformed JSON
              b'{"id": "latin1", "text": "caf\xe9 au lait"}',                   # line 12: not UTF-8
              json.dumps({"id": "no-text", "body": "hello"}).encode(),          # line 13: missing field
              json.dumps({"id": "empty", "text": "   \n "}).encode(),           # line 14: empty
              json.dumps({"id": "num", "text": 42}).encode(),                   # line 15: wrong type
              b'["a", "list"]']                                                 # line 16: not an object
    lines += [json.dumps(d).encode() for d in good[10:]]
    raw.write_bytes(b"\n".join(lines) + b"\n")

    summary = run(source(paths=[str(raw)]), tmp_path / "out")

    assert summary["docs"] == 20 and summary["quarantined"] == 6 and summary["records"] == 26
    q = {r["origin"].rsplit(":", 1)[1]: r["reason"] for r in quarantine(tmp_path / "out")}
    assert q["11"].startswith("malformed JSON")
    assert q["12"].startswith("not UTF-8")
    assert q["13"].startswith("missing field 'text'")
    assert q["14"] == "empty text"
    assert "not a string" in q["15"]
    assert q["16"].startswith("not a JSON object")
    assert all(str(raw) in r["origin"] for r in quarantine(tmp_path / "out"))
    docs = read_docs(tmp_path / "out")
    assert sorted(d["id"] for d in docs) == sorted(f"t/{d['id']}" for d in good)
    assert {d["text"] for d in docs} == {d["text"] for d in good}
    assert all(d["metadata"]["source"] == "t" for d in docs)


def test_giant_document_is_quarantined_not_loaded_into_training(tmp_path):
    raw = tmp_path / "giant.jsonl"
    with open(raw, "w") as f:
        f.write(json.dumps({"id": "small", "text": "In the beginning was the word."}) + "\n")
        f.write('{"id": "giant", "text": "' + "word " * 20_000_000 + '"}\n')  # a single 100 MB document
    summary = run(source(paths=[str(raw)]), tmp_path / "out")
    assert summary["docs"] == 1 and summary["quarantined"] == 1
    (reason,) = [r["reason"] for r in quarantine(tmp_path / "out")]
    assert "too large (100,000,000 bytes > max_doc_bytes 5,000,000)" in reason
    assert (tmp_path / "out" / "quarantine.jsonl").stat().st_size < 10_000  # a preview, not the document


def test_mostly_bad_source_fails_naming_the_field(tmp_path):
    raw = write_jsonl(tmp_path / "wrong.jsonl", [{"id": i, "content": "x"} for i in range(10)])
    with pytest.raises(SourceError, match=r"10 of 10 records are unusable \(missing field 'text' x10\).*text_field"):
        run(source(paths=[str(raw)]), tmp_path / "out")


def test_missing_files_fail_with_the_pattern(tmp_path):
    with pytest.raises(SourceError, match=r"source 't': paths pattern .*nothing-\*\.jsonl.* matches no file"):
        resolve_source(source(paths=[str(tmp_path / "nothing-*.jsonl")]))


def test_txt_and_parquet_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("Four score and seven years ago.\n")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad bytes")
    pq.write_table(pa.table({"text": ["one doc", "two doc"], "id": ["p1", "p2"]}), tmp_path / "c.parquet")
    summary = run(source(paths=[str(tmp_path / "*.txt"), str(tmp_path / "*.parquet")]), tmp_path / "out")
    assert summary["docs"] == 3 and summary["quarantine_reasons"] == {"not UTF-8": 1}
    assert {d["id"] for d in read_docs(tmp_path / "out")} == {"t/a", "t/p1", "t/p2"}


def test_parquet_without_text_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(SourceError, match=r"c\.parquet: no column 'text' \(columns: \['body'\]\)"):
        run(source(paths=[str(tmp_path / "c.parquet")]), tmp_path / "out")


def test_hf_datasets_source_from_local_files(tmp_path):
    """A Hugging Face dataset of four files, streamed through `datasets`: one task reads it in order; with 2 or 4
    tasks each streams its own files, and 3 tasks become 2 (a divisor of the file count, so no task streams files
    that are not its own); the same documents and the same quarantined record in every case."""
    docs = bundled_docs("kjv", 20)
    for part in range(4):
        rows = [{"content": d["text"], "id": d["id"]} for d in docs[part * 5:part * 5 + 5]]
        write_jsonl(tmp_path / f"hf-{part}.jsonl", rows + ([{"content": "", "id": "blank"}] if part == 2 else []))
    src = SourceSpec(name="hf", kind="hf", dataset="json", data_files=[str(tmp_path / "hf-*.jsonl")],
                     text_field="content", license="test")
    summary = run(src, tmp_path / "out", tasks=1)
    assert (summary["docs"], summary["quarantined"]) == (20, 1)
    assert read_docs(tmp_path / "out")[0]["text"].startswith("Genesis 1")
    for tasks, used in ((2, 2), (3, 2), (4, 4)):
        parallel = run(src, tmp_path / f"out{tasks}", tasks=tasks)
        assert (parallel["docs"], parallel["quarantined"], parallel["records"]) == (20, 1, 21)
        assert sorted(d["id"] for d in read_docs(tmp_path / f"out{tasks}")) == sorted(f"hf/{d['id']}" for d in docs)
        per_task = [sum(1 for _ in gzip.open(f)) for f in sorted((tmp_path / f"out{tasks}/docs").glob("*.jsonl.gz"))]
        assert len(per_task) == used and min(per_task) > 0
        assert quarantine(tmp_path / f"out{tasks}")[0]["origin"].startswith("hf://json/train[task ")


def test_fineweb_edu_spec_reads_its_schema_through_datasets(tmp_path):
    """The pretrain/7b corpus source as shipped, pointed at a local Parquet file with FineWeb-Edu's columns instead
    of the Hub: the same `datasets` streaming path, ids and metadata taken from those columns."""
    (shipped,) = load_spec("data_specs/fineweb_edu_7b.yaml").sources
    assert (shipped.kind, shipped.dataset, shipped.config) == ("hf", "HuggingFaceFW/fineweb-edu", "sample-10BT")
    rows = [{"text": d["text"], "id": f"<urn:uuid:{i:08d}-0000-4000-8000-000000000000>", "dump": "CC-MAIN-2024-10",
             "url": f"https://example.org/page/{i}", "file_path": f"s3://commoncrawl/crawl-data/{i}.warc.gz",
             "language": "en", "language_score": 0.97, "token_count": len(d["text"]) // 4, "score": 3.4,
             "int_score": 3} for i, d in enumerate(bundled_docs("sotu", 4))]
    rows.append({**rows[0], "id": "<urn:uuid:empty>", "text": "  "})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    local = shipped.model_copy(update={"dataset": "parquet", "config": None,
                                       "data_files": [str(tmp_path / "train-00000-of-00001.parquet")]})
    with pytest.raises(SourceError, match=r"1 of 5 records are unusable \(empty text x1\); this exceeds max_bad_fraction=0.01"):
        run(local, tmp_path / "strict", tasks=1)  # the shipped limit: 1% of 10 M pages
    summary = run(local.model_copy(update={"max_bad_fraction": 0.5}), tmp_path / "out", tasks=1)
    assert (summary["docs"], summary["quarantined"], summary["quarantine_reasons"]) == (4, 1, {"empty text": 1})
    doc = read_docs(tmp_path / "out")[1]
    assert doc["id"] == "fineweb_edu/<urn:uuid:00000001-0000-4000-8000-000000000000>"
    assert doc["metadata"]["url"] == "https://example.org/page/1" and doc["metadata"]["int_score"] == 3
    assert doc["metadata"]["origin"] == "hf://parquet/train:2" and doc["text"] == rows[1]["text"]


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support (the stdlib handler has none), counting range requests."""

    ranges: list[str] = []

    def do_GET(self):
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        rng = self.headers.get("Range")
        if rng:
            RangeHandler.ranges.append(rng)
            start = int(rng.split("=")[1].rstrip("-"))
            self.send_response(206)
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: RangeHandler(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_download_resumes_and_verifies_checksum(tmp_path, http_root):
    root, base = http_root
    payload = gzip.compress("".join(json.dumps(d) + "\n" for d in bundled_docs("sotu", 3)).encode())
    (root / "corpus.jsonl.gz").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    url = f"{base}/corpus.jsonl.gz"
    # An earlier, interrupted download left the first half behind.
    cache.mkdir()
    partial = cache / (hashlib.sha256(url.encode()).hexdigest()[:16] + "-corpus.jsonl.gz.part")
    partial.write_bytes(payload[: len(payload) // 2])
    RangeHandler.ranges.clear()
    path = fetch_url(url, sha, cache, "web")
    assert RangeHandler.ranges == [f"bytes={len(payload) // 2}-"]
    assert path.read_bytes() == payload and not partial.exists()

    summary = run(SourceSpec(name="web", kind="url", url=url, sha256=sha, license="test"), tmp_path / "out")
    assert summary["docs"] == 3


def test_url_checksum_mismatch_is_rejected(tmp_path, http_root):
    root, base = http_root
    (root / "x.jsonl").write_text('{"text": "tampered"}\n')
    with pytest.raises(SourceError, match="sha256 .* the spec expects 0000"):
        fetch_url(f"{base}/x.jsonl", "0" * 64, tmp_path / "cache", "web")
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written kept as if valid


def test_unreachable_url_fails_fast_with_a_hint(tmp_path):
    with pytest.raises(SourceError, match="cannot download .*Check the URL and the network"):
        fetch_url("http://127.0.0.1:9/corpus.jsonl", None, tmp_path / "cache", "web")


def test_a_failed_build_keeps_its_evidence_where_the_error_says(tmp_path):
    """A source that fails its bad-record check names its quarantine file; after the failed build that file
    exists, under `<stage>/failed-<fingerprint>/`. A later successful build of the fingerprint removes it."""
    raw = write_jsonl(tmp_path / "wrong.jsonl", [{"id": i, "content": "x"} for i in range(10)])
    resolved = resolve_source(source(paths=[str(raw)]))
    attempts = []

    def build(out: Path) -> dict:
        attempts.append(out)
        if len(attempts) == 1:
            return normalise_source(resolved, out, ExecutorConfig(tasks=2), tmp_path / "_dl")
        return {"docs": 0}

    params = {"resolved": resolved, "artifacts_dir": str(tmp_path / "store")}
    with pytest.raises(SourceError, match="examples are in ") as failure:
        build_artifact("download", params, build)
    named = Path(str(failure.value).split("examples are in ")[1].split()[0])
    assert named.parent.name.startswith("failed-") and named.name == "quarantine.jsonl"
    assert len(named.read_text().splitlines()) == 10
    stage_dir = tmp_path / "store" / "download"
    assert sorted(p.name[:6] for p in stage_dir.iterdir()) == [".lock-", "failed"]  # no temporary directory
    ref = build_artifact("download", params, build)
    assert verify(ref.dir) is None and not named.parent.exists()


def test_artifact_verification_catches_corruption(tmp_path):
    params = {"x": 2, "artifacts_dir": str(tmp_path)}
    ref = build_artifact("download", params, lambda out: (out / "a.txt").write_text("abc") and {})
    assert verify(ref.dir) is None
    built = (ref.dir / "a.txt").stat().st_mtime_ns
    (ref.dir / "a.txt").write_text("abd")  # same size, new mtime: the stat differs, so the file is hashed
    os.utime(ref.dir / "a.txt", ns=(built, built + 1))
    assert "fails its sha256 check" in verify(ref.dir)
    os.utime(ref.dir / "a.txt", ns=(built, built))  # mtime restored: only a full check sees it
    assert verify(ref.dir) is None and "fails its sha256 check" in verify(ref.dir, full=True)
    record = json.loads((ref.dir / "_artifact.json").read_text())  # a record that lacks a file's mtime: rebuilt
    record["files"] = {rel: entry[:2] for rel, entry in record["files"].items()}
    (ref.dir / "_artifact.json").write_text(json.dumps(record))
    assert "_artifact.json is unreadable: not enough values to unpack" in verify(ref.dir)
    (ref.dir / "_artifact.json").write_text(json.dumps({**record, "files": {"a.txt": [3, record["files"]["a.txt"][1],
                                                                                     built]}}))
    (ref.dir / "a.txt").unlink()
    assert "missing" in verify(ref.dir)


def test_local_files_are_normalised_in_parallel_tasks_with_the_same_result(tmp_path):
    """Four files, a bad record in two of them: 1 and 4 executor tasks keep the same documents and quarantine the
    same records (file:line), and the bad-fraction check sees all of them."""
    docs = bundled_docs("kjv", 40)
    for part in range(4):
        lines = [json.dumps(d) for d in docs[part::4]] + (['{"id": "cut", "text": "unterminated'] if part % 2 else [])
        (tmp_path / f"in-{part}.jsonl").write_text("\n".join(lines) + "\n")
    src = source(paths=[str(tmp_path / "in-*.jsonl")])
    one, four = run(src, tmp_path / "one", tasks=1), run(src, tmp_path / "four", tasks=4)
    assert (one["docs"], one["quarantined"], one["records"]) == (four["docs"], four["quarantined"],
                                                                  four["records"]) == (40, 2, 42)
    assert sorted(d["id"] for d in read_docs(tmp_path / "one")) == sorted(d["id"] for d in read_docs(tmp_path / "four"))
    assert len(list((tmp_path / "four" / "docs").glob("*.jsonl.gz"))) == 4
    run(src, tmp_path / "eight", tasks=8)  # no more tasks than files
    assert len(list((tmp_path / "eight" / "docs").glob("*.jsonl.gz"))) == 4
    assert [q["origin"] for q in quarantine(tmp_path / "four")] == [f"{tmp_path}/in-1.jsonl:11",
                                                                   f"{tmp_path}/in-3.jsonl:11"]
    with pytest.raises(SourceError, match="2 of 42 records are unusable"):
        run(src.model_copy(update={"max_bad_fraction": 0.01}), tmp_path / "strict", tasks=4)
