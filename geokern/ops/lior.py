"""LIoR memory kernel, memory convolution, recurrence and action: checks, backends, custom ops, autograd.

Public: lior_params, lior_kernel, lior_memory_conv, lior_recurrence, lior_recurrence_step_,
lior_action_. The definitions (and the choices where the spec is silent) are
geokern.reference.lior (spec retrieval_lior.md section 4); the kernels, their bytes and flops are
kernels/lior.py and kernels/lior.md.

Backends:
- lior_kernel and lior_memory_conv are compositions of torch ops on every device (the kernel is a
  few dozen flops on T numbers; the convolution's direct path is one GEMM with a Toeplitz matrix,
  its long path cuFFT): "auto" and "torch" run them, "triton" and "cuda" raise. Their gradients
  (to x and to params) are torch's autograd.
- lior_recurrence, lior_recurrence_step_ and lior_action_ have Triton kernels (float16 / bfloat16
  / float32, float32 arithmetic) and the reference ("torch", float64 too). "cuda" raises: the CUDA
  kernels are issue #21's second half. "auto" takes Triton for CUDA tensors, the reference for CPU.
- The in-place ops (the step, the action) carry no gradient: they update a state, as a decode
  step does, and run without autograd; lior_recurrence is differentiable in x, j, m0 and history.
  For a differentiable action integrand use geokern.retrieval_cost (the same quadratic form).
"""

import math
import numbers

import torch

from geokern import _backend
from geokern._checks import FLOAT_DTYPES, check_same, check_tensor
from geokern.kernels import lior as tk
from geokern.metric import Metric
from geokern.ops._registry import alert_nondeterministic, bound_once, constant, refuse_double_backward, triton_op
from geokern.reference import lior as ref

