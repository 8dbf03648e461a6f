"""An evaluation's result and how it is kept: `RUN/eval/NAME.json` (numbers and settings, for
scripts), `RUN/eval/NAME.md` (a readable table) and `RUN/eval/NAME.examples.jsonl` (every
scored example: prompt, prediction, reference), each written atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
import re
from pathlib import Path

from babyllama.atomic import atomic_write_text
from babyllama.run import Run


@dataclass
class EvalResult:
    task: str                    # lm | rouge | choice | generation
    data: str                    # what was evaluated (a path)
    metrics: dict[str, float]    # the headline numbers
    columns: list[str]           # the table's columns, in order
    rows: list[dict]             # the table (one row, or one per subject / split)
    settings: dict = field(default_factory=dict)        # what produced the numbers
    examples: list[dict] = field(default_factory=list)  # per-example records

    def table(self) -> str:
        return markdown_table(self.columns, self.rows)


def format_value(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(format_value(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def default_name(task: str, data: str) -> str:
    """`choice-cmmlu`, `lm-paragraphs`, `math-builtin-arith-zh-test`: the task and the data's
    file or folder name, with characters a file name cannot hold everywhere (":", "#") as "-"."""
    stem = Path(data.rstrip("/")).stem or "data"
    safe = re.sub(r"[^\w.-]+", "-", stem)
    return f"{task}-{safe}"


def write_result(result: EvalResult, run_dir: str | Path, name: str | None = None) -> Path:
    """Write the result under `run_dir/eval/`; returns the Markdown file's path."""
    out = Run(run_dir).eval_dir
    name = name or default_name(result.task, result.data)
    record = {"task": result.task, "data": result.data, "run": str(run_dir),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "metrics": result.metrics,
              "settings": result.settings, "table": result.rows}
    atomic_write_text(out / f"{name}.json", json.dumps(record, ensure_ascii=False, indent=2) + "\n")
    # repr for strings: a template's newline must not break the line.
    settings = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                         for k, v in result.settings.items())
    md = (f"# {result.task}: {result.data}\n\nrun: `{run_dir}`  \nsettings: {settings}\n\n"
          f"{result.table()}\n")
    atomic_write_text(out / f"{name}.md", md)
    if result.examples:
        atomic_write_text(out / f"{name}.examples.jsonl",
                          "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in result.examples))
    return out / f"{name}.md"
