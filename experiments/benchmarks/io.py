"""Crash-safe prediction files for long evaluation runs.

An eval run over thousands of images gets preempted or killed; it must resume where it stopped
and never score a corrupt record. So predictions go to an append-only JSONL file, one record per
line, each line flushed and fsynced before the next item starts. A crash can then only leave a
last line without its newline: that line is treated as never written. `read_predictions` ignores
it; `PredictionWriter` cuts it off before appending, so the next record starts on a fresh line.
A record written twice (an item redone after a resume) counts once, the later one winning.

Lines are written ASCII-only (json.dumps' default escaping), so a cut can never split a
multi-byte character, and a record's question_id is stored as a string, the key `score` uses.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

_NEWLINE = b"\n"
_TAIL_SCAN_CHUNK = 1 << 16


def _complete_length(path: Path) -> int:
    """Byte length of the file up to and including its last newline."""
    with path.open("rb") as file:
        end = file.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            start = max(0, position - _TAIL_SCAN_CHUNK)
            file.seek(start)
            chunk = file.read(position - start)
            newline_at = chunk.rfind(_NEWLINE)
            if newline_at != -1:
                return start + newline_at + 1
            position = start
        return 0


class PredictionWriter:
    """Appends one JSON record per line to `path`, durably (flush + fsync per record)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            complete = _complete_length(self.path)
            if complete < self.path.stat().st_size:
                logger.warning("%s: dropping a half-written last line before appending", self.path)
                os.truncate(self.path, complete)
        self._file = self.path.open("ab")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record` (which must have a question_id) and make it durable."""
        if "question_id" not in record:
            raise ValueError(f"prediction record has no 'question_id': {dict(record)!r}")
        line = json.dumps({**record, "question_id": str(record["question_id"])}) + "\n"
        self._file.write(line.encode("ascii"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def read_predictions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """question_id -> record from a prediction file (last record per id wins).

    A last line without its newline (a write cut short) is ignored; any other line that is not a
    JSON object with a question_id raises ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file {path} does not exist")
    data = path.read_bytes()
    complete = data.rfind(_NEWLINE) + 1
    if complete < len(data):
        logger.warning("%s: ignoring a half-written last line", path)
    records: dict[str, dict[str, Any]] = {}
    for line_number, line in enumerate(data[:complete].split(_NEWLINE)[:-1], start=1):
        if not line.strip():
            continue
        location = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{location}: corrupt prediction record ({error})") from None
        if not isinstance(record, dict) or "question_id" not in record:
            raise ValueError(f"{location}: prediction record must be a JSON object with a 'question_id'")
        records[str(record["question_id"])] = record
    return records
