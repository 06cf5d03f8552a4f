"""Benchmark cases: retrieval attention in the decode regime, the trainer's shape (spec section 2).
Part of the retrieval family (geokern/bench/retrieval.py appends these cases).

One query per row, n = 8 coordinates, diag metric, per-query R, beta = 5, B = 32 rows, each
row seeing its own T = 512 keys and a memory bank of C = 4096 keys shared by the whole batch
(M = 4608), d_v = 768; float32 and bfloat16.

Implementations, timed side by side in one run (do_bench clears L2 between calls, inputs rotate
through sets larger than L2):
  cuda          the public op with bank=(bank keys, bank values), backend="cuda": both key sets
                are segments of one launch of the CUDA op (plus the merge of the splits); the
                bank is never expanded; a CTA reads a tile of bank values once for 16 rows.
  cuda-raw      the CUDA op alone (forward, no autograd, no Python wrapper), the two segments.
  X[graph]      X captured in a CUDA graph (one graph per input set, replayed): the kernel's time
                without the host's; the eager X's time includes the host time of a call where
                that exceeds the kernel's (do_bench's L2 clear leaves the GPU idle otherwise).
  cuda-raw[graph,K]  the raw op in a graph under the split heuristic's knobs
                (csrc/retrieval/retrieval.cu): ctas<n> = num_ctas=n (target number of blocks;
                default 2 per SM), bank<n> = bank_splits=n (most splits of the bank; default one
                per 64 keys).
  triton        the public op with bank=, backend="triton" (the bank is the kernel's second key
                segment).
  eager (peer)  what the trainer does: concatenate the bank (expanded) to every row's keys, then the
                eager reference (cost, softmax, weighted sum).
read_same_bytes rows (no attention): PyTorch reductions reading the same bytes once, eager and in a
graph, per input and as one buffer: the floor that fixed costs (launches, ramp-up and tail of a
kernel over a few tens of MB) put under any implementation of this shape.
cases(backends=...) picks the kernel backends timed (default both).

Bytes counted (metric TB/s, judged against the copy bandwidth measured in the same run): every
input read once and the output written once, the bank counted once (not once per row):
(B*T + C) * (n + d_v) elements of keys and values, B * n of queries, B R values (float32) and
B * d_v of output. The forward + backward direction counts the same plus the keys and values read
again and their gradients written ((B*T + C) * (n + d_v) elements twice more).
"""

import functools

import torch

from geokern import _backend
from geokern.bench.registry import Case
from geokern.metric import diag
from geokern.ops import retrieval as ops
from geokern.reference import retrieval as ref

B, N, T, C, DV = 32, 8, 512, 4096, 768
BETA, EPS = 5.0, 1e-8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# forward knobs timed (in graphs) beside the default: name -> keyword arguments of the CUDA op
SWEEP = {"ctas132": {"num_ctas": 132}, "ctas528": {"num_ctas": 528}, "bank32": {"bank_splits": 32},
         "ctas528,bank32": {"num_ctas": 528, "bank_splits": 32}}


def _make(dtype, grad):
    def make():
        g = dict(device="cuda", dtype=dtype)
        q = torch.randn(B, N, **g)
        kseq, kbank = torch.randn(B, T, N, **g), torch.randn(C, N, **g)
        vseq = torch.randn(B, T, DV, **g).requires_grad_(grad)
        vbank = torch.randn(C, DV, **g).requires_grad_(grad)
        lam = torch.rand(N, device="cuda") * 0.05 + 0.02  # keeps the softmax spread over many keys
        R = torch.rand(B, 1, device="cuda") + 0.5
        return q, kseq, kbank, vseq, vbank, lam, R

    return make


def _segments(q, kseq, kbank, vseq, vbank, lam, R, num_ctas=0, bank_splits=0):
    """Both key sets in one launch of the CUDA op (no autograd: the forward alone)."""
    r4 = R.reshape(1, B, 1, 1)
    out, _ = torch.ops.geokern.retrieval_attention_cuda(
        q.reshape(1, B, 1, N), kseq.unsqueeze(0), vseq.unsqueeze(0), lam, r4, None, kbank.reshape(1, 1, C, N),
        vbank.reshape(1, 1, C, DV), r4, BETA, EPS, num_ctas, bank_splits, -1, -1)
    return out.reshape(B, DV)


def _graphed(fn):
    """fn captured in a CUDA graph per input set (at its first call with that set), then replayed."""
    graphs = {}

    def f(*inputs):
        entry = graphs.get(id(inputs[0]))
        if entry is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*inputs)  # warm-up outside the capture (lazy initialisation, allocator)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = fn(*inputs)
            entry = graphs[id(inputs[0])] = (g, out, inputs)  # inputs kept: their ids stay unique
        entry[0].replay()
        return entry[1]

    return f


