"""Ultrametric (LCP-bucketed) attention, hard mode, and the soft LCP kernel: the definition
(spec section 3).

Digits. A head vector x [..., D] becomes K digits in base p through a bias-free linear map
`weight` [K, D]: soft digits sigmoid(x @ weight.T) * (p - 1), hard digits round(soft) clamped
to [0, p - 1]. round is torch.round, half to even (the spec says only "round"; theirs is
torch.round too), so a soft digit of exactly 0.5 becomes 0. Hard digits are int64: prefix
codes need up to 63 bits and torch's index ops (index_add_, gather) take int64; the digits
are K numbers per token, small next to v's D, so the width costs little here. The attention
accepts digits of any integer dtype (a kernel may store int8); float or bool digits are a
TypeError, digits outside [0, p - 1] a ValueError.

Prefix codes. The first l digits of a token (level l = 0..K) are one node of the depth-K
p-ary trie; its code is the node's breadth-first id, sum_{m<l} p^m + value_l with value_l
the first l digits read as a base-p number (first digit most significant). Codes are unique
across levels, lie in [0, N) with N = sum_{l<=K} p^l, and level 0 (the root) is code 0. A
dense bucket table indexes them directly while N is small; past 2^63 they do not fit int64
and are refused (ValueError naming p and K).

Hard mode. Shapes (B, H, T, .): q_digits [B, H, Tq, K], k_digits [B, Hkv, Tk, K],
v [B, Hkv, Tk, D], Hkv dividing H (query head h reads key head h // (H // Hkv)). With
lcp_ij the number of leading digits keys j and query i share,

    y[i]   = sum_j alpha^lcp_ij v[j] / max(sum_j alpha^lcp_ij, 1e-9)   (visible j only)
    lse[i] = log(sum_j alpha^lcp_ij)                                    (-inf: no visible key)

which is the spec's sum_l alpha^l (S_l - S_{l+1}) / sum_l alpha^l (C_l - C_{l+1}), S_l / C_l
the sum of v / the count over the visible keys in the query's level-l bucket. No level
difference is formed and no weight is negative (read_codes): for alpha > 1 it is sum_l w_l S_l
with w_0 = 1, w_l = alpha^(l-1) (alpha - 1) (the same sum regrouped); for alpha <= 1, where those
w_l are <= 0 and the regrouped sum cancels (alpha = 0.01, K = 8: terms of size 1 summing to
1e-16), S_l - S_{l+1} is read as the sum of the p - 1 sibling buckets of the query's
level-(l + 1) bucket, so every key enters once with its own weight alpha^lcp. Query i sits at absolute position Tk - Tq + i and, when causal, sees
keys at positions <= its own (their causal_attn_mask: prefill Tq == Tk, one-token decode
Tq == 1 sees every key, chunked prefill Tq < Tk); causal with Tk < Tq and Tq > 1 is a
ValueError (as in the tropical reference). key_padding_mask [B, Tk] (True = keep) removes
keys; queries are never masked (a padded query's row is computed; the caller drops it).
A query with no visible key gives y = 0 and lse = -inf. alpha must be a finite number > 0
(the spec does not bound it; alpha <= 0 breaks the clamped normaliser). The clamp at 1e-9
is the spec's, kept even where it bites (alpha^K < 1e-9 with every visible key in the
query's deepest bucket).

Work O(T K D): a table of running bucket sums [rows, D] and counts [rows] (int64, exact),
one row per (key head, code) that occurs (codes compressed by torch.unique, so no code
range limits memory), filled in time order: keys before the first query in one index_add,
then chunks of `chunk` positions. A chunk's queries read their K + 1 rows (the keys of
earlier chunks) and add the chunk's own visible keys densely (chunk x chunk: O(T chunk D)
in all). Non-causal adds every key, then reads. Beyond O(T K D) only the code compression
sorts (O(T K log(T K)) integer work); the table holds O(T K D) values at most. Sums in float32 (float64 for float64), y in v's dtype, lse in
the sum dtype.

Gradient: to v only. Digits are integers (discrete); no gradient reaches them or the soft
digits in hard mode (a straight-through option belongs to the op layer, not here).

Non-finite values: a key hidden from a query (padding, or a later position when causal)
contributes nothing whatever its v (NaN included). A NaN in a visible v[j, d] makes y[i, d]
NaN for every query i that sees key j; a visible +-inf makes it +-inf (NaN where +inf and -inf
meet), as the brute force, since every weight is positive (a weight alpha^l that underflows to 0
times inf is NaN).

Soft LCP kernel (soft_lcp_attention): dense O(Tq Tk K), the spec's formula with float
digits, chunked over queries so at most about CHUNK_ELEMS pair elements exist at once;
differentiable in q_soft, k_soft and v. Causal / chunked prefill / decode positions, padding,
grouped-query heads, the clamp and lse are those of hard mode; lcp_beta is a finite number >= 0.
With hard digits and a large lcp_beta (exp(-beta) == 0 in the dtype) it equals hard mode.
"""

