"""QuaternionLinear and OctonionLinear: drop-in replacements for nn.Linear."""

import math

import torch
from torch import nn

from geokern.ops.hypercomplex import octonion_linear, quaternion_linear

# Parcollet et al.'s QuaternionLinear (Orkis-Research/Pytorch-Quaternion-Neural-Networks):
# r_weight, i_weight, j_weight, k_weight, each [in/4, out/4] and applied as x @ W, laid
# into the same block matrix as ours, so their component c is ours transposed.
_PARCOLLET = ("r_weight", "i_weight", "j_weight", "k_weight")


class _HypercomplexLinear(nn.Module):
    N = 0
    _op = None

    def __init__(self, in_features, out_features, bias=True, *, backend=None, device=None, dtype=None):
        super().__init__()
        name, n = type(self).__name__, self.N
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < n or v % n != 0:
                raise ValueError(f"{name}: {arg} must be a positive multiple of {n}, got {v!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        # the variance of nn.Linear's init for every entry of the expanded [out, in] matrix
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(n, out_features // n, in_features // n, **kw).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features, **kw).uniform_(-bound, bound)) if bias else None

    def forward(self, x):
        return type(self)._op(x, *self.weight.unbind(0), bias=self.bias, backend=self.backend)

    def expanded_weight(self):
        """The equivalent nn.Linear weight [out_features, in_features]."""
        from geokern.reference.hypercomplex import expand_weight

        return expand_weight(self.weight.unbind(0))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuaternionLinear(_HypercomplexLinear):
    """y = x @ W^T + bias with W the real [out, in] matrix of a quaternion weight: output
    quaternion o is sum_i W[o, i] (x) x_i (Hamilton product, weight on the left).

    weight: [4, out/4, in/4], the components (r, i, j, k) in nn.Linear orientation;
    features in blocks [r | i | j | k] as in Parcollet et al.'s QuaternionLinear. A state
    dict of theirs (r_weight ... k_weight, [in/4, out/4] each, and bias) loads directly
    (load_state_dict converts it), and parcollet_state_dict() gives ours in theirs.
    backend is passed to geokern.quaternion_linear.
    """

    N = 4
    _op = staticmethod(quaternion_linear)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_load_state_dict_pre_hook(_from_parcollet)

    def parcollet_state_dict(self):
        """This layer's parameters in Parcollet et al.'s QuaternionLinear layout (detached)."""
        out = {name: w.detach().t().contiguous() for name, w in zip(_PARCOLLET, self.weight.unbind(0))}
        if self.bias is not None:
            out["bias"] = self.bias.detach().clone()
        return out


def _from_parcollet(module, state_dict, prefix, *args):
    """Replaces Parcollet et al.'s r_weight ... k_weight under `prefix` by our weight."""
    keys = [prefix + k for k in _PARCOLLET]
    if not any(k in state_dict for k in keys):
        return
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise KeyError(f"QuaternionLinear: a Parcollet-layout state dict needs all of {keys}; missing {missing}")
    comps = [state_dict.pop(k) for k in keys]
    expect = (module.in_features // 4, module.out_features // 4)
    for k, w in zip(keys, comps):
        if tuple(w.shape) != expect:
            raise ValueError(f"QuaternionLinear: {k} must have shape {expect} ([in/4, out/4] in their layout), "
                             f"got {tuple(w.shape)}")
    state_dict[prefix + "weight"] = torch.stack([w.t() for w in comps])


class OctonionLinear(_HypercomplexLinear):
    """The octonion layer: weight [8, out/8, in/8], features in 8 blocks, output octonion o
    is sum_i W[o, i] x_i (Cayley-Dickson product, weight on the left). backend is passed to
    geokern.octonion_linear."""

    N = 8
    _op = staticmethod(octonion_linear)
