"""GeodesicRetrieval: retrieval attention with a learned metric and a memory bank."""

import math

import torch
from torch import nn

import geokern.metric as gm
from geokern.ops.retrieval import retrieval_attention
from geokern.reference.retrieval import merge_by_lse


class GeodesicRetrieval(nn.Module):
    """out = softmax(-beta * R * sqrt(g(k - q, k - q) + eps)) @ V over two segments: the
    keys and values passed with the query (per row, optional) and a memory bank shared by
    every row, a ring buffer of the last `bank_size` (key, value) pairs written.

    g = diag(softplus(raw)) is learned (positive, so the cost is a distance). The two
    segments run in one retrieval_attention call (its `bank` argument: one kernel launch
    that streams the row's keys and then the bank, merged in the online softmax), so the
    bank is never expanded per row nor concatenated to the row's keys; the result equals
    one softmax over the union. R is a number or per query
    ([B, 1] for queries [B, n], [..., Lq, 1] for [..., Lq, n]): it applies to both
    segments. `mask` (bool, True = keep) masks the row's own keys only. Rows that see
    no key at all give zeros (an empty bank and no keys passed included). forward never
    waits for the GPU (no host read of bank_count): the unwritten slots of the bank are
    masked on the device, so it compiles with torch.compile(fullgraph=True). The bank is
    then the first (masked) key segment and the row's keys the second; with a `mask` on the
    row's keys too, two launches merged by their lse. forward's keyword arguments besides
    backend (num_ctas, bank_splits, pipeline, norm_mma, bwd_chunk) go to retrieval_attention.
    """

    def __init__(self, n_coords, d_value, bank_size, *, beta=1.0, eps=1e-8, init_lam=1.0,
                 device=None, dtype=None):
        super().__init__()
        if n_coords < 1 or d_value < 1 or bank_size < 0:
            raise ValueError(f"GeodesicRetrieval: need n_coords >= 1, d_value >= 1, bank_size >= 0; got "
                             f"{n_coords}, {d_value}, {bank_size}")
        if init_lam <= 0:
            raise ValueError(f"GeodesicRetrieval: init_lam must be > 0, got {init_lam}")
        kw = {"device": device, "dtype": dtype}
        raw = math.log(math.expm1(init_lam))  # softplus(raw) = init_lam
        self.raw_lam = nn.Parameter(torch.full((n_coords,), raw, **kw))
        self.beta, self.eps, self.bank_size = float(beta), float(eps), int(bank_size)
        self.register_buffer("bank_keys", torch.zeros(bank_size, n_coords, **kw))
        self.register_buffer("bank_values", torch.zeros(bank_size, d_value, **kw))
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("bank_next", torch.zeros((), dtype=torch.long, device=device))

    @property
    def metric(self):
        return gm.diag(nn.functional.softplus(self.raw_lam))

    @torch.no_grad()
    def write(self, keys, values):
        """Append (keys [N, n], values [N, d_value]) to the bank, overwriting the oldest."""
        if keys.dim() != 2 or keys.shape[-1] != self.bank_keys.shape[-1]:
            raise ValueError(f"GeodesicRetrieval.write: keys must be [N, {self.bank_keys.shape[-1]}], "
                             f"got {tuple(keys.shape)}")
        if values.dim() != 2 or values.shape != (keys.shape[0], self.bank_values.shape[-1]):
            raise ValueError(f"GeodesicRetrieval.write: values must be [{keys.shape[0]}, "
                             f"{self.bank_values.shape[-1]}], got {tuple(values.shape)}")
        if self.bank_size == 0:
            return
        keys, values = keys[-self.bank_size:], values[-self.bank_size:]
        idx = (self.bank_next + torch.arange(keys.shape[0], device=keys.device)) % self.bank_size
        self.bank_keys[idx] = keys.to(self.bank_keys.dtype)
        self.bank_values[idx] = values.to(self.bank_values.dtype)
        self.bank_next.copy_((self.bank_next + keys.shape[0]) % self.bank_size)
        self.bank_count.clamp_(max=self.bank_size - keys.shape[0]).add_(keys.shape[0])

    def forward(self, query, keys=None, values=None, R=1.0, mask=None, *, backend=None, **knobs):
        if (keys is None) != (values is None):
            raise ValueError("GeodesicRetrieval: pass keys and values together, or neither")
        if keys is None and mask is not None:
            raise ValueError("GeodesicRetrieval: mask applies to the row's own keys; none were passed")
        if keys is None and self.bank_size == 0:
            raise ValueError("GeodesicRetrieval: no keys passed and the bank has no slots (bank_size = 0)")
        if self.bank_size == 0:
            return retrieval_attention(query, keys, values, R, self.metric, self.beta, self.eps, mask,
                                       backend=backend, **knobs)
        # No host sync: the whole ring buffer goes in and its unwritten slots are masked on the
        # device, never sliced at int(bank_count) (a GPU sync, and a data-dependent shape that
        # torch.compile(fullgraph=True) rejects). The kernels mask only their first key segment,
        # so the bank goes first, with the row's keys as the second (unmasked) segment.
        filled = torch.arange(self.bank_size, device=self.bank_count.device) < self.bank_count
        dtype = values.dtype if values is not None else query.dtype
        bk, bv = self.bank_keys.to(query.dtype), self.bank_values.to(dtype)
        if keys is None or mask is None:
            return retrieval_attention(query, bk, bv, R, self.metric, self.beta, self.eps, filled,
                                       bank=None if keys is None else (keys, values), backend=backend, **knobs)
        # both segments masked: two launches merged by their log-sum-exp (the same softmax)
        o1, l1 = retrieval_attention(query, keys, values, R, self.metric, self.beta, self.eps, mask,
                                     return_lse=True, backend=backend, **knobs)
        o2, l2 = retrieval_attention(query, bk, bv, R, self.metric, self.beta, self.eps, filled,
                                     return_lse=True, backend=backend, **knobs)
        return merge_by_lse(o1, l1, o2, l2)[0].to(dtype)