import math

import torch

CHUNK_ELEMS = 1 << 22
CLAMP = 1e-9
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def soft_digits(x, weight, p):
    """sigmoid(x @ weight.T) * (p - 1): x [..., D], weight [K, D] -> [..., K] in [0, p - 1]."""
    _check_base(p)
    return torch.sigmoid(x @ weight.transpose(0, 1)) * (p - 1)


def hard_digits(soft, p):
    """round(soft) (half to even) clamped to [0, p - 1], as int64. NaN is a ValueError."""
    _check_base(p)
    if torch.isnan(soft).any():
        raise ValueError("hard_digits: soft must not contain NaN (a NaN digit has no bucket)")
    return torch.round(soft).clamp(0, p - 1).to(torch.int64)


def hyperplane_signatures(x, planes, weight=None):
    """Random-hyperplane bit signatures (their JAX demo's `_signature`, p = 2): digit l of a head
    vector h is 1 if planes[l] . h > 0, else 0, as int8 [B, H, T, K], usable as q_digits / k_digits.

    weight None: x [B, H, T, D] are the head vectors. weight [H * D, Din] (an nn.Linear weight,
    y = x @ weight.T): x [B, T, Din] is projected first and split into H heads of D (the layout of
    q = c_q(x).view(B, T, H, D).transpose(1, 2)). planes [H, K, D] (one set per head, as the demo's
    per-head planes) or [K, D] (shared by every head). Everything is computed in float64.

    Ties: a dot of exactly 0 (and -0) gives digit 0 (the comparison is strict, as the demo's
    `proj > 0`); a NaN dot gives 0 too (the comparison is false). Digits are discrete: no gradient.
    """
    B, H, T, D, K = check_signature_inputs(x, planes, weight)
    with torch.no_grad():
        h = x.detach().double()
        if weight is not None:
            h = (h @ weight.detach().double().transpose(0, 1)).view(B, T, H, D).transpose(1, 2)
        P = planes.detach().double()
        P = P.expand(H, K, D) if P.dim() == 2 else P
        dots = torch.einsum("bhtd,hkd->bhtk", h, P)
        return (dots > 0).to(torch.int8)


def check_signature_inputs(x, planes, weight):
    """(B, H, T, D, K) of hyperplane_signatures' inputs; TypeError / ValueError naming the argument."""
    for name, t in (("x", x), ("planes", planes), ("weight", weight)):
        if t is None and name == "weight":
            continue
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if planes.dim() not in (2, 3) or planes.shape[-2] < 1:
        raise ValueError(f"planes must be [K, D] or [H, K, D] with K >= 1, got shape {tuple(planes.shape)}")
    K, D = planes.shape[-2], planes.shape[-1]
    if weight is None:
        if x.dim() != 4 or x.shape[-1] != D:
            raise ValueError(f"x must be [B, H, T, D] head vectors with D = {D} (planes' last dim) when weight is "
                             f"None, got shape {tuple(x.shape)}")
        B, H, T = x.shape[:3]
    else:
        if weight.dim() != 2 or x.dim() != 3 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"weight must be [H * D, Din] and x [B, T, Din] with Din = weight.shape[1], got weight "
                             f"{tuple(weight.shape)}, x {tuple(x.shape)}")
        if D == 0 or weight.shape[0] % D:
            raise ValueError(f"weight must have H * D rows with D = {D} (planes' last dim), got {weight.shape[0]}")
        H = weight.shape[0] // D
        B, T = x.shape[:2]
    if planes.dim() == 3 and planes.shape[0] != H:
        raise ValueError(f"planes [H, K, D] must have H = {H} heads (from {'weight' if weight is not None else 'x'}),"
                         f" got shape {tuple(planes.shape)}")
    return B, H, T, D, K


