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

Choices where the spec is silent:
- A phase with no rows has no mean: refused (ValueError), never a silent zero or NaN update.
- The gate and the clip are decided on the device: no .item(), no host synchronisation; the skip
  is a torch.where, so W and b are bit-identical when skipped (a multiply by a 0/1 mask would
  turn NaN * 0 into NaN, and W + 0 turns -0.0 into +0.0).
- The update is computed in float32 for 16-bit and float32 activities (float64 for float64) and
  added to W and b in their own dtype with one rounding.
"""

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
