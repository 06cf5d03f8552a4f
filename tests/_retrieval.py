"""Inputs shared by the retrieval tests (tests/test_retrieval_*.py): float64 draws, metrics of
each family and R of each broadcast form."""

import torch
from _helpers import DTYPES
from conftest import DEVICE

import geokern.metric as gm

KERNEL_DTYPES = [d for d in DTYPES if d != torch.float64]


def rnd(*shape, scale=1.0):
    return (scale * torch.randn(*shape, device=DEVICE, dtype=torch.float64))


def metric_of(kind, n):
    """A metric of the family `kind` with float64 parameters (list returned for grads)."""
    lam = torch.rand(n, device=DEVICE, dtype=torch.float64) + 0.5
    if kind == "diag":
        return [lam], lambda p: gm.diag(p[0])
    if kind == "rotor_diag":
        theta = rnd(3)
        pairs = [(0, 1), (2, n - 1), (1, 2)]
        return [lam, theta], lambda p: gm.rotor_diag(p[0], p[1], pairs)
    q, _ = torch.linalg.qr(rnd(n, n))
    u, d = rnd(n, 2, scale=0.3), torch.tensor([0.4, -0.3], device=DEVICE, dtype=torch.float64)
    om = torch.tensor(0.8, device=DEVICE, dtype=torch.float64)
    return [om, q, lam, u, d], lambda p: gm.lowrank(p[0], p[1], p[2], p[3], p[4])


def make_R(kind, qshape, kshape):
    m = kshape[-2]
    if kind == "scalar":
        return 0.8
    lead = qshape[:-1]
    if kind == "query":
        return rnd(*lead, 1).abs() + 0.3
    if kind == "key":
        return rnd(m).abs() + 0.3
    return rnd(*lead, m).abs() + 0.3
