"""The ultrametric decode state: UltrametricCache and ultrametric_decode_step_ (re-exported by
geokern.ops.ultrametric, whose docstring holds the family's choices).

Backends: "torch" (index_add_ / gathers on the tables, the reference's read_codes /
read_buckets / _finish), "triton" (kernels/ultrametric: the scan's summary and read kernels) and
"cuda" (csrc/ultrametric: one warp per key or query). "auto" takes Triton for CUDA tensors: the
CUDA kernels are not yet measured against it, and auto picks them only once they are faster.
"""

import torch

from geokern import _backend
from geokern._checks import host_reads_allowed
from geokern.kernels import ultrametric as tk
from geokern.ops._registry import alert_nondeterministic, cuda_op, triton_op
from geokern.reference import ultrametric as ref

__all__ = ["UltrametricCache", "ultrametric_decode_step_"]

_PREFER = ("triton",)  # not "cuda" until measured faster (module docstring)


# ---- the torch backend: the class's own and the CUDA ops' CPU implementation --------


def _rows(digits, p, N, Hkv, alpha=None):
    """[B, heads, T, K] -> table rows [B, heads, T, K + 1] (group * N + code) of a table [B * Hkv,
    N, ...]; with alpha, the rows a query reads and their weights (reference.ultrametric.read_codes)
    instead. Digits are clamped as the kernels clamp them."""
    B, heads = digits.shape[:2]
    codes = ref.prefix_codes(digits.long().clamp(0, p - 1), p, values=False)  # clamped: no host check
    g = torch.arange(B * Hkv, device=digits.device).view(B, Hkv, 1, 1).repeat_interleave(heads // Hkv, dim=1)
    if alpha is not None:
        read, w = ref.read_codes(codes, p, alpha, torch.float32)
        return read + g * N, w
    return codes + g * N


def _bad(digits, p):
    """[B, heads, T] bool: rows with a digit outside [0, p - 1], computed on the device (no host
    read): the kernels' NaN marking (UltrametricCache's docstring)."""
    return ((digits < 0) | (digits >= p)).any(-1)


def _cache_append_torch(tab, cnt, k_digits, v, keep, p):
    G, N, D = tab.shape
    B, Hkv, T, K = k_digits.shape
    keep = torch.ones(B, T, dtype=torch.bool, device=v.device) if keep is None else keep
    keep4 = keep.view(B, 1, T, 1)
    rows = _rows(k_digits, p, N, Hkv).reshape(-1)
    vk = torch.where(_bad(k_digits, p).unsqueeze(-1), float("nan"), v.float())
    # a padded key adds zeros: where, not a product, so its NaN never enters
    vk = torch.where(keep4, vk, 0.0).unsqueeze(3).expand(-1, -1, -1, K + 1, -1)
    tab.view(G * N, D).index_add_(0, rows, vk.reshape(rows.numel(), D))
    cnt.view(G * N).index_add_(0, rows, keep4.expand(B, Hkv, T, K + 1).reshape(-1).int())


def _cache_query_torch(tab, cnt, q_digits, y, lse, alpha, p):
    G, N, D = tab.shape
    rows, w = _rows(q_digits, p, N, G // q_digits.shape[0], alpha)
    num, den, seen = ref.read_buckets(tab.view(G * N, D), cnt.view(G * N), rows, w)
    yy, ll = ref._finish(num, den, seen, torch.float32)
    bad = _bad(q_digits, p)
    y.copy_(torch.where(bad.unsqueeze(-1), float("nan"), yy))
    lse.copy_(torch.where(bad, float("nan"), ll))


def _cache_append_fake(tab, cnt, k_digits, v, keep, p):
    return None


def _cache_query_fake(tab, cnt, q_digits, y, lse, alpha, p):
    return None


def _cache_append_triton(
    tab: torch.Tensor, cnt: torch.Tensor, k_digits: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, p: int,
) -> None:
    tk.ultrametric_cache_append(tab, cnt, k_digits, v, keep, p)


def _cache_query_triton(
    tab: torch.Tensor, cnt: torch.Tensor, q_digits: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, alpha: float,
    p: int,
) -> None:
    tk.ultrametric_cache_query(tab, cnt, q_digits, y, lse, alpha, p)


# (append, query) per kernel backend; the CUDA pair is None without geokern._C
_KERNELS = {
    "triton": (
        triton_op("ultrametric_cache_append_triton", _cache_append_triton, mutates_args=("tab", "cnt")),
        triton_op("ultrametric_cache_query_triton", _cache_query_triton, mutates_args=("y", "lse")),
    ),
    "cuda": (
        cuda_op("ultrametric_cache_append_cuda", _cache_append_fake, _cache_append_torch),
        cuda_op("ultrametric_cache_query_cuda", _cache_query_fake, _cache_query_torch),
    ),
}


def _backend_for(backend, device):
    if _backend.requested(backend) == "cuda" and device.type != "cuda":
        raise RuntimeError(f"UltrametricCache: backend='cuda' needs a CUDA device= for the tables, got device={device} "
                           "(use backend='torch' on the CPU)")
    return _backend.resolve("UltrametricCache", backend, device, _PREFER)


class UltrametricCache:
    """The constant-cost decode state of one attention layer: running bucket sums tab
    [B * Hkv, N, D] float32 and counts cnt [B * Hkv, N] int32, one row per prefix code (N =
    sum_{l<=K} p^l <= 2^16: dense tables). Appending a key adds its v to its K + 1 prefix rows;
    a query reads its K + 1 rows: O(K D) per token whatever the context length, in place, no host
    synchronisation, so a decode step can be captured in a CUDA graph (pass out= buffers to
    allocate nothing per step). Equal to ultrametric_attention over every appended key (float32
    sums: rounding grows with the context as any running float32 sum does). No gradient.

    backend: "triton", "cuda" (csrc/ultrametric; v float16 / bfloat16 / float32) or "torch" (torch
    index_add_ / gathers on the same tables); "auto" takes Triton for CUDA tensors (the CUDA
    kernels are not yet measured faster), the torch backend for CPU tensors. The Triton and CUDA
    appends add with float32 atomics: under torch.use_deterministic_algorithms(True) they raise as
    torch's nondeterministic ops do (backend='torch' is deterministic).

    Digits outside [0, p - 1]: append, query and ultrametric_decode_step_ do not read the digits
    on the host by default (check_digits=False), since on a GPU that read is a device-to-host copy
    and a stream sync per call (226 us of an 8.8 us CUDA decode step on the H100, issue #16), and
    no sync-free host check can raise for a tensor the host has not read. Instead every backend
    marks them on the device, so a bad digit is never a silently wrong answer:
    - a query with an out-of-range digit gets y and lse NaN (that query row only);
    - a kept key with an out-of-range digit is added as NaN values: every query of its (batch, key
      head) group from then on reads y NaN (lse stays the log of the weight sum), until reset().
    check_digits=True reads the digits' range on the host first and raises ValueError naming the
    argument and the range (a sync on a GPU; skipped under CUDA-graph capture and torch.compile)."""

    def __init__(self, batch, kv_heads, head_dim, K, *, p=2, alpha=2.0, device=None, backend=None):
        for name, x, lo in (("batch", batch, 1), ("kv_heads", kv_heads, 1), ("head_dim", head_dim, 1), ("K", K, 1)):
            if isinstance(x, bool) or not isinstance(x, int) or x < lo:
                raise ValueError(f"UltrametricCache: {name} must be an int >= {lo}, got {x!r}")
        ref._check_base(p)
        ref._check_alpha(alpha)
        self.N = ref.num_codes(p, K)
        if self.N > tk.MAX_CODES:
            raise ValueError(f"UltrametricCache: dense tables hold at most {tk.MAX_CODES} (2**16) prefix codes; p={p}, "
                             f"K={K} need {self.N} (use reference.ultrametric.UltrametricDecodeState)")
        self.B, self.Hkv, self.D, self.K, self.p, self.alpha = batch, kv_heads, head_dim, K, p, float(alpha)
        device = torch.device(device or "cpu")
        self.backend = _backend_for(backend, device)
        self.tab = torch.zeros(batch * kv_heads, self.N, head_dim, dtype=torch.float32, device=device)
        self.cnt = torch.zeros(batch * kv_heads, self.N, dtype=torch.int32, device=device)
        self.length = 0  # tokens appended through append (eager bookkeeping; not updated in a graph replay)

    def reset(self):
        self.tab.zero_()
        self.cnt.zero_()
        self.length = 0

    def _check(self, name, digits, heads, T, v=None, mask=None, check_digits=False):
        if not isinstance(digits, torch.Tensor) or digits.dtype not in ref.INT_DTYPES or digits.dim() != 4 \
                or digits.shape[0] != self.B or digits.shape[3] != self.K or (heads and digits.shape[1] != heads) \
                or digits.shape[1] % self.Hkv or (T is not None and digits.shape[2] != T):
            raise ValueError(f"UltrametricCache: {name} must be an integer tensor ({self.B}, "
                             f"{heads or f'a multiple of {self.Hkv}'}, {T or 'T'}, {self.K}), got "
                             f"{getattr(digits, 'dtype', type(digits).__name__)} {tuple(getattr(digits, 'shape', ()))}")
        if digits.device != self.tab.device:
            raise ValueError(f"UltrametricCache: {name} is on {digits.device}, the cache on {self.tab.device}")
        if check_digits is not True and check_digits is not False:
            raise TypeError(f"UltrametricCache: check_digits must be a bool, got {check_digits!r}")
        if check_digits and host_reads_allowed(digits):  # opt-in: a host sync (the class docstring)
            try:
                ref.check_digits(name, digits, self.p)
            except ValueError as e:
                raise ValueError(f"UltrametricCache: {e}") from None
        if v is not None:
            want = (self.B, self.Hkv, digits.shape[2], self.D)
            if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point or tuple(v.shape) != want \
                    or v.device != self.tab.device:
                raise ValueError(f"UltrametricCache: v must be a float tensor {want} on {self.tab.device}, got "
                                 f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
            if self.backend == "cuda" and v.dtype == torch.float64:
                raise ValueError("UltrametricCache: the CUDA backend takes float16 / bfloat16 / float32 v, got "
                                 "float64 (the tables are float32: pass v.float(), or use backend='torch')")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or tuple(mask.shape) != (self.B, digits.shape[2]) or mask.device != self.tab.device):
            raise ValueError(f"UltrametricCache: key_padding_mask must be bool ({self.B}, {digits.shape[2]}) on "
                             f"{self.tab.device}, got {getattr(mask, 'dtype', type(mask).__name__)} "
                             f"{tuple(getattr(mask, 'shape', ()))} on {getattr(mask, 'device', None)}")

    def append(self, k_digits, v, key_padding_mask=None, *, check_digits=False):
        """Add T keys: k_digits [B, Hkv, T, K], v [B, Hkv, T, D] (any float dtype; the CUDA backend:
        not float64), key_padding_mask [B, T] (True = keep) or None. A key with a digit outside
        [0, p - 1] poisons its group with NaN unless check_digits=True refuses it (class docstring)."""
        self._check("k_digits", k_digits, self.Hkv, None, v, key_padding_mask, check_digits)
        self._append(k_digits, v, key_padding_mask)

    def _append(self, k_digits, v, key_padding_mask):
        T = v.shape[2]
        if T:
            v = v.detach()
            keep = None if key_padding_mask is None else key_padding_mask.contiguous()
            if self.backend == "torch":
                _cache_append_torch(self.tab, self.cnt, k_digits, v, keep, self.p)
            else:  # float32 atomics into the tables
                alert_nondeterministic(f"UltrametricCache.append (backend='{self.backend}')", "backend='torch'")
                _KERNELS[self.backend][0](self.tab, self.cnt, k_digits.contiguous(), v.contiguous(), keep, self.p)
        self.length += T

    def query(self, q_digits, *, out=None, return_lse=False, check_digits=False):
        """q_digits [B, H, Tq, K] against every appended key: y [B, H, Tq, D] float32 (and lse
        [B, H, Tq]); out=(y, lse) float32 buffers of those shapes are written instead of new ones.
        A query with a digit outside [0, p - 1] gets y and lse NaN unless check_digits=True refuses
        it (class docstring)."""
        self._check("q_digits", q_digits, 0, None, check_digits=check_digits)
        return self._query(q_digits, out, return_lse)

    def _query(self, q_digits, out, return_lse):
        B, H, Tq, _ = q_digits.shape
        if out is None:
            out = (torch.empty(B, H, Tq, self.D, device=self.tab.device), torch.empty(B, H, Tq, device=self.tab.device))
        y, lse = out
        if tuple(y.shape) != (B, H, Tq, self.D) or tuple(lse.shape) != (B, H, Tq) or y.dtype != torch.float32 \
                or lse.dtype != torch.float32 or not (y.is_contiguous() and lse.is_contiguous()) \
                or y.device != self.tab.device or lse.device != self.tab.device:
            raise ValueError(f"UltrametricCache: out must be contiguous float32 ({B}, {H}, {Tq}, {self.D}) and "
                             f"({B}, {H}, {Tq}) on {self.tab.device}, got {tuple(y.shape)} {y.dtype} {y.device}, "
                             f"{tuple(lse.shape)} {lse.dtype} {lse.device}")
        if Tq:
            if self.backend == "torch":
                _cache_query_torch(self.tab, self.cnt, q_digits, y, lse, self.alpha, self.p)
            else:
                _KERNELS[self.backend][1](self.tab, self.cnt, q_digits.contiguous(), y, lse, self.alpha, self.p)
        return (y, lse) if return_lse else y


def ultrametric_decode_step_(cache, q_digits, k_digits, v, *, key_padding_mask=None, out=None, return_lse=False,
                             check_digits=False):
    """One decode token in place: append the key (k_digits [B, Hkv, 1, K], v [B, Hkv, 1, D]) to
    `cache` (an UltrametricCache, whose backend runs it), then attend q_digits [B, H, 1, K] over
    every key so far (a query sees its own key, as causal attention does). Returns y [B, H, 1, D]
    float32 (and lse); with out=(y, lse) it writes those buffers and allocates nothing: capturable
    in a CUDA graph. No host read or sync: digits outside [0, p - 1] turn y (and for a bad query
    lse) NaN, as UltrametricCache's docstring says; check_digits=True raises ValueError for them
    instead, at the cost of a host sync per call on a GPU."""
    if not isinstance(cache, UltrametricCache):
        raise TypeError(f"ultrametric_decode_step_: cache must be an UltrametricCache, got {type(cache).__name__}")
    # each input checked once (append / query would check again)
    cache._check("k_digits", k_digits, cache.Hkv, 1, v, key_padding_mask, check_digits)
    cache._check("q_digits", q_digits, 0, 1, check_digits=check_digits)
    cache._append(k_digits, v, key_padding_mask)
    return cache._query(q_digits, out, return_lse)
