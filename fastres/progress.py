"""Progress display: a rich bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_record(r: dict[str, Any]) -> str:
    parts = [f"lr {r['lr']:.4g}"]
    if "train_loss" in r:
        parts += [f"loss {r['train_loss']:.4f}", f"err {100 * r['train_error']:.2f}%"]
    for key in ("val_error", "test_error"):
        if key in r:
            parts.append(f"{key.split('_')[0]} {100 * r[key]:.2f}%")
    if "it_s" in r:
        parts.append(f"{r['it_s']:.1f} it/s")
    return "  ".join(parts)


class Reporter:
    """Shows training progress; `advance` is called every step and never touches the device."""

    def __init__(self, mode: str, total: int, start: int, title: str) -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode, self.total = mode, total
        self.bar: Progress | None = None
        if mode == "rich":
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task(title, total=total, completed=start, stats="")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def log(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(self.task, stats=format_record(record))
        elif self.mode == "plain":
            print(f"iter {record['iter']}/{self.total}  {format_record(record)}", flush=True)

    def message(self, text: str) -> None:
        if self.mode != "none":
            (self.bar.console.print if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
