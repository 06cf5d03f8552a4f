"""Benchmark cases: the LIoR recurrence (sequence forward and backward, the in-place step), the
action, and the memory convolution's direct (Toeplitz GEMM) and FFT paths across T.

The recurrence, the step and the action are memory-bound: amount = the bytes a call must move
(each input read once, each output written once), judged against the copy bandwidth (issue #21:
>= 80% of it at >= 256 MB of traffic per call). Each is timed at a trainer size and at >= 256 MB.
Peer: the eager reference (a Python loop of torch ops for the sequence, torch ops for the step and
the action). The sequence's backward has no peer (the reference's backward is autograd through T
steps of its forward: not a like-for-like time); its bytes: g, x and m read, dx written, plus
the gate's j and dj.

The step is timed on a state where it is idempotent (rho = 0, every ring slot holding x): the
correctness check runs after the reference and before the peer on the same tensors, and the
bytes moved do not depend on the values. The memory convolution's rows ("direct", "fft") show the
crossover in T that ops.lior.DIRECT_MAX_T should be set to; amount = x read + out written.
"""

import functools

import torch

from geokern import _backend
from geokern.bench.registry import Case
from geokern.metric import diag
from geokern.kernels import lior as tk
from geokern.ops import lior as ops
from geokern.ops._registry import launching_directly
from geokern.reference import lior as ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "bf16": 1e-2}
GAINS = dict(rho=0.9, eta=1.0, xi=0.5)


def _triton_available():
    return _backend.why_unavailable("triton", torch.device("cuda")) is None


def _seq_fwd_case(T, B, D, dt, gate):
    dtype = DTYPES[dt]

    def make():
        x = torch.randn(T, B, D, device="cuda", dtype=dtype)
        return x, (torch.randn(T, B, device="cuda", dtype=dtype) if gate else None)

    @launching_directly  # as the ops launch (the launcher called outside any op)
    def step_loop(x, j):  # the forward's old loop alone (kernels/lior.md: the chunked loop's baseline)
        out = torch.empty_like(x)
        tk.lior_recurrence_fwd(x, j, None, None, out, *GAINS.values(), 4, config="step")
        return out

    impls = {"triton": functools.partial(ops.lior_recurrence, backend="triton", **GAINS),
             "triton step loop": step_loop} if _triton_available() else {}
    e = dtype.itemsize
    return Case(
        op="lior_recurrence" + ("+gate" if gate else ""), shape=f"T{T}-B{B}-D{D}", dtype=dt, direction="fwd",
        make_inputs=make, impls=impls, peers={"torch eager": functools.partial(ops.lior_recurrence, backend="torch",
                                                                               **GAINS)},
        reference=lambda x, j: ref.lior_recurrence(x.float(), None if j is None else j.float(), **GAINS),
        amount=2 * T * B * D * e + (T * B * e if gate else 0), metric="TB/s", ceiling="copy_tb_s", tol=TOL[dt],
        input_bytes=T * B * D * e,
    )


def _seq_bwd_case(T, B, D, dt):
    dtype = DTYPES[dt]
    p = 4

    def make():
        x = torch.randn(T, B, D, device="cuda", dtype=dtype)
        j = torch.randn(T, B, device="cuda", dtype=dtype)
        out = ops.lior_recurrence(x, j, backend="triton", **GAINS)
        return torch.randn_like(x), x, j, out

    def reference(g, x, j, out):
        xs, js = x.float().requires_grad_(), j.float().requires_grad_()
        dx, dj = torch.autograd.grad(ref.lior_recurrence(xs, js, p=p, **GAINS), (xs, js), g.float())
        return dx, dj

    def triton(g, x, j, out):
        dx, _, _, dj = ops._KERNELS["triton"]["bwd"](g, x, j, None, None, out, *GAINS.values(), p)
        return dx, dj

    @launching_directly
    def step_loop(g, x, j, out):  # the backward's old loop alone (kernels/lior.md: the chunked loop's baseline)
        T_, B_, D_ = x.shape
        dx, dm0, dh = torch.empty_like(x), x.new_empty((B_, D_)), x.new_empty((p, B_, D_))
        dj = torch.zeros(T_, B_, device="cuda")
        tk.lior_recurrence_bwd(g, x, j, None, None, out, dx, dm0, dh, dj, *GAINS.values(), p, config="step")
        return dx, dj

    e = dtype.itemsize
    return Case(
        op="lior_recurrence+gate", shape=f"T{T}-B{B}-D{D}", dtype=dt, direction="bwd", make_inputs=make,
        impls={"triton": triton, "triton step loop": step_loop} if _triton_available() else {}, peers={},
        reference=reference,
        amount=4 * T * B * D * e + T * B * (e + 4), metric="TB/s", ceiling="copy_tb_s", tol=TOL[dt],
        input_bytes=3 * T * B * D * e,
    )


