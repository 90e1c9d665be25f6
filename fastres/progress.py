"""Progress display: a rich bar on a terminal, plain log lines elsewhere.

The bar's line is fitted to the terminal at every refresh: the count and the time remaining
are never cut; the figures beside them are dropped, least useful first, to make room. The
time remaining comes from a smoothed rate (wall time between log points, evaluations and
checkpoints included), not from rich's per-step speed estimate.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import Progress, ProgressColumn, Task
from rich.table import Column
from rich.text import Text

SMOOTHING = 0.2  # the newest log interval's weight in the rate behind the time remaining
BAR_WIDTH = (8, 40)  # the bar's narrowest (while figures are shown) and widest
# Columns left free at the line's end for the "^C" a terminal echoes at the cursor: a line
# that filled the last column would wrap there, and rich would redraw one line too low,
# leaving a stale copy of the bar above the final one.
ECHO_ROOM = 2
Field = tuple[int, str]  # (rank: a higher one is kept longer on a narrow line, text)


def resolve(mode: str) -> str:
    """`auto` is a rich bar on a terminal, plain log lines elsewhere."""
    if mode == "auto":
        return "rich" if sys.stdout.isatty() else "plain"
    return mode


def record_fields(r: dict[str, Any]) -> list[Field]:
    """One run's figures in display order; on a narrow line lr goes first, then the training
    error, the val and test errors, the loss, and it/s last."""
    fields = [(0, f"lr {r['lr']:.4g}")]
    if "train_loss" in r:
        fields += [(4, f"loss {r['train_loss']:.4f}"), (1, f"err {100 * r['train_error']:.2f}%")]
    for rank, key in ((2, "val_error"), (3, "test_error")):
        if key in r:
            fields.append((rank, f"{key.split('_')[0]} {100 * r[key]:.2f}%"))
    if "it_s" in r:
        fields.append((5, f"{r['it_s']:.1f} it/s"))
    return fields


def group_fields(records: list[dict[str, Any]], labels: list[str]) -> list[Field]:
    """A fused group's figures: lr (when the runs share it) and the group's it/s, then each
    run's loss and errors, after its label (`s0`; `lr0.05 s0` in a sweep); on a narrow line
    lr goes first, then the runs from the last."""
    r, n = records[0], len(records)
    fields = [(0, f"lr {r['lr']:.4g}")] if len({x["lr"] for x in records}) == 1 else []
    fields += [(n + 1, f"{r['it_s']:.1f} it/s x{n}")] if "it_s" in r else []
    for k, (record, label) in enumerate(zip(records, labels, strict=True)):
        shown = [f"{record['train_loss']:.3f}"] if "train_loss" in record else []
        shown += [f"{100 * record[key]:.1f}%" for key in ("train_error", "test_error") if key in record]
        fields.append((n - k, f"{label} " + "/".join(shown)))
    return fields


def format_record(r: dict[str, Any]) -> str:
    return "  ".join(text for _, text in record_fields(r))


def format_group(records: list[dict[str, Any]], labels: list[str]) -> str:
    """A fused group on one line: lr and the group's it/s, then each run's loss and error."""
    return "  ".join(text for _, text in group_fields(records, labels))


def fit(fields: list[Field], room: int) -> str:
    """The fields that fit in `room` columns, in display order, dropped by rank: a field is
    shown only if every field ranked above it is."""
    kept, used = set(), -2
    for i in sorted(range(len(fields)), key=lambda i: -fields[i][0]):
        used += len(fields[i][1]) + 2
        if used > room:
            break
        kept.add(i)
    return "  ".join(text for i, (_, text) in enumerate(fields) if i in kept)


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def bar_line(width: int, title: str, done: int, total: int, fields: list[Field], remaining: str) -> Text:
    """`title bar count  figures  time` in at most `width` columns: the figures are dropped
    (by rank), then the bar narrows, then the title is cut; never the count or the time."""
    count = f"{done:>{len(str(total))}}/{total}"
    ends = len(count) + 2 + len(remaining)
    room = width - ends - 2
    if len(title) > room:  # cut with a mark, so a cut name never reads as another model
        title = title[:room - 1] + "…" if room >= 2 else ""
    free = width - ends - len(title) - 2  # the two spaces around the bar
    stats = fit(fields, free - BAR_WIDTH[0] - 2)
    bar = max(0, min(BAR_WIDTH[1], free - (len(stats) + 2 if stats else 0)))
    filled = round(bar * done / total) if total else 0
    line = Text(title, "bold")
    line.append(" ")
    line.append("━" * filled, "bar.finished" if done >= total else "bar.complete")
    line.append("━" * (bar - filled), "bar.back")
    line.append(f" {count}")
    line.append(f"  {stats}" if stats else "")
    line.append(f"  {remaining}", "progress.remaining")
    return line


class _Line(ProgressColumn):
    """The whole bar line, one column, fitted to the console's width at each refresh."""

    def __init__(self, reporter: Reporter) -> None:
        super().__init__(Column(no_wrap=True))
        self.reporter = reporter

    def render(self, task: Task) -> Text:
        done, total = int(task.completed), int(task.total or 0)
        reporter = self.reporter
        return bar_line(reporter.console.width - ECHO_ROOM, str(task.description), done, total, reporter.fields,
                        clock(reporter.remaining(done)))


