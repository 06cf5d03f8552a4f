"""Test setup: the Triton interpreter without a GPU, a seed per test, and NaN-poisoned allocations."""

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # must precede the first import of geokern: triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@torch.no_grad()  # callers may ask for requires_grad=True (torch.compile does)
def _poison(t):
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        # traced (dynamo, or fake / functional tensors under AOT): a fill recorded into the
        # graph ahead of a Triton kernel trips an assertion in inductor's reinplacing pass
        return t
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).max)


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """torch.empty & co. return NaN-filled memory, so an element a kernel fails to write
    fails the comparison. C++ allocations (at::empty in geokern._C) come from the CUDA
    caching allocator: it is handed a NaN-filled block first, which they then reuse."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(new_empty(self, *a, **k)))
    if HAS_CUDA:
        block = empty(64 << 20, device="cuda").fill_(float("nan"))
        del block
    yield
    if HAS_CUDA and torch.cuda.memory_reserved() > _KEEP_RESERVED:
        # make gpu runs ~12 test processes on one GPU: blocks a large test leaves cached in one
        # process are memory the others cannot have (14 processes holding 4-9 GB each ran the
        # H100 out of memory), so a process keeps no more than this between tests
        torch.cuda.empty_cache()


_KEEP_RESERVED = 1 << 30


@pytest.fixture(autouse=True)
def seed(request):
    """Every test draws from its own seed, a function of its id: the same inputs whatever
    runs before it, in any shard or order. The seed is the fixture's value."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value
