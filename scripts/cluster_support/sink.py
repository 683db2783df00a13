"""The shared directory sink read back by payload id.

Objects are gzip (or plain) NDJSON, one envelope per line with the payload inside
(`{"received_at": …, "version": …, "payload": {"id": …}}`). Only finished objects are visible
(the directory sink renames a hidden temp file into place) and an object is never changed once
there (a re-send after a crash writes the same bytes to the same key), so each file is parsed
once and remembered: polling "has everything landed?" costs only the new objects.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .load import Ledger


@dataclass(frozen=True)
class Figures:
    acknowledged: int
    landed: int  # acknowledged ids found in the sink
    lost: int  # acknowledged ids not found
    duplicates: int  # copies beyond the first, over every id in the sink
    refused_landed: int  # answered non-202 yet found: the contract broken
    unknown: int  # no answer
    unknown_landed: int
    strangers: int  # ids found that no client sent
    objects: int
    stored: int  # payload lines in the sink


class SinkReader:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._ids: dict[Path, list[str]] = {}

    def scan(self) -> Counter[str]:
        """Every payload id in the sink, with how many times it is stored."""
        for path in self.root.rglob("*.ndjson*") if self.root.exists() else []:
            if path.name.startswith(".") or path in self._ids:
                continue
            try:
                body = path.read_bytes()
                if path.name.endswith(".gz"):
                    body = gzip.decompress(body)
            except (OSError, EOFError, zlib.error):
                continue  # renamed away or not whole: read it at the next scan
            self._ids[path] = [json.loads(line)["payload"]["id"] for line in body.splitlines() if line]
        counts: Counter[str] = Counter()
        for ids in self._ids.values():
            counts.update(ids)
        return counts

    @property
    def objects(self) -> int:
        return len(self._ids)

    def figures(self, ledger: Ledger) -> Figures:
        counts = self.scan()
        acked, refused, unknown = set(ledger.acked), set(ledger.refused), set(ledger.unknown)
        landed = sum(1 for i in acked if counts[i])
        return Figures(
            acknowledged=len(acked), landed=landed, lost=len(acked) - landed,
            duplicates=sum(c - 1 for c in counts.values() if c > 1),
            refused_landed=sum(1 for i in refused if counts[i]),
            unknown=len(unknown), unknown_landed=sum(1 for i in unknown if counts[i]),
            strangers=sum(1 for i in counts if i not in acked and i not in refused and i not in unknown),
            objects=self.objects, stored=sum(counts.values()))

    def missing(self, ledger: Ledger) -> int:
        counts = self.scan()
        return sum(1 for i in set(ledger.acked) if not counts[i])