def ultrametric_top1(q, k, v, q_digits, k_digits, *, p=2, causal=False, key_padding_mask=None, return_details=False):
    """Top-1 bucket retrieval (their demo's `attend`): per head h and query i, among the keys j
    visible to it, the deepest non-empty prefix bucket (the largest lcp_ij: at lcp 0 every visible
    key) and in it the key with the best cosine similarity
        cos_ij = q_i . k_j / ((|q_i| + 1e-12) (|k_j| + 1e-12)),
    i.e. the lexicographic maximum of (lcp_ij, cos_ij, -j). y[b, i] = mean over the H heads of
    v[b, h // R, index[b, h, i]] (the demo averages the picked values over heads).

    q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv], q_digits [B, H, Tq, K], k_digits
    [B, Hkv, Tk, K] (integer digits in [0, p - 1]; Hkv divides H, query head h reads key head
    h // (H // Hkv)). causal and key_padding_mask as in ultrametric_attention (default
    non-causal: the demo retrieves from every stored key). Computed in float64.

    Ties: equal (lcp, cos) picks the lowest key index. A NaN similarity ranks above every number
    (torch.argmax's rule), so a NaN key wins the buckets it competes in, and y is NaN for a
    query whose pick in any head has a NaN similarity. A query that sees no key gets index -1,
    lcp -1, similarity -inf and y = 0. Gradient: to v only (through the pick); the pick is
    discrete in q, k and the digits.

    Returns y [B, Tq, Dv] in v's dtype, and with return_details (index [B, H, Tq] int64,
    lcp [B, H, Tq] int64, sim [B, H, Tq] float64).
    """
    B, H, Hkv, Tq, Tk, K, Dv = check_inputs(q_digits, k_digits, v, 2.0, p, causal, key_padding_mask)
    check_top1_vectors(q, k, B, H, Hkv, Tq, Tk)
    f64, dev = torch.float64, v.device
    kk, kd = _repeat_kv(k.detach().to(f64), H), _repeat_kv(k_digits.long(), H)
    kn = kk.norm(dim=-1) + 1e-12  # [B, H, Tk]
    keep = torch.ones(B, Tk, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask
    step = max(1, CHUNK_ELEMS // max(1, B * H * Tk * max(K, q.shape[-1])))
    idx, lcps, sims = [], [], []
    jj = torch.arange(Tk, device=dev)
    for i0 in range(0, Tq, step):
        qq = q[:, :, i0:i0 + step].detach().to(f64)
        c = qq.shape[2]
        lcp = (q_digits[:, :, i0:i0 + c, None, :].long() == kd[:, :, None]).long().cumprod(-1).sum(-1)
        sim = (qq @ kk.transpose(-1, -2)) / ((qq.norm(dim=-1) + 1e-12)[..., None] * kn[:, :, None, :])
        vis = keep[:, None, None, :].expand(B, H, c, Tk)
        if causal:
            pos = torch.arange(i0, i0 + c, device=dev) + (Tk - Tq)
            vis = vis & (jj[None, :] <= pos[:, None])
        lcp = torch.where(vis, lcp, -1)
        best = lcp.amax(-1, keepdim=True) if Tk else lcp.new_full((B, H, c, 1), -1)
        cand = vis & (lcp == best)
        rank = torch.where(cand, torch.where(sim.isnan(), math.inf, sim), -math.inf)
        top = rank.amax(-1, keepdim=True) if Tk else rank.new_full((B, H, c, 1), -math.inf)
        win = cand & (rank == top)
        j = torch.where(win, jj, Tk).amin(-1) if Tk else torch.full((B, H, c), Tk, device=dev)
        found = j < Tk
        j = torch.where(found, j, -1)
        s = torch.gather(sim, -1, j.clamp_min(0)[..., None]).squeeze(-1) if Tk else torch.zeros(B, H, c, dtype=f64,
                                                                                                    device=dev)
        idx.append(j)
        lcps.append(best.squeeze(-1))
        sims.append(torch.where(found, s, -math.inf))
    cat = (lambda ts, dt: torch.cat(ts, 2) if ts else torch.zeros(B, H, 0, dtype=dt, device=dev))
    index, lcp, sim = cat(idx, torch.int64), cat(lcps, torch.int64), cat(sims, f64)
    y = top1_values(v, index, sim)
    return (y, index, lcp, sim) if return_details else y


def check_top1_vectors(q, k, B, H, Hkv, Tq, Tk):
    """q [B, H, Tq, D] and k [B, Hkv, Tk, D] float tensors of one D matching the digits' shapes."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if q.dim() != 4 or tuple(q.shape[:3]) != (B, H, Tq):
        raise ValueError(f"q must have shape (B, H, Tq, D) = ({B}, {H}, {Tq}, D) like q_digits, got {tuple(q.shape)}")
    if k.dim() != 4 or tuple(k.shape) != (B, Hkv, Tk, q.shape[3]):
        raise ValueError(f"k must have shape (B, Hkv, Tk, D) = ({B}, {Hkv}, {Tk}, {q.shape[3]}) like k_digits and q, "
                         f"got {tuple(k.shape)}")


def top1_values(v, index, sim):
    """y [B, Tq, Dv]: the mean over the H heads of v[b, h // R, index[b, h, i]] (0 where index is -1,
    NaN where sim is NaN), summed in float32 (float64 for float64 v), in v's dtype."""
    B, Hkv, Tk, Dv = v.shape
    H, Tq = index.shape[1], index.shape[2]
    acc = acc_dtype(v.dtype)
    if Tk == 0 or H == 0:
        return v.new_zeros(B, Tq, Dv) + v.reshape(-1)[:0].sum()
    R = H // Hkv
    flat = index.clamp_min(0).reshape(B, Hkv, R * Tq, 1).expand(B, Hkv, R * Tq, Dv)
    got = torch.gather(v, 2, flat).view(B, H, Tq, Dv).to(acc)
    got = torch.where((index < 0)[..., None], torch.zeros((), dtype=acc, device=v.device), got)
    got = torch.where(sim.isnan()[..., None], torch.full((), math.nan, dtype=acc, device=v.device), got)
    return (got.sum(1) / H).to(v.dtype)


def num_codes(p, K):
    """N = sum_{l<=K} p^l, the number of prefix codes of K base-p digits (a Python int)."""
    return K + 1 if p == 1 else (p ** (K + 1) - 1) // (p - 1)


def _check_base(p):
    if isinstance(p, bool) or not isinstance(p, int):
        raise TypeError(f"p must be an int (the digit base), got {type(p).__name__}")
    if p < 2:
        raise ValueError(f"p must be >= 2 (the digit base), got {p}")


def check_digits(name, d, p, values=True):
    """TypeError unless d is an integer tensor with >= 1 dims; ValueError for a digit outside [0, p - 1],
    no digit (K = 0), or codes of more than 63 bits. values=False skips the range check (a read of
    d's min and max on the host: a GPU sync)."""
    _check_base(p)
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer digits, got {type(d).__name__}")
    if d.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype (hard digits; round soft digits with hard_digits), "
                        f"got {d.dtype}")
    if d.dim() < 1 or d.shape[-1] < 1:
        raise ValueError(f"{name} must have a last dim of K >= 1 digits, got shape {tuple(d.shape)}")
    K = d.shape[-1]
    if num_codes(p, K) > 1 << 63:
        raise ValueError(f"{name}: K={K} digits in base p={p} need prefix codes of more than 63 bits "
                         f"(sum of p**l for l <= K is {num_codes(p, K)} > 2**63); use fewer digits or a smaller p")
    if values and d.numel():
        lo, hi = torch.stack(torch.aminmax(d)).tolist()  # one reduction and one host read, not two of each
        if lo < 0 or hi > p - 1:
            raise ValueError(f"{name} must hold digits in [0, p - 1] = [0, {p - 1}], found min {lo} max {hi}")


def prefix_codes(digits, p, values=True):
    """[..., K] digits -> [..., K + 1] int64 trie-node codes of their prefixes (module docstring).
    values=False skips the digits' range check (a host read), for digits in range by construction."""
    check_digits("digits", digits, p, values)
    d = digits.to(torch.int64)
    value = torch.zeros(d.shape[:-1], dtype=torch.int64, device=d.device)
    codes, offset = [value], 0
    for level in range(1, d.shape[-1] + 1):
        offset += p ** (level - 1)
        value = value * p + d[..., level - 1]
        codes.append(value + offset)
    return torch.stack(codes, -1)


def level_weights(alpha, K, dtype, device=None):
    """w [K + 1]: w_0 = 1, w_l = alpha^(l-1) (alpha - 1), so that sum_{l<=lcp} w_l = alpha^lcp (alpha - 1
    rather than a difference of powers: no cancellation near alpha = 1). Negative for alpha < 1:
    read_codes uses them for alpha > 1 only."""
    w = [1.0] + [alpha ** (level - 1) * (alpha - 1) for level in range(1, K + 1)]
    return torch.tensor(w, dtype=dtype, device=device)


def read_codes(codes, p, alpha, dtype):
    """The buckets a query reads and their weights: codes [..., K + 1] (the query's prefix_codes) ->
    (read [..., M] codes, w [M] of dtype), so that sum_m w_m * table[read_m] = sum_j alpha^lcp_j v_j
    over the keys j in the table, with every w_m >= 0: nothing cancels.

    alpha > 1: the query's K + 1 prefix buckets with level_weights (w_l = alpha^(l-1) (alpha - 1) >= 0;
    a key with lcp L lies in buckets 0..L, whose weights sum to alpha^L).
    alpha <= 1 (those weights are negative or zero, and a sum of size 1 cancelling to alpha^K loses
    everything when alpha^K is below the dtype's epsilon): disjoint buckets, each key in exactly one:
    for l < K the p - 1 siblings of the query's level-(l + 1) bucket (the keys whose first differing
    digit is digit l + 1, lcp l) with weight alpha^l, and the query's level-K bucket with weight
    alpha^K. M = K (p - 1) + 1 (K + 1 for p = 2).
    """
    K = codes.shape[-1] - 1
    if alpha > 1:
        return codes, level_weights(alpha, K, dtype, codes.device)
    child = codes[..., 1:, None]  # [..., K, 1]: the query's bucket at levels 1..K
    digit = torch.stack([(codes[..., level] - num_codes(p, level - 1)) % p for level in range(1, K + 1)], -1)[..., None]
    shift = torch.arange(1, p, device=codes.device)  # the other p - 1 digits, (digit + shift) mod p
    siblings = child - digit + (digit + shift) % p  # [..., K, p - 1]
    read = torch.cat([siblings.flatten(-2), codes[..., K:]], -1)
    w = [alpha ** level for level in range(K) for _ in range(p - 1)] + [alpha ** K]
    return read, torch.tensor(w, dtype=dtype, device=codes.device)


def _repeat_kv(t, H):
    return t if t.shape[1] == H else t.repeat_interleave(H // t.shape[1], dim=1)


def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


def check_inputs(q, k, v, alpha, p, causal, key_padding_mask, soft=False, values=True, names=None):
    """The checks every entry point shares; (B, H, Hkv, Tq, Tk, K, D). Errors name the argument
    (names: the (q, k) argument names, by default q_soft / k_soft or q_digits / k_digits).
    values=False: no digit range check (check_digits)."""
    qn, kn = names or (("q_soft", "k_soft") if soft else ("q_digits", "k_digits"))
    if soft:
        for name, t in ((qn, q), (kn, k)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    else:
        check_digits(qn, q, p, values)
        check_digits(kn, k, p, values)
    if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
        raise TypeError(f"v must be a floating-point tensor, got {v.dtype if isinstance(v, torch.Tensor) else type(v)}")
    for name, t in ((qn, q), (kn, k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, heads, T, .), got shape {tuple(t.shape)}")
    (B, H, Tq, K), (Bk, Hkv, Tk, Kk), D = q.shape, k.shape, v.shape[-1]
    if Kk != K:
        raise ValueError(f"{kn} must have K = {K} digits like {qn}, got shape {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (Bk, Hkv, Tk) or Bk != B:
        raise ValueError(f"v must have shape (B, Hkv, Tk, D) = ({B}, {Hkv}, {Tk}, D) from {qn} and {kn}, "
                         f"got {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{kn}: its {Hkv} heads must divide the {H} heads of {qn}")
    if causal and Tk < Tq and Tq > 1:
        raise ValueError(f"causal ultrametric attention needs Tk >= Tq (or Tq == 1), got Tq={Tq}, Tk={Tk}")
    if key_padding_mask is not None and (not isinstance(key_padding_mask, torch.Tensor)
                                         or key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (B, Tk)):
        raise ValueError(f"key_padding_mask must be a bool tensor of shape (B, Tk) = ({B}, {Tk}), got "
                         f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask))} "
                         f"{tuple(getattr(key_padding_mask, 'shape', ()))}")
    _check_alpha(alpha)
    return B, H, Hkv, Tq, Tk, K, D


def _finish(num, den, seen, out_dtype):
    """(y, lse) from the weighted sums: num [..., D], den [...], seen [...] (any visible key)."""
    y = num / den.clamp_min(CLAMP).unsqueeze(-1)
    lse = torch.where(seen, torch.log(den), torch.full_like(den, -math.inf))
    return y.to(out_dtype), lse


def read_buckets(sums, counts, rows, w):
    """Weighted table reads (read_codes): rows [..., M] -> (num [..., D], den [...], seen [...])."""
    num = (sums[rows] * w.unsqueeze(-1)).sum(-2)
    c = counts[rows]
    return num, (c.to(w.dtype) * w).sum(-1), (c > 0).any(-1)


def _row_ids(qc, kc, R):
    """Compress (key head, code) pairs to dense rows: (query rows, key rows, number of rows)."""
    B, Hkv, Tk, L = kc.shape
    H, Tq, M = qc.shape[1], qc.shape[2], qc.shape[3]
    g = torch.arange(B * Hkv, device=kc.device).view(B, Hkv, 1, 1)
    kp = torch.stack([g.expand(B, Hkv, Tk, L), kc], -1).reshape(B * Hkv * Tk * L, 2)
    qg = g.repeat_interleave(R, dim=1).expand(B, H, Tq, M)
    qp = torch.stack([qg, qc], -1).reshape(B * H * Tq * M, 2)
    uniq, inv = torch.unique(torch.cat([kp, qp]), dim=0, return_inverse=True)
    return inv[kp.shape[0]:].view(B, H, Tq, M), inv[: kp.shape[0]].view(B, Hkv, Tk, L), uniq.shape[0]


def ultrametric_attention(q_digits, k_digits, v, alpha=2.0, *, p=2, causal=True, key_padding_mask=None,
                          return_lse=False, chunk=64):
    """Hard-mode ultrametric attention (module docstring): y [B, H, Tq, D], and lse [B, H, Tq] if
    return_lse. chunk: positions per step of the causal scan (any value >= 1 gives the same result)."""
    B, H, Hkv, Tq, Tk, K, D = check_inputs(q_digits, k_digits, v, alpha, p, causal, key_padding_mask)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    acc, R = acc_dtype(v.dtype), H // Hkv
    qc, kc = prefix_codes(q_digits, p), prefix_codes(k_digits, p)
    qread, w = read_codes(qc, p, alpha, acc)
    qrow, krow, n_rows = _row_ids(qread, kc, R)
    keep = torch.ones(B, Tk, dtype=torch.bool, device=v.device) if key_padding_mask is None else key_padding_mask
    keep4 = keep.view(B, 1, Tk, 1)
    # a removed key adds zeros: where, not a product, so its NaN never enters
    vk = torch.where(keep4, v.to(acc), torch.zeros((), dtype=acc, device=v.device))
    sums = torch.zeros(n_rows, D, dtype=acc, device=v.device)
    counts = torch.zeros(n_rows, dtype=torch.int64, device=v.device)
    alpha_pow = torch.tensor([alpha ** level for level in range(K + 1)], dtype=acc, device=v.device)

    def add(j0, j1):  # keys at positions [j0, j1) into their K + 1 buckets
        rows = krow[:, :, j0:j1].reshape(-1)  # explicit sizes below: D may be 0
        sums.index_add_(0, rows, vk[:, :, j0:j1, None, :].expand(-1, -1, -1, K + 1, -1).reshape(rows.numel(), D))
        counts.index_add_(0, rows, keep4[:, :, j0:j1].expand(B, Hkv, -1, K + 1).reshape(-1).long())

    off = Tk - Tq
    if not causal or Tq == 0:
        add(0, Tk)
        num, den, seen = read_buckets(sums, counts, qrow, w)
    else:
        add(0, max(off, 0))
        parts = []
        for i0 in range(0, Tq, chunk):
            i1 = min(i0 + chunk, Tq)
            j0, j1 = off + i0, off + i1  # this chunk's key positions, == its queries' positions
            num, den, seen = read_buckets(sums, counts, qrow[:, :, i0:i1], w)
            if j1 > max(j0, 0):  # the chunk's own keys (off < 0 only for one decode query, Tk = 0)
                lcp = (qc[:, :, i0:i1, None, 1:] == _repeat_kv(kc[:, :, j0:j1], H)[:, :, None, :, 1:]).sum(-1)
                pos = torch.arange(i0, i1, device=v.device)
                vis = torch.arange(j0, j1, device=v.device)[None, :] <= (pos + off)[:, None]
                vis = vis & keep[:, None, None, j0:j1]  # [B, 1, c, c]
                W = torch.where(vis, alpha_pow[lcp], torch.zeros((), dtype=acc, device=v.device))  # [B, H, c, c]
                vc = _repeat_kv(vk[:, :, j0:j1], H)
                vc = torch.where(vis.unsqueeze(-1), vc[:, :, None], torch.zeros((), dtype=acc, device=v.device))
                num = num + (W.unsqueeze(-1) * vc).sum(3)  # a hidden key's NaN never enters
                den, seen = den + W.sum(-1), seen | vis.any(-1)
                add(j0, j1)
            parts.append((num, den, seen))
        num, den, seen = (torch.cat(t, dim=2) for t in zip(*parts))
    num = num + v.reshape(-1)[:0].sum()  # keeps y on v's graph when no key exists (Tk = 0)
    y, lse = _finish(num, den, seen, v.dtype)
    return (y, lse) if return_lse else y


class UltrametricDecodeState:
    """Running bucket sums and counts for one-token decode: O(K D) per token whatever the context.

    Rows of the table are allocated on first use through a dict keyed by (key head, code) (Python
    ints: no code range limits memory; one host sync per call, acceptable in a reference). Row 0
    stays zero and answers a code no key has. No gradient: v is detached (inference). The outputs
    equal ultrametric_attention with causal=True over every appended key, to rounding."""

    def __init__(self, batch, kv_heads, head_dim, K, *, p=2, alpha=2.0, dtype=torch.float32, device=None):
        _check_base(p)
        _check_alpha(alpha)
        if num_codes(p, K) > 1 << 63:
            raise ValueError(f"K={K} digits in base p={p} need prefix codes of more than 63 bits")
        self.B, self.Hkv, self.D, self.K, self.p, self.alpha = batch, kv_heads, head_dim, K, p, alpha
        self.dtype, self.acc = dtype, acc_dtype(dtype)
        self.sums = torch.zeros(64, head_dim, dtype=self.acc, device=device)
        self.counts = torch.zeros(64, dtype=torch.int64, device=device)
        self.rows = {}
        self.length = 0  # tokens appended

    def _rows_of(self, codes, heads, create):
        """codes [B, heads, T, K + 1] -> rows (same shape) of (b * Hkv + head // (heads // Hkv), code)."""
        B, _, T, L = codes.shape
        R = heads // self.Hkv
        flat, out = codes.tolist(), []
        for b in range(B):
            for h in range(heads):
                g = b * self.Hkv + h // R
                for t in range(T):
                    for c in flat[b][h][t]:
                        row = self.rows.get((g, c), 0)
                        if row == 0 and create:
                            row = self.rows[(g, c)] = len(self.rows) + 1
                        out.append(row)
        return torch.tensor(out, dtype=torch.int64, device=self.sums.device).view(B, heads, T, L)

    def append(self, k_digits, v, key_padding_mask=None):
        """Add T tokens: k_digits [B, Hkv, T, K], v [B, Hkv, T, D], key_padding_mask [B, T] (True = keep)."""
        q_like = torch.zeros(self.B, self.Hkv, 0, self.K, dtype=torch.int64, device=v.device)
        check_inputs(q_like, k_digits, v, self.alpha, self.p, False, key_padding_mask)
        if tuple(v.shape[:2]) != (self.B, self.Hkv) or v.shape[3] != self.D:
            raise ValueError(f"v must have shape ({self.B}, {self.Hkv}, T, {self.D}), got {tuple(v.shape)}")
        rows = self._rows_of(prefix_codes(k_digits, self.p), self.Hkv, True)
        while len(self.rows) + 1 > self.sums.shape[0]:  # grow by doubling: amortised O(1) per row
            self.sums = torch.cat([self.sums, torch.zeros_like(self.sums)])
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
        T, L = v.shape[2], self.K + 1
        keep = (torch.ones(self.B, T, dtype=torch.bool, device=v.device) if key_padding_mask is None
                else key_padding_mask).view(self.B, 1, T, 1)
        vk = torch.where(keep, v.detach().to(self.acc), torch.zeros((), dtype=self.acc, device=v.device))
        self.sums.index_add_(0, rows.reshape(-1), vk.unsqueeze(3).expand(-1, -1, -1, L, -1).reshape(rows.numel(), self.D))
        self.counts.index_add_(0, rows.reshape(-1), keep.expand(self.B, self.Hkv, T, L).reshape(-1).long())
        self.length += T

    def query(self, q_digits, return_lse=False):
        """Attend q_digits [B, H, Tq, K] over every appended key: y [B, H, Tq, D] (and lse)."""
        if not isinstance(q_digits, torch.Tensor) or q_digits.dim() != 4 or q_digits.shape[0] != self.B \
                or q_digits.shape[1] % self.Hkv or q_digits.shape[3] != self.K:
            raise ValueError(f"q_digits must have shape ({self.B}, H, Tq, {self.K}) with H a multiple of "
                             f"{self.Hkv}, got {tuple(getattr(q_digits, 'shape', ()))}")
        read, w = read_codes(prefix_codes(q_digits, self.p), self.p, self.alpha, self.acc)
        rows = self._rows_of(read, q_digits.shape[1], False)
        y, lse = _finish(*read_buckets(self.sums, self.counts, rows, w), self.dtype)
        return (y, lse) if return_lse else y

    def step(self, q_digits, k_digits, v, key_padding_mask=None, return_lse=False):
        """One decode token: append the key (k_digits [B, Hkv, 1, K], v [B, Hkv, 1, D]), then query
        q_digits [B, H, 1, K] (a query sees its own key, as in causal attention)."""
        self.append(k_digits, v, key_padding_mask)
        return self.query(q_digits, return_lse)


def check_lcp_beta(lcp_beta):
    """ValueError unless lcp_beta is a finite number >= 0 (inf would give inf * 0 = NaN at equal digits)."""
    if isinstance(lcp_beta, bool) or not isinstance(lcp_beta, (int, float)) or not 0 <= lcp_beta < math.inf:
        raise ValueError(f"lcp_beta must be a finite number >= 0, got {lcp_beta!r}")


def soft_lcp_attention(q_soft, k_soft, v, alpha=2.0, lcp_beta=32.0, *, causal=True, key_padding_mask=None,
                       return_lse=False):
    """The soft LCP kernel (module docstring): q_soft [B, H, Tq, K], k_soft [B, Hkv, Tk, K] float digits,
    v [B, Hkv, Tk, D] -> y [B, H, Tq, D] (and lse [B, H, Tq]). Dense, chunked over queries."""
    B, H, Hkv, Tq, Tk, K, D = check_inputs(q_soft, k_soft, v, alpha, 2, causal, key_padding_mask, soft=True)
    check_lcp_beta(lcp_beta)
    acc = acc_dtype(v.dtype)
    k, vr = _repeat_kv(k_soft.to(acc), H), _repeat_kv(v.to(acc), H)
    keep = torch.ones(B, Tk, dtype=torch.bool, device=v.device) if key_padding_mask is None else key_padding_mask
    step = max(1, CHUNK_ELEMS // max(1, B * H * Tk * max(K, D)))
    ys, lses = [], []
    for i0 in range(0, Tq, step):
        q = q_soft[:, :, i0:i0 + step].to(acc)
        match = torch.exp(-lcp_beta * (q.unsqueeze(3) - k.unsqueeze(2)).square())  # [B, H, c, Tk, K]
        lcp = torch.cumprod(match, -1).sum(-1)
        vis = keep[:, None, None, :].expand(B, H, q.shape[2], Tk)
        if causal:
            pos = torch.arange(i0, i0 + q.shape[2], device=v.device) + (Tk - Tq)
            vis = vis & (torch.arange(Tk, device=v.device)[None, :] <= pos[:, None])
        w = torch.where(vis, torch.pow(float(alpha), lcp), torch.zeros((), dtype=acc, device=v.device))
        vv = torch.where(vis.unsqueeze(-1), vr.unsqueeze(2), torch.zeros((), dtype=acc, device=v.device))
        y, lse = _finish((w.unsqueeze(-1) * vv).sum(3), w.sum(-1), vis.any(-1), v.dtype)
        ys.append(y)
        lses.append(lse)
    y = torch.cat(ys, 2) if ys else v.new_zeros(B, H, 0, D)
    y = y + v.reshape(-1)[:0].sum()
    lse = torch.cat(lses, 2) if lses else torch.zeros(B, H, 0, dtype=acc, device=v.device)
    return (y, lse) if return_lse else y
