"""Contrastive (equilibrium-propagation) update of a linear layer: checks, backends, custom ops.

Public: contrastive_update_ (one step, in place) and ContrastiveStats (the streaming form: phase
statistics accumulated over many steps, applied once). The rule, the gate and the clip are defined
in geokern.reference.contrastive; no autograd is involved anywhere.

How the Triton backend computes it, with no host synchronisation (CUDA graphs capture it):

1. G = [Yn ; -c Yf]^T [Xn ; Xf] with c = Nn / Nf: one stacked GEMM through torch.matmul, i.e.
   cuBLAS. A GEMM of this shape (K = Nn + Nf rows, often short; out x in outputs) is what cuBLAS
   is tuned for, with TF32 / bf16 tensor cores and split-K heuristics we would only re-derive;
   a Triton GEMM here would buy nothing and cost tuning. Then dW = s G with s = lr / (beta Nn)
   (2 beta when centred): the per-phase means live in c and s, so equal phase sizes (c = 1, the
   usual case) scale nothing in the activities' own dtype. float32 activities follow torch's
   matmul precision (IEEE, or TF32 where torch.backends.cuda.matmul allows it); bf16 / fp16
   activities multiply on tensor cores with float32 accumulation and a float32 G (mm's
   out_dtype). 16-bit phases of unequal size are widened to float32 first, so the 1 / N of each
   phase is not rounded to 8 bits. The stacked product subtracts the phases inside the GEMM, so
   its error is relative to ||Y|| ||X||, not to ||dW||: at small beta (nearly equal phases) TF32
   or bf16 products leave few correct digits of dW; float32 activities with TF32 off keep ~1e-7
   of ||Y|| ||X||, as the reference does.
2. ||G||_F, in float64 so that squares of large entries do not overflow: from G itself (one
   reduction), or from the two Gram matrices, sum((A A^T) * (B B^T)) with A = [Yn ; -c Yf],
   B = [Xn ; Xf], which never reads G again. The Gram products run in float64 (cuBLAS DGEMM):
   the form cancels when the phases nearly agree, as they do at small beta (relative error about
   eps * ||A||^2 ||B||^2 / ||G||^2), which would cost float32 or TF32 every digit of the clip.
   `gram=None` takes it only where the spec allows it (2 N < in * out / (in + out), 2 N = Nn + Nf
   stacked rows) and where its float64 flops cost less than the read of G (use_gram).
3. One Triton launch (kernels/contrastive.py) decides, in every program, from ||G||: ok_w =
   ||dW|| <= float32 max (false for NaN / inf: a non-finite element of dW makes the norm
   non-finite, and a finite norm bounds every element) and the clip factor; ok_b = ok_w and
   every element of db finite. It applies W += f G and b += s gb where they allow, and stores
   nothing where they do not. A torch chain for those scalars would cost a dozen launches.

Choices beyond the spec: a phase with no rows is refused (its mean does not exist); b may be None;
W and b stay in their own dtype (one rounding of the float32 update); float64 runs the reference
(backend "torch"); the finite gate of the Triton backend also skips an update whose norm is past
float32's range (~3.4e38), whose elements a float32 G could not hold anyway.
"""

import torch

from geokern import _backend
from geokern._checks import FLOAT_DTYPES, check_tensor
from geokern.kernels import contrastive as tk
from geokern.ops._registry import triton_op
from geokern.reference import contrastive as ref

__all__ = ["contrastive_update_", "ContrastiveStats", "all_reduce_stats_"]

_OP = "contrastive_update_"
_PREFER = ("triton",)  # no CUDA C++ kernel yet (issue #22's later items): the apply is one pass
_NO_CUDA = ("backend='cuda' is not built for the contrastive update (the GEMMs are cuBLAS either way; "
            "CUDA C++ apply kernel: issue #22, later items); use backend='triton' or 'torch'")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- the device-side pieces ------------------------------------------------------------------


