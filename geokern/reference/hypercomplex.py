"""Quaternion and octonion products: the definition (spec section 4).

Quaternions are (w, x, y, z) in the last dim, Hamilton product. Octonions are pairs of
quaternions (a, b) multiplied by Cayley-Dickson: (a, b)(c, d) = (a c - conj(d) b,
d a + b conj(c)). Leading dims broadcast. Differentiable by autograd; every float dtype.
"""

import functools

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


# ---- quaternion / octonion linear layers (spec section 4) ---------------------------
# y_p = sum_b (W (x) x)_p: weight component matrices W_a [out/n, in/n] in nn.Linear
# orientation, features in n blocks [w | x | y | z | ...] (Parcollet et al.'s [r | i | j | k]).


@functools.lru_cache(None)
def left_mul_blocks(n: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """(comp, sign), each n x n: block (p, b) of left multiplication by w is sign[p][b] *
    w[comp[p][b]], i.e. (w x)_p = sum_b sign[p][b] w_comp[p][b] x_b.

    Read off the products above (e_a e_b = +-e_p for exactly one a per (p, b)), so the
    layers share the one multiplication table of the products."""
    e = torch.eye(n, dtype=torch.float64)
    coef = hypercomplex_mul(e[:, None, :], e[None, :, :], n).permute(2, 1, 0)  # [p, b, a] = (e_a e_b)_p
    if not bool((coef.abs().sum(-1) == 1).all()):
        raise AssertionError("hypercomplex basis products are not signed basis elements")
    comp = coef.abs().argmax(-1)
    sign = coef.gather(-1, comp[..., None]).squeeze(-1)
    return tuple(map(tuple, comp.tolist())), tuple(tuple(int(s) for s in row) for row in sign.tolist())


def expand_weight(weights) -> torch.Tensor:
    """The [n * O, n * I] real matrix of the layer from its n component matrices [O, I]:
    block (p, b) is sign[p][b] * weights[comp[p][b]] (for quaternions
    [[r, -i, -j, -k], [i, r, -k, j], [j, k, r, -i], [k, -j, i, r]])."""
    n = len(weights)
    comp, sign = left_mul_blocks(n)
    rows = [torch.cat([weights[comp[p][b]] * sign[p][b] for b in range(n)], dim=1) for p in range(n)]
    return torch.cat(rows, dim=0)


def hypercomplex_linear(x: torch.Tensor, weights, bias=None) -> torch.Tensor:
    """y = x @ expand_weight(weights)^T + bias: x [..., n * I] -> [..., n * O]. Each output
    quaternion (octonion) o is sum_i W[o, i] x_i, the Hamilton (Cayley-Dickson) product with
    the weight on the left, x_i = (x[..., i], x[..., I + i], x[..., 2I + i], ...)."""
    return torch.nn.functional.linear(x, expand_weight(weights), bias)
