"""Documents for calibration and evaluation: `.txt`, `.jsonl` and `.jsonl.xz` files or folders of them.

A `.txt` file is one document; a JSON-lines file holds one object per line with a `text` field (and an
optional `id`), as the shared Gutenberg shards do. Documents are split into a calibration part and a
held-out part *by document*, with a recorded seed, so the two never share text; the split is recorded
(file, sha256, document ids) in the bank manifest.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".jsonl.xz")


class DataError(ValueError):
    """Unreadable or empty data, naming the file."""


@dataclass(frozen=True)
class Document:
    path: Path
    doc_id: str
    text: str = field(repr=False)


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise DataError(f"{path}: no {', '.join(SUFFIXES)} files in the folder")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    if not path.name.endswith(SUFFIXES):
        raise DataError(f"{path}: unknown data format (expected {', '.join(SUFFIXES)})")
    return [path]


def _read_file(path: Path) -> list[Document]:
    if path.suffix == ".txt":
        return [Document(path, path.stem, path.read_text(encoding="utf-8"))]
    opener = lzma.open if path.name.endswith(".xz") else open
    docs = []
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}:{number}: expected an object with a string 'text' field")
                docs.append(Document(path, str(record.get("id", number)), record["text"]))
    except (json.JSONDecodeError, UnicodeDecodeError, lzma.LZMAError, EOFError) as bad:
        raise DataError(f"{path}: unreadable ({bad})") from None
    return docs


def read_documents(paths: list[str | Path]) -> list[Document]:
    """Every document of every file under `paths`, in a stable order."""
    docs = [doc for path in paths for file in _data_files(Path(path)) for doc in _read_file(file)]
    docs = [doc for doc in docs if doc.text.strip()]
    if not docs:
        raise DataError(f"{', '.join(map(str, paths))}: no non-empty documents")
    return docs


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class DataSplit:
    calibration: list[Document]
    held_out: list[Document]
    seed: int

    @classmethod
    def of(cls, docs: list[Document], seed: int, held_out_fraction: float = 0.5) -> DataSplit:
        """Shuffles documents with `seed` and cuts them; each part gets at least one document."""
        if len(docs) < 2:
            raise DataError(f"{docs[0].path}: need at least 2 documents to split calibration from held-out data")
        order = list(docs)
        random.Random(seed).shuffle(order)
        cut = min(len(order) - 1, max(1, round(len(order) * held_out_fraction)))
        return cls(calibration=order[cut:], held_out=order[:cut], seed=seed)

    @cached_property
    def record(self) -> dict:
        """{"calibration": [...], "held_out": [...]} as the bank manifest stores it."""
        return {"calibration": _record(self.calibration), "held_out": _record(self.held_out)}


def _record(docs: list[Document]) -> list[dict]:
    by_file: dict[Path, list[str]] = {}
    for doc in docs:
        by_file.setdefault(doc.path, []).append(doc.doc_id)
    return [{"path": str(path), "sha256": sha256_of(path), "documents": sorted(ids)} for path, ids in by_file.items()]
