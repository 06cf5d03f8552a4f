"""Benchmark cases: the contrastive (equilibrium-propagation) update of one linear layer.

At MLP sizes the update is bound by memory, not by its GEMM (2 (Nn + Nf) in out flops: 17 GFLOP
at 4096 x 4096 with N = 256 per phase, ~20 us of bf16 tensor cores, against 130 MB of float32 W
to read and write): amount = the bytes of one ideal pass, W and b read and written once plus the
activities read once, judged against the copy ceiling. The Triton backend writes G (float32
out x in) from cuBLAS, reads it for the norm (direct form) and again in the apply, so it sits at
about 2/5 of that bound (3/5 where the Gram form spares the norm's read).

Peers, measured in the same process:
- "autograd+SGD": what users write today: the energy difference of the two phases,
  E_p = -(sum_r y_r^T W x_r + sum_r y_r^T b) / N_p, backward, clip_grad_norm_ on W's gradient,
  a finite check read on the host (.all() in an if: a synchronisation), then the SGD step.
- "torch": the plain torch composition with no host sync (geokern.reference.contrastive in the
  activities' dtype: two GEMMs, means, norm, where-gates).

W starts at zero so that the check before timing compares dW itself (not W + dW, where W's size
would hide an error in dW); each implementation updates its own copy of W (made on its first call,
outside the timing) so every first call starts from the same W; later calls keep updating it (the
clip, max_norm = 1, bounds each step).
"""

import functools

import torch

from geokern.bench.registry import Case
from geokern.ops import contrastive as ops
from geokern.ops import _contrastive_many as ops_many
from geokern.ops._contrastive_many import ContrastiveGroup
from geokern.reference import contrastive as ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-3, "bf16": 1e-2}  # fp32 activities may run on TF32 tensor cores (torch's setting)
LR, BETA, MAX_NORM = 0.05, 0.5, 1.0


def _own_copy(fn):
    """fn(W, b, *acts) on this implementation's own copy of (W, b); returns the updated (W, b)."""
    copies = {}

    def run(W0, b0, *acts):
        key = id(W0)
        if key not in copies:
            copies[key] = (W0.clone(), b0.clone())
        W, b = copies[key]
        fn(W, b, *acts)
        return W, b

    return run


def _geokern(backend, gram=None):
    return _own_copy(functools.partial(_op, backend=backend, gram=gram))


def _op(W, b, *acts, backend, gram):
    ops.contrastive_update_(W, b, *acts, LR, BETA, MAX_NORM, gram=gram, backend=backend)


def _torch(W, b, *acts):
    ref.contrastive_update_(W, b, *acts, LR, BETA, MAX_NORM)


def _autograd_sgd():
    params = {}

    def step(W0, b0, Xn, Yn, Xf, Yf):
        key = id(W0)
        if key not in params:
            params[key] = (W0.clone().requires_grad_(True), b0.clone().requires_grad_(True))
        W, b = params[key]
        W.grad = b.grad = None

        def energy(X, Y):
            return -(((Y @ W) * X).sum() + (Y @ b).sum()) / X.shape[0]

        with torch.autocast("cuda", enabled=False):
            loss = (energy(Xn.to(W.dtype), Yn.to(W.dtype)) - energy(Xf.to(W.dtype), Yf.to(W.dtype))) / BETA
        loss.backward()
        torch.nn.utils.clip_grad_norm_([W], MAX_NORM / LR)  # the clip of dW = lr * grad
        with torch.no_grad():
            if torch.isfinite(W.grad).all():  # a host read: the synchronisation users pay today
                W.add_(W.grad, alpha=-LR)
                if torch.isfinite(b.grad).all():
                    b.add_(b.grad, alpha=-LR)
        return W.detach(), b.detach()

    return step


def _reference(W0, b0, *acts):
    W, b = W0.double(), b0.double()
    ref.contrastive_update_(W, b, *(a.double() for a in acts), LR, BETA, MAX_NORM)
    return W, b


def _case(inn, out, n, dt, device="cuda"):
    dtype = DTYPES[dt]

    def make():
        W, b = torch.zeros(out, inn, device=device), torch.zeros(out, device=device)
        # nudged = free + a small push, as in equilibrium propagation
        Xf, Yf = torch.randn(n, inn, device=device), torch.randn(n, out, device=device)
        Xn, Yn = Xf + 0.1 * torch.randn_like(Xf), Yf + 0.1 * torch.randn_like(Yf)
        return (W, b) + tuple(t.to(dtype) for t in (Xn, Yn, Xf, Yf))

    impls = {"triton": _geokern("triton")}
    if not ops.use_gram(2 * n, out, inn):  # the default is direct: time the Gram form beside it
        impls["triton-gram"] = _geokern("triton", gram=True)
    else:
        impls["triton-direct"] = _geokern("triton", gram=False)
    act_bytes = 2 * n * (inn + out) * dtype.itemsize
    return Case(
        op="contrastive_update_", shape=f"in{inn}-out{out}-N{n}", dtype=dt, direction="fwd",
        make_inputs=make, impls=impls,
        peers={"autograd+SGD": _autograd_sgd(), "torch": _own_copy(_torch)},
        reference=_reference, amount=2 * 4 * (inn * out + out) + act_bytes, metric="TB/s",
        ceiling="copy_tb_s", tol=TOL[dt], input_bytes=4 * (inn * out + out) + act_bytes,
    )


