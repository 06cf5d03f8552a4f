"""Metrics G for the retrieval cost g(dv, dv) = dv^T G dv (spec retrieval_lior.md section 1).

Build one once and pass it to geokern.retrieval_cost / geokern.retrieval_attention:

    m = geokern.metric.diag(lam)                          # g = sum_i lam_i dv_i^2
    m = geokern.metric.rotor_diag(lam, theta, pairs)      # Givens rotations, then diag
    m = geokern.metric.lowrank(omega_sq, Q, lam, U, D)    # omega_sq (Q^T dv)^T diag(lam) (Q^T dv)
                                                          #   + (U^T dv)^T diag(D) (U^T dv)

Every metric is a quadratic form that factors as a linear feature map phi (no bias)
and per-feature weights w of any sign: g(dv, dv) = sum_f w_f phi(dv)_f^2. `quad` is
the definition used by the reference; `features` gives (phi, w), which the fused
kernels use: since phi is linear, phi(k - q) = phi(k) - phi(q), so the kernels see a
diag metric on the mapped queries and keys, and autograd carries the gradient of w
and of phi back to the metric's parameters. Parameters are tensors; they may require
grad. The metric's tensors are cast to float32 (float64 for float64 inputs) for use.
"""

from dataclasses import dataclass

import torch

__all__ = ["Metric", "Diag", "RotorDiag", "LowRank", "diag", "rotor_diag", "lowrank"]


def _check_vec(name, t, n=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"metric: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"metric: {name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = f"[{n}]" if n is not None else "1-D"
        raise ValueError(f"metric: {name} must have shape {want}, got {tuple(t.shape)}")


class Metric:
    """Base of the metric families: `n` (coordinate dim), `quad(dv)`, `features(x)`."""

    kind = "metric"
    n: int

    def quad(self, dv: torch.Tensor) -> torch.Tensor:
        """g(dv, dv) over the last dim of dv, in dv's dtype."""
        phi, w = self.features(dv)
        return (phi * phi * w).sum(-1)

    def features(self, x: torch.Tensor):
        """(phi(x), w): the linear feature map and the weights; g = sum_f w_f phi_f^2."""
        raise NotImplementedError

    def weights(self, dtype):
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Diag(Metric):
    lam: torch.Tensor
    kind = "diag"

    def __post_init__(self):
        _check_vec("lam", self.lam)

    @property
    def n(self):
        return self.lam.shape[0]

    def weights(self, dtype):
        return self.lam.to(dtype)

    def quad(self, dv):
        return (dv * dv * self.lam.to(dv.dtype)).sum(-1)

    def features(self, x):
        return x, self.lam.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


@dataclass(frozen=True, eq=False)
class RotorDiag(Metric):
    lam: torch.Tensor
    theta: torch.Tensor
    pairs: tuple  # ((a, b), ...): rotation planes, applied in order

    kind = "rotor_diag"

    def __post_init__(self):
        _check_vec("lam", self.lam)
        _check_vec("theta", self.theta, len(self.pairs))
        n = self.lam.shape[0]
        for a, b in self.pairs:
            if not (0 <= a < n and 0 <= b < n and a != b):
                raise ValueError(f"metric: rotor_diag pairs must be distinct indices in [0, {n}), got ({a}, {b})")

    @property
    def n(self):
        return self.lam.shape[0]

    def rotate(self, x):
        """Givens rotations in order, out of place: x_a' = c x_a - s x_b, x_b' = s x_a + c x_b."""
        cols = list(x.unbind(-1))
        cos, sin = torch.cos(self.theta).to(x.dtype), torch.sin(self.theta).to(x.dtype)
        for t, (a, b) in enumerate(self.pairs):
            xa, xb = cols[a], cols[b]
            cols[a] = cos[t] * xa - sin[t] * xb
            cols[b] = sin[t] * xa + cos[t] * xb
        return torch.stack(cols, -1)

    def quad(self, dv):
        r = self.rotate(dv)
        return (r * r * self.lam.to(dv.dtype)).sum(-1)

    def features(self, x):
        return self.rotate(x), self.lam.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


@dataclass(frozen=True, eq=False)
class LowRank(Metric):
    omega_sq: torch.Tensor  # scalar (0-d or [1])
    Q: torch.Tensor  # [n, n]
    lam: torch.Tensor  # [n]
    U: torch.Tensor  # [n, r]
    D: torch.Tensor  # [r], any sign: G may be indefinite

    kind = "lowrank"

    def __post_init__(self):
        n = self.lam.shape[0] if isinstance(self.lam, torch.Tensor) else None
        _check_vec("lam", self.lam)
        _check_vec("D", self.D)
        if not isinstance(self.omega_sq, torch.Tensor) or self.omega_sq.numel() != 1:
            raise ValueError("metric: lowrank omega_sq must be a one-element tensor")
        if not isinstance(self.Q, torch.Tensor) or tuple(self.Q.shape) != (n, n):
            raise ValueError(f"metric: lowrank Q must have shape ({n}, {n}), got {tuple(getattr(self.Q, 'shape', ()))}")
        r = self.D.shape[0]
        if not isinstance(self.U, torch.Tensor) or tuple(self.U.shape) != (n, r):
            raise ValueError(f"metric: lowrank U must have shape ({n}, {r}), got {tuple(getattr(self.U, 'shape', ()))}")

    @property
    def n(self):
        return self.lam.shape[0]

    def quad(self, dv):
        a = dv @ self.Q.to(dv.dtype)  # Q^T dv as a row
        b = dv @ self.U.to(dv.dtype)
        w = self.omega_sq.reshape(()).to(dv.dtype)
        return w * (a * a * self.lam.to(dv.dtype)).sum(-1) + (b * b * self.D.to(dv.dtype)).sum(-1)

    def features(self, x):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        phi = torch.cat([x.to(acc) @ self.Q.to(acc), x.to(acc) @ self.U.to(acc)], -1).to(x.dtype)
        w = torch.cat([self.omega_sq.reshape(1).to(acc) * self.lam.to(acc), self.D.to(acc)])
        return phi, w


def diag(lam: torch.Tensor) -> Diag:
    """g(dv, dv) = sum_i lam_i dv_i^2 (lam may be negative: the cost clamps g at 0)."""
    return Diag(lam)


def rotor_diag(lam: torch.Tensor, theta: torch.Tensor, pairs) -> RotorDiag:
    """Rotate dv by Givens rotations (pairs[t] = (a, b), angle theta[t]) in order, then diag(lam)."""
    if isinstance(pairs, torch.Tensor):
        pairs = pairs.tolist()
    pairs = tuple((int(a), int(b)) for a, b in pairs)
    return RotorDiag(lam, theta, pairs)


def lowrank(omega_sq, Q: torch.Tensor, lam: torch.Tensor, U: torch.Tensor, D: torch.Tensor) -> LowRank:
    """g = omega_sq (Q^T dv)^T diag(lam) (Q^T dv) + (U^T dv)^T diag(D) (U^T dv); D may be negative."""
    if not isinstance(omega_sq, torch.Tensor):
        omega_sq = torch.tensor(float(omega_sq), dtype=lam.dtype, device=lam.device)
    return LowRank(omega_sq, Q, lam, U, D)
