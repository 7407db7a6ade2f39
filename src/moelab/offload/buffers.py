"""Recycled read buffers for expert loads: a slow-tier read into freshly allocated memory pays a
page fault per 4 kB page (measured here: 8-20 ms for an 8.65 MB expert that reads in 4 ms into
memory already touched), so the store reads into buffers whose previous expert nothing references
any more (the cache evicted it and no computation holds it), as offloading runtimes read into
preallocated slots (Eliseev & Mazur 2023, arXiv:2312.17238)."""

from __future__ import annotations

import threading

import torch

from moelab.errors import ConfigError


def _storage_refs(t: torch.Tensor) -> int:
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


class BufferPool:
    """Byte buffers handed out for reads and taken back once only the pool references them.

    A buffer is reusable when its storage's use count is the pool's own (no view of it lives in a
    cache entry, a stand-in or a computation in progress). At most `spare` unreferenced buffers are
    kept beyond those in use, so the pool holds at most `spare` experts of memory that the cache
    budget does not count (`spare_bytes()` reports it)."""

    def __init__(self, spare: int = 2) -> None:
        if spare < 0:
            raise ConfigError(f"BufferPool spare={spare}: must be >= 0")
        self.spare = spare
        self._bufs: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._alone = _storage_refs(torch.empty(1, dtype=torch.uint8))
        self.reused = 0
        self.allocated = 0

    def _free(self, b: torch.Tensor) -> bool:
        return _storage_refs(b) == self._alone

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of exactly `nbytes`: a released one if any, else a new allocation."""
        with self._lock:
            free = [i for i, b in enumerate(self._bufs) if self._free(b)]
            hit = next((i for i in free if self._bufs[i].numel() == nbytes), None)
            if hit is not None:
                free.remove(hit)
                buf = self._bufs[hit]
                self.reused += 1
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8)
                self.allocated += 1
            drop = set(free[: max(0, len(free) - self.spare)])  # least recently handed out
            if hit is not None:
                drop.add(hit)  # re-appended below as the most recent
            self._bufs = [b for i, b in enumerate(self._bufs) if i not in drop]
            self._bufs.append(buf)
            return buf[:]  # a view: the caller's hold counts in the storage's use count

    def spare_bytes(self) -> int:
        """Bytes of pooled buffers nothing else references (memory outside the cache budget)."""
        with self._lock:
            return sum(b.numel() for b in self._bufs if self._free(b))
