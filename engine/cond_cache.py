"""A bounded LRU cache of per-row conditioning for neighbour captions (caption-deduplication guidance).

Keyed by training-index row: ``get(rows)`` returns one cached value per requested row (repeats
allowed), encoding the missing rows in one ``encode_fn(missing_rows)`` call. At most ``max_items``
values are kept; the least recently used go first. A request with more distinct rows than
``max_items`` is still answered in full; only the most recent ``max_items`` stay cached.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


class ConditioningCache:
    """LRU of ``encode_fn(list_of_rows) -> list of per-row objects``, at most ``max_items`` rows."""

    def __init__(self, encode_fn: Callable[[list[int]], Sequence[Any]], max_items: int = 4096) -> None:
        if max_items < 1:
            raise ValueError(f"max_items={max_items}: the cache must hold at least 1 row, e.g. 4096")
        self.encode_fn, self.max_items = encode_fn, max_items
        self._items: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, row: int) -> bool:
        return row in self._items

    def get(self, rows: torch.Tensor | Sequence[int]) -> list[Any]:
        """Values for ``rows`` (LongTensor [B] or ints), in order. Reads rows on the host (a sync)."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else [int(r) for r in rows]
        found = {r: self._items[r] for r in dict.fromkeys(rows) if r in self._items}
        missing = [r for r in dict.fromkeys(rows) if r not in found]
        if missing:
            values = list(self.encode_fn(missing))
            if len(values) != len(missing):
                raise ValueError(f"encode_fn returned {len(values)} values for {len(missing)} rows")
            found.update(zip(missing, values, strict=True))
        for r in dict.fromkeys(rows):  # most recently used last, the whole request kept if it fits
            self._items[r] = found[r]
            self._items.move_to_end(r)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return [found[r] for r in rows]

    def clear(self) -> None:
        self._items.clear()