def _stacked(Xn, Yn, Xf, Yf, c):
    """A = [Yn ; -c Yf], B = [Xn ; Xf] in the dtype the GEMMs take."""
    if Xn.dtype != torch.float32 and c != 1.0:  # see step 1: do not round 1 / N to 8 bits
        Xn, Yn, Xf, Yf = (t.float() for t in (Xn, Yn, Xf, Yf))
    return torch.cat([Yn, Yf * -c]), torch.cat([Xn, Xf])


def _mm32(a, b):
    """a @ b with a float32 result: cuBLAS with float32 accumulation for 16-bit operands."""
    if a.dtype == torch.float32:
        return torch.matmul(a, b)
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.matmul(a.float(), b.float())  # CPU (the interpreter): no 16-bit out_dtype mm there


def _finish(w, b, G, gb, s, max_norm, norm_g):
    """The gated, clipped apply (one Triton launch; the gate and the clip are decided in it)."""
    # Parameters are contiguous (no copy); a strided W or b is updated in a contiguous copy and
    # copied back (a skipped update copies back the same bits). `is`, not data_ptr(): fake
    # tensors (opcheck, torch.compile) have no data pointer.
    wc = w if w.is_contiguous() else w.contiguous()
    bc = b if b.is_contiguous() else b.contiguous()
    tk.contrastive_apply(wc, G, bc, gb, norm_g, s, max_norm)
    if wc is not w:
        w.copy_(wc)
    if bc is not b:
        b.copy_(bc)


def _gram_norm(A, B):
    """||A^T B||_F from the N x N Gram matrices, in float64 (never forms A^T B).

    float64 because the Gram form cancels: ||dW||^2 = sum((A A^T) * (B B^T)) is a small difference
    of large terms when the phases nearly agree (small beta, the usual case), so float32 (let alone
    TF32) Grams could lose every digit of it, and the clip with them. float64 also holds the
    squares of any float32 activity (no overflow where dW itself is finite)."""
    A, B = A.double(), B.double()
    return ((A @ A.T) * (B @ B.T)).sum().clamp_min(0).sqrt()


def use_gram(n_rows, out, inn):
    """Whether gram=None takes the Gram form for Nn + Nf = n_rows stacked rows: only when the spec's
    2N < in out / (in + out) holds, and then only while its float64 products, 2 n^2 (in + out)
    flops at the H100's ~67 TFLOP/s of float64, cost less than the read of G (4 in out bytes at
    ~3.35 TB/s) they replace: n^2 (in + out) < 40 in out, taken as 32 for the conversions.
    Derived, not measured; on GPUs with slow float64 pass gram=False."""
    return n_rows * (inn + out) < inn * out and n_rows * n_rows * (inn + out) < 32 * inn * out


def _contrastive_update_triton(
    w: torch.Tensor, b: torch.Tensor, xn: torch.Tensor, yn: torch.Tensor, xf: torch.Tensor, yf: torch.Tensor,
    lr: float, beta: float, max_norm: float | None, centred: bool, gram: bool,
) -> None:
    # b is an empty tensor for a layer without bias
    nn_, nf = xn.shape[0], xf.shape[0]
    c = nn_ / nf
    s = lr / ((2.0 * beta if centred else beta) * nn_)
    A, B = _stacked(xn, yn, xf, yf, c)
    G = _mm32(A.T, B)
    gb = A.sum(0, dtype=torch.float32)  # sum Yn - c sum Yf: one reduction over the stacked rows
    norm_g = _gram_norm(A, B) if gram else torch.linalg.vector_norm(G, dtype=torch.float64)
    _finish(w, b, G, gb, s, max_norm, norm_g)