class Reporter:
    """Shows training progress; `advance` is called every step and never touches the device.

    `log_every` turns on the early reads (`wants_early`) that show figures before the first
    log point; `console` and `now` are for tests."""

    def __init__(self, mode: str, total: int, start: int, title: str, log_every: int | None = None,
                 console: Console | None = None, now: Callable[[], float] = time.monotonic) -> None:
        self.mode, self.total, self.start, self.now = resolve(mode), total, start, now
        self.first_log = (start // log_every + 1) * log_every if log_every else start
        self.fields: list[Field] = []
        self.rate: float | None = None  # iterations a second of wall time, smoothed
        self._mark, self._logs = (start, now()), 0
        self.console = console or Console()
        self.bar: Progress | None = None
        if self.mode == "rich":
            self.bar = Progress(_Line(self), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task(title, total=total, completed=start)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def wants_early(self, done: int) -> bool:
        """Whether the bar would show an early read after iteration `done`: at 1, 2, 4, 8...
        steps from the start, until the first log point."""
        steps = done - self.start
        return self.bar is not None and done < self.first_log and steps > 0 and steps & (steps - 1) == 0

    def remaining(self, done: int) -> float | None:
        return None if self.rate is None else (self.total - done) / self.rate

    def _since_mark(self, done: int) -> float:
        mark, then = self._mark
        return (done - mark) / max(self.now() - then, 1e-9)

    def early(self, done: int, lrs: list[float], values: list[dict[str, float]], labels: list[str]) -> None:
        """An early read after iteration `done` (each run's loss and error so far): shown, never
        logged. The first step (compilation, warm-up) is left out of the rate after it."""
        self.rate = self._since_mark(done)
        if done == self.start + 1:
            self._mark = (done, self.now())
        self._show([{"lr": lr, **v, "it_s": self.rate} for lr, v in zip(lrs, values, strict=True)], labels)

    def log(self, records: list[dict[str, Any]], labels: list[str]) -> None:
        """One record per run of the group (one for a single run): the bar shows the group's
        it/s and each run's loss and error; plain mode prints a line per run. The rate behind
        the time remaining is an exponential average of the log intervals' rates."""
        if not records:
            return
        done = records[0]["iter"]
        rate = self._since_mark(done)
        self.rate = rate if self._logs == 0 else SMOOTHING * rate + (1 - SMOOTHING) * self.rate
        self._mark, self._logs = (done, self.now()), self._logs + 1
        if self.bar is not None:
            self._show(records, labels)
        elif self.mode == "plain":
            for record, label in zip(records, labels, strict=True):
                run = f"  {label}" if len(records) > 1 else ""
                print(f"iter {record['iter']}/{self.total}{run}  {format_record(record)}", flush=True)

    def _show(self, records: list[dict[str, Any]], labels: list[str]) -> None:
        self.fields = record_fields(records[0]) if len(records) == 1 else group_fields(records, labels)
        if self.bar is not None:
            self.bar.refresh()

    def message(self, text: str) -> None:
        """A line above the bar (or printed); never wrapped by rich, so a printed command pastes whole."""
        if self.bar is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        elif self.mode != "none":
            print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def summary(head: str, facts: dict[str, str]) -> str:
    """What a run is about to do, in a few lines: a head line, then one line a fact."""
    wide = max(map(len, facts), default=0)
    return "\n".join([f"fastres: {head}", *(f"  {name:<{wide}}  {value}" for name, value in facts.items())])
