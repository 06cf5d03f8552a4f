"""Quaternion rotor-gate attention and octonion attention: the definition (spec section 4).

Shapes: q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with Hkv dividing H (grouped-query heads).
The head dim holds D / n hypercomplex channels, each n = 4 (quaternion) or 8 (octonion)
consecutive components: channel c of a row is x[..., n c : n c + n] (x.unflatten(-1, (D / n, n))),
the layout of the product ops' last dim.

    s_ij = (q_i . k_j) * scale            (scale = 1 / sqrt(D), 1 for D = 0; the raw q, k)
    p_ij = softmax_j(s_ij)                (causal mask: tropical.causal_visible)
    q^_i, k^_j = q_i, k_j normalised per channel (x / max(|x|, eps), F.normalize's rule)
    quaternion:  y_i = q^_i (sum_j p_ij conj(k^_j) v_j)            per channel
    octonion:    y_i = sum_j p_ij ((q^_i conj(k^_j)) v_j)           per channel

Choices where the spec is silent: the channel layout above (interleaved components, as the
product ops take them); the octonion op normalises q and k per channel as the quaternion op
does (the spec says "the same scores" and the same rotor construction); eps = 1e-12 (a zero
channel gives a zero rotor, never NaN); normalize=False uses q and k in the products as they
are. Everything is computed in the inputs' dtype (use float64 for the truth); memory is
bounded by chunking queries (the octonion products are O(chunk * Tk * D) at a time; with a
causal mask, the keys that a chunk's rows see in part are taken per pair, O(chunk * chunk * D)).

A causally hidden key contributes nothing, whatever its k and v (NaN and inf included): its terms
are selected away per (query, key) pair (torch.where on the key's k and values, never p = 0 times
them), in the scores and the sums alike, so it reaches neither y_i nor any gradient through row i;
the same selection keeps a row's NaN q or upstream gradient out of the gradients of the keys hidden
from it. (Every key is seen by the last query, so a key's own gradient is its visible rows' sum.)
"""

import torch

from geokern.reference.hypercomplex import hypercomplex_conj, hypercomplex_mul
from geokern.reference.tropical import causal_visible, repeat_kv

EPS = 1e-12
_CHUNK_ELEMS = 1 << 24  # elements of one query chunk's [B, H, chunk, Tk, D] octonion products
_DIAG = 32  # query rows per causal chunk: its partly seen keys' pairs are [B, H, chunk, chunk, D]


