"""TropicalLinear: the max-plus analogue of nn.Linear."""

import math

import torch
from torch import nn

from geokern.ops.maxplus import maxplus_matmul


class TropicalLinear(nn.Module):
    """y[..., o] = max_i (x[..., i] + weight[o, i]) + bias[o] (min for semiring="minplus").

    weight is [out_features, in_features] as in nn.Linear and is initialised the same way
    (uniform in +-1/sqrt(in_features)), as is the bias. Gradients follow the argmax route:
    each output sends its gradient to the one (x, weight) pair that won, and to its bias.
    The map is model_guided_research's `tropical_maxplus_layer(x, weight, bias)` at its
    exact (beta=None) endpoint; its smoothed variant and TropicalMLP's init are not here.

    semiring, num_splits and backend are passed to geokern.maxplus_matmul (num_splits: the
    CUDA kernel's split-K slices over in_features, 0 to choose).
    """

    def __init__(self, in_features, out_features, bias=True, *, semiring="maxplus", num_splits=0, backend=None,
                 device=None, dtype=None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"TropicalLinear: need in_features, out_features >= 1, got {in_features}, {out_features}")
        if semiring not in ("maxplus", "minplus"):
            raise ValueError(f"TropicalLinear: semiring must be 'maxplus' or 'minplus', got {semiring!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.semiring, self.num_splits, self.backend = semiring, num_splits, backend
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features, **kw).uniform_(-bound, bound)) if bias else None

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"TropicalLinear: x must have last dim {self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = maxplus_matmul(x.reshape(-1, self.in_features), self.weight.t(), semiring=self.semiring,
                           num_splits=self.num_splits, backend=self.backend)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, semiring={self.semiring!r}")
