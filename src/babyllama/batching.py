"""Streams cut into lists: the one place the tokenizer and data pipelines batch documents.

`batched` is `itertools.batched` (Python 3.12) for the 3.10/3.11 interpreters we support;
`batched_by_size` also bounds a batch's characters, so one huge document does not make a batch
that holds a worker's memory for minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` items (the last may be shorter). Raises ValueError if size < 1."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def batched_by_size(items: Iterable[T], max_items: int, max_chars: int,
                    length: Callable[[T], int] = len) -> Iterator[list[T]]:
    """Lists that end once they hold `max_items` items or `length` totals `max_chars`
    (a single item longer than `max_chars` is a batch of its own)."""
    batch: list[T] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += length(item)
        if len(batch) >= max_items or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
