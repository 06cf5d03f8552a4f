"""GeodesicRetrieval: retrieval attention with a learned metric and a memory bank."""

import math

import torch
from torch import nn

import geokern.metric as gm
from geokern.ops.retrieval import retrieval_attention


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
    no key at all give zeros. forward's keyword arguments besides backend (the tuning knobs
    num_ctas, bank_splits, pipeline, norm_mma, bwd_chunk) go to retrieval_attention.
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
        count = int(self.bank_count)
        if keys is None and count == 0:
            raise ValueError("GeodesicRetrieval: no keys passed and the bank is empty")
        dtype = values.dtype if values is not None else query.dtype
        bank = None
        if count > 0:
            bank = (self.bank_keys[:count].to(query.dtype), self.bank_values[:count].to(dtype))
        if keys is None:
            keys, values = bank
            bank = None
        return retrieval_attention(query, keys, values, R, self.metric, self.beta, self.eps, mask, bank=bank,
                                   backend=backend, **knobs)
