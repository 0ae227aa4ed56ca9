"""A least-recently-used map bounded by an estimate of bytes (compiled grammars)."""
from __future__ import annotations

import collections
import threading
from collections.abc import Hashable


class LruBytes:
    """get / put are thread-safe. Each value has a size in bytes; putting evicts the least recently
    used entries until the total fits max_bytes (an entry bigger than max_bytes is not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: collections.OrderedDict[Hashable, tuple[object, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> object | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: object, size: int) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.num_bytes -= old[1]
            if size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self.num_bytes += size
            while self.num_bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.num_bytes -= evicted