def _contrastive_stats_apply_triton(
    w: torch.Tensor, b: torch.Tensor, gn: torch.Tensor, gf: torch.Tensor, sn: torch.Tensor, sf: torch.Tensor,
    nn_: int, nf: int, lr: float, beta: float, max_norm: float | None, centred: bool,
) -> None:
    c = nn_ / nf
    s = lr / ((2.0 * beta if centred else beta) * nn_)
    G = gn - c * gf  # float32 sums; no Gram form: the activities are gone
    gb = sn - c * sf
    _finish(w, b, G, gb, s, max_norm, torch.linalg.vector_norm(G, dtype=torch.float64))


_KERNELS = {
    "triton": (
        triton_op("contrastive_update_triton", _contrastive_update_triton, mutates_args=("w", "b")),
        triton_op("contrastive_stats_apply_triton", _contrastive_stats_apply_triton, mutates_args=("w", "b")),
    ),
}


# ---- checks ----------------------------------------------------------------------------------


def _check_scalars(lr, beta, max_norm, centred, gram, op=_OP):
    for name, v in (("lr", lr), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{op}: {name} must be a Python float, got {type(v).__name__}")
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"{op}: beta must be > 0 (the nudging strength; use the sign of the phases), got {beta}")
    if max_norm is not None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
            raise TypeError(f"{op}: max_norm must be a Python float or None, got {type(max_norm).__name__}")
        if not max_norm > 0:
            raise ValueError(f"{op}: max_norm must be > 0 (None: no clip), got {max_norm}")
    if not isinstance(centred, bool):
        raise TypeError(f"{op}: centred must be a bool, got {type(centred).__name__}")
    if gram is not None and not isinstance(gram, bool):
        raise TypeError(f"{op}: gram must be None (choose) or a bool, got {type(gram).__name__}")


def _check_params(W, b, op=_OP, names=("W", "b")):
    wn, bn = names
    check_tensor(op, wn, W, min_dim=2)
    if W.dim() != 2:
        raise ValueError(f"{op}: {wn} must be [out, in], got shape {tuple(W.shape)}")
    if b is not None:
        check_tensor(op, bn, b)
        if tuple(b.shape) != (W.shape[0],):
            raise ValueError(f"{op}: {bn} must have shape ({W.shape[0]},) ({wn}'s out), got {tuple(b.shape)}")
        if b.device != W.device:
            raise ValueError(f"{op}: {bn} is on {b.device} but {wn} is on {W.device}")


def _check_phase(W, named, op=_OP, wname="W"):
    """X [N, in], Y [N, out] of one phase, on W's device, one dtype for all activities."""
    (xn, X), (yn, Y) = named
    out, inn = W.shape
    for name, t, width in ((xn, X, inn), (yn, Y, out)):
        check_tensor(op, name, t, min_dim=2)
        if t.dim() != 2 or t.shape[1] != width:
            raise ValueError(f"{op}: {name} must be [N, {width}] ({'in' if t is X else 'out'} of {wname} "
                             f"{tuple(W.shape)}), got shape {tuple(t.shape)}")
        if t.device != W.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {wname} is on {W.device}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"{op}: {xn} and {yn} must have the same rows, got {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{op}: the phase of {xn} / {yn} has no rows: its mean does not exist")
    if X.dtype != Y.dtype:
        raise TypeError(f"{op}: {yn} has dtype {Y.dtype} but {xn} has {X.dtype}")


def _resolve(backend, device, dtypes, op=_OP):
    if _backend.requested(backend) == "cuda":
        raise RuntimeError(f"{op}: {_NO_CUDA}")
    be = _backend.resolve(op, backend, device, _PREFER)
    if be == "triton" and any(d not in _KERNEL_DTYPES for d in dtypes):
        if backend == "triton":
            raise TypeError(f"{op}: the Triton backend takes float16 / bfloat16 / float32 tensors, "
                            f"got {sorted({str(d) for d in dtypes})} (use backend='torch' for float64)")
        be = "torch"  # auto: float64 runs the reference, as documented
    return be


# ---- public ----------------------------------------------------------------------------------


