"""Expert reads done by a helper process (moelab.offload.reader_child) into shared-memory slots,
so that a prefetch costs the decoding interpreter one request write and one completion read
instead of a second Python thread's GIL handovers (40-150 us of decode per load, bench/RESULTS.md
run 27; a separate process reading the same file costs about 1%).

The slots are page-aligned pieces of one memfd, each wrapped as its own tensor storage so that,
as in BufferPool, a slot is free again once no view of it is held (the cache evicted the expert
and no computation holds it). Only the Linux file tiers ('direct', 'fadvise') have a process
reader; the simulated tiers ('ram', 'throttle') keep the thread.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelab.errors import ConfigError, OffloadError
from moelab.offload.buffers import _storage_refs
from moelab.offload.reader_child import ABORT_SLOTS, ABORTED, COMPLETION, DONE, ERROR, REQUEST
from moelab.offload.store import ALIGN, ExpertStore, layer_file

WAIT_LIMIT_S = 60.0  # safety cap on one wait for the helper: a hung read is reported, not waited on


def process_reader_available(store: ExpertStore) -> bool:
    """True where a ProcessReader can serve `store` (a Linux file tier with memfd)."""
    return store.tier in ("direct", "fadvise") and hasattr(os, "memfd_create")


@dataclass
class Completion:
    """One finished request: the expert's weights (None if stopped or failed) or the error."""

    req: int
    layer: int
    expert: int
    value: Any = None
    aborted: bool = False
    error: BaseException | None = None


