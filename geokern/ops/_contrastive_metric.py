"""The metric / rotor update of spec section 5 (its last paragraph): contrastive_metric_update_.

The rule is geokern.reference.contrastive.metric_delta. The Triton backend is one launch
(kernels/contrastive_metric.py's metric_update_kernel: the mean, the rotations, the increments,
the gate, the clamp, the wrap, the stores), preceded past rows_per_program rows by a parallel
row-sum launch; no value is read back to the host, so a CUDA graph captures the call (after one
eager call with the same rotation planes: their int32 table is copied to the device once and
cached, a copy that a capture cannot hold).
"""

import math

import torch

from geokern._checks import check_tensor
from geokern.kernels import contrastive_metric as tk
from geokern.metric import Metric
from geokern.ops._registry import triton_op
from geokern.ops.contrastive import _resolve
from geokern.reference import contrastive as ref

__all__ = ["contrastive_metric_update_"]

_OP = "contrastive_metric_update_"


def _contrastive_metric_update_triton(
    lam: torch.Tensor, theta: torch.Tensor, pairs: torch.Tensor, x: torch.Tensor, dl: torch.Tensor | None,
    dl_value: float, s: float, rows_per_program: int,
) -> None:
    # theta is an empty tensor for a diag metric, dl None when dL is a Python number (dl_value)
    tk.metric_update(x, lam, theta, pairs, dl, dl_value, s, rows_per_program)


_KERNELS = {"triton": triton_op("contrastive_metric_update_triton", _contrastive_metric_update_triton,
                                mutates_args=("lam", "theta"))}


_PAIRS = {}  # (pairs, device) -> int32 [P, 2] table


def _pairs_table(pairs, device):
    """The rotation planes as int32 [P, 2] on `device`, made once per (pairs, device) and never
    freed: an evicted table's block could be reused on its stream while a launch on another stream
    still reads it, and a captured graph keeps reading the address it captured. A model has a few
    rotor metrics, each a few planes."""
    key = (pairs, device)
    t = _PAIRS.get(key)
    if t is None:
        t = _PAIRS[key] = torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2).to(device)
    return t


