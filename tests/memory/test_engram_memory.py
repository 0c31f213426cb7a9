"""Engram's memory substrate (tierlm.memory): the tokenizer compression map, multi-head N-gram hashing, the table
backends and deterministic prefetch."""
from __future__ import annotations

import pytest
import torch

from tierlm.core.errors import CorruptModelError
from tierlm.memory.hashing import NGramHasher, compression_map, is_prime, load_map, save_map
from tierlm.memory.prefetch import Prefetcher
from tierlm.memory.storage import EngramTable


@pytest.fixture(scope="module")
def tokenizer():
    from tierlm.models.loader import load_checkpoint

    return load_checkpoint("default").tokenizer


def test_compression_folds_case_and_leading_space_only(tokenizer, tmp_path):
    m = compression_map(tokenizer)
    ids = {w: tokenizer.encode(w) for w in (" The", "the", "THE", " cat", "cat", " dog")}
    assert all(len(v) == 1 for v in ids.values()), ids
    norm = {w: int(m[v[0]]) for w, v in ids.items()}
    assert norm[" The"] == norm["the"] == norm["THE"] and norm[" cat"] == norm["cat"]
    assert len({norm["the"], norm["cat"], norm[" dog"]}) == 3
    assert 0.5 * tokenizer.vocab_size < int(m.max()) + 1 < tokenizer.vocab_size  # it compresses, not collapses
    assert len({int(m[i]) for i in tokenizer._all_special_ids}) == len(tokenizer._all_special_ids)
    save_map(tmp_path / "map.json", m)
    assert torch.equal(load_map(tmp_path / "map.json", tokenizer.vocab_size), m)
    with pytest.raises(CorruptModelError, match="the tokenizer has 100"):
        load_map(tmp_path / "map.json", 100)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="not a readable Engram token map"):
        load_map(tmp_path / "bad.json", tokenizer.vocab_size)


def test_hashing_is_deterministic_local_and_resumable():
    h = NGramHasher(num_ids=5000, rows_per_head=1009)
    assert len(set(h.sizes)) == h.slots == 16 and all(is_prime(p) and p <= 1009 for p in h.sizes)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5000, (2, 40), generator=g)
    r = h.row_ids(ids)
    assert r.shape == (2, 40, 16) and torch.equal(r, NGramHasher(5000, 1009).row_ids(ids))
    assert not torch.equal(r, NGramHasher(5000, 1009, seed=1).row_ids(ids))
    for s, (off, size) in enumerate(zip(h.offsets, h.sizes)):  # each head stays inside its own table
        assert off <= int(r[..., s].min()) and int(r[..., s].max()) < off + size
    # a 2-gram row at t reads tokens t-1, t; a 3-gram row also t-2: nothing else
    changed = ids.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 5000
    rc = h.row_ids(changed)
    diff = (rc != r).any(0)  # [T, slots]
    assert diff[20:22, :8].any() and not diff[:20, :8].any() and not diff[22:, :8].any()
    assert diff[20:23, 8:].any() and not diff[:20, 8:].any() and not diff[23:, 8:].any()
    # a decode step that passes the last ids as history hashes like the whole sequence did
    assert torch.equal(h.row_ids(ids[:, 30:], history=ids[:, 28:30]), r[:, 30:])
    # padding before the start is an id of its own
    assert not torch.equal(h.row_ids(ids[:, 30:]), r[:, 30:])


@pytest.mark.parametrize("backend", ["host", "device", "mmap"])
def test_tables_gather_the_same_rows_on_every_backend(backend, tmp_path):
    ref = EngramTable.create(97, 8, init_std=1.0, seed=3)
    t = EngramTable.create(97, 8, backend=backend, init_std=1.0, seed=3, path=tmp_path / "t.bin")
    rows = torch.tensor([[0, 96], [5, 5]])
    assert torch.equal(t.gather(rows), ref.data[rows.reshape(-1)])
    with pytest.raises(IndexError, match="outside the table"):
        t.gather(torch.tensor([97]))
    if backend == "mmap":
        t.data[3] = 7.0  # writes go to the file (training updates land on disk)
        del t
        assert torch.equal(EngramTable.open(tmp_path / "t.bin").gather(torch.tensor([3])), torch.full((1, 8), 7.0))


def test_a_damaged_table_file_is_refused(tmp_path):
    path = tmp_path / "t.bin"
    EngramTable.create(50, 4, backend="mmap", path=path, dtype=torch.float16)
    with open(path, "r+b") as fh:
        fh.truncate(50 * 4 * 2 - 2)
    with pytest.raises(CorruptModelError, match="holds 398 bytes, its header says 400"):
        EngramTable.open(path)
    (tmp_path / "t.bin.json").write_text('{"rows": 50}')
    with pytest.raises(CorruptModelError, match="no readable header"):
        EngramTable.open(path)


def test_prefetch_equals_the_synchronous_gather_and_raises_where_it_is_read():
    h = NGramHasher(num_ids=300, rows_per_head=101, heads=4)
    table = EngramTable.create(h.total_rows, 6, init_std=1.0)
    ids = torch.randint(0, 300, (3, 9))
    with Prefetcher(table, h) as pf:
        ticket = pf.submit(ids)
        got = pf.get(ticket)
        assert got.shape == (3, 9, 8, 6) and torch.equal(got, pf.rows(ids))
        want = table.data[h.row_ids(ids).reshape(-1)].view(3, 9, 8, 6)
        assert torch.equal(got, want)
        odd = pf.submit(torch.tensor([[-5, 1]]))  # any int64 id hashes into the tables
        assert pf.get(odd).shape == (1, 2, 8, 6)
        table.rows = 10  # a table that shrank under the prefetcher: the worker's error surfaces in get()
        failed = pf.submit(ids)
        with pytest.raises(IndexError, match="outside the table"):
            pf.get(failed)
    small = EngramTable.create(10, 6)
    with pytest.raises(ValueError, match="addresses"):
        Prefetcher(small, h)


def _resident_pages(path) -> int:
    """Pages of `path` in the OS page cache (mincore over a fresh read-only mapping)."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = ctypes.create_string_buffer(pages)
        assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw)


def test_a_cold_start_drops_the_table_file_from_the_page_cache(tmp_path):
    """drop_page_cache evicts the file (the bench's engram-mmap-cold reads rows from the disk), and a table mapped
    from it afterwards still reads the same rows."""
    from tierlm.memory.storage import drop_page_cache
    from tierlm.models.export import save_tensors

    values = torch.randn(4096, 64)
    path = tmp_path / "engram.safetensors"
    save_tensors({"t": values}, path)
    path.read_bytes()  # everything in the page cache
    total = _resident_pages(path)
    assert total >= values.numel() * 4 // 4096
    drop_page_cache(path)
    assert _resident_pages(path) < total // 10
    table = EngramTable.from_safetensors(path, "t", "mmap")
    rows = torch.tensor([5, 4000, 17])
    assert torch.equal(table.gather(rows), values[rows])
