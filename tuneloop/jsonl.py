"""Reading user-supplied JSONL: one JSON object per line, errors that name file and line."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneloop.errors import InputError


def json_objects(path: Path, text: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yield (line number, where, object) for each non-empty line; `where` reads 'PATH line N'."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"Malformed JSON in {where}: {exc.msg}") from None
        except RecursionError:
            raise InputError(f"Malformed JSON in {where}: nested too deeply") from None
        except ValueError as exc:  # e.g. an integer of more than 4,300 digits
            raise InputError(f"Malformed JSON in {where}: {exc}") from None
        if not isinstance(record, dict):
            raise InputError(f"Expected a JSON object in {where}")
        yield lineno, where, record