def _step_case(B, D, dt, gate, p=4):
    dtype = DTYPES[dt]
    kw = dict(rho=0.0, eta=1.0, xi=0.5)

    def make():
        x = torch.randn(B, D, device="cuda", dtype=dtype)
        ring = x.unsqueeze(0).repeat(p, 1, 1)
        pos = torch.zeros((), dtype=torch.int64, device="cuda")
        j = torch.randn(B, device="cuda", dtype=dtype) if gate else None
        return torch.zeros_like(x), ring, pos, x, j

    def reference(m, ring, pos, x, j):
        return ref.lior_recurrence_step(m, x, ring[0], j, kw["rho"], kw["eta"], kw["xi"])

    def run(backend):
        return lambda m, ring, pos, x, j: ops.lior_recurrence_step_(m, ring, pos, x, j, backend=backend, **kw)

    e = dtype.itemsize
    return Case(
        op="lior_recurrence_step_" + ("+gate" if gate else ""), shape=f"B{B}-D{D}-p{p}", dtype=dt, direction="fwd",
        make_inputs=make, impls={"triton": run("triton")} if _triton_available() else {},
        peers={"torch eager": run("torch")}, reference=reference,
        # m, x and the ring slot read; m and the slot written
        amount=5 * B * D * e + (B * e if gate else 0), metric="TB/s", ceiling="copy_tb_s", tol=TOL[dt],
        input_bytes=(p + 2) * B * D * e,
    )


def _action_case(W, B, n):
    def make():
        v = torch.randn(W, B, n, device="cuda")
        R = torch.rand(W, B, device="cuda") + 0.5
        lam = torch.rand(n, device="cuda")
        return v, R, lam, torch.zeros(B, device="cuda"), torch.zeros(B, device="cuda"), \
            torch.zeros((), dtype=torch.int64, device="cuda")

    def run(backend):
        return lambda v, R, lam, i, m, c: ops.lior_action_(v, R, diag(lam), i, m, c, dtau=0.1, backend=backend)

    @launching_directly
    def old_config(v, R, lam, i, m, c):  # the old launcher's tile and loop (kernels/lior.md: the baseline)
        phi, w = diag(lam).features(v)
        cost = torch.empty(W, B, device="cuda")
        tk.lior_action(phi, w.float().contiguous(), torch.broadcast_to(R, (W, B)), cost, i, m, c, 1e-8, 0.1,
                       config=tk.ACTION_OLD_CONFIG)
        c.add_(W)
        return cost

    impls = {"triton": run("triton"), "triton old config": old_config} if _triton_available() else {}
    return Case(
        op="lior_action_", shape=f"W{W}-B{B}-n{n}", dtype="fp32", direction="fwd", make_inputs=make,
        impls=impls, peers={"torch eager": run("torch")},
        reference=lambda v, R, lam, i, m, c: ref.lior_action(v, R, diag(lam), 1e-8, 0.1)[0],
        # v and R read, the cost written, the state (3 x B) read and written
        amount=4 * (W * B * n + 2 * W * B + 4 * B), metric="TB/s", ceiling="copy_tb_s", tol=1e-5,
        input_bytes=4 * W * B * (n + 1),
    )


def _conv_case(T, cols):
    def make():
        return torch.randn(T, cols, device="cuda"), ref.lior_params(device="cuda")

    impls = {m: functools.partial(ops.lior_memory_conv, method=m) for m in ("direct", "fft")}
    return Case(
        op="lior_memory_conv", shape=f"T{T}-cols{cols}", dtype="fp32", direction="fwd", make_inputs=make,
        impls=impls, peers={}, reference=lambda x, p: ref.lior_memory_conv(x.double(), p.double(), "fft"),
        amount=2 * T * cols * 4, metric="TB/s", ceiling="copy_tb_s", tol=1e-5, input_bytes=T * cols * 4,
    )


def cases():
    out = []
    for dt in DTYPES:
        out += [_seq_fwd_case(256, 64, 1024, dt, gate=False), _seq_fwd_case(256, 64, 1024, dt, gate=True)]
    # >= 256 MB of traffic per call
    out += [_seq_fwd_case(1024, 32, 2048, "fp32", gate=False), _seq_fwd_case(1024, 32, 2048, "fp32", gate=True),
            _seq_fwd_case(2048, 32, 2048, "bf16", gate=True)]
    out += [_seq_bwd_case(256, 64, 1024, "fp32"), _seq_bwd_case(1024, 32, 2048, "fp32"),
            _seq_bwd_case(2048, 32, 2048, "bf16")]
    out += [_step_case(64, 1024, "fp32", gate=True), _step_case(4096, 4096, "fp32", gate=False),
            _step_case(4096, 4096, "fp32", gate=True), _step_case(8192, 4096, "bf16", gate=True)]
    out += [_action_case(32, 4096, 64), _action_case(64, 65536, 16), _action_case(16, 65536, 64)]
    out += [_conv_case(T, 64 * 256) for T in (64, 128, 256, 512, 1024, 2048, 4096, 8192)]
    return out
