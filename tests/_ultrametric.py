"""What the ultrametric test modules share: independent float64 definitions (a dense alpha^LCP
brute force and a per-query trie walk, the spec's two readings) and input makers."""

import torch
from conftest import DEVICE


def brute(qd, kd, v, alpha, causal=True, keep=None):
    """(y, lse) in float64: w_ij = alpha ** lcp_ij over visible keys, y = w v / max(sum w, 1e-9).
    Over chunks of queries, so the [.., Tq, Tk, max(K, D)] pair tensors stay near 2^24 elements
    (T = 1000 tests share the GPU with other test processes)."""
    B, H, Tq, K = qd.shape
    Tk = kd.shape[2]
    kd, v = (t.repeat_interleave(H // kd.shape[1], dim=1) for t in (kd, v.double()))
    dev, f64 = qd.device, torch.float64
    zero = torch.zeros((), dtype=f64, device=dev)
    step = max(1, (1 << 24) // max(1, B * H * Tk * max(K, v.shape[-1])))
    ys, lses = [], []
    for i0 in range(0, Tq, step):
        q = qd[:, :, i0:i0 + step]
        lcp = (q[:, :, :, None, :] == kd[:, :, None, :, :]).long().cumprod(-1).sum(-1)
        w = torch.tensor(alpha, dtype=f64, device=dev) ** lcp.double()
        vis = torch.ones(B, 1, q.shape[2], Tk, dtype=torch.bool, device=dev)
        if causal:
            qpos = torch.arange(i0, i0 + q.shape[2], device=dev)[:, None] + Tk - Tq
            vis = vis & (torch.arange(Tk, device=dev)[None, :] <= qpos)
        if keep is not None:
            vis = vis & keep[:, None, None, :]
        w = torch.where(vis, w, zero)
        den = w.sum(-1)
        y = torch.where(vis[..., None], w[..., None] * v[:, :, None], zero).sum(3)
        ys.append(y / den.clamp_min(1e-9)[..., None])
        lses.append(torch.log(den))
    if not ys:  # no queries
        return v.new_zeros(B, H, 0, v.shape[-1]), v.new_zeros(B, H, 0)
    return torch.cat(ys, 2), torch.cat(lses, 2)


def digits(B, H, T, K, p, kind="random"):
    if kind == "equal":
        return torch.full((B, H, T, K), p - 1, dtype=torch.int64, device=DEVICE)
    if kind == "distinct":  # every token a different digit string (base-p expansion of a permutation)
        n = torch.randperm(p ** K, device=DEVICE)[: B * H * T].view(B, H, T, 1)
        return (n // p ** torch.arange(K - 1, -1, -1, device=DEVICE)) % p
    return torch.randint(0, p, (B, H, T, K), device=DEVICE)


def visible(B, Tq, Tk, causal, keep):
    """[B, Tq, Tk] bool: query i (at position Tk - Tq + i) sees key j."""
    vis = torch.ones(B, Tq, Tk, dtype=torch.bool, device=DEVICE)
    if causal:
        pos = torch.arange(Tq, device=DEVICE) + (Tk - Tq)
        vis = vis & (torch.arange(Tk, device=DEVICE)[None, :] <= pos[:, None])
    if keep is not None:
        vis = vis & keep[:, None, :]
    return vis


def trie_walk(qd, kd, v, alpha, causal=True, keep=None):
    """float64, one query at a time: the visible keys' prefix sums S_l / counts C_l along the
    query's trie path, y = sum_l alpha^l (S_l - S_{l+1}) / sum_l alpha^l (C_l - C_{l+1})."""
    B, H, Tq, K = qd.shape
    R = H // kd.shape[1]
    vis = visible(B, Tq, kd.shape[2], causal, keep)
    y = torch.zeros(B, H, Tq, v.shape[3], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kk, vv = kd[b, h // R].tolist(), v[b, h // R].double().cpu()
            for i in range(Tq):
                q = qd[b, h, i].tolist()
                S = [torch.zeros(v.shape[3], dtype=torch.float64) for _ in range(K + 2)]
                Cn = [0] * (K + 2)
                for j in range(kd.shape[2]):
                    if vis[b, i, j]:
                        n = 0
                        while n < K and kk[j][n] == q[n]:
                            n += 1
                        for level in range(n + 1):
                            S[level] = S[level] + vv[j]
                            Cn[level] += 1
                num = sum(alpha ** lv * (S[lv] - S[lv + 1]) for lv in range(K + 1))
                den = sum(alpha ** lv * (Cn[lv] - Cn[lv + 1]) for lv in range(K + 1))
                y[b, h, i] = num / max(den, 1e-9)
    return y.to(DEVICE)


def soft_brute(qs, ks, v, alpha, beta, causal=True, keep=None):
    """(y, lse) in float64 from the spec's soft LCP formula, dense (small sizes only):
    match = exp(-beta (q - k)^2) per digit, lcp = sum_l prod_{m<=l} match, w = alpha^lcp over the
    visible keys, y = w v / max(sum w, 1e-9), lse = log(sum w). Differentiable in all three."""
    B, H, Tq, K = qs.shape
    R = H // ks.shape[1]
    ks, v = ks.double().repeat_interleave(R, 1), v.double().repeat_interleave(R, 1)
    match = torch.exp(-beta * (qs.double()[:, :, :, None] - ks[:, :, None]).square())
    lcp = torch.zeros(match.shape[:-1], dtype=torch.float64, device=qs.device)
    run = torch.ones_like(lcp)
    for level in range(K):
        run = run * match[..., level]
        lcp = lcp + run
    vis = visible(B, Tq, ks.shape[2], causal, keep)[:, None]
    w = torch.where(vis, torch.tensor(float(alpha), dtype=torch.float64) ** lcp, torch.zeros((), dtype=torch.float64))
    den = w.sum(-1)
    y = torch.where(vis[..., None], w[..., None] * v[:, :, None], torch.zeros((), dtype=torch.float64)).sum(3)
    return y / den.clamp_min(1e-9)[..., None], torch.log(den)