def channels(x, n):
    """(..., D) -> (..., D / n, n)."""
    return x.unflatten(-1, (x.shape[-1] // n, n))


def normalize_channels(x, n, eps=EPS):
    """x with each of its D / n channels scaled to unit norm (zero channels stay zero)."""
    c = channels(x, n)
    return (c / c.norm(dim=-1, keepdim=True).clamp_min(eps)).flatten(-2)


def default_scale(D):
    """1 / sqrt(D); 1 for D = 0 (every score is then 0 whatever the scale: an empty result, not a
    ZeroDivisionError)."""
    return D ** -0.5 if D else 1.0


def _chunks(Tq, Tk, causal, row_elems, device):
    """(i0, i1, kvis, kend, vis) per chunk of query rows [i0, i1): keys [0, kvis) are seen by every
    row of the chunk, keys [kvis, kend) by some (vis (i1 - i0, kend - kvis) bool: where query i sees
    key j, tropical.causal_visible; None when kvis == kend), keys past kend by none. row_elems: the
    elements one query row's pairwise tensors hold (0: no bound); causal chunks also hold at most
    _DIAG rows, so the partly seen keys' pairs stay O(chunk * _DIAG * D)."""
    step = max(1, _CHUNK_ELEMS // max(1, row_elems))
    if causal:
        step = min(step, _DIAG)
    for i0 in range(0, max(Tq, 1), step):  # one pass even when Tq == 0: an empty y with a grad_fn
        i1 = min(Tq, i0 + step)
        if not causal or Tq == 1:
            yield i0, i1, Tk, Tk, None
            continue
        off = Tk - Tq
        kvis, kend = min(Tk, i0 + off + 1), min(Tk, i1 + off)
        yield i0, i1, kvis, kend, causal_visible(Tq, Tk, device)[i0:i1, kvis:kend]


def _pairs(x, vis):
    """x (B, H, Tk, ...) per key -> (B, H, c, Tk, ...) per (query, key) pair, zero where vis (c, Tk)
    hides the key: a hidden key's entries are selected away, never multiplied by p = 0, so a NaN or
    inf there reaches no output and no gradient (torch.where's backward sends it none)."""
    m = vis.reshape(vis.shape + (1,) * (x.dim() - 3))
    return torch.where(m, x.unsqueeze(2), x.new_zeros(()))


def _weights(q, k, kvis, vis, scale):
    """p (B, H, c, kend) and lse (B, H, c) of query rows q (B, H, c, D) against keys k (B, H, kend,
    D), the first kvis seen by every row, the rest where vis (as _chunks) says: their hidden scores
    are -inf, formed from zeros in place of the hidden keys."""
    s = torch.matmul(q, k[:, :, :kvis].transpose(-1, -2)) * scale
    if vis is not None:
        sd = torch.einsum("bhid,bhijd->bhij", q, _pairs(k[:, :, kvis:], vis)) * scale
        s = torch.cat([s, sd.masked_fill(~vis, float("-inf"))], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(s.dtype).min))
    return p, lse


def softmax_weights(q, k, causal, scale=None):
    """p (B, H, Tq, Tk) and lse (B, H, Tq) of the scores; rows with no visible key get p = 0
    and lse = -inf. Causal: a hidden key's k is never read (its p is exactly 0, its gradient from
    that row 0); this forms Tq * Tk * D pairs at once (the ops chunk them)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    Tq, Tk = q.shape[2], k.shape[2]
    vis = causal_visible(Tq, Tk, q.device) if causal else None
    return _weights(q, repeat_kv(k, q.shape[1]), 0 if causal else Tk, vis, scale)


def quaternion_attention(q, k, v, causal=True, scale=None, normalize=True):
    """y (B, H, Tq, D) of quaternion rotor-gate attention (module docstring)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    qn, kn = (normalize_channels(q, 4), normalize_channels(k, 4)) if normalize else (q, k)
    H = q.shape[1]
    kr = repeat_kv(k, H)
    t = repeat_kv(hypercomplex_mul(hypercomplex_conj(channels(kn, 4), 4), channels(v, 4), 4).flatten(-2), H)  # T_j
    out = []
    for i0, i1, kvis, kend, vis in _chunks(q.shape[2], k.shape[2], causal, 0, q.device):
        p, _ = _weights(q[:, :, i0:i1], kr[:, :, :kend], kvis, vis, scale)
        a = torch.matmul(p[..., :kvis], t[:, :, :kvis])  # A_i = sum_j p_ij T_j
        if vis is not None:  # the partly seen keys: their visible T_j only
            a = a + torch.einsum("bhij,bhijd->bhid", p[..., kvis:], _pairs(t[:, :, kvis:kend], vis))
        out.append(hypercomplex_mul(channels(qn[:, :, i0:i1], 4), channels(a, 4), 4).flatten(-2))
    return torch.cat(out, dim=2)


def octonion_attention(q, k, v, causal=True, scale=None, normalize=True):
    """y (B, H, Tq, D) of octonion attention with the parenthesisation ((q^_i conj(k^_j)) v_j)
    (module docstring): the literal sum over key pairs, in query chunks."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    qn, kn = (normalize_channels(q, 8), normalize_channels(k, 8)) if normalize else (q, k)
    H = q.shape[1]
    kr = repeat_kv(k, H)
    kb = channels(hypercomplex_conj(channels(repeat_kv(kn, H), 8), 8).flatten(-2), 8)  # (B, H, Tk, C, 8)
    vc = channels(repeat_kv(v, H), 8)
    B, _, Tq, D = q.shape
    Tk = k.shape[2]
    out = []
    for i0, i1, kvis, kend, vis in _chunks(Tq, Tk, causal, B * H * Tk * D, q.device):
        p, _ = _weights(q[:, :, i0:i1], kr[:, :, :kend], kvis, vis, scale)
        qc = channels(qn[:, :, i0:i1], 8).unsqueeze(3)  # (B, H, c, 1, C, 8)
        parts = [(p[..., :kvis], kb[:, :, :kvis].unsqueeze(2), vc[:, :, :kvis].unsqueeze(2))]
        if vis is not None:  # the partly seen keys: the visible ones only
            parts.append((p[..., kvis:], _pairs(kb[:, :, kvis:kend], vis), _pairs(vc[:, :, kvis:kend], vis)))
        y = 0
        for pp, kbc, vcc in parts:
            left = hypercomplex_mul(qc, kbc, 8)  # q^_i conj(k^_j): (B, H, c, keys, C, 8)
            prod = hypercomplex_mul(left, vcc, 8).flatten(-2)  # (B, H, c, keys, D)
            y = y + torch.einsum("bhij,bhijd->bhid", pp, prod)
        out.append(y)
    return torch.cat(out, dim=2)


def octonion_attention_other_parenthesisation(q, k, v, causal=True, scale=None, normalize=True):
    """sum_j p_ij (q^_i (conj(k^_j) v_j)): what the op is not (octonions do not associate);
    the tests use it to show the op keeps the spec's parenthesisation."""
    p, _ = softmax_weights(q, k, causal, scale)
    qn, kn = (normalize_channels(q, 8), normalize_channels(k, 8)) if normalize else (q, k)
    t = hypercomplex_mul(hypercomplex_conj(channels(kn, 8), 8), channels(v, 8), 8).flatten(-2)
    a = torch.matmul(p, repeat_kv(t, q.shape[1]))  # by linearity in the right factor
    return hypercomplex_mul(channels(qn, 8), channels(a, 8), 8).flatten(-2)


def structure_constants(n):
    """G (n, n, n, n) float64 with ((e_s e_t) e_u)_r = G[r, s, t, u]: the trilinear form of
    (a b) c, read off the one multiplication table (hypercomplex_mul) on basis elements."""
    e = torch.eye(n, dtype=torch.float64)
    ab = hypercomplex_mul(e[:, None, :], e[None, :, :], n)  # [s, t, :] = e_s e_t
    abc = hypercomplex_mul(ab[:, :, None, :], e[None, None, :, :], n)  # [s, t, u, :]
    return abc.permute(3, 0, 1, 2).contiguous()


def epilogue_matrix(n):
    """(n * n, n * n) float64 E with E[t n + u, s n + r] = G[r, s, t, u]: for M[t, u] =
    sum_j p_ij conj(k^_j)_t v_j,u, (M.flatten() @ E)[s n + r] summed against q^_s over s is
    y_r, the octonion attention's epilogue as one small GEMM."""
    g = structure_constants(n)  # [r, s, t, u]
    return g.permute(2, 3, 1, 0).reshape(n * n, n * n).contiguous()
