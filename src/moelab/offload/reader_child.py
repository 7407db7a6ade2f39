"""The helper process of moelab.offload.procreader: reads expert byte ranges from the store's
layer files into shared-memory slots, outside the decoding interpreter (a reading thread in the
decoding process costs the decode 40-150 us per load in GIL handovers: bench/RESULTS.md run 27).

Run as a script by path (`python -I reader_child.py CONFIG_JSON`), so that it imports only the
standard library. Requests come on stdin, completions go to stdout, both fixed-size records
(formats below, shared with procreader); slots live in a memfd inherited from the parent, mapped
in segments of `seg_bytes`; one abort byte per request (index req_id % ABORT_SLOTS) lives in a
second memfd, set by the parent to stop a read before it starts or after its current chunk.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import time

REQUEST = struct.Struct("<IIIQQQ")  # req_id, file index, slot, file offset, length, chunk
COMPLETION = struct.Struct("<IIqd")  # req_id, status, bytes read (or errno), seconds
DONE, ABORTED, ERROR = 0, 1, 2  # DONE may be short (at the end of a file): the parent checks
ABORT_SLOTS = 4096


def _read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = os.read(fd, n - len(out))
        if not got:
            return b""
        out += got
    return out


def main(config: dict) -> None:
    """Serve requests until stdin closes."""
    flags = os.O_RDONLY | (os.O_DIRECT if config["tier"] == "direct" else 0)
    files = [os.open(p, flags) for p in config["files"]]
    fadvise = config["tier"] == "fadvise"
    arena_fd, seg_bytes, slot_bytes = config["arena_fd"], config["seg_bytes"], config["slot_bytes"]
    per_seg = seg_bytes // slot_bytes
    segs: dict[int, mmap.mmap] = {}
    aborts = mmap.mmap(config["abort_fd"], ABORT_SLOTS)
    rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
    while True:
        rec = _read_exact(rfd, REQUEST.size)
        if not rec:
            return
        req, fi, slot, off, length, chunk = REQUEST.unpack(rec)
        t0 = time.perf_counter()
        status, n = DONE, 0
        if aborts[req % ABORT_SLOTS]:
            status = ABORTED
        else:
            seg = slot // per_seg
            if seg not in segs:
                segs[seg] = mmap.mmap(arena_fd, seg_bytes, offset=seg * seg_bytes)
            base = (slot % per_seg) * slot_bytes
            mv = memoryview(segs[seg])[base : base + length]
            step = chunk or length
            try:
                for a in range(0, length, step):
                    got = os.preadv(files[fi], [mv[a : min(a + step, length)]], off + a)
                    n += got
                    if got < min(step, length - a):
                        break
                    if a + step < length and aborts[req % ABORT_SLOTS]:
                        status = ABORTED
                        break
                if fadvise:
                    os.posix_fadvise(files[fi], off, length, os.POSIX_FADV_DONTNEED)
            except OSError as exc:
                status, n = ERROR, exc.errno or 0
            mv.release()
        os.write(wfd, COMPLETION.pack(req, status, n, time.perf_counter() - t0))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