class ProcessReader:
    """Reads experts of `store` in a helper process: submit() -> request id, poll() -> finished.

    Requests are served in submission order, one at a time; abort(req) stops one before it
    starts or after its current chunk. Values are views of the slots, built in this process."""

    def __init__(self, store: ExpertStore, seg_slots: int = 16) -> None:
        if not process_reader_available(store):
            raise ConfigError(
                f"ProcessReader: store tier {store.tier!r} has no process reader (needs a file "
                "tier, 'direct' or 'fadvise', on Linux)"
            )
        if seg_slots < 1:
            raise ConfigError(f"ProcessReader seg_slots={seg_slots}: must be >= 1")
        self.store = store
        spans = [
            store.file_span(layer, e)
            for layer in range(store.num_layers)
            for e in range(store.num_experts[layer])
        ]
        self.slot_bytes = -(-max(b - a for a, b in spans) // mmap.PAGESIZE) * mmap.PAGESIZE
        self.seg_slots = seg_slots
        self._seg_bytes = self.slot_bytes * seg_slots
        self._arena_fd = os.memfd_create("moelab-expert-slots")
        self._abort_fd = os.memfd_create("moelab-read-aborts")
        os.ftruncate(self._abort_fd, ABORT_SLOTS)
        self._aborts = mmap.mmap(self._abort_fd, ABORT_SLOTS)
        self._segs: list[mmap.mmap] = []
        self._slots: list[torch.Tensor] = []
        self._busy: set[int] = set()
        self._cursor = 0
        self._alone = _storage_refs(torch.empty(1, dtype=torch.uint8))
        # req -> (layer, expert, slot, first byte, end byte of its span in the layer file)
        self._pending: dict[int, tuple[int, int, int, int, int]] = {}
        self._next = 0
        self._partial = b""
        config = {
            "tier": store.tier,
            "files": [str(store.path / layer_file(i)) for i in range(store.num_layers)],
            "arena_fd": self._arena_fd,
            "abort_fd": self._abort_fd,
            "seg_bytes": self._seg_bytes,
            "slot_bytes": self.slot_bytes,
        }
        child = Path(__file__).with_name("reader_child.py")
        self._proc = subprocess.Popen(
            [sys.executable, "-I", str(child), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(self._arena_fd, self._abort_fd),
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._in, self._out = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        os.set_blocking(self._out, False)
        self.reads = self.aborted = 0

    # ------------------------------------------------------------------ slots
    def _free(self, i: int) -> bool:
        return i not in self._busy and _storage_refs(self._slots[i]) == self._alone

    def _take_slot(self) -> int:
        n = len(self._slots)
        for j in range(n):  # first free slot from a rotating cursor: O(1) while most are free
            i = (self._cursor + j) % n
            if self._free(i):
                self._cursor = (i + 1) % n
                return i
        seg = len(self._segs)
        os.ftruncate(self._arena_fd, (seg + 1) * self._seg_bytes)
        mm = mmap.mmap(self._arena_fd, self._seg_bytes, offset=seg * self._seg_bytes)
        self._segs.append(mm)
        for j in range(self.seg_slots):  # each slot its own storage: its own use count
            self._slots.append(
                torch.frombuffer(mm, dtype=torch.uint8, count=self.slot_bytes,
                                 offset=j * self.slot_bytes)
            )  # fmt: skip
        self._cursor = n + 1
        return n

    def slots(self) -> int:
        """Slots allocated so far (each slot_bytes of shared memory)."""
        return len(self._slots)

    def spare_bytes(self) -> int:
        """Bytes of slots nothing references (memory outside the cache budget)."""
        return sum(self.slot_bytes for i in range(len(self._slots)) if self._free(i))

    # ------------------------------------------------------------------ requests
    def submit(self, layer: int, expert: int, chunk: int = 0) -> int:
        """Ask the helper to read expert `expert` of `layer` (in pieces of `chunk` bytes, rounded
        up to 4 kB; 0: one read) -> request id."""
        if chunk < 0:
            raise ConfigError(f"ProcessReader.submit: chunk={chunk} must be >= 0 bytes")
        self._check_alive()
        a0, a1 = self.store.file_span(layer, expert)
        slot = self._take_slot()
        req = self._next
        self._next = (self._next + 1) % (1 << 32)
        if len(self._pending) >= ABORT_SLOTS:
            raise OffloadError(f"ProcessReader: more than {ABORT_SLOTS} reads outstanding")
        self._aborts[req % ABORT_SLOTS] = 0
        step = -(-chunk // ALIGN) * ALIGN if chunk else 0
        os.write(self._in, REQUEST.pack(req, layer, slot, a0, a1 - a0, step))
        self._busy.add(slot)
        self._pending[req] = (layer, expert, slot, a0, a1)
        return req

    def abort(self, req: int) -> None:
        """Stop request `req` before it starts or after its current chunk (no-op once done)."""
        if req in self._pending:
            self._aborts[req % ABORT_SLOTS] = 1

    @property
    def outstanding(self) -> int:
        """Requests submitted and not yet polled."""
        return len(self._pending)

    def poll(self, wait: bool = False) -> list[Completion]:
        """Requests finished since the last poll; with `wait`, block until at least one has (if
        any is outstanding), at most WAIT_LIMIT_S."""
        if wait and self._pending and len(self._partial) < COMPLETION.size:
            ready, _, _ = select.select([self._out], [], [], WAIT_LIMIT_S)
            if not ready:
                raise OffloadError(
                    f"ProcessReader: no read finished within {WAIT_LIMIT_S:.0f} s "
                    f"({len(self._pending)} outstanding): the helper process hangs"
                )
        try:
            data = os.read(self._out, 1 << 16)
        except BlockingIOError:
            data = None
        if data == b"":
            self._check_alive(force=True)
        buf = self._partial + (data or b"")
        n = len(buf) // COMPLETION.size * COMPLETION.size
        self._partial = buf[n:]
        out = []
        for req, status, got, seconds in COMPLETION.iter_unpack(buf[:n]):
            layer, expert, slot, a0, a1 = self._pending.pop(req)
            self._busy.discard(slot)
            c = Completion(req, layer, expert)
            if status == ABORTED:
                c.aborted = True
                self.aborted += 1
                self.store.account(0, 0.0, aborted=True)
            elif status == ERROR:
                c.error = OffloadError(
                    f"{self.store.path / layer_file(layer)}: reading expert {expert} failed in "
                    f"the reader process: {os.strerror(got)}"
                )
            elif status == DONE:
                try:
                    self.store.check_read(layer, expert, got)
                    buf_t = self._slots[slot][: a1 - a0]
                    c.value = self.store.assemble(layer, expert, buf_t, a0)
                    self.reads += 1
                    self.store.account(self.store.expert_nbytes(layer, expert), seconds)
                except OffloadError as exc:
                    c.error = exc
            else:
                c.error = OffloadError(f"ProcessReader: unknown status {status} for request {req}")
            out.append(c)
        return out

    def _check_alive(self, force: bool = False) -> None:
        rc = self._proc.poll()
        if rc is not None or force:
            err = f"exited with status {rc}" if rc is not None else "closed its output"
            raise OffloadError(
                f"ProcessReader: the reader process {err} with {len(self._pending)} reads "
                "outstanding"
            )

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Stop the helper (its outstanding reads are dropped) and release the shared memory
        (slots still referenced by cache entries stay valid until those go)."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()  # type: ignore[union-attr]
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._pending.clear()
        self._busy.clear()
        for fd in (self._arena_fd, self._abort_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._arena_fd = self._abort_fd = -1

    def __enter__(self) -> ProcessReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_arena_fd", -1) >= 0:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown: the helper sees EOF and exits
                pass
