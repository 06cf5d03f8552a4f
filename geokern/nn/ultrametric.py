"""UltrametricCausalSelfAttention: causal self-attention over LCP buckets of learned digits."""

import torch
from torch import nn

from geokern.ops.ultrametric import UltrametricCache, ultrametric_attention, ultrametric_decode_step_
from geokern.reference.ultrametric import _check_alpha, _check_base, check_lcp_beta


class UltrametricCausalSelfAttention(nn.Module):
    """model_guided_research's UltrametricCausalSelfAttention (spec section 3) on
    geokern.ultrametric_attention, in either of their modes: mode="hard" (their trie mode, the
    default) is O(T K D) instead of their O(T^2 K) dense soft kernel; mode="soft" (their kernel
    mode) is the soft LCP kernel, fused (O(T^2 K) work, O(T) memory on the Triton and CUDA backends).

    Per head, q and k (head_dim each) become K digits in base p through one learned bias-free
    map to_digits (nn.Linear(head_dim, K), weight [K, head_dim], shared by every head and by q
    and k): soft digits sigmoid(to_digits(x)) * (p - 1), hard digits round(soft) clamped to
    [0, p - 1]. Then y_i = sum_j alpha^lcp_ij v_j / max(sum_j alpha^lcp_ij, 1e-9) over the keys
    j <= i that key_padding_mask keeps (lcp: the number of leading digits q_i and k_j share),
    and the output projection. Defaults are the spec's: K = 8, p = 2, alpha = 2.0,
    lcp_beta = 32.0. mode="soft" uses the soft digits directly: lcp_ij = sum_l prod_{m<=l}
    exp(-lcp_beta (qs_im - ks_jm)^2), every parameter gets a gradient, and no cache exists (a
    soft key has no bucket; decode recomputes, or use the hard mode).

    Gradient: digits are discrete, so hard mode sends gradient to v only (c_v, c_proj and x
    through v); c_q, c_k and to_digits get none. straight_through=True passes the soft digits
    as q_soft / k_soft: y keeps its hard value and its gradient to the digits is the soft LCP
    kernel's at lcp_beta, which reaches to_digits, c_q and c_k (a dense O(T^2 K) backward).

    Choices where the spec is silent:
    - constructor (d_model, n_heads, n_kv_heads=n_heads for grouped-query heads, K, p, alpha,
      lcp_beta, straight_through, backend); projections named as nanochat's modules (c_q, c_k,
      c_v, c_proj, nn.Linear without bias, like TropicalCausalSelfAttention);
    - no rotary embedding and no q / k norm: the digits hash content; add position upstream;
    - alpha is fixed (a Python float; the op and kernels take it as a constant and give it no
      gradient); straight_through defaults to False (the hard path's cost);
    - hard digits round half to even (torch.round, as ultrametric_hard_digits); a NaN soft digit
      becomes digit 0 (its token's v is NaN too, and reaches the outputs that see it);
    - straight_through applies to the hard mode only (soft mode is differentiable as it is).

    forward(x, key_padding_mask=None, *, cache=None): x [B, T, d_model], key_padding_mask [B, T]
    bool (True = keep; padded queries are computed, drop them). Without a cache it reads no
    tensor on the host (Triton backend; the digit check is skipped, the digits are in range by
    construction), so it compiles with torch.compile(fullgraph=True). With cache (new_cache(B)),
    x holds the next T tokens: each attends to every earlier token in the cache and causally
    within x, then enters the cache (O(K D) per token; the attention output carries no gradient:
    decode under torch.no_grad()). One token per call is ultrametric_decode_step_; T > 1 merges
    the cache's read with the op over x by their log-sum-exps. The cache checks the digits on the
    host (except under CUDA-graph capture). backend is passed to the op and the cache ("torch",
    "triton", "cuda", None = auto; the decode cache has no soft mode).
    """

    def __init__(self, d_model, n_heads, *, n_kv_heads=None, K=8, p=2, alpha=2.0, lcp_beta=32.0,
                 straight_through=False, mode="hard", backend=None, device=None, dtype=None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        for name, x in (("d_model", d_model), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("K", K)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"UltrametricCausalSelfAttention: {name} must be an int >= 1, got {x!r}")
        if d_model % n_heads:
            raise ValueError(f"UltrametricCausalSelfAttention: d_model={d_model} must be divisible by "
                             f"n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"UltrametricCausalSelfAttention: n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        try:
            _check_base(p)
            _check_alpha(alpha)
            check_lcp_beta(lcp_beta)
        except (TypeError, ValueError) as e:
            raise type(e)(f"UltrametricCausalSelfAttention: {e}") from None
        if mode not in ("hard", "soft"):
            raise ValueError(f"UltrametricCausalSelfAttention: mode must be 'hard' or 'soft', got {mode!r}")
        if mode == "soft" and straight_through:
            raise ValueError("UltrametricCausalSelfAttention: straight_through is for mode='hard' (the soft mode "
                             "is differentiable in its digits as it is)")
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, d_model // n_heads
        self.K, self.p, self.alpha, self.lcp_beta = K, p, float(alpha), float(lcp_beta)
        self.straight_through, self.mode, self.backend = bool(straight_through), mode, backend
        self.c_q = nn.Linear(d_model, d_model, bias=False, **kw)
        self.c_k = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False, **kw)
        self.c_v = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False, **kw)
        self.c_proj = nn.Linear(d_model, d_model, bias=False, **kw)
        self.to_digits = nn.Linear(self.head_dim, K, bias=False, **kw)

    def _heads(self, x):
        """x [B, T, d_model] -> q [B, H, T, hd], k, v [B, Hkv, T, hd]."""
        B, T, _ = x.shape
        q, k, v = (c(x).view(B, T, -1, self.head_dim).transpose(1, 2) for c in (self.c_q, self.c_k, self.c_v))
        return q, k, v

    def _soft_digits(self, t):
        return torch.sigmoid(self.to_digits(t)) * (self.p - 1)

    def _digits(self, t):
        """(soft, hard) digits of t [..., hd]; hard by the ops' rounding without their NaN check (a host read)."""
        soft = self._soft_digits(t)
        hard = torch.round(torch.nan_to_num(soft.detach(), nan=0.0)).clamp(0, self.p - 1).to(torch.int64)
        return soft, hard

    def new_cache(self, batch, *, device=None):
        """An empty UltrametricCache for this layer: batch rows, its kv heads, digits and alpha
        (hard mode only)."""
        self._no_soft_cache()
        device = device if device is not None else self.c_q.weight.device
        return UltrametricCache(batch, self.n_kv_heads, self.head_dim, self.K, p=self.p, alpha=self.alpha,
                                device=device, backend=self.backend)

    def forward(self, x, key_padding_mask=None, *, cache=None):
        if x.dim() != 3 or x.shape[2] != self.d_model:
            raise ValueError(f"UltrametricCausalSelfAttention: x must be (B, T, {self.d_model}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        q, k, v = self._heads(x)
        if self.mode == "soft":
            if cache is not None:
                self._no_soft_cache()
            y = ultrametric_attention(self._soft_digits(q), self._soft_digits(k), v, alpha=self.alpha, causal=True, key_padding_mask=key_padding_mask,
                                      mode="soft", lcp_beta=self.lcp_beta, backend=self.backend)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, self.d_model))
        (qs, qd), (ks, kd) = self._digits(q), self._digits(k)
        if cache is not None:
            y = self._extend(cache, qd, kd, v, key_padding_mask).to(x.dtype)
        else:
            st = self.straight_through
            y = ultrametric_attention(qd, kd, v, alpha=self.alpha, p=self.p, causal=True,
                                      key_padding_mask=key_padding_mask, q_soft=qs if st else None,
                                      k_soft=ks if st else None, lcp_beta=self.lcp_beta, check_digits=False,
                                      backend=self.backend)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.d_model))

    def _no_soft_cache(self):
        if self.mode == "soft":
            raise ValueError("UltrametricCausalSelfAttention: mode='soft' has no decode cache (a soft digit has "
                             "no bucket); call it on the whole sequence, or use mode='hard'")

    @torch.no_grad()
    def _extend(self, cache, qd, kd, v, keep):
        """The new tokens against the cache, then into it: y [B, H, T, hd] float32."""
        if qd.shape[2] == 1:
            return ultrametric_decode_step_(cache, qd, kd, v, key_padding_mask=keep)
        # T > 1: the cache's keys (all earlier) and the chunk's own (causal) are two disjoint
        # key sets; each part's y is its weighted mean, merged by its weight sum exp(lse)
        y0, l0 = cache.query(qd, return_lse=True)
        y1, l1 = ultrametric_attention(qd, kd, v, alpha=self.alpha, p=self.p, causal=True, key_padding_mask=keep,
                                       return_lse=True, check_digits=False, backend=self.backend)
        m = torch.maximum(l0, l1).clamp_min(-1e30)  # finite: a query with no key anywhere gives 0, not NaN
        w0, w1 = torch.exp(l0 - m).unsqueeze(-1), torch.exp(l1 - m).unsqueeze(-1)
        y = (w0 * y0 + w1 * y1.float()) / (w0 + w1).clamp_min(1e-30)
        cache.append(kd, v, keep)
        return y

    def extra_repr(self):
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, K={self.K}, "
                f"p={self.p}, alpha={self.alpha}, mode={self.mode}, straight_through={self.straight_through}")
