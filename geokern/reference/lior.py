"""LIoR memory, recurrence and action: the definition (spec retrieval_lior.md section 4).

The memory kernel, 3 modes with scalar parameters (`params`, a float tensor [12] in the order of
PARAM_NAMES; build one with `lior_params`):

    dt  = max(dt, 0.1)
    k_e = a * exp(clip(-b * dt, -20, 20))                                         (exponential)
    k_f = gamma * exp(clip(-delta * ln dt, -20, 20)) * exp(clip(-xi * dt, -20, 20))  (power law)
    k_o = eta * cos(omega * dt + phi) * exp(clip(-zeta * dt, -20, 20))             (oscillating)
    K   = clip(w0 * k_e + w1 * k_f + w2 * k_o, -100, 100),  w = softmax(logits)

The power-law mode is added, as in the trainer's code. The memory layer over a sequence x [T, ...]
(time first, any trailing dims):

    out[t] = w0 * x[t] + (1 - w0) * sum_{j<=t} khat_j * x[t - j]
    khat_j = K(j + 1) / (|sum_{i<T} K(i + 1)| + 1e-8)

Choices where the spec is silent: w0 of the layer is the kernel's own first mode weight
softmax(logits)[0]; the normalisation runs over the sequence's own length T (so khat depends on T);
the sum accumulates in float32 (float64 for float64 inputs). A non-finite x[t0] (NaN or inf) makes
out[t] NaN for every t >= t0 in its column and nothing else, in the direct and the FFT path alike
(an FFT would otherwise spread it over the whole column, a matmul through 0 * inf).

The recurrence, elementwise over [B, D], with a ring of the last p inputs (x_{t-p} = 0 before the
first p steps unless a history is given) and an optional per-row gate j:

    m_t = rho * s(j) * m_{t-1} + eta * g(j) * x_t - xi * g(j) * x_{t-p}
    s(j) = sigmoid(j), g(j) = 1 + 0.1 tanh(j);   without j: s = g = 1

The LIoR action over a window of W steps, v [W, B, n] (velocities), R broadcasting to [W, B]:

    cost_t  = R_t * sqrt(max(g(v_t, v_t), 0) + eps)   (geokern.reference.retrieval.quad_cost)
    I      += dtau * cost_t                          (the action integral, per row)
    mean    = running mean of cost over every step since the state was zeroed
"""

import math

import torch

from geokern.reference.retrieval import quad_cost

PARAM_NAMES = ("a", "b", "gamma", "delta", "xi", "eta", "omega", "phi", "zeta", "logit_e", "logit_f", "logit_o")
DEFAULT_PARAMS = dict(a=1.0, b=0.5, gamma=0.5, delta=1.0, xi=0.05, eta=0.3, omega=0.7, phi=0.0, zeta=0.2,
                      logit_e=0.0, logit_f=0.0, logit_o=0.0)
NORM_EPS = 1e-8
CLIP_EXP = 20.0
CLIP_K = 100.0
DT_MIN = 0.1


def lior_params(dtype=torch.float32, device=None, **values):
    """The params tensor [12] from named scalars (missing names take DEFAULT_PARAMS)."""
    bad = set(values) - set(PARAM_NAMES)
    if bad:
        raise ValueError(f"lior_params: unknown parameter(s) {sorted(bad)}; names are {PARAM_NAMES}")
    full = {**DEFAULT_PARAMS, **values}
    return torch.tensor([float(full[n]) for n in PARAM_NAMES], dtype=dtype, device=device)


