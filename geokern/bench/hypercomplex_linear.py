"""Benchmark cases: the quaternion / octonion linear layers (geokern.quaternion_linear,
geokern.octonion_linear), bf16.

Training size (4096 rows, in = out = 4096): compute-bound, amount = the dense-equivalent
FLOPs (2 M in out forward, 6 M in out forward + backward), ceiling the bf16 cuBLAS GEMM
rate. Peers: cuBLAS on the equivalent dense GEMM with the expanded weight made beforehand
(F.linear forward; forward + backward as its three GEMMs y = x W^T, dx = dy W,
dW = dy^T x), and the expand-then-matmul layer a user would write (the reference: expands
the weight on every call, autograd for the backward). The forward + backward rows check
(y, dx); dW is computed and timed but checked by tests/test_hypercomplex_linear.py.

Decode sizes (1, 8, 32 rows; in = out = 8192): memory-bound on the weight, amount = the
bytes of the components plus x and y, ceiling the copy bandwidth; every implementation is
also timed inside a CUDA graph ("[graph]"), where launch costs do not hide the kernel. The
first peer, nn.Linear with the expanded weight (n times the bytes), is what the speed-up
is against. Our rows: "triton" is the op with its defaults (the decode kernel up to
decode_max_rows rows); "triton gemm kernel[graph]" and "triton decode kernel[graph]" force one
kernel each (the GEMM kernel: one program per output block and column tile, every weight
element read n times; the decode kernel: one program per column tile of all n blocks, each
read once), so one run times both beside nn.Linear. At the training size the forward also
has "triton gemm stepwise kernel" and "triton gemm blocked kernel" (the op's gemm_variant
forced: a K loop over all blocks with the sign on the x tile, or a K loop per block with the
sign on the accumulator), beside cuBLAS F.linear on the expanded W. Issue #19's targets: 4096 rows forward <= 1.11x cuBLAS, forward + backward
<= 1.11x the three GEMMs; decode in a graph >= 2.5x nn.Linear (octonion >= 4x).
"""

import torch

from geokern import _backend
from geokern.bench._retrieval_decode import _graphed
from geokern.bench.registry import Case
from geokern.ops import hypercomplex as ops
from geokern.reference import hypercomplex as ref

NAMES = {4: "quaternion_linear", 8: "octonion_linear"}
TRAIN = (4096, 4096, 4096)  # rows, in, out
DECODE_ROWS, DECODE_FEATURES = (1, 8, 32), 8192
TOL = 1e-2


def _triton_ok():
    return "triton" in _backend.available(torch.device("cuda"))


