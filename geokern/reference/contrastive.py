"""Contrastive (free / nudged) update of a linear layer, no autograd: the definition (spec section 5).

For W [out, in] (torch layout), b [out] (or None), activities X [N, in], Y [N, out] collected in
a nudged phase (n) and a free phase (f):

    dW = clip_F((lr / beta) * (mean_n(Y^T X) - mean_f(Y^T X)), max_norm)
    db = (lr / beta) * (mean_n(Y) - mean_f(Y))
    mean_p(Y^T X) = (1 / N_p) sum_{rows r of phase p} Y[r]^T X[r]

clip_F scales dW by max_norm / ||dW||_F when ||dW||_F > max_norm (exactly: no epsilon in the
denominator), and leaves it alone otherwise; max_norm=None turns the clip off. If dW has any
non-finite element, the whole update (W and b) is skipped; if dW is finite but db is not, W is
updated and b is skipped (b's own finite check). W and b are updated in place under no_grad.

Centred variant (centred=True): the two phases are nudged at +beta (passed as n) and -beta
(passed as f), and the difference is divided by 2 beta instead of beta.

The metric / rotor update of the same section's last paragraph is metric_delta (below).

Choices where the spec is silent:
- A phase with no rows has no mean: refused (ValueError), never a silent zero or NaN update.
- The gate and the clip are decided on the device: no .item(), no host synchronisation; the skip
  is a torch.where, so W and b are bit-identical when skipped (a multiply by a 0/1 mask would
  turn NaN * 0 into NaN, and W + 0 turns -0.0 into +0.0).
- The update is computed in float32 for 16-bit and float32 activities (float64 for float64) and
  added to W and b in their own dtype with one rounding.
"""

import math

import torch