def contrastive_update_(W, b, Xn, Yn, Xf, Yf, lr, beta, max_norm=None, *, centred=False, gram=None, backend=None):
    """W += clip_F((lr / beta) (mean_n(Y^T X) - mean_f(Y^T X)), max_norm); b += (lr / beta)
    (mean_n(Y) - mean_f(Y)), in place, without autograd; returns None.

    W [out, in], b [out] or None (any float dtype, kept); Xn [Nn, in], Yn [Nn, out] from the nudged
    phase, Xf [Nf, in], Yf [Nf, out] from the free phase (one float dtype for all four; Nn and Nf
    may differ, neither may be 0). max_norm: clip dW to that Frobenius norm (None: no clip).
    centred=True: the phases were nudged at +beta (n) and -beta (f); divides by 2 beta.

    If any element of dW is non-finite (NaN or inf anywhere in the activities makes it so) the
    whole update is skipped and W and b are left bit-identical; if only db is non-finite, W is
    updated and b is left alone. The gate and the clip are decided on the device: the call never
    synchronises with the host (CUDA-graph capturable).

    gram: how ||dW|| is computed for the gate and the clip: None chooses (the float64 Gram form
    when Nn + Nf < in * out / (in + out) and it is cheaper than a read of dW: use_gram), True /
    False force it (geokern.ops.contrastive's docstring
    gives the cost and accuracy of each). backend: "auto" | "triton" | "torch" (see DESIGN.md);
    float64 runs the reference.
    """
    _check_params(W, b)
    _check_phase(W, (("Xn", Xn), ("Yn", Yn)))
    _check_phase(W, (("Xf", Xf), ("Yf", Yf)))
    if Xf.dtype != Xn.dtype:
        raise TypeError(f"{_OP}: Xf has dtype {Xf.dtype} but Xn has {Xn.dtype} (one dtype for all activities)")
    _check_scalars(lr, beta, max_norm, centred, gram)
    be = _resolve(backend, W.device, (W.dtype, Xn.dtype) + ((b.dtype,) if b is not None else ()))
    mx = None if max_norm is None else float(max_norm)
    # no autograd, and no autocast: the activities' dtype decides the GEMMs' precision (an autocast
    # region around a training step would otherwise turn float32 activities into bf16 products)
    with torch.no_grad(), torch.autocast(W.device.type, enabled=False):
        if be == "torch":
            return ref.contrastive_update_(W, b, Xn, Yn, Xf, Yf, float(lr), float(beta), mx, centred)
        if gram is None:
            gram = use_gram(Xn.shape[0] + Xf.shape[0], *W.shape)
        bb = b if b is not None else W.new_empty(0)
        _KERNELS[be][0](W, bb, Xn, Yn, Xf, Yf, float(lr), float(beta), mx, centred, gram)


