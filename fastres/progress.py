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


def format_group(records: list[dict[str, Any]], seeds: list[int]) -> str:
    """A fused group on one line: lr and the group's it/s, then each run's loss and error."""
    r = records[0]
    parts = [f"lr {r['lr']:.4g}"] + ([f"{r['it_s']:.1f} it/s x{len(records)}"] if "it_s" in r else [])
    for record, seed in zip(records, seeds, strict=True):
        shown = [f"{record['train_loss']:.3f}"] if "train_loss" in record else []
        shown += [f"{100 * record[key]:.1f}%" for key in ("train_error", "test_error") if key in record]
        parts.append(f"s{seed} " + "/".join(shown))
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

    def log(self, records: list[dict[str, Any]], seeds: list[int]) -> None:
        """One record per run of the group (one for a single run): the bar shows the group's
        it/s and each run's loss and error; plain mode prints a line per run."""
        if not records:
            return
        if self.bar is not None:
            stats = format_record(records[0]) if len(records) == 1 else format_group(records, seeds)
            self.bar.update(self.task, stats=stats)
        elif self.mode == "plain":
            for record, seed in zip(records, seeds, strict=True):
                run = f"  seed {seed}" if len(records) > 1 else ""
                print(f"iter {record['iter']}/{self.total}{run}  {format_record(record)}", flush=True)

    def message(self, text: str) -> None:
        if self.mode != "none":
            (self.bar.console.print if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