def _check(metric, x_free, dL, lr, beta, rows_per_program):
    if not isinstance(metric, Metric):
        raise TypeError(f"{_OP}: metric must be a geokern.metric (diag or rotor_diag), got {type(metric).__name__}")
    if metric.kind not in ("diag", "rotor_diag"):
        raise ValueError(f"{_OP}: metric must be a diag or rotor_diag geokern.metric, got kind {metric.kind!r} "
                         "(the spec's update acts on lam and the rotor angles; lowrank has no rotor)")
    lam = metric.lam
    n, dev = lam.shape[0], lam.device
    if metric.kind == "rotor_diag" and metric.theta.device != dev:
        raise ValueError(f"{_OP}: metric.theta is on {metric.theta.device} but metric.lam is on {dev}")
    check_tensor(_OP, "x_free", x_free, last_dim=n)
    if x_free.device != dev:
        raise ValueError(f"{_OP}: x_free is on {x_free.device} but metric.lam is on {dev}")
    if x_free.numel() == 0:
        raise ValueError(f"{_OP}: x_free {tuple(x_free.shape)} has no rows: their mean does not exist")
    if isinstance(dL, torch.Tensor):
        check_tensor(_OP, "dL", dL, min_dim=0)
        if dL.dim() != 0:
            raise ValueError(f"{_OP}: dL must be a Python number or a 0-dim tensor, got shape {tuple(dL.shape)}")
        if dL.device != dev:
            raise ValueError(f"{_OP}: dL is on {dL.device} but metric.lam is on {dev} (it is never read on the host)")
    elif isinstance(dL, bool) or not isinstance(dL, (int, float)):
        raise TypeError(f"{_OP}: dL must be a Python number or a 0-dim tensor, got {type(dL).__name__}")
    for name, v in (("lr", lr), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{_OP}: {name} must be a Python float, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{_OP}: {name} must be finite, got {v}")
    if beta == 0:
        raise ValueError(f"{_OP}: beta must be nonzero (s = lr / beta), got {beta}")
    if isinstance(rows_per_program, bool) or not isinstance(rows_per_program, int) or rows_per_program < 0:
        raise ValueError(f"{_OP}: rows_per_program must be an int >= 0 (0: choose), got {rows_per_program!r}")


def contrastive_metric_update_(metric, x_free, dL, lr, beta, *, backend=None, rows_per_program=0):
    """The metric update of spec section 5, in place on metric.lam (and metric.theta); returns None.

    With s = lr / beta, c = s * dL and v the mean of x_free's rows rotated by the metric's current
    angles (the rotation g(dv, dv) applies; for diag, the mean itself):
        lam   = clamp(lam + c * v^2 / (sum v^2 + 1e-8), 0.01, 100)
        theta_k = wrap(theta_k + (c * -0.01) * atan2(v_j, v_i) * r),  r = sqrt(v_i^2 + v_j^2),
                  for each plane k = (i, j), only where r >= 1e-6; wrap: to [-pi, pi).
    metric: geokern.metric.diag or rotor_diag (lowrank is refused); x_free: [..., n] (rows
    flattened, any float dtype); dL = LIoR_nudged - LIoR_free: a Python number or a 0-dim tensor on
    the metric's device (never read on the host); lr, beta: finite Python floats, beta != 0.

    Choices beyond the spec (geokern.reference.contrastive.metric_delta defines them):
    - The whole update (lam and theta) is skipped, bit-identically, when v, an increment, lam or
      theta is non-finite (in float32, float64 for float64 state: a product past float32's range
      skips it). The gate is decided on the device: the call never synchronises with the host
      (CUDA-graph capturable once the rotation planes' table is cached by an eager call).
    - The clamp to [0.01, 100] applies even when dL = 0 (and the wrap too).
    - Angles are clamped to [-1e8, 1e8] before the wrap (a float32 angle past that has no meaningful
      value modulo 2 pi); the result lies in [-pi, pi) for every finite input (pi: the compute
      dtype's, float32's rounds up).
    - 16-bit lam and theta are updated in float32 and rounded once; the mean accumulates in
      float32 (its row sums may overflow where the float64 mean would not: then it is skipped);
      cos and sin of the angles are float32 (float64 for float64 state), never 16-bit.

    backend: "auto" | "triton" | "torch" ("cuda" raises: no CUDA C++ kernel); float64 runs the
    reference, and so do metrics with n > 4096 under "auto" (v lives in one program's registers).
    rows_per_program: rows each program of the parallel row-sum stage reads (0: choose,
    kernels/contrastive_metric.py's default_rows_per_program); at least N: one program reads all.
    """
    _check(metric, x_free, dL, lr, beta, rows_per_program)
    lam, theta, pairs = ref._metric_state(metric)
    n = lam.shape[0]
    dl = dL if isinstance(dL, torch.Tensor) else None
    be = _resolve(backend, lam.device, (lam.dtype, theta.dtype, x_free.dtype), op=_OP)
    if be == "triton" and n > tk.MAX_N:
        if backend == "triton":
            raise ValueError(f"{_OP}: the Triton backend holds v in one program: n must be <= {tk.MAX_N}, got {n} "
                             "(use backend='torch')")
        be = "torch"
    with torch.no_grad(), torch.autocast(lam.device.type, enabled=False):
        if be == "torch":
            return ref.contrastive_metric_update_(metric, x_free, dL, float(lr), float(beta))
        x = x_free.reshape(-1, n)
        if n > 1 and x.stride(1) != 1:
            x = x.contiguous()
        rpp = rows_per_program or tk.default_rows_per_program(x.shape[0])
        _KERNELS[be](lam, theta, _pairs_table(pairs, lam.device), x, dl, 0.0 if dl is not None else float(dL),
                     float(lr) / float(beta), rpp)