def cases():
    # (in, out, rows per phase): an MNIST MLP layer, transformer-MLP-sized layers, a wide
    # projection with few rows (where the Gram form is the default)
    sizes = [(784, 512, 128), (1024, 1024, 256), (4096, 4096, 256), (4096, 16384, 32), (8192, 8192, 64)]
    return [_case(i, o, n, dt) for i, o, n in sizes for dt in DTYPES] + \
        [_many_case(64, 1024, 1024, 256, dt, peer=p) for p in ("torch-loop", "autograd+SGD") for dt in MANY_DTYPES]


# ---- many layers: one grouped launch against the per-layer loops (issue #22, item 7) -----------
#
# "fp32": float32 activities, IEEE products on both sides (torch's matmul precision "highest");
# "tf32": float32 activities on TF32 tensor cores on both sides; "bf16": bfloat16 activities with
# float32 W and b, float32 accumulation on both sides (the autograd peer under bf16 autocast).
MANY_DTYPES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False)}
# The check before timing: the rounding of the products' inputs (TF32 / bf16) is amplified by the
# cancellation of the two phases (nudged = free + a small push), so ||dW||'s error grows with it.
# The autograd update rounds each phase's product to its output dtype before the phases meet
# (under bf16 autocast a bf16 Y^T X per phase), which costs it more: a few % of dW at bf16 in
# the tiny test case. Its rows are a case of their own, judged at its own accuracy.
MANY_TOL = {"fp32": 1e-3, "tf32": 5e-3, "bf16": 1e-2}
AUTOGRAD_TOL = {"fp32": 1e-3, "tf32": 5e-2, "bf16": 1e-1}


class _precision:
    """torch's float32 matmul precision for the peers of a tf32 / fp32 row, restored after."""

    def __init__(self, tf32):
        self.want = "high" if tf32 else "highest"

    def __enter__(self):
        self.old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.want)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.old)


def _own_copies(fn):
    """fn(Ws, bs, *acts) on this implementation's own copies of the lists Ws, bs; returns the
    updated (*Ws, *bs) (made on the first call, outside the timing, as _own_copy)."""
    copies = {}

    def run(Ws0, bs0, *acts):
        key = id(Ws0)
        if key not in copies:
            copies[key] = ([W.clone() for W in Ws0], [b.clone() for b in bs0])
        Ws, bs = copies[key]
        fn(Ws, bs, *acts)
        return (*Ws, *bs)

    return run


def _many(tf32):
    def fn(Ws, bs, *acts):
        ops_many.contrastive_update_many_(Ws, bs, *acts, LR, BETA, MAX_NORM, tf32=tf32, backend="triton")

    return _own_copies(fn)


def _many_graph(tf32):
    """The grouped update replayed from a CUDA graph: the first call runs it eagerly (it builds the
    tables: that is its update) and captures the graph; later calls replay it."""
    graphs = {}

    def fn(Ws, bs, *acts):
        key = id(Ws)
        if key in graphs:
            graphs[key].replay()
            return
        group = ContrastiveGroup(Ws, bs)
        group.update_(*acts, LR, BETA, MAX_NORM, tf32=tf32)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            group.update_(*acts, LR, BETA, MAX_NORM, tf32=tf32)
        graphs[key] = g
        g.group = group  # the graph reads the group's workspace and tables: keep them alive

    return _own_copies(fn)


def _one_layer_loop(tf32):
    def fn(Ws, bs, *acts):
        with _precision(tf32):
            for i, (W, b) in enumerate(zip(Ws, bs)):
                ops.contrastive_update_(W, b, *(a[i] for a in acts), LR, BETA, MAX_NORM, gram=False, backend="triton")

    return _own_copies(fn)