def acc_dtype(*ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def mode_weights(params):
    """softmax of the 3 logits: (w0, w1, w2)."""
    return torch.softmax(params[9:12], 0)


def lior_kernel(dt, params):
    """K(dt) elementwise, in float32 (float64 if dt or params is float64)."""
    acc = acc_dtype(dt, params)
    dt, p = dt.to(acc), params.to(acc)
    a, b, gamma, delta, xi, eta, omega, phi, zeta = p[:9].unbind(0)
    w = mode_weights(p)
    dt = torch.clamp(dt, min=DT_MIN)  # clamp keeps NaN

    def ex(z):
        return torch.exp(torch.clamp(z, -CLIP_EXP, CLIP_EXP))

    k_e = a * ex(-b * dt)
    k_f = gamma * ex(-delta * torch.log(dt)) * ex(-xi * dt)
    k_o = eta * torch.cos(omega * dt + phi) * ex(-zeta * dt)
    return torch.clamp(w[0] * k_e + w[1] * k_f + w[2] * k_o, -CLIP_K, CLIP_K)


def memory_weights(T, params, dtype=None):
    """khat [T]: K(1..T) normalised by |sum| + 1e-8."""
    acc = dtype or acc_dtype(params)
    k = lior_kernel(torch.arange(1, T + 1, device=params.device, dtype=acc), params)
    return k / (k.sum().abs() + NORM_EPS)


def _poisoned(x):
    """[T, ...] bool: some x[s], s <= t, of this column is non-finite."""
    if x.shape[0] == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    return (~torch.isfinite(x)).to(torch.uint8).cummax(0).values.bool()


def causal_conv_direct(x, khat):
    """sum_{j<=t} khat_j x[t - j] as the lower-triangular Toeplitz matrix times x: O(T^2) work."""
    T = x.shape[0]
    t = torch.arange(T, device=x.device)
    lag = t[:, None] - t[None, :]
    toep = torch.where(lag >= 0, khat[lag.clamp(min=0)], torch.zeros((), dtype=khat.dtype, device=x.device))
    return (toep @ x.reshape(T, -1)).reshape(x.shape)


def fft_size(T):
    """The FFT length of a causal convolution of T samples: the power of two >= 2T - 1."""
    return 1 << max(0, 2 * T - 2).bit_length()


def causal_conv_fft(x, khat):
    """The same convolution through a zero-padded real FFT over time: O(T log T) work."""
    T = x.shape[0]
    n = fft_size(T)
    xf = torch.fft.rfft(x, n=n, dim=0)
    kf = torch.fft.rfft(khat, n=n).reshape((-1,) + (1,) * (x.dim() - 1))
    return torch.fft.irfft(xf * kf, n=n, dim=0)[:T]


def lior_memory_conv(x, params, method="fft"):
    """out [T, ...] in x's dtype (see the module docstring); method "direct" or "fft"."""
    acc = acc_dtype(x, params)
    T = x.shape[0]
    xa = x.to(acc)
    if T == 0 or x.numel() == 0:
        return (xa * params.to(acc)[0]).to(x.dtype)  # empty; keeps the graph to params
    khat = memory_weights(T, params.to(acc), acc)
    bad = _poisoned(xa)
    clean = torch.where(bad, torch.zeros((), dtype=acc, device=x.device), xa)
    conv = causal_conv_direct(clean, khat) if method == "direct" else causal_conv_fft(clean, khat)
    w0 = mode_weights(params.to(acc))[0]
    out = w0 * xa + (1 - w0) * conv
    return torch.where(bad, torch.full((), math.nan, dtype=acc, device=x.device), out).to(x.dtype)


def gate_factors(j, rho, eta, xi, acc):
    """(a, b, c) of one step, each [B, 1], or Python numbers without a gate."""
    if j is None:
        return rho, eta, xi
    j = j.to(acc).unsqueeze(-1)
    g = 1 + 0.1 * torch.tanh(j)
    return rho * torch.sigmoid(j), eta * g, xi * g


def lior_recurrence_step(m, x, x_old, j, rho, eta, xi):
    """m_t from m_{t-1} [B, D], x_t, x_{t-p} (out of place, in the accumulation dtype)."""
    acc = acc_dtype(m, x)
    a, b, c = gate_factors(j, rho, eta, xi, acc)
    return a * m.to(acc) + b * x.to(acc) - c * x_old.to(acc)


def lior_recurrence_step_(m, ring, pos, x, j, rho, eta, xi):
    """One step in place: ring [p, B, D] holds x_{t-p} at slot t % p, pos [] int64 holds t.
    Reads the slot, writes x_t there, updates m and pos; no host synchronisation."""
    p = ring.shape[0]
    slot = torch.remainder(pos.reshape(1), p)
    x_old = ring.index_select(0, slot)[0]
    m.copy_(lior_recurrence_step(m, x, x_old, j, rho, eta, xi))
    ring.index_copy_(0, slot, x.to(ring.dtype).unsqueeze(0))
    pos.add_(1)
    return m


def lior_recurrence(x, j=None, rho=0.9, eta=1.0, xi=0.5, p=4, m0=None, history=None):
    """m [T, B, D] (x's dtype) for x [T, B, D], j [T, B] or None, m0 [B, D] (zeros), history
    [p, B, D] = (x_{-p}, ..., x_{-1}) (zeros): T steps, differentiable (autograd of the loop)."""
    T, B, D = x.shape
    acc = acc_dtype(x)
    h = x.new_zeros((p, B, D)) if history is None else history.to(x.dtype)
    xs = torch.cat([h, x], 0)
    m = x.new_zeros((B, D), dtype=acc) if m0 is None else m0.to(acc)
    out = []
    for t in range(T):
        m = lior_recurrence_step(m, xs[t + p], xs[t], None if j is None else j[t], rho, eta, xi)
        out.append(m)
    if not out:  # no step: an empty result still tied to every input (their gradients are zeros)
        tie = sum(t.sum() for t in (j, m0, history) if t is not None)
        return (x.to(acc) + 0 * tie).to(x.dtype)
    return torch.stack(out).to(x.dtype)


def lior_action(v, R, metric, eps=1e-8, dtau=1.0, integral=None, mean=None, count=None):
    """(cost [W, B], integral [B], mean [B], count []) after the window, out of place.

    integral / mean (float32, float64 for float64 v) and count (int64, steps seen) start at zero
    when None. The mean of no step (count + W = 0) stays what it was."""
    W, B = v.shape[0], v.shape[1]
    acc = acc_dtype(v)
    R = torch.as_tensor(R, dtype=acc, device=v.device)
    cost = quad_cost(v.to(acc), R.to(acc), metric, eps)
    cost = torch.broadcast_to(cost, (W, B))
    I0 = torch.zeros(B, dtype=acc, device=v.device) if integral is None else integral.to(acc)
    mu0 = torch.zeros(B, dtype=acc, device=v.device) if mean is None else mean.to(acc)
    n0 = torch.zeros((), dtype=torch.int64, device=v.device) if count is None else count.reshape(())
    s = cost.sum(0)
    n1 = n0 + W
    mu1 = torch.where(n1 > 0, (mu0 * n0.to(acc) + s) / n1.clamp(min=1).to(acc), mu0)
    return cost, I0 + dtau * s, mu1, n1
