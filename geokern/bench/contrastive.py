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
    return [_case(i, o, n, dt) for i, o, n in sizes for dt in DTYPES]
