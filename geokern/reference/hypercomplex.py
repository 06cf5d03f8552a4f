"""Quaternion and octonion products: the definition (spec section 4).

Quaternions are (w, x, y, z) in the last dim, Hamilton product. Octonions are pairs of
quaternions (a, b) multiplied by Cayley-Dickson: (a, b)(c, d) = (a c - conj(d) b,
d a + b conj(c)). Leading dims broadcast. Differentiable by autograd; every float dtype.
"""

import torch


def quaternion_conj(q: torch.Tensor) -> torch.Tensor:
    return torch.cat([q[..., :1], -q[..., 1:]], dim=-1)


def quaternion_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def octonion_conj(o: torch.Tensor) -> torch.Tensor:
    return torch.cat([o[..., :1], -o[..., 1:]], dim=-1)


def octonion_mul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a, b = x[..., :4], x[..., 4:]
    c, d = y[..., :4], y[..., 4:]
    first = quaternion_mul(a, c) - quaternion_mul(quaternion_conj(d), b)
    second = quaternion_mul(d, a) + quaternion_mul(b, quaternion_conj(c))
    return torch.cat([first, second], dim=-1)


def hypercomplex_mul(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    return quaternion_mul(a, b) if n == 4 else octonion_mul(a, b)


def hypercomplex_conj(a: torch.Tensor, n: int) -> torch.Tensor:
    return quaternion_conj(a) if n == 4 else octonion_conj(a)


def hypercomplex_mul_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, n: int):
    """(dA, dB) for C = A B: dA = dC conj(B), dB = conj(A) dC (any composition algebra),
    summed over the dims where A or B was broadcast."""
    da = hypercomplex_mul(grad, hypercomplex_conj(b, n), n)
    db = hypercomplex_mul(hypercomplex_conj(a, n), grad, n)
    return da.sum_to_size(a.shape), db.sum_to_size(b.shape)
