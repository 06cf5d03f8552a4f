"""TropicalCausalSelfAttention: a drop-in for model_guided_research's module of that name."""

import torch
import torch.nn.functional as F
from torch import nn

from geokern.ops.tropical import tropical_attention
from geokern.reference.tropical import gauge


def apply_rotary_emb(x, cos, sin):
    """Rotary embedding on (B, T, H, D) as nanochat applies it: the two halves of D are
    rotated as pairs (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos); cos and sin have
    last dim D / 2 and broadcast over the rest."""
    if x.ndim != 4:
        raise ValueError(f"apply_rotary_emb: x must be (B, T, H, D), got shape {tuple(x.shape)}")
    if x.shape[3] % 2:
        raise ValueError(f"apply_rotary_emb: the head dim must be even, got shape {tuple(x.shape)}")
    h = x.shape[3] // 2
    if cos.shape[-1] != h or sin.shape[-1] != h:
        raise ValueError(f"apply_rotary_emb: cos and sin need last dim {h}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3).to(x.dtype)


def attention_heads(mod, x, cos_sin, kv_cache=None):
    """(q, k, v) as (B, H, T, D) / (B, Hkv, Tk, D) for an attention module in nanochat's shape
    (c_q / c_k / c_v, n_head, n_kv_head, head_dim, layer_idx): the projections, rotary and
    RMS-normed q and k, then the KV cache's keys and values when one is given."""
    B, T, _ = x.shape
    q = mod.c_q(x).view(B, T, mod.n_head, mod.head_dim)
    k = mod.c_k(x).view(B, T, mod.n_kv_head, mod.head_dim)
    v = mod.c_v(x).view(B, T, mod.n_kv_head, mod.head_dim)
    cos, sin = cos_sin
    q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
    q, k = F.rms_norm(q, (mod.head_dim,)), F.rms_norm(k, (mod.head_dim,))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kv_cache is not None:
        k, v = kv_cache.insert_kv(mod.layer_idx, k, v)
    return q, k, v


class TropicalCausalSelfAttention(nn.Module):
    """Causal self-attention with max-plus scores and values, on the fused kernel.

    Same constructor and forward as model_guided_research's
    `nanochat.tropical_attention_torch.TropicalCausalSelfAttention`, so a model swaps one
    for the other and, with the same weights, gets the same output:

    - config: n_head, n_kv_head, n_embd (head_dim = n_embd // n_head), and optional
      tropical_gauge_fix (True), tropical_score_center (True), tropical_record_margins
      (False); layer_idx selects the layer in a KV cache.
    - parameters c_q, c_k, c_v, c_proj (nn.Linear without bias, their shapes and names,
      so state dicts load either way); non-persistent buffers tropical_gamma_head_mean,
      tropical_gamma_head_min, tropical_gamma_min filled when margins are recorded.
    - forward(x, cos_sin, kv_cache): x (B, T, n_embd); cos_sin = (cos, sin) for the
      rotary embedding; kv_cache None or an object with insert_kv(layer_idx, k, v)
      returning the cached (k, v) so far (nanochat's KVCache). Causal masking follows
      their causal_attn_mask (prefill, one-token decode, chunked decode).

    Steps as theirs: projections, rotary on q and k, RMS norm of q and k, the KV cache,
    tropical attention with gauge fixes and score centring (grouped-query heads are read
    in place rather than repeated), output projection, and a final gauge fix. Their
    finite-beta smoothing (config.semiring_beta) and the "nsa" parameterization are not
    supported: they raise. `backend` picks the kernel (default: auto).
    """

    def __init__(self, config, layer_idx, *, backend=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"TropicalCausalSelfAttention: need n_head | n_embd and n_kv_head | n_head, got "
                             f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}")
        self.head_dim = self.n_embd // self.n_head
        self.tropical_gauge_fix = bool(getattr(config, "tropical_gauge_fix", True))
        self.tropical_score_center = bool(getattr(config, "tropical_score_center", True))
        self.tropical_record_margins = bool(getattr(config, "tropical_record_margins", False))
        if getattr(config, "semiring_beta", None) is not None:
            raise NotImplementedError("TropicalCausalSelfAttention: finite semiring_beta (Maslov smoothing) is not "
                                      "supported by geokern's fused kernels; use semiring_beta=None")
        if getattr(config, "parameterization", "current") != "current":
            raise NotImplementedError(f"TropicalCausalSelfAttention: parameterization "
                                      f"{config.parameterization!r} is not supported (only 'current')")
        self.backend = backend
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)
        for name, shape in (("tropical_gamma_head_mean", (self.n_head,)), ("tropical_gamma_head_min", (self.n_head,)),
                            ("tropical_gamma_min", ())):
            self.register_buffer(name, torch.full(shape, float("nan"), dtype=torch.float32), persistent=False)

    def forward(self, x, cos_sin, kv_cache):
        B, T, _ = x.shape
        q, k, v = attention_heads(self, x, cos_sin, kv_cache)
        out = tropical_attention(q, k, v, causal=True, gauge_fix=self.tropical_gauge_fix,
                                 score_center=self.tropical_score_center,
                                 return_margins=self.tropical_record_margins, backend=self.backend)
        if self.tropical_record_margins:
            y, gamma = out
            self._record(gamma)
        else:
            y = out
        y = self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))
        return gauge(y) if self.tropical_gauge_fix else y

    @torch.no_grad()
    def _record(self, gamma):
        g = gamma.float()
        finite = torch.isfinite(g)
        count = finite.sum(dim=(0, 2)).float()
        mean = g.masked_fill(~finite, 0.0).sum(dim=(0, 2)) / count.clamp_min(1.0)
        self.tropical_gamma_head_mean.copy_(mean.masked_fill(count == 0, float("nan")))
        self.tropical_gamma_head_min.copy_(g.amin(dim=(0, 2)))
        self.tropical_gamma_min.copy_(g.amin())