class ContrastiveStats:
    """The streaming form: each phase's sum of Y^T X, sum of Y and row count, accumulated over
    any number of steps (add_) and applied once (apply_), equal to contrastive_update_ on all
    the rows at once (the means are over every row collected in a phase).

        stats = geokern.ContrastiveStats(out_features, in_features, device="cuda")
        for batch in window:
            ...free phase...;   stats.add_(x_free, y_free, "free")
            ...nudged phase...; stats.add_(x_nudged, y_nudged, "nudged")
        stats.apply_(layer.weight, layer.bias, lr, beta, max_norm=1.0)
        stats.reset()

    The sums are float32 (float64 with dtype=torch.float64) on `device`; each add_ is one cuBLAS
    GEMM accumulating into the sum (addmm: no extra pass over it) and a column sum. Row counts
    are Python ints (the shapes are known on the host): nothing synchronises. apply_ takes the
    arguments of contrastive_update_ after the activities; the norm is taken from the sums
    (the activities are gone, so there is no Gram form), then the same gated apply runs.
    """

    PHASES = ("nudged", "free")

    def __init__(self, out_features, in_features, *, device=None, dtype=torch.float32):
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"ContrastiveStats: dtype (of the sums) must be float32 or float64, got {dtype}")
        self.shape = (int(out_features), int(in_features))
        self.g = {p: torch.zeros(self.shape, device=device, dtype=dtype) for p in self.PHASES}
        self.s = {p: torch.zeros(self.shape[0], device=device, dtype=dtype) for p in self.PHASES}
        self.n = dict.fromkeys(self.PHASES, 0)
        self.reduced = False  # all_reduce_stats_ made g, s the global means (n = 1)

    def reset(self):
        for p in self.PHASES:
            self.g[p].zero_()
            self.s[p].zero_()
            self.n[p] = 0
        self.reduced = False

    @torch.no_grad()
    def add_(self, X, Y, phase):
        """Accumulate one step's activities X [N, in], Y [N, out] into `phase` ("nudged" or "free")."""
        if phase not in self.PHASES:
            raise ValueError(f"ContrastiveStats.add_: phase must be one of {self.PHASES}, got {phase!r}")
        if self.reduced:
            raise RuntimeError("ContrastiveStats.add_: the statistics were all-reduced (they are global means "
                               "now): apply_ them, then reset() before adding more")
        g, sy = self.g[phase], self.s[phase]
        for name, t, width in (("X", X, self.shape[1]), ("Y", Y, self.shape[0])):
            check_tensor("ContrastiveStats.add_", name, t, min_dim=2)
            if t.dim() != 2 or t.shape[1] != width:
                raise ValueError(f"ContrastiveStats.add_: {name} must be [N, {width}], got shape {tuple(t.shape)}")
            if t.device != g.device:
                raise ValueError(f"ContrastiveStats.add_: {name} is on {t.device} but the sums are on {g.device}")
        if X.shape[0] != Y.shape[0] or X.dtype != Y.dtype:
            raise ValueError(f"ContrastiveStats.add_: X and Y must have the same rows and dtype, got "
                             f"{tuple(X.shape)} {X.dtype} and {tuple(Y.shape)} {Y.dtype}")
        with torch.autocast(g.device.type, enabled=False):  # the activities' dtype decides
            if X.dtype == g.dtype:
                g.addmm_(Y.T, X)  # cuBLAS with beta = 1: accumulates in its epilogue
            elif g.dtype == torch.float32 and X.dtype != torch.float64 and g.device.type == "cuda":
                torch.addmm(g, Y.T, X, out_dtype=torch.float32, out=g)  # 16-bit operands, float32 sum
            else:
                g.addmm_(Y.T.to(g.dtype), X.to(g.dtype))
            sy.add_(Y.sum(0, dtype=g.dtype))
        self.n[phase] += X.shape[0]

    def apply_(self, W, b, lr, beta, max_norm=None, *, centred=False, backend=None, all_reduce=None, group=None):
        """contrastive_update_ of W, b from the accumulated statistics; returns None. Does not reset.

        all_reduce: sum the statistics over the ranks of `group` first (all_reduce_stats_); None: when
        torch.distributed is initialised with more than one rank and they were not reduced yet.
        With many layers, call all_reduce_stats_ on all of them first: one collective for all."""
        if _distributed(group) if all_reduce is None else all_reduce:
            if not self.reduced:
                all_reduce_stats_([self], group=group)
        _check_params(W, b)
        if tuple(W.shape) != self.shape:
            raise ValueError(f"ContrastiveStats.apply_: W must have shape {self.shape}, got {tuple(W.shape)}")
        if W.device != self.g["free"].device:
            raise ValueError(f"ContrastiveStats.apply_: W is on {W.device} but the sums are on {self.g['free'].device}")
        for p in self.PHASES:
            if self.n[p] == 0:
                raise ValueError(f"ContrastiveStats.apply_: no rows were added to the {p} phase: its mean does not exist")
        _check_scalars(lr, beta, max_norm, centred, None)
        gdt = self.g["free"].dtype
        be = _resolve(backend, W.device, (W.dtype, gdt) + ((b.dtype,) if b is not None else ()))
        mx = None if max_norm is None else float(max_norm)
        args = (self.g["nudged"], self.s["nudged"], self.n["nudged"], self.g["free"], self.s["free"], self.n["free"])
        with torch.no_grad(), torch.autocast(W.device.type, enabled=False):
            if be == "torch":
                return ref.contrastive_update_from_stats_(W, b, *args, float(lr), float(beta), mx, centred)
            bb = b if b is not None else W.new_empty(0)
            gn, sn, nn_, gf, sf, nf = args
            _KERNELS[be][1](W, bb, gn, gf, sn, sf, nn_, nf, float(lr), float(beta), mx, centred)