def _public(backend):
    def f(q, kseq, kbank, vseq, vbank, lam, R):
        return ops.retrieval_attention(q, kseq, vseq, R, diag(lam), BETA, EPS, bank=(kbank, vbank), backend=backend)

    return f


def _eager(q, kseq, kbank, vseq, vbank, lam, R):
    keys = torch.cat([kseq, kbank.expand(B, C, N)], 1)
    values = torch.cat([vseq, vbank.expand(B, C, DV)], 1)
    return ref.retrieval_attention(q, keys, values, R, diag(lam), BETA, EPS)


def _fwd_bwd(fn):
    def f(q, kseq, kbank, vseq, vbank, lam, R):
        vseq.grad = vbank.grad = None
        out = fn(q, kseq, kbank, vseq, vbank, lam, R)
        g = torch.randn(out.shape, device=out.device, generator=torch.Generator(device=out.device).manual_seed(0))
        out.backward(g.to(out.dtype))
        return out, vseq.grad, vbank.grad

    return f


def _reference(grad):
    def reference(q, kseq, kbank, vseq, vbank, lam, R):
        f32 = [t.detach().float().requires_grad_(grad) for t in (vseq, vbank)]
        args = (q.float(), kseq.float(), kbank.float(), f32[0], f32[1], lam, R)
        if grad:
            return _fwd_bwd(_eager)(*args)
        return _eager(*args)

    return reference


def _bytes(esz, grad):
    kv = (B * T + C) * (N + DV) * esz
    once = kv + B * N * esz + B * 4 + B * DV * esz
    return once + (2 * kv if grad else 0)


def _case(dname, direction, backends):
    dtype = DTYPES[dname]
    grad = direction == "fwd+bwd"
    avail = [b for b in _backend.available(torch.device("cuda")) if b in backends]
    impls = {b: _public(b) for b in avail if b != "torch"}
    if "cuda" in avail and not grad:
        impls["cuda-raw"] = _segments
        impls["cuda-raw[graph]"] = _graphed(_segments)
        impls.update({f"cuda-raw[graph,{k}]": _graphed(functools.partial(_segments, **kw)) for k, kw in SWEEP.items()})
        impls["cuda[graph]"] = _graphed(_public("cuda"))  # last: a capture that fails is reported as such
    peers = {"eager": _eager}
    if grad:
        impls = {k: _fwd_bwd(f) for k, f in impls.items()}
        peers = {k: _fwd_bwd(f) for k, f in peers.items()}
    esz = torch.finfo(dtype).bits // 8
    return Case(
        op="retrieval_decode", shape=f"B{B}-n{N}-T{T}+bank{C}-dv{DV}", dtype=dname, direction=direction,
        make_inputs=_make(dtype, grad), impls=impls, peers=peers, reference=_reference(grad),
        amount=_bytes(esz, grad), metric="TB/s", ceiling="copy_tb_s", tol=2e-2 if dtype == torch.bfloat16 else 1e-4,
        input_bytes=_bytes(esz, False),
    )


def _read_floor_case(dname):
    """What any kernel pays to read this shape's bytes once, timed the same way: PyTorch's
    sum over each input (one kernel per input, as the op reads several tensors), and over one
    buffer of the same total size (one kernel, the best case), eager and in a CUDA graph.
    These rows compute no attention: the reference is empty, so the check compares nothing."""
    dtype = DTYPES[dname]
    esz = torch.finfo(dtype).bits // 8
    total = _bytes(esz, False)

    def make():
        flat = torch.randn(total // esz, device="cuda", dtype=dtype)
        return _make(dtype, False)() + (flat,)

    def each(q, kseq, kbank, vseq, vbank, lam, R, flat):
        return [t.sum() for t in (q, kseq, kbank, vseq, vbank, R)]

    def one(*inputs):
        return inputs[-1].sum()

    return Case(
        op="read_same_bytes", shape=f"B{B}-n{N}-T{T}+bank{C}-dv{DV}", dtype=dname, direction="fwd",
        make_inputs=make, impls={}, reference=lambda *inputs: (),
        peers={"sum each input": each, "sum each input[graph]": _graphed(each), "sum one buffer[graph]": _graphed(one)},
        amount=total, metric="TB/s", ceiling="copy_tb_s", input_bytes=2 * total,
    )


def cases(backends=("cuda", "triton")):
    """The decode cases; backends: the kernel backends timed (where available)."""
    return [_case(d, direction, backends) for d in DTYPES for direction in ("fwd", "fwd+bwd")] + [
        _read_floor_case(d) for d in DTYPES]

