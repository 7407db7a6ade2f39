"""ExpertStore: a model's routed experts on disk (one safetensors file per MoE layer, each expert's
tensors contiguous) read back one expert at a time through an honestly slow tier.

Tiers (what `read` costs is reported by `stats()`):
- "direct":   O_DIRECT pread of the expert's aligned byte range (bypasses the page cache);
- "fadvise":  buffered pread, then posix_fadvise(DONTNEED) on the range (evicts it again);
- "throttle": the store is held in RAM and each copy is slowed to a configured bandwidth and
              latency (a model of a link, e.g. PCIe), sleeping off the difference;
- "ram":      plain RAM copy (fast tier, for tests and all-resident references);
- "auto":     "direct" if the filesystem supports it, else "fadvise".

Precision: a store holds each expert at full precision (the model's dtype, exact) or quantised
weight-only as int8 / int4 (moelab.offload.quant); `read` then returns QuantWeights, and a load
moves 4x / about 7x fewer bytes than fp32.

Offloading MoE experts with an LRU cache + speculative loading follows Eliseev & Mazur 2023,
"Fast Inference of Mixture-of-Experts Language Models with Offloading" (arXiv:2312.17238).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from moelab._io import atomic_write_json, atomic_write_with
from moelab.errors import ConfigError, OffloadError
from moelab.offload.buffers import BufferPool
from moelab.offload.quant import (
    DEFAULT_GROUP,
    QuantWeight,
    check_precision,
    int4_layout_probe,
    pick_group,
    quantize,
)
from moelab.offload.sites import EXPERT_TENSORS, ExpertSite, require_sites

FORMAT = "moelab-expert-store"
VERSION = 1
TIERS = ("auto", "direct", "fadvise", "throttle", "ram")
ALIGN = 4096
_DTYPES = {
    "I8": torch.int8,
    "U8": torch.uint8,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


def layer_file(layer: int) -> str:
    """File name of MoE layer `layer`'s experts."""
    return f"layer_{layer:03d}.safetensors"


def tensor_key(expert: int, name: str) -> str:
    """Key of one expert tensor; zero-padded so safetensors' name order keeps experts contiguous."""
    return f"e{expert:05d}.{name}"


def stored_names(precision: str) -> tuple[str, ...]:
    """Tensor names one expert is stored as at `precision` (codes `.q` and scales `.s`)."""
    if precision == "full":
        return EXPERT_TENSORS
    return tuple(f"{n}.{part}" for n in EXPERT_TENSORS for part in ("q", "s"))


