"""Read buffers are recycled only when nothing references them; reads stay byte-exact."""

from __future__ import annotations

import torch

from moelab.offload.buffers import BufferPool


def test_buffer_reused_only_after_every_view_is_gone() -> None:
    pool = BufferPool(spare=2)
    a = pool.take(4096)
    view = a[8:1032].view(torch.float32).view(16, 16)
    del a
    b = pool.take(4096)  # `view` still holds the first buffer
    assert b.data_ptr() != view.data_ptr() - 8
    assert (pool.allocated, pool.reused) == (2, 0)
    first = view.data_ptr() - 8
    del view
    c = pool.take(4096)
    assert c.data_ptr() == first and pool.reused == 1


def test_spare_buffers_are_bounded() -> None:
    pool = BufferPool(spare=1)
    held = [pool.take(1000) for _ in range(5)]
    assert pool.spare_bytes() == 0
    del held
    kept = pool.take(1000)  # reuses one; of the other four free ones at most one is kept
    assert pool.reused == 1 and pool.spare_bytes() == 1000
    other = pool.take(2000)  # another size: a new buffer, still at most one free one kept
    assert pool.spare_bytes() == 1000
    del kept, other
    assert pool.spare_bytes() == 4000  # released by their users, pruned at the next take
    pool.take(2000)
    assert (
        pool.spare_bytes() == 1000 + 2000
    )  # spare=1 free besides the re-handed 2000 (dropped view)


def test_pool_never_hands_out_a_buffer_twice() -> None:
    pool = BufferPool(spare=4)
    live = [pool.take(512) for _ in range(8)]
    ptrs = {b.data_ptr() for b in live}
    assert len(ptrs) == 8