def _acc_dtype(*ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def contrastive_delta(Xn, Yn, Xf, Yf, lr, beta, max_norm=None, centred=False):
    """(dW, db, ok_w, ok_b): the clipped dW and db of the rule, in float32 (float64 for float64
    activities), and the device-side flags: ok_w = every element of dW finite, ok_b = ok_w and
    every element of db finite. The flags are 0-dim bool tensors (no host sync)."""
    return delta_from_stats(*phase_stats(Xn, Yn), *phase_stats(Xf, Yf), lr, beta, max_norm, centred)


def delta_from_stats(gn, sn, nn, gf, sf, nf, lr, beta, max_norm=None, centred=False):
    """contrastive_delta from each phase's (sum of Y^T X, sum of Y, rows): see phase_stats."""
    s = lr / (2.0 * beta if centred else beta)
    dW = s * (gn / nn - gf / nf)
    db = s * (sn / nn - sf / nf)
    ok_w = torch.isfinite(dW).all()
    if max_norm is not None:
        norm = torch.linalg.vector_norm(dW)
        # exact scale-down, only above max_norm; where(...) keeps the skipped case NaN-free
        factor = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
        dW = dW * factor
    ok_b = ok_w & torch.isfinite(db).all()
    return dW, db, ok_w, ok_b


def _apply_(W, b, dW, db, ok_w, ok_b):
    W.copy_(torch.where(ok_w, (W.to(dW.dtype) + dW).to(W.dtype), W))
    if b is not None:
        b.copy_(torch.where(ok_b, (b.to(db.dtype) + db).to(b.dtype), b))


@torch.no_grad()
def contrastive_update_(W, b, Xn, Yn, Xf, Yf, lr, beta, max_norm=None, centred=False):
    """Apply the rule to W (and b unless None) in place; returns None."""
    _apply_(W, b, *contrastive_delta(Xn, Yn, Xf, Yf, lr, beta, max_norm, centred))


@torch.no_grad()
def contrastive_update_from_stats_(W, b, gn, sn, nn, gf, sf, nf, lr, beta, max_norm=None, centred=False):
    """contrastive_update_ from accumulated phase statistics (the streaming form); returns None."""
    _apply_(W, b, *delta_from_stats(gn, sn, nn, gf, sf, nf, lr, beta, max_norm, centred))


def phase_stats(X, Y):
    """The statistics one phase contributes: (Y^T X, sum Y, rows), in float32 (float64 for
    float64). The streaming form sums them over steps; the update reads only these."""
    acc = _acc_dtype(X, Y)
    return Y.to(acc).T @ X.to(acc), Y.to(acc).sum(0), X.shape[0]


# ---- the metric / rotor update (spec section 5, last paragraph) ---------------------------------

LAM_MIN, LAM_MAX = 0.01, 100.0
ANGLE_MAX = 1e8  # past it a float32 angle (ulp 8) has no meaningful value modulo 2 pi
RADIUS_MIN = 1e-6
ANGLE_RATE = -0.01  # theta_k += ANGLE_RATE * s * dL * atan2(v_j, v_i) * r


def wrap_angle(t):
    """t (float32 or float64) wrapped to [-pi, pi) in its own dtype, for every finite t (and +-inf).
    |t| is clamped to ANGLE_MAX first: past it the rounded k * 2 pi misses t by more than 2 pi. Up
    to it, one reduction lands within a few units of the range (float32: 1e8 has ulp 8), and one
    step of 2 pi across the boundary it missed brings it in, exactly (Sterbenz: t -+ 2 pi is exact
    there). pi is the dtype's: float32's rounds up, so the float32 range is [-pi32, pi32)."""
    pi, two_pi = math.pi, 2.0 * math.pi
    t = t.clamp(-ANGLE_MAX, ANGLE_MAX)
    t = t - two_pi * torch.floor((t + pi) / two_pi)
    t = torch.where(t >= pi, t - two_pi, t)
    return torch.where(t < -pi, t + two_pi, t)


def _metric_state(metric):
    """(lam, theta, pairs) of a diag or rotor_diag metric (theta: an empty tensor for diag)."""
    if metric.kind == "diag":
        return metric.lam, metric.lam.new_empty(0), ()
    if metric.kind == "rotor_diag":
        return metric.lam, metric.theta, metric.pairs
    raise ValueError(f"contrastive_metric_update_: metric must be a geokern.metric diag or rotor_diag, got kind "
                     f"{metric.kind!r} (the spec's update acts on lam and the rotor angles only)")


def metric_delta(metric, x_free, dL, lr, beta):
    """(dlam [n], dtheta [P], ok) of the metric update, in float32 (float64 when lam, theta or x_free
    is float64; a tensor dL is cast to it); ok: a 0-dim bool tensor, the device-side gate.

    v = the mean of x_free's rows ([..., n] flattened), rotated by the metric's current angles
    (RotorDiag.rotate with float32 / float64 cos and sin); c = (lr / beta) * dL;
    dlam = c * v^2 / (sum v^2 + 1e-8); for plane k = (i, j), r = sqrt(v_i^2 + v_j^2),
    dtheta_k = (c * -0.01) * atan2(v_j, v_i) * r where r >= 1e-6, else 0.
    ok = v, dlam, dtheta, lam and theta all finite (in the compute dtype: a product that
    overflows float32 skips the update there). dL: a Python number or a 0-dim tensor."""
    lam, theta, pairs = _metric_state(metric)
    dl_t = dL if isinstance(dL, torch.Tensor) else None
    acc = _acc_dtype(lam, theta, x_free)  # a float64 dL is cast: a scalar does not set the precision
    n = lam.shape[0]
    mean = x_free.reshape(-1, n).to(acc).mean(0)
    lam_a, theta_a = lam.to(acc), theta.to(acc)
    v = type(metric)(lam_a, theta_a, pairs).rotate(mean) if pairs else mean
    # a fill, not torch.tensor: no host-to-device copy (a CUDA graph captures a fill)
    dl = dl_t.to(acc) if dl_t is not None else torch.full((), float(dL), dtype=acc, device=lam.device)
    c = (lr / beta) * dl
    v2 = v * v
    dlam = c * v2 / (v2.sum() + 1e-8)
    if pairs:
        cols = v.unbind(0)  # plane coordinates by Python index: no index tensor to copy to the device
        vi = torch.stack([cols[i] for i, _ in pairs])
        vj = torch.stack([cols[j] for _, j in pairs])
        r = torch.sqrt(vi * vi + vj * vj)
        dtheta = torch.where(r >= RADIUS_MIN, (c * ANGLE_RATE) * torch.atan2(vj, vi) * r, torch.zeros_like(r))
    else:
        dtheta = v.new_zeros(0)
    ok = (torch.isfinite(v).all() & torch.isfinite(dlam).all() & torch.isfinite(dtheta).all()
          & torch.isfinite(lam_a).all() & torch.isfinite(theta_a).all())
    return dlam, dtheta, ok


@torch.no_grad()
def contrastive_metric_update_(metric, x_free, dL, lr, beta):
    """lam = clamp(lam + dlam, 0.01, 100), theta = wrap_angle(theta + dtheta) in the compute dtype,
    each rounded once to its own dtype, in place where ok (else bit-identical); returns None."""
    lam, theta, _ = _metric_state(metric)
    dlam, dtheta, ok = metric_delta(metric, x_free, dL, lr, beta)
    lam.copy_(torch.where(ok, (lam.to(dlam.dtype) + dlam).clamp(LAM_MIN, LAM_MAX).to(lam.dtype), lam))
    if theta.numel():
        theta.copy_(torch.where(ok, wrap_angle(theta.to(dtheta.dtype) + dtheta).to(theta.dtype), theta))
