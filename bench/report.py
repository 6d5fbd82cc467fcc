"""How the benchmarks report: a JSON line per measured row as it is measured, a Markdown table of all rows at
the end, and the rows as a JSON file when `--json` asks for one."""

from __future__ import annotations

import json
from pathlib import Path


def print_row(row: dict, digits: int = 4) -> None:
    print(json.dumps({k: round(v, digits) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def print_table(header: list[str], lines: list[list[str]]) -> None:
    """A Markdown table: `header` cells, then one list of formatted cells per line."""
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")


def save_json(rows, path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(rows, indent=1))
