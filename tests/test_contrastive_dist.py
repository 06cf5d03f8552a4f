"""The distributed contrastive update: two CPU processes on the gloo backend, each with part of
the rows (different counts per rank and phase), all-reduce their phase statistics in one
collective for all layers; the update equals the single process's on all the rows (relative
1e-6), whether the reduction is called for the list of layers or left to apply_."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import geokern

# (out, in) per layer; rows per phase, split unevenly between the two ranks
LAYERS = [(7, 5), (12, 9), (3, 16)]
ROWS = {"nudged": (5, 8), "free": (9, 2)}
LR, BETA, MAX_NORM = 0.3, 0.5, 0.8

_WORKER = """
import json, os, sys
import torch, torch.distributed as dist
import geokern
sys.path.insert(0, {tests!r})
from test_contrastive_dist import data, layer_stats

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
Ws, bs, acts = data()
stats = layer_stats(acts, rank)
geokern.all_reduce_stats_(stats[:2])  # one collective for the first two layers
for st, W, b in zip(stats, Ws, bs):
    st.apply_(W, b, {lr}, {beta}, {max_norm})  # the third layer: apply_ reduces it by itself
assert all(st.reduced for st in stats)
json.dump([[W.tolist(), b.tolist()] for W, b in zip(Ws, bs)], open({out!r} + str(rank), "w"))
dist.destroy_process_group()
"""


def data():
    """The same parameters and activities on every rank: W, b per layer, and per layer and phase
    X [rows, in], Y [rows, out] with the rows of both ranks."""
    g = torch.Generator().manual_seed(1234)
    Ws = [torch.randn(o, i, generator=g) for o, i in LAYERS]
    bs = [torch.randn(o, generator=g) for o, _ in LAYERS]
    acts = [{p: (torch.randn(sum(n), i, generator=g), torch.randn(sum(n), o, generator=g)) for p, n in ROWS.items()}
            for o, i in LAYERS]
    return Ws, bs, acts


def layer_stats(acts, rank=None):
    """Each layer's ContrastiveStats over the rows of `rank` (all rows: None), in two steps."""
    out = []
    for (o, i), a in zip(LAYERS, acts):
        st = geokern.ContrastiveStats(o, i)
        for p, (n0, n1) in ROWS.items():
            lo, hi = ((0, n0), (n0, n0 + n1))[rank] if rank is not None else (0, n0 + n1)
            X, Y = a[p]
            mid = (lo + hi) // 2
            for s, e in ((lo, mid), (mid, hi)):
                if e > s:
                    st.add_(X[s:e], Y[s:e], p)
        out.append(st)
    return out


def test_two_ranks_equal_one_process_on_all_rows(tmp_path):
    code = textwrap.dedent(_WORKER).format(tests=os.path.dirname(__file__), store=str(tmp_path / "store"), lr=LR,
                                           beta=BETA, max_norm=MAX_NORM, out=str(tmp_path / "out"))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for r, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank {r} did not finish in 120 s")
        assert p.returncode == 0, f"rank {r} failed:\n{err[-3000:]}"
    Ws, bs, acts = data()
    w0, b0 = [W.clone() for W in Ws], [b.clone() for b in bs]
    for st, W, b in zip(layer_stats(acts), Ws, bs):
        st.apply_(W, b, LR, BETA, MAX_NORM)
    for r in range(2):
        got = json.load(open(tmp_path / f"out{r}"))
        for i, ((gw, gb), W, b) in enumerate(zip(got, Ws, bs)):
            for name, g, want, start in (("W", gw, W, w0[i]), ("b", gb, b, b0[i])):
                d_got, d_want = torch.tensor(g) - start, want - start
                err = ((d_got - d_want).norm() / d_want.norm()).item()
                assert err <= 1e-6, f"rank {r} layer {i} d{name}: relative error {err:.2e} against one process"


def test_reduced_stats_refuse_add_and_reduce_alone():
    """Without torch.distributed the reduction is the identity (means of this process's rows),
    apply_ does not call it, and reduced statistics refuse add_ until reset()."""
    _, _, acts = data()
    st = layer_stats(acts)[0]
    W = torch.zeros(LAYERS[0])
    want = W.clone()
    st.apply_(want, None, LR, BETA)
    assert not st.reduced
    geokern.all_reduce_stats_([st])
    st.apply_(W, None, LR, BETA)
    torch.testing.assert_close(W, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"reset\(\) before adding more"):
        st.add_(*acts[0]["free"], "free")
    st.reset()
    st.add_(*acts[0]["free"], "free")