def _make(n, M, fin, fout, grad=False):
    def make():
        x = torch.randn(M, fin, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, fout // n, fin // n, device="cuda", dtype=torch.bfloat16) / (fin**0.5)
        b = torch.randn(fout, device="cuda", dtype=torch.bfloat16)
        dense = ref.expand_weight(w.unbind(0)).contiguous()
        dy = torch.randn(M, fout, device="cuda", dtype=torch.bfloat16) if grad else None
        return x, w, b, dense, dy

    return make


def _ours(x, w, b, dense, dy):
    return ops._linear(x, list(w.unbind(0)), b, "triton")


def _ours_gemm(x, w, b, dense, dy):
    """The GEMM kernel whatever the rows (one program per output block and column tile)."""
    return ops._linear(x, list(w.unbind(0)), b, "triton", decode_max_rows=0)


def _ours_gemm_stepwise(x, w, b, dense, dy):
    """The GEMM kernel, stepwise variant (one K loop over all blocks, the sign on the x tile)."""
    return ops._linear(x, list(w.unbind(0)), b, "triton", decode_max_rows=0, gemm_variant="stepwise")


def _ours_gemm_blocked(x, w, b, dense, dy):
    """The GEMM kernel, blocked variant (a K loop per block, the sign on the accumulator)."""
    return ops._linear(x, list(w.unbind(0)), b, "triton", decode_max_rows=0, gemm_variant="blocked")


def _ours_decode(x, w, b, dense, dy):
    """The decode kernel whatever the rows (one program per column tile of all n blocks)."""
    return ops._linear(x, list(w.unbind(0)), b, "triton", decode_max_rows=1 << 30)


def _ours_fwd_bwd(x, w, b, dense, dy):
    x, w, b = x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
    y = ops._linear(x, list(w.unbind(0)), b, "triton")
    dx, _, _ = torch.autograd.grad(y, (x, w, b), dy)
    return y, dx


def _expand_layer(x, w, b, dense, dy):
    return ref.hypercomplex_linear(x, w.unbind(0), b)


def _expand_layer_fwd_bwd(x, w, b, dense, dy):
    x, w, b = x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
    y = ref.hypercomplex_linear(x, w.unbind(0), b)
    dx, _, _ = torch.autograd.grad(y, (x, w, b), dy)
    return y, dx


def _dense(x, w, b, dense, dy):
    return torch.nn.functional.linear(x, dense, b)


def _three_gemms(x, w, b, dense, dy):
    y = torch.nn.functional.linear(x, dense, b)
    dx = dy @ dense
    dy.t() @ x  # dW of the expanded weight
    dy.sum(0)  # db
    return y, dx


def _reference(x, w, b, dense, dy):
    return ref.hypercomplex_linear(x.float(), w.float().unbind(0), b.float())


def _reference_fwd_bwd(x, w, b, dense, dy):
    xf = x.float().requires_grad_()
    y = ref.hypercomplex_linear(xf, w.float().unbind(0), b.float())
    (dx,) = torch.autograd.grad(y, xf, dy.float())
    return y, dx


def _train_case(n, direction):
    M, fin, fout = TRAIN
    fb = direction == "fwd+bwd"
    impls = {"triton": _ours_fwd_bwd if fb else _ours} if _triton_ok() else {}
    if impls and not fb:  # the two GEMM variants side by side (gemm_variant; "triton" is the default's)
        impls.update({"triton gemm stepwise kernel": _ours_gemm_stepwise,
                      "triton gemm blocked kernel": _ours_gemm_blocked})
    peers = ({"cuBLAS three GEMMs (expanded W)": _three_gemms, "expand-then-matmul layer": _expand_layer_fwd_bwd} if fb
             else {"cuBLAS F.linear (expanded W)": _dense, "expand-then-matmul layer": _expand_layer})
    return Case(
        op=NAMES[n], shape=f"{M}x{fin}x{fout}", dtype="bf16", direction=direction,
        make_inputs=_make(n, M, fin, fout, grad=fb), impls=impls, peers=peers,
        reference=_reference_fwd_bwd if fb else _reference,
        amount=(6 if fb else 2) * M * fin * fout, metric="TFLOP/s", ceiling="bf16_gemm_tflop_s", tol=TOL,
        input_bytes=2 * (M * fin + fin * fout // n + fin * fout + (M * fout if fb else 0)),
    )


def _decode_case(n, M):
    f = DECODE_FEATURES
    # "triton" is the op as users get it (decode_max_rows' default picks the kernel); the gemm /
    # decode rows force each kernel, to time them side by side and set that default
    impls = {"triton[graph]": _graphed(_ours), "triton": _ours, "triton gemm kernel[graph]": _graphed(_ours_gemm),
             "triton decode kernel[graph]": _graphed(_ours_decode)} if _triton_ok() else {}
    peers = {"nn.Linear (expanded W)[graph]": _graphed(_dense), "nn.Linear (expanded W)": _dense,
             "expand-then-matmul layer[graph]": _graphed(_expand_layer)}
    return Case(
        op=NAMES[n], shape=f"{M}x{f}x{f}", dtype="bf16", direction="fwd",
        make_inputs=_make(n, M, f, f), impls=impls, peers=peers, reference=_reference,
        amount=2 * (f * f // n + 2 * M * f), metric="TB/s", ceiling="copy_tb_s", tol=TOL,
        input_bytes=2 * (f * f // n + f * f + M * f),
    )


def cases():
    out = []
    for n in (4, 8):
        out += [_train_case(n, d) for d in ("fwd", "fwd+bwd")]
        out += [_decode_case(n, M) for M in DECODE_ROWS]
    return out