def _torch_rule_loop(tf32):
    """The whole rule in PyTorch, per layer, no host sync: the stacked GEMM [Yn/Nn ; -Yf/Nf]^T
    [Xn ; Xf] (float32 output for bf16 operands), the norm, the clip, the finite gates, the add."""
    def fn(Ws, bs, Xns, Yns, Xfs, Yfs):
        with _precision(tf32):
            for W, b, xn, yn, xf, yf in zip(Ws, bs, Xns, Yns, Xfs, Yfs):
                # the means as geokern takes them: 1 / Nn in the scale, c = Nn / Nf on the free rows
                # (float32 where c != 1, so a 16-bit scaling does not round it)
                s, c = LR / (BETA * xn.shape[0]), xn.shape[0] / xf.shape[0]
                if c != 1.0:
                    xn, yn, xf, yf = (t.float() for t in (xn, yn, xf, yf))
                A = torch.cat([yn, yf * -c])
                B = torch.cat([xn, xf])
                if A.dtype == torch.float32:
                    G = A.T @ B
                elif A.is_cuda:
                    G = torch.mm(A.T, B, out_dtype=torch.float32)
                else:  # CPU (the tests' tiny case): no 16-bit out_dtype mm there
                    G = A.T.float() @ B.float()
                gb = A.sum(0, dtype=torch.float32)
                norm = torch.linalg.vector_norm(G) * s
                f = torch.where(norm > MAX_NORM, MAX_NORM / norm, s)
                ok = torch.isfinite(norm)
                W.copy_(torch.where(ok, W + f * G, W))
                b.copy_(torch.where(ok & torch.isfinite(gb).all(), b + s * gb, b))

    return _own_copies(fn)


def _autograd_many(bf16, tf32):
    """What published EqProp code does, for every layer: the energy of each phase, one backward,
    then per layer the clip of its gradient, a finite check read on the host and the SGD step."""
    params = {}

    def step(Ws0, bs0, Xns, Yns, Xfs, Yfs):
        key = id(Ws0)
        if key not in params:
            params[key] = [(W.clone().requires_grad_(True), b.clone().requires_grad_(True)) for W, b in zip(Ws0, bs0)]
        wb = params[key]
        with _precision(tf32), torch.autocast(Ws0[0].device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = 0.0
            for (W, b), xn, yn, xf, yf in zip(wb, Xns, Yns, Xfs, Yfs):
                W.grad = b.grad = None
                for X, Y, sign in ((xn, yn, 1.0), (xf, yf, -1.0)):
                    loss = loss - sign * (((Y @ W) * X).sum() + (Y @ b).sum()) / (X.shape[0] * BETA)
        with _precision(tf32):
            loss.backward()
        with torch.no_grad():
            for W, b in wb:
                torch.nn.utils.clip_grad_norm_([W], MAX_NORM / LR)
                if torch.isfinite(W.grad).all():  # a host read per layer: what users pay today
                    W.add_(W.grad, alpha=-LR)
                    if torch.isfinite(b.grad).all():
                        b.add_(b.grad, alpha=-LR)
        return (*(W.detach() for W, _ in wb), *(b.detach() for _, b in wb))

    return step


def _many_reference(Ws0, bs0, *acts):
    out_w, out_b = [], []
    for i, (W0, b0) in enumerate(zip(Ws0, bs0)):
        W, b = W0.double(), b0.double()
        ref.contrastive_update_(W, b, *(a[i].double() for a in acts), LR, BETA, MAX_NORM)
        out_w.append(W)
        out_b.append(b)
    return (*out_w, *out_b)


def _many_case(layers, inn, out, n, dt, device="cuda", peer="torch-loop"):
    """The grouped update against `peer`: "torch-loop" (the whole rule per layer in PyTorch, at the
    same dtypes) or "autograd+SGD" (in a case of its own: see AUTOGRAD_TOL)."""
    dtype, tf32 = MANY_DTYPES[dt]

    def make():
        Ws = [torch.zeros(out, inn, device=device) for _ in range(layers)]
        bs = [torch.zeros(out, device=device) for _ in range(layers)]
        acts = [[], [], [], []]
        for _ in range(layers):
            Xf, Yf = torch.randn(n, inn, device=device), torch.randn(n, out, device=device)
            Xn, Yn = Xf + 0.1 * torch.randn_like(Xf), Yf + 0.1 * torch.randn_like(Yf)
            for lst, t in zip(acts, (Xn, Yn, Xf, Yf)):
                lst.append(t.to(dtype))
        return (Ws, bs, *acts)

    act_bytes = layers * 2 * n * (inn + out) * dtype.itemsize
    impls = {"triton": _many(tf32)}
    if peer == "torch-loop":
        impls["triton-1layer-loop"] = _one_layer_loop(tf32)
        if torch.device(device).type == "cuda":
            impls["triton-graph"] = _many_graph(tf32)
        peers, tol = {"torch-loop": _torch_rule_loop(tf32)}, MANY_TOL[dt]
    else:
        peers, tol = {"autograd+SGD": _autograd_many(dtype == torch.bfloat16, tf32)}, AUTOGRAD_TOL[dt]
    shape = f"L{layers}-in{inn}-out{out}-N{n}" + ("" if peer == "torch-loop" else "-vs-autograd")
    return Case(
        op="contrastive_update_many_", shape=shape, dtype=dt, direction="fwd", make_inputs=make, impls=impls,
        peers=peers, reference=_many_reference, amount=layers * 2 * 4 * (inn * out + out) + act_bytes,
        metric="TB/s", ceiling="copy_tb_s", tol=tol,
        input_bytes=layers * 4 * (inn * out + out) + act_bytes,
    )
