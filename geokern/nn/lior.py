"""LiorMemory: the LIoR memory layer (a learnable 3-mode kernel as a causal convolution over time)."""

import torch
from torch import nn

from geokern.ops.lior import lior_memory_conv
from geokern.reference import lior as ref


class LiorMemory(nn.Module):
    """out[t] = w0 x[t] + (1 - w0) sum_{j<=t} khat_j x[t - j] (geokern.lior_memory_conv), with the
    kernel's 12 scalars (a, b, gamma, delta, xi, eta, omega, phi, zeta and the 3 mode logits) as one
    learnable parameter `params` [12], initialised from geokern.reference.lior.DEFAULT_PARAMS
    (override any by keyword). x is [T, ...] (time first), or [B, T, ...] with batch_first=True.
    method ("auto", "direct", "fft") and backend are passed to the op; its gradients reach x and
    params. float32 params by default: the op accumulates in float32 either way."""

    def __init__(self, *, batch_first=False, method="auto", backend=None, device=None, dtype=None, **init):
        super().__init__()
        self.batch_first, self.method, self.backend = batch_first, method, backend
        self.params = nn.Parameter(ref.lior_params(dtype or torch.float32, device, **init))

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 + self.batch_first:
            raise ValueError(f"LiorMemory: x must be a tensor with a time dim ({'[B, T, ...]' if self.batch_first else '[T, ...]'}), "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
        if self.batch_first:
            return lior_memory_conv(x.transpose(0, 1), self.params, method=self.method,
                                    backend=self.backend).transpose(0, 1)
        return lior_memory_conv(x, self.params, method=self.method, backend=self.backend)

    def kernel_weights(self, T):
        """khat [T]: the normalised kernel this layer applies over a length-T sequence."""
        return ref.memory_weights(T, self.params)

    def extra_repr(self):
        return f"batch_first={self.batch_first}, method={self.method!r}"