__all__ = ["lior_params", "lior_kernel", "lior_memory_conv", "lior_recurrence", "lior_recurrence_step_",
           "lior_action_"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PREFER = ("triton",)
_NO_CUDA = "backend='cuda' is not built for the LIoR ops (their CUDA kernels are issue #21, still to come)"
# the memory convolution's "auto" takes the direct (GEMM) path up to this T, the FFT beyond: the
# crossover geokern/bench/lior.py measured on the H100 (16384 fp32 columns: direct 1.77 vs FFT
# 2.30 ms at T = 1024, 4.77 vs 4.48 ms at 2048; kernels/lior.md)
DIRECT_MAX_T = 1024
_GRID_X = 2**31 - 1


# ---- custom ops ------------------------------------------------------------------
#   lior_step_triton(m, ring, x, j?, pos, rho, eta, xi) -> ()            mutates m, ring, pos
#   lior_recurrence_triton(x, j?, m0?, h?, rho, eta, xi, p) -> m [T, B, D] in x's dtype
#   lior_recurrence_backward_triton(g, x, j?, m0?, h?, out, rho, eta, xi, p)
#       -> (dx [T, B, D], dm0 [B, D], dh [p, B, D]) in x's dtype, dj [T, B] float32
#   lior_action_triton(phi, w, r, integral, mean, count, eps, dtau) -> cost [W, B]
#       mutates integral, mean, count


def _lior_step_triton(m: torch.Tensor, ring: torch.Tensor, x: torch.Tensor, j: torch.Tensor | None,
                      pos: torch.Tensor, rho: float, eta: float, xi: float) -> None:
    tk.lior_step(m, ring, x, j, pos, rho, eta, xi)
    pos.add_(1)  # after the kernel (stream order): every program read the old value


def _lior_recurrence_triton(x: torch.Tensor, j: torch.Tensor | None, m0: torch.Tensor | None,
                            h: torch.Tensor | None, rho: float, eta: float, xi: float, p: int) -> torch.Tensor:
    out = torch.empty_like(x)
    tk.lior_recurrence_fwd(x, j, m0, h, out, rho, eta, xi, p)
    return out


def _lior_recurrence_backward_triton(
    g: torch.Tensor, x: torch.Tensor, j: torch.Tensor | None, m0: torch.Tensor | None, h: torch.Tensor | None,
    out: torch.Tensor, rho: float, eta: float, xi: float, p: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, B, D = x.shape
    dx = torch.empty_like(x)
    dm0 = x.new_empty((B, D))
    dh = x.new_empty((p, B, D))
    dj = x.new_zeros((T, B), dtype=torch.float32)
    tk.lior_recurrence_bwd(g, x, j, m0, h, out, dx, dm0, dh, dj, rho, eta, xi, p)
    return dx, dm0, dh, dj


def _lior_action_triton(phi: torch.Tensor, w: torch.Tensor, r: torch.Tensor, integral: torch.Tensor,
                        mean: torch.Tensor, count: torch.Tensor, eps: float, dtau: float) -> torch.Tensor:
    cost = phi.new_empty(phi.shape[:2], dtype=torch.float32)
    tk.lior_action(phi, w, r, cost, integral, mean, count, eps, dtau)
    count.add_(phi.shape[0])  # after the kernel, which read the steps seen before this window
    return cost


_KERNELS = {
    "triton": {
        "step": triton_op("lior_step_triton", _lior_step_triton, mutates_args=("m", "ring", "pos")),
        "fwd": triton_op("lior_recurrence_triton", _lior_recurrence_triton),
        "bwd": triton_op("lior_recurrence_backward_triton", _lior_recurrence_backward_triton),
        "action": triton_op("lior_action_triton", _lior_action_triton, mutates_args=("integral", "mean", "count")),
    },
}


# ---- autograd --------------------------------------------------------------------


@bound_once
class LiorRecurrenceFunction(torch.autograd.Function):
    """m [T, B, D] of the recurrence; gradients to x, j, m0, h by the adjoint kernel."""

    @staticmethod
    def forward(x, j, m0, h, rho, eta, xi, p, backend):
        return _KERNELS[backend]["fwd"](x, j, m0, h, rho, eta, xi, p)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, j, m0, h, rho, eta, xi, p, backend = inputs
        ctx.save_for_backward(x, j, m0, h, output)
        ctx.args, ctx.backend = (rho, eta, xi, p), backend

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("lior_recurrence")
        x, j, m0, h, out = ctx.saved_tensors
        if ctx.needs_input_grad[1]:  # dj sums across D-blocks with float32 atomics
            alert_nondeterministic(f"lior_recurrence backward with a gate j (backend='{ctx.backend}')",
                                   "backend='torch'")
        dx, dm0, dh, dj = _KERNELS[ctx.backend]["bwd"](g.contiguous(), x, j, m0, h, out, *ctx.args)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dj.to(x.dtype) if need[1] else None, dm0 if need[2] else None,
                dh if need[3] else None, None, None, None, None, None)


# ---- checks ----------------------------------------------------------------------


def _check_number(op, name, v, lo=-math.inf):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < lo:
        more = f" >= {lo}" if lo > -math.inf else ""
        raise ValueError(f"{op}: {name} must be a finite number{more}, got {v!r}")


def _check_shape(op, name, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_params(op, params):
    check_tensor(op, "params", params)
    if tuple(params.shape) != (len(ref.PARAM_NAMES),):
        raise ValueError(f"{op}: params must have shape ({len(ref.PARAM_NAMES)},) (the scalars {ref.PARAM_NAMES}; "
                         f"build it with geokern.lior_params), got {tuple(params.shape)}")


def _composition_only(op, backend, device):
    """The torch-op composition's backend; an explicit kernel backend is refused, saying why."""
    if _backend.requested(backend) == "cuda":
        raise RuntimeError(f"{op}: {_NO_CUDA}")
    be = _backend.resolve(op, backend, device, ())
    if be == "triton":
        raise RuntimeError(f"{op}: has no Triton kernel: it is a composition of torch ops (a GEMM or cuFFT), "
                           "use backend='torch' or 'auto'")
    return be


def _kernel_backend(op, backend, device, dtype):
    if _backend.requested(backend) == "cuda":
        raise RuntimeError(f"{op}: {_NO_CUDA}; use backend='triton' or 'torch'")
    be = _backend.resolve(op, backend, device, _PREFER)
    if be == "triton" and dtype not in _KERNEL_DTYPES:
        if backend is None or backend == "auto":
            return "torch"
        raise TypeError(f"{op}: the Triton kernels take float16 / bfloat16 / float32, got {dtype} "
                        "(use backend='torch')")
    return be


def _check_gains(op, rho, eta, xi):
    for name, v in (("rho", rho), ("eta", eta), ("xi", xi)):
        _check_number(op, name, v)


# ---- public ops ------------------------------------------------------------------


def lior_params(dtype=torch.float32, device=None, **values):
    """The params tensor [12] of lior_kernel / lior_memory_conv from named scalars: a, b, gamma,
    delta, xi, eta, omega, phi, zeta, logit_e, logit_f, logit_o (missing ones take
    geokern.reference.lior.DEFAULT_PARAMS). A tensor so that a layer can learn them."""
    return ref.lior_params(dtype, device, **values)


def lior_kernel(dt: torch.Tensor, params: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """K(dt), the 3-mode memory kernel, elementwise with the spec's clips (geokern.reference.lior):
    float32 (float64 if dt or params is). Differentiable in dt and params (0 where a clip holds)."""
    op = "lior_kernel"
    check_tensor(op, "dt", dt, min_dim=0)
    _check_params(op, params)
    if dt.device != params.device:
        raise ValueError(f"{op}: params is on {params.device} but dt is on {dt.device}")
    _composition_only(op, backend, dt.device)
    return ref.lior_kernel(dt, params)


def lior_memory_conv(x: torch.Tensor, params: torch.Tensor, *, method: str = "auto",
                     backend: str | None = None) -> torch.Tensor:
    """out[t] = w0 x[t] + (1 - w0) sum_{j<=t} khat_j x[t - j] over x [T, ...] (time first), khat the
    kernel at 1..T normalised by |sum| + 1e-8 (geokern.reference.lior). float32 accumulation
    (float64 for float64), result in x's dtype; differentiable in x and params.

    method: "direct" (a T x T Toeplitz GEMM: O(T^2) work, T^2 floats of memory), "fft" (a real FFT
    of length 2T rounded up to a power of two: O(T log T)), or "auto": direct up to DIRECT_MAX_T.
    A non-finite x[t0] makes out[t >= t0] NaN in its column only, in both paths."""
    op = "lior_memory_conv"
    check_tensor(op, "x", x)
    _check_params(op, params)
    # argument values first: a bad method is refused the same way whatever devices x and params are on
    if method not in ("auto", "direct", "fft"):
        raise ValueError(f"{op}: method must be 'auto', 'direct' or 'fft', got {method!r}")
    if x.device != params.device:
        raise ValueError(f"{op}: params is on {params.device} but x is on {x.device}")
    _composition_only(op, backend, x.device)
    if method == "auto":
        method = "direct" if x.shape[0] <= DIRECT_MAX_T else "fft"
    return ref.lior_memory_conv(x, params, method)


def _check_recurrence(op, x, j, m0, history, p):
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_dim=3)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [T, B, D], got shape {tuple(x.shape)}")
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"{op}: p (the ring size) must be an int >= 1, got {p!r}")
    T, B, D = x.shape
    named = {"x": x}
    for name, t, shape in (("j", j, (T, B)), ("m0", m0, (B, D)), ("history", history, (p, B, D))):
        if t is not None:
            check_tensor(op, name, t, min_dim=0)
            _check_shape(op, name, t, shape)
            named[name] = t
    check_same(op, named)


def lior_recurrence(x: torch.Tensor, j: torch.Tensor | None = None, *, rho: float = 0.9, eta: float = 1.0,
                    xi: float = 0.5, p: int = 4, m0: torch.Tensor | None = None,
                    history: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """m [T, B, D] (x's dtype) of m_t = rho s(j_t) m_{t-1} + eta g(j_t) x_t - xi g(j_t) x_{t-p} over
    x [T, B, D]: T steps of lior_recurrence_step_ in one launch (a program per row and block of D
    walks T with the last p inputs in registers). j [T, B] the optional per-row gate (s = sigmoid,
    g = 1 + 0.1 tanh; without it both are 1); m0 [B, D] the state before x[0] and history [p, B, D]
    = (x_{-p}, ..., x_{-1}), zeros when None. rho, eta, xi: Python numbers. Differentiable in x, j,
    m0 and history (the backward is one reverse launch; dj sums across D-blocks with float32
    atomics, so its last bits may vary, and under torch.use_deterministic_algorithms(True) a
    backward that needs dj raises on the Triton backend as torch's nondeterministic ops do;
    backend='torch' is deterministic). NaN in x[t] or j[t] reaches m[t' >= t] of its row only."""
    op = "lior_recurrence"
    _check_recurrence(op, x, j, m0, history, p)
    _check_gains(op, rho, eta, xi)
    be = _kernel_backend(op, backend, x.device, x.dtype)
    if be == "torch":
        return ref.lior_recurrence(x, j, rho, eta, xi, p, m0, history)
    if x.shape[1] > _GRID_X:
        raise ValueError(f"{op}: backend='triton' launches a program row per batch row: B must be < 2**31")
    c = [None if t is None else t.contiguous() for t in (x, j, m0, history)]
    return LiorRecurrenceFunction.apply(*c, float(rho), float(eta), float(xi), p, be)


def lior_recurrence_step_(m: torch.Tensor, ring: torch.Tensor, pos: torch.Tensor, x: torch.Tensor,
                          j: torch.Tensor | None = None, *, rho: float = 0.9, eta: float = 1.0, xi: float = 0.5,
                          backend: str | None = None) -> torch.Tensor:
    """One step of the recurrence, in place, fused: m [B, D] becomes m_t from x [B, D] and x_{t-p},
    read from the ring [p, B, D] (slot pos % p, then overwritten with x_t); pos (a 0-d int64 tensor,
    the step count) advances by one. j [B] the optional per-row gate. m, ring and x share a dtype
    and must be contiguous (they are state). Device-side throughout: no host synchronisation, so a
    step can be captured in a CUDA graph. No gradient. Returns m."""
    op = "lior_recurrence_step_"
    check_tensor(op, "m", m, min_dim=2)
    if m.dim() != 2:
        raise ValueError(f"{op}: m must be [B, D], got shape {tuple(m.shape)}")
    B, D = m.shape
    check_tensor(op, "ring", ring, min_dim=0)
    if ring.dim() != 3 or ring.shape[0] < 1 or tuple(ring.shape[1:]) != (B, D):
        raise ValueError(f"{op}: ring must be [p, B, D] = [p >= 1, {B}, {D}] (the last p inputs), "
                         f"got shape {tuple(ring.shape)}")
    check_tensor(op, "x", x, min_dim=0)
    _check_shape(op, "x", x, (B, D))
    named = {"m": m, "ring": ring, "x": x}
    if j is not None:
        check_tensor(op, "j", j, min_dim=0)
        _check_shape(op, "j", j, (B,))
        named["j"] = j
    check_same(op, named)
    if not isinstance(pos, torch.Tensor) or pos.dtype != torch.int64 or pos.numel() != 1:
        raise TypeError(f"{op}: pos must be a one-element int64 tensor (the step count), got "
                        f"{getattr(pos, 'dtype', type(pos).__name__)} {tuple(getattr(pos, 'shape', ()))}")
    if pos.device != m.device:
        raise ValueError(f"{op}: pos is on {pos.device} but m is on {m.device}")
    for name, t in (("m", m), ("ring", ring)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} is updated in place and must be contiguous")
    _check_gains(op, rho, eta, xi)
    be = _kernel_backend(op, backend, m.device, m.dtype)
    with torch.no_grad():
        if be == "torch":
            ref.lior_recurrence_step_(m, ring, pos, x, j, rho, eta, xi)
        else:
            _KERNELS[be]["step"](m, ring, x.contiguous(), None if j is None else j.contiguous(), pos,
                                 float(rho), float(eta), float(xi))
    return m


def lior_action_(v: torch.Tensor, R, metric: Metric, integral: torch.Tensor, mean: torch.Tensor,
                 count: torch.Tensor, *, eps: float = 1e-8, dtau: float = 1.0,
                 backend: str | None = None) -> torch.Tensor:
    """The LIoR action over a window, fused and in place: cost_t = R_t sqrt(max(g(v_t, v_t), 0) + eps)
    for v [W, B, n] (g a geokern.metric, the retrieval cost's quadratic form), integral [B] +=
    dtau * sum_t cost_t, mean [B] the running mean of cost over every step since the state was
    zeroed, count (0-d int64 tensor, steps seen) += W. R: a number or a tensor broadcasting to
    [W, B]. integral and mean are float32 (float64 with float64 v on backend='torch'). Returns the
    per-step integrand cost [W, B] (float32 / float64). No host synchronisation; no gradient.
    NaN in v_t[b] or R_t[b] makes cost_t[b], integral[b] and mean[b] NaN (other rows untouched)."""
    op = "lior_action_"
    check_tensor(op, "v", v, min_dim=3)
    if v.dim() != 3:
        raise ValueError(f"{op}: v must be [W, B, n], got shape {tuple(v.shape)}")
    W, B, n = v.shape
    if not isinstance(metric, Metric):
        raise TypeError(f"{op}: metric must be a geokern.metric metric, got {type(metric).__name__}")
    if metric.n != n:
        raise ValueError(f"{op}: metric is for n = {metric.n} coordinates, v has n = {n}")
    if isinstance(R, torch.Tensor):
        check_tensor(op, "R", R, min_dim=0)
        if R.device != v.device:
            raise ValueError(f"{op}: R is on {R.device} but v is on {v.device}")
        try:
            torch.broadcast_shapes(R.shape, (W, B))
        except RuntimeError:
            raise ValueError(f"{op}: R of shape {tuple(R.shape)} does not broadcast to [W, B] = [{W}, {B}]") from None
    else:
        _check_number(op, "R", R)
    acc = ref.acc_dtype(v)
    for name, t in (("integral", integral), ("mean", mean)):
        check_tensor(op, name, t, dtypes=(acc,), min_dim=0)
        _check_shape(op, name, t, (B,))
        if t.device != v.device or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous tensor on {v.device} (state updated in place)")
    if not isinstance(count, torch.Tensor) or count.dtype != torch.int64 or count.numel() != 1 \
            or count.device != v.device:
        raise TypeError(f"{op}: count must be a one-element int64 tensor on {v.device} (steps seen), got "
                        f"{getattr(count, 'dtype', type(count).__name__)} {tuple(getattr(count, 'shape', ()))}")
    _check_number(op, "eps", eps, 0.0)
    _check_number(op, "dtau", dtau)
    be = _kernel_backend(op, backend, v.device, v.dtype)
    with torch.no_grad():
        if be == "torch":
            cost, i1, m1, n1 = ref.lior_action(v, R, metric, eps, dtau, integral, mean, count)
            integral.copy_(i1)
            mean.copy_(m1)
            count.copy_(n1.reshape(count.shape))
            return cost
        phi, w = metric.features(v)
        phi = phi if phi.stride(-1) == 1 else phi.contiguous()
        r = R.to(torch.float32) if isinstance(R, torch.Tensor) else constant(R, (), torch.float32, v.device)
        r = torch.broadcast_to(r, (W, B))
        return _KERNELS[be]["action"](phi, w.float().contiguous(), r, integral, mean, count, float(eps), float(dtau))