@dataclass
class ExpertRange:
    """Byte range of one expert inside its layer file and where each tensor sits in it."""

    start: int
    end: int
    tensors: dict[
        str, tuple[int, int, tuple[int, ...], torch.dtype]
    ]  # name -> (off, end, shape, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the expert."""
        return self.end - self.start


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Parse a safetensors header -> (data start offset, header dict)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise OffloadError(f"{path}: truncated expert file (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            hdr = f.read(n)
            if len(hdr) < n:
                raise OffloadError(f"{path}: truncated expert file (header of {n} bytes cut short)")
    except FileNotFoundError:
        raise OffloadError(
            f"{path}: expert file missing; rewrite the store with ExpertStore.write(model, dir)"
        ) from None
    try:
        return 8 + n, json.loads(hdr)
    except json.JSONDecodeError as exc:
        raise OffloadError(f"{path}: corrupt safetensors header ({exc})") from exc


def supports_o_direct(directory: str | os.PathLike[str]) -> bool:
    """True if files in `directory` can be opened and read with O_DIRECT."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = Path(directory) / f".odirect_probe_{os.getpid()}_{threading.get_ident()}"
    try:
        buf = mmap.mmap(-1, ALIGN)
        buf.write(b"\0" * ALIGN)
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
        try:
            os.pwrite(fd, buf, 0)
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        if probe.exists():
            probe.unlink()


class ExpertStore:
    """Reads single experts of a written store: `read(layer, expert) -> {name: tensor}`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        tier: str = "auto",
        bandwidth: float | None = None,
        latency: float = 0.0,
        device: str | torch.device = "cpu",
    ) -> None:
        if tier not in TIERS:
            raise ConfigError(f"ExpertStore tier={tier!r}: expected one of {TIERS}")
        if tier == "throttle" and (bandwidth is None or bandwidth <= 0):
            raise ConfigError(
                f"ExpertStore tier='throttle' needs bandwidth > 0 (bytes/s), got {bandwidth!r}"
            )
        if latency < 0:
            raise ConfigError(f"ExpertStore latency={latency!r}: must be >= 0 seconds")
        self.path = Path(path)
        man = self.path / "manifest.json"
        if not man.exists():
            raise OffloadError(
                f"{man}: not an expert store (manifest.json missing); write one with "
                "ExpertStore.write(model, dir)"
            )
        self.manifest = json.loads(man.read_text())
        if self.manifest.get("format") != FORMAT:
            raise OffloadError(
                f"{man}: format {self.manifest.get('format')!r}, expected {FORMAT!r}"
            )
        self.precision = str(self.manifest.get("precision", "full"))
        check_precision(self.precision, f"{man} precision")
        self.group = int(self.manifest.get("group", 0))
        if self.precision == "int4" and self.manifest.get("int4_probe") != int4_layout_probe():
            raise OffloadError(
                f"{man}: int4 experts were packed for another CPU kernel layout than this machine's;"
                " rewrite the store here with ExpertStore.write(model, dir, precision='int4')"
            )
        self._names = stored_names(self.precision)
        self._shapes = [
            {n: tuple(v) for n, v in info["shapes"].items()} for info in self.manifest["layers"]
        ]
        if tier == "auto":
            tier = "direct" if supports_o_direct(self.path) else "fadvise"
        self.tier = tier
        self.bandwidth, self.latency = bandwidth, latency
        self.device = torch.device(device)
        self.num_layers = int(self.manifest["num_layers"])
        self.num_experts: list[int] = list(self.manifest["num_experts"])
        self._ranges: list[list[ExpertRange]] = []
        self._fds: list[int] = []
        self._ram: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.buffers = BufferPool()  # reads land in memory already touched (no page faults)
        self._bytes = 0
        self._seconds = 0.0
        self._reads = 0
        self._aborted = 0  # chunked reads stopped by their abort() (not counted in reads)
        for layer in range(self.num_layers):
            self._open_layer(layer)

    # ----------------------------------------------------------------- opening
    def _open_layer(self, layer: int) -> None:
        path = self.path / layer_file(layer)
        data_start, hdr = _read_header(path)
        ranges: list[ExpertRange] = []
        data_end = 0
        for e in range(self.num_experts[layer]):
            tensors = {}
            for name in self._names:
                key = tensor_key(e, name)
                if key not in hdr:
                    raise OffloadError(
                        f"{path}: tensor {key!r} missing (store written for another model?)"
                    )
                info = hdr[key]
                if info["dtype"] not in _DTYPES:
                    raise OffloadError(f"{path}: {key} has unsupported dtype {info['dtype']}")
                b, en = info["data_offsets"]
                tensors[name] = (
                    data_start + b,
                    data_start + en,
                    tuple(info["shape"]),
                    _DTYPES[info["dtype"]],
                )
                data_end = max(data_end, data_start + en)
            lo = min(t[0] for t in tensors.values())
            hi = max(t[1] for t in tensors.values())
            if hi - lo != sum(t[1] - t[0] for t in tensors.values()):
                raise OffloadError(f"{path}: expert {e}'s tensors are not contiguous")
            ranges.append(ExpertRange(lo, hi, tensors))
        size = path.stat().st_size
        if size < data_end:
            raise OffloadError(
                f"{path}: truncated expert file ({size} bytes, header needs {data_end}); rewrite the store"
            )
        self._ranges.append(ranges)
        if self.tier == "direct":
            self._fds.append(os.open(path, os.O_RDONLY | os.O_DIRECT))
        elif self.tier == "fadvise":
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # start cold
            self._fds.append(fd)
        else:
            self._ram.append(np.fromfile(path, dtype=np.uint8))

    def close(self) -> None:
        """Close file descriptors (idempotent)."""
        for fd in getattr(self, "_fds", []):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # ----------------------------------------------------------------- reading
    def expert_nbytes(self, layer: int, expert: int = 0) -> int:
        """Bytes of one expert (what a load moves over the slow tier)."""
        return self._ranges[layer][expert].nbytes

    def _check(self, layer: int, expert: int) -> ExpertRange:
        if not 0 <= layer < self.num_layers:
            raise OffloadError(
                f"ExpertStore.read: layer {layer} out of range [0, {self.num_layers})"
            )
        if not 0 <= expert < self.num_experts[layer]:
            raise OffloadError(
                f"ExpertStore.read: expert {expert} out of range [0, {self.num_experts[layer]}) "
                f"at layer {layer}"
            )
        return self._ranges[layer][expert]

    def read_bytes(
        self,
        layer: int,
        expert: int,
        chunk: int = 0,
        abort: Callable[[], bool] | None = None,
    ) -> tuple[torch.Tensor, int] | None:
        """Raw bytes covering the expert (uint8 tensor) and the file offset of its first byte.

        chunk > 0 reads in pieces of that many bytes (rounded up to the 4 kB alignment) and asks
        `abort()` after each one: True stops the read and returns None (a prefetch that turned
        out wrong frees the link after at most one piece instead of a whole expert)."""
        r = self._check(layer, expert)
        if chunk < 0:
            raise ConfigError(f"ExpertStore.read: chunk={chunk} must be >= 0 bytes")
        if self.tier in ("direct", "fadvise"):
            direct = self.tier == "direct"
            a0, a1 = self.file_span(layer, expert)
            if direct:
                raw = self.buffers.take(a1 - a0 + ALIGN)
                shift = (-raw.data_ptr()) % ALIGN
                buf = raw[shift : shift + a1 - a0]
            else:
                buf = self.buffers.take(r.nbytes)
            mv = memoryview(buf.numpy())
            step = -(-chunk // ALIGN) * ALIGN if chunk else a1 - a0
            n = 0
            for off in range(a0, a1, step):
                got = os.preadv(self._fds[layer], [mv[off - a0 : min(off + step, a1) - a0]], off)
                n += got
                if got < min(step, a1 - off):
                    break
                if abort is not None and off + step < a1 and abort():
                    return None
            if not direct:
                os.posix_fadvise(self._fds[layer], r.start, r.nbytes, os.POSIX_FADV_DONTNEED)
            self.check_read(layer, expert, n)
            return buf, a0
        t0 = time.perf_counter()
        buf = self.buffers.take(r.nbytes)
        dst, src = buf.numpy(), self._ram[layer][r.start : r.end]
        step = chunk or r.nbytes
        for off in range(0, r.nbytes, step):
            end = min(off + step, r.nbytes)
            dst[off:end] = src[off:end]
            if self.tier == "throttle":  # the link's time for the bytes copied so far
                want = self.latency + end / float(self.bandwidth)  # type: ignore[arg-type]
                left = want - (time.perf_counter() - t0)
                if left > 0:
                    time.sleep(left)
            if abort is not None and end < r.nbytes and abort():
                return None
        return buf, r.start

    def read(
        self,
        layer: int,
        expert: int,
        chunk: int = 0,
        abort: Callable[[], bool] | None = None,
    ) -> dict[str, Any] | None:
        """Load expert `expert` of MoE layer `layer` -> {"gate_up_proj": ..., "down_proj": ...};
        None if `abort()` stopped a chunked read (see read_bytes)."""
        t0 = time.perf_counter()
        r = self._check(layer, expert)
        got = self.read_bytes(layer, expert, chunk, abort)
        if got is None:
            self.account(0, 0.0, aborted=True)
            return None
        out = self.assemble(layer, expert, *got)
        self.account(r.nbytes, time.perf_counter() - t0)
        return out

    def file_span(self, layer: int, expert: int) -> tuple[int, int]:
        """File offsets [a0, a1) a file-tier read of the expert covers (4 kB-aligned on 'direct',
        as O_DIRECT needs)."""
        r = self._check(layer, expert)
        if self.tier == "direct":
            return (r.start // ALIGN) * ALIGN, -(-r.end // ALIGN) * ALIGN
        return r.start, r.end

    def check_read(self, layer: int, expert: int, got: int) -> None:
        """Raise OffloadError if a file-tier read of `got` bytes from file_span's start misses
        some of the expert's bytes (a truncated file)."""
        r = self._check(layer, expert)
        need = r.end - self.file_span(layer, expert)[0]
        if got < need:
            raise OffloadError(
                f"{self.path / layer_file(layer)}: short read for expert {expert} "
                f"({got} of {need} bytes); file truncated?"
            )

    def assemble(self, layer: int, expert: int, buf: torch.Tensor, base: int) -> dict[str, Any]:
        """The expert's weights as views of `buf`, raw bytes whose first is file offset `base`:
        {name: tensor}, or {name: QuantWeight} for a quantised store."""
        r = self._check(layer, expert)
        flat = {}
        for name, (b, e, shape, dtype) in r.tensors.items():
            t = buf[b - base : e - base].view(dtype).view(shape)
            flat[name] = t.to(self.device) if self.device.type != "cpu" else t
        if self.precision == "full":
            out: dict[str, Any] = flat
        else:
            out = {
                n: QuantWeight(
                    self.precision,
                    flat[f"{n}.q"].view(torch.int8 if self.precision == "int8" else torch.uint8),
                    flat[f"{n}.s"].view(torch.bfloat16),
                    self._shapes[layer][n],  # type: ignore[arg-type]
                    self.group if self.precision == "int4" else 0,
                )
                for n in EXPERT_TENSORS
            }
        return out

    def account(self, nbytes: int, seconds: float, aborted: bool = False) -> None:
        """Count one read (or one stopped read) in stats(); reads done outside read() report here."""
        with self._lock:
            if aborted:
                self._aborted += 1
                return
            self._bytes += nbytes
            self._seconds += seconds
            self._reads += 1

    def stats(self) -> dict[str, Any]:
        """Tier used, reads, bytes and measured bytes/s since open (or the last reset)."""
        with self._lock:
            return {
                "tier": self.tier,
                "reads": self._reads,
                "aborted": self._aborted,
                "bytes": self._bytes,
                "seconds": self._seconds,
                "bytes_per_s": self._bytes / self._seconds if self._seconds > 0 else float("nan"),
                "buffers_reused": self.buffers.reused,
                "buffers_allocated": self.buffers.allocated,
                "spare_buffer_bytes": self.buffers.spare_bytes(),
            }

    def reset_stats(self) -> None:
        """Zero the read counters."""
        with self._lock:
            self._bytes, self._seconds, self._reads, self._aborted = 0, 0.0, 0, 0

    def measure(self, reads: int = 16, seed: int = 0) -> dict[str, float]:
        """Time `reads` random single-expert reads -> bandwidth (bytes/s) and latency (s) fit."""
        rng = np.random.default_rng(seed)
        sizes, times = [], []
        for _ in range(reads):
            layer = int(rng.integers(self.num_layers))
            e = int(rng.integers(self.num_experts[layer]))
            t0 = time.perf_counter()
            self.read(layer, e)
            times.append(time.perf_counter() - t0)
            sizes.append(self.expert_nbytes(layer, e))
        t = float(np.median(times))
        s = float(np.median(sizes))
        return {"bandwidth": s / t, "latency": 0.0, "seconds_per_expert": t, "expert_bytes": s}

    # ----------------------------------------------------------------- checking
    def check_model(self, sites: list[ExpertSite]) -> None:
        """Raise OffloadError unless the store holds exactly these sites' experts."""
        man = self.manifest
        if len(sites) != self.num_layers:
            raise OffloadError(
                f"model/store mismatch: model has {len(sites)} MoE layers, store {self.path} has "
                f"{self.num_layers}"
            )
        for s, info in zip(sites, man["layers"], strict=True):
            want = {n: tuple(v) for n, v in info["shapes"].items()}
            if s.num_experts != info["num_experts"] or s.expert_shapes() != want:
                raise OffloadError(
                    f"model/store mismatch at MoE layer {s.layer}: model has {s.num_experts} experts "
                    f"of shapes {s.expert_shapes()}, store has {info['num_experts']} of {want}"
                )
            fp = s.router_fingerprint()
            if info.get("router_sha") and fp and fp != info["router_sha"]:
                raise OffloadError(
                    f"model/store mismatch at MoE layer {s.layer}: router weights differ "
                    f"(store {self.path} was written from another checkpoint)"
                )

    # ----------------------------------------------------------------- writing
    @staticmethod
    def write(
        model: torch.nn.Module,
        path: str | os.PathLike[str],
        precision: str = "full",
        group: int | None = None,
    ) -> Path:
        """Write every MoE layer's routed experts (one safetensors file per layer) + manifest.json,
        at full precision or quantised weight-only ('int8' per channel, 'int4' in groups)."""
        check_precision(precision, "ExpertStore.write precision")
        sites = require_sites(model)
        if group is None:
            group = (
                pick_group(sites[0].expert_shapes(), DEFAULT_GROUP) if precision == "int4" else 0
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        layers = []
        for s in sites:
            tensors = {}
            nbytes = 0
            for e in range(s.num_experts):
                for name in EXPERT_TENSORS:
                    w = getattr(s.experts, name)[e].detach().to("cpu")
                    if precision == "full":
                        tensors[tensor_key(e, name)] = w.contiguous().clone()
                        nbytes += w.numel() * w.element_size() if e == 0 else 0
                        continue
                    qw = quantize(w, precision, group)
                    # raw bytes (uint8): safetensors orders tensors by dtype before name, so one
                    # dtype keeps each expert's codes and scales contiguous
                    tensors[tensor_key(e, f"{name}.q")] = qw.q.contiguous().view(torch.uint8)
                    tensors[tensor_key(e, f"{name}.s")] = qw.scales.contiguous().view(torch.uint8)
                    nbytes += qw.nbytes if e == 0 else 0
            target = path / layer_file(s.layer)
            atomic_write_with(target, lambda tmp, t=tensors: save_file(t, str(tmp)))
            fd = os.open(target, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            shapes = s.expert_shapes()
            layers.append(
                {
                    "layer": s.layer,
                    "transformer_layer": s.transformer_layer,
                    "num_experts": s.num_experts,
                    "top_k": s.top_k,
                    "shapes": {n: list(v) for n, v in shapes.items()},
                    "dtype": str(s.dtype()).replace("torch.", ""),
                    "expert_nbytes": nbytes,
                    "router_sha": s.router_fingerprint(),
                    "file": layer_file(s.layer),
                }
            )
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "kind": sites[0].kind,
            "model": type(model).__name__,
            "num_layers": len(sites),
            "num_experts": [s.num_experts for s in sites],
            "layer_indices": [s.transformer_layer for s in sites],
            "layers": layers,
            "precision": precision,
            "group": group if precision == "int4" else 0,
            "int4_probe": int4_layout_probe() if precision == "int4" else "",
        }
        atomic_write_json(path / "manifest.json", manifest)
        return path
