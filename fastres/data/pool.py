"""Chunks of work spread over a process pool, results in order and memory bounded: the
decoding of an image archive (60k JPEGs, about 15 s on one core) on all cores."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

A = TypeVar("A")
B = TypeVar("B")


def cores() -> int:
    """The cores this process may run on (its affinity, as under taskset or a container's
    cpuset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS and Windows
        return os.cpu_count() or 1


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: the parent handles it and shuts the pool down,
    # so a worker does not print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _context() -> multiprocessing.context.BaseContext:
    # fork: a worker starts in milliseconds. spawn and forkserver import the parent's main
    # module in each worker (or the server): under `python -m fastres.train` that is torch,
    # about 2 s of a 15 s decode. A forked worker runs only the function it is given (Pillow
    # and numpy on bytes), never torch, a terminal or a lock a parent's thread may hold.
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)


def ordered_map(fn: Callable[[A], B], chunks: Iterable[A], workers: int, ahead: int) -> Iterator[B]:
    """`fn` of each chunk, in the chunks' order, on `workers` processes with at most `ahead`
    chunks in flight, so memory holds no more than `ahead` chunks beyond the results.

    A single chunk, or one worker, runs in this process: a small data set starts no pool.
    An error raised while the chunks are made (the reader's refusals) is raised once the
    chunks made before it are done, so the first error in reading order is the one raised,
    as in a serial run."""
    chunks = iter(chunks)
    first = next(chunks, None)
    if first is None:
        return
    try:
        second = next(chunks, None)
    except Exception:
        yield fn(first)
        raise
    if second is None or workers <= 1:
        yield fn(first)
        if second is not None:
            yield fn(second)
        yield from map(fn, chunks)
        return
    yield from _pooled(fn, first, second, chunks, workers, ahead)


def _pooled(fn: Callable[[A], B], first: A, second: A, rest: Iterator[A], workers: int, ahead: int) -> Iterator[B]:
    pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_ignore_sigint)
    try:
        pending: deque[Future[B]] = deque([pool.submit(fn, first), pool.submit(fn, second)])
        failure: Exception | None = None
        while True:
            try:
                chunk = next(rest, None)
            except Exception as e:  # raised after what was read before it
                failure = e
                break
            if chunk is None:
                break
            pending.append(pool.submit(fn, chunk))
            while len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        if failure is not None:
            raise failure
    finally:  # an error, an early stop or Ctrl-C: no queued chunk starts, running ones end
        pool.shutdown(wait=True, cancel_futures=True)