def _distributed(group=None):
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


@torch.no_grad()
def all_reduce_stats_(stats, group=None):
    """Sum the phase statistics of every ContrastiveStats in `stats` across the ranks of `group`
    (torch.distributed, any backend), in one collective for all of them, before the update:
    each phase's sum of Y^T X, sum of Y and row count, not per-rank means, so ranks with different
    row counts weigh each row alike, as one process would on all the rows. No autograd hook does
    this for the contrastive rule (it has no gradients), so a data-parallel run calls it (or lets
    ContrastiveStats.apply_ call it) once per update.

    Afterwards each statistic holds the global mean of its phase (sums divided by the summed row
    counts on the device: the counts are never read back to the host, so nothing synchronises
    beyond the collective itself) and counts as one row; apply_ then gives the update on all the
    ranks' rows. add_ is refused until reset(). Every rank must pass the same layers in the same
    order. Row counts travel in the statistics' float dtype: exact up to 2**24 rows per phase in
    float32 (refused beyond). A phase with no rows on any rank has no mean: its statistics turn
    NaN and the finite gate skips the update (a host check would cost the synchronisation)."""
    import torch.distributed as dist

    stats = list(stats)
    if not stats:
        return
    for i, st in enumerate(stats):
        if not isinstance(st, ContrastiveStats):
            raise TypeError(f"all_reduce_stats_: stats[{i}] must be a ContrastiveStats, got {type(st).__name__}")
        if st.reduced:
            raise RuntimeError(f"all_reduce_stats_: stats[{i}] was reduced already; reset() it after its apply_")
    dev = stats[0].g["free"].device
    dt = torch.float64 if any(st.g["free"].dtype == torch.float64 for st in stats) else torch.float32
    world = dist.get_world_size(group) if _distributed(group) else 1
    limit = 2 ** 53 if dt == torch.float64 else 2 ** 24
    counts = [st.n[p] for st in stats for p in ContrastiveStats.PHASES]
    if max(counts) * world > limit:
        raise ValueError(f"all_reduce_stats_: up to {max(counts)} rows per phase on each of {world} ranks may pass "
                         f"{limit} rows, which {dt} counts do not hold exactly: accumulate float64 statistics")
    parts = [t.reshape(-1).to(dt) for st in stats for p in ContrastiveStats.PHASES for t in (st.g[p], st.s[p])]
    parts.append(torch.tensor(counts, dtype=dt).to(dev))
    bucket = torch.cat(parts)
    if world > 1:
        dist.all_reduce(bucket, group=group)
    n_tot = bucket[-len(counts):]
    off, k = 0, 0
    for st in stats:
        for p in ContrastiveStats.PHASES:
            for t in (st.g[p], st.s[p]):
                torch.div(bucket[off:off + t.numel()].view(t.shape), n_tot[k], out=t)
                off += t.numel()
            st.n[p] = 1
            k += 1
        st.reduced = True


# the many-layer grouped update and the metric update (their own modules: they import this one's checks)
from geokern.ops._contrastive_many import ContrastiveGroup, contrastive_update_many_  # noqa: E402
from geokern.ops._contrastive_metric import contrastive_metric_update_  # noqa: E402

__all__ += ["contrastive_update_many_", "ContrastiveGroup", "contrastive_metric_update_"]
