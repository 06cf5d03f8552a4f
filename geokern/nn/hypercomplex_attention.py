"""QuaternionCausalSelfAttention and OctonionCausalSelfAttention on the fused kernels
(geokern.quaternion_attention / geokern.octonion_attention, issue #20)."""

from torch import nn

from geokern.nn.tropical import attention_heads
from geokern.ops.hypercomplex_attention import octonion_attention, quaternion_attention


class _HypercomplexCausalSelfAttention(nn.Module):
    N = 0
    _op = None

    def __init__(self, config, layer_idx, *, backend=None):
        super().__init__()
        name, n = type(self).__name__, self.N
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.n_embd = config.n_head, config.n_kv_head, config.n_embd
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"{name}: need n_head | n_embd and n_kv_head | n_head, got n_embd={self.n_embd}, "
                             f"n_head={self.n_head}, n_kv_head={self.n_kv_head}")
        self.head_dim = self.n_embd // self.n_head
        if self.head_dim % n or self.head_dim % 2:
            raise ValueError(f"{name}: the head dim n_embd / n_head = {self.head_dim} must be a multiple of {n} "
                             f"({n}-component channels) and even (rotary)")
        self.backend = backend
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache):
        B, T, _ = x.shape
        q, k, v = attention_heads(self, x, cos_sin, kv_cache)
        y = type(self)._op(q, k, v, causal=True, backend=self.backend)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))


class QuaternionCausalSelfAttention(_HypercomplexCausalSelfAttention):
    """Causal self-attention with quaternion rotor gating (spec section 4), on the fused kernel.

    Constructor and forward as TropicalCausalSelfAttention (nanochat's protocol):
    config with n_head, n_kv_head, n_embd (head_dim = n_embd // n_head, a multiple of 4);
    layer_idx selects the layer in a KV cache; forward(x, cos_sin, kv_cache) with x (B, T, n_embd),
    cos_sin = (cos, sin) for the rotary embedding, kv_cache None or an object with
    insert_kv(layer_idx, k, v) returning the cached (k, v) so far. Causal masking follows their
    causal_attn_mask (prefill, one-token decode, chunked decode).

    Steps: q, k, v projections (c_q, c_k, c_v: nn.Linear without bias), rotary on q and k, RMS
    norm of q and k over the head dim, the KV cache, quaternion_attention (scores from those q, k;
    the rotors are their per-channel unit quaternions; grouped-query heads read in place), output
    projection c_proj. The spec names no hypercomplex projection for these modules, so the
    projections are real nn.Linear maps (QuaternionLinear is the drop-in where a model wants one).
    `backend` picks the kernel (default: auto)."""

    N = 4
    _op = staticmethod(quaternion_attention)


class OctonionCausalSelfAttention(_HypercomplexCausalSelfAttention):
    """As QuaternionCausalSelfAttention with octonion_attention, y_i = sum_j p_ij ((q^_i conj(k^_j)) v_j)
    per octonion channel (head_dim a multiple of 8)."""

    N = 8
    _op = staticmethod(octonion_attention)
