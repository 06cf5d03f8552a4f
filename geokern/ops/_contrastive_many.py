"""The contrastive update of many layers in one grouped launch: contrastive_update_many_ and
ContrastiveGroup.

Every layer i has its own W_i [out_i, in_i], b_i and activities (Xn_i, Yn_i, Xf_i, Yf_i); the
rule, the gate and the clip are per layer, exactly contrastive_update_'s (the reference is a loop
of geokern.reference.contrastive.contrastive_update_). The Triton backend runs all of them as one
launch of kernels/contrastive.py's contrastive_many_kernel: a grouped GEMM over a table of
(layer, tile) entries, whose first half of programs computes G_i = Yn_i^T Xn_i - c_i Yf_i^T Xf_i
tile by tile (Triton dots: float32 accumulation, IEEE or TF32 for float32 activities, tensor cores
for 16-bit) into a float32 workspace with each layer's sum of squares (float64 atomics), and whose
second half waits for its layer's tiles and applies the gated, clipped W += f G, b += s gb. No
cuBLAS: a loop of cuBLAS GEMMs is one launch (and a few more for the norm and the apply) per
layer, which at 64 layers costs more in launches than the GEMMs take (issue #22).

The tables are built on the host, once, and cached:
- per group (the list of W and b): the workspace (float32 G and gb of every layer: as many
  elements as the parameters; float64 norms, int32 counters, zero between calls because the
  kernel's last program zeroes them) and the (layer, tile) table per tile shape;
- per set of activity tensors (their addresses, shapes and strides): the int64 per-layer table
  of addresses, sizes and offsets (kernels/contrastive.py's META_COLS), copied to the device once.
A call whose tensors are all in the cache allocates nothing, copies nothing from the host and
reads nothing back: it is one kernel launch, which a CUDA graph captures. Warm the call up once
outside the capture with the same tensors (a cache miss while capturing is an error that says
so), and keep the ContrastiveGroup alive as long as the graph (it owns the workspace the graph
reads); contrastive_update_many_ keeps the last few groups in a small cache, so for graphs hold
a ContrastiveGroup yourself. One group serves one stream at a time (its workspace is shared by
its calls).

Not yet: a custom op for torch.compile (the tables hold raw addresses, which fake tensors do not
have: under torch.compile the call is a graph break), the Gram form of the norm, and the
streaming and distributed forms (ContrastiveStats and all_reduce_stats_ cover those per layer).
"""

import collections

import torch
from torch.autograd.graph import increment_version

from geokern import _backend
from geokern.kernels import contrastive as tk
from geokern.ops._registry import alert_nondeterministic
from geokern.ops.contrastive import _KERNEL_DTYPES, _check_params, _check_phase, _check_scalars, _resolve
from geokern.reference import contrastive as ref

__all__ = ["contrastive_update_many_", "ContrastiveGroup"]

_OP = "contrastive_update_many_"
_PHASES = ("Xn", "Yn", "Xf", "Yf")
_COL = {name: i for i, name in enumerate(tk.META_COLS)}
_ACT_CACHE = 4  # activity tables kept per group (a training loop alternates few buffer sets)
_GROUP_CACHE = 4  # groups kept by contrastive_update_many_


def default_blocks(act_dtype):
    """(block_m, block_n, block_k, num_warps, num_stages) when the caller passes 0: 16-bit
    activities take 128 x 128 tensor-core tiles, float32 128 x 64 (TF32) or 64 x 64 (IEEE: no
    tensor cores, smaller tiles keep more programs per SM); the interpreter takes 16 x 16 x 16.
    Chosen from the Triton matmul tutorial's configurations, not measured here yet."""
    if _backend.interpret_mode():
        return 16, 16, 16, 4, 1
    if act_dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 128, 32, 8, 3


def _span(t):
    """[start, end) bytes of t's memory (0-size tensors occupy nothing)."""
    if t.numel() == 0:
        return None
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check_disjoint(op, written, read=()):
    """No two tensors of `written` ((name, tensor) pairs) overlap, nor any with one of `read`:
    the kernel writes W and b while other programs still read activities and parameters."""
    spans = sorted(((sp, name, True) for name, t in written if (sp := _span(t))), key=lambda x: x[0])
    spans += [(sp, name, False) for name, t in read if (sp := _span(t))]
    spans.sort(key=lambda x: x[0])
    for i, ((s0, e0), n0, w0) in enumerate(spans):
        for (s1, e1), n1, w1 in spans[i + 1:]:
            if s1 >= e0:
                break
            if w0 or w1:
                raise ValueError(f"{op}: {n1} overlaps {n0} in memory (the same tensor twice, or views of one): "
                                 "every W and b must be its own memory, apart from the activities")


class ContrastiveGroup:
    """A fixed list of layers (W_i, b_i) updated together, one grouped launch per call.

        group = geokern.ContrastiveGroup([l.weight for l in layers], [l.bias for l in layers])
        group.update_(Xns, Yns, Xfs, Yfs, lr, beta, max_norm=1.0)    # one launch, no host sync

    Ws: W_i [out_i, in_i], contiguous, one dtype (float32, bfloat16 or float16) and device for all;
    bs: None, or a list with b_i [out_i] (W's dtype, contiguous) or None per layer. Block sizes
    and warps are knobs (0: default_blocks). See the module docstring for what is cached."""

    def __init__(self, Ws, bs=None, *, block_m=0, block_n=0, block_k=0, num_warps=0, num_stages=0):
        Ws, bs = _check_layers(Ws, bs)
        if Ws and Ws[0].dtype not in _KERNEL_DTYPES:
            raise TypeError(f"ContrastiveGroup: W[0] has dtype {Ws[0].dtype}: the grouped kernel takes float32 / "
                            "bfloat16 / float16 parameters (contrastive_update_many_(backend='torch') for float64)")
        self.Ws, self.bs = Ws, bs
        self._written = Ws + [b for b in bs if b is not None]
        for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k),
                        ("num_warps", num_warps), ("num_stages", num_stages)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"ContrastiveGroup: {name} must be an int >= 0 (0: choose), got {v!r}")
        for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
            if v and (v < 16 or v & (v - 1)):
                raise ValueError(f"ContrastiveGroup: {name} must be 0 or a power of two >= 16, got {v}")
        self._knobs = (block_m, block_n, block_k, num_warps, num_stages)
        dev = Ws[0].device if Ws else torch.device("cpu")
        sizes = [W.numel() for W in Ws]
        outs = [W.shape[0] for W in Ws]
        self._g_off = [sum(sizes[:i]) for i in range(len(Ws))]
        self._gb_off = [sum(sizes) + sum(outs[:i]) for i in range(len(Ws))]
        self._ws = torch.zeros(max(sum(sizes) + sum(outs), 1), device=dev, dtype=torch.float32)
        self._norm = torch.zeros(len(Ws), device=dev, dtype=torch.float64)
        self._badb = torch.zeros(len(Ws), device=dev, dtype=torch.int32)
        self._cnt = torch.zeros(len(Ws) + 2, device=dev, dtype=torch.int32)
        self._tiles = {}  # (block_m, block_n) -> (int32 [T, 2] table, T, per-layer (tiles_n, tiles))
        self._acts = collections.OrderedDict()  # activity key -> int64 meta table on the device
        self._pinned = set()  # keys of tables that a CUDA graph captured

    def blocks(self, act_dtype):
        """The (block_m, block_n, block_k, num_warps, num_stages) a call with act_dtype uses."""
        return tuple(k or d for k, d in zip(self._knobs, default_blocks(act_dtype)))

    def _tile_table(self, bm, bn):
        if (bm, bn) not in self._tiles:
            rows, per_layer = [], []
            for i, W in enumerate(self.Ws):
                out, inn = W.shape
                tiles_n = max(-(-inn // bn), 1)  # in = 0 still has a column tile: it makes gb
                tiles = -(-out // bm) * tiles_n
                per_layer.append((tiles_n, tiles))
                rows += [(i, t) for t in range(tiles)]
            table = torch.tensor(rows or [(0, 0)], dtype=torch.int32).to(self._ws.device)
            self._tiles[(bm, bn)] = (table, len(rows), per_layer)
        return self._tiles[(bm, bn)]

    def _meta(self, key, acts, bm, bn):
        """The per-layer table for these activity tensors (cached under `key`: _act_key)."""
        named = [(f"W[{i}]", W) for i, W in enumerate(self.Ws)] + \
                [(f"b[{i}]", b) for i, b in enumerate(self.bs) if b is not None]
        _check_disjoint(_OP, named, [(f"{p}[{i}]", t) for p, a in zip(_PHASES, acts) for i, t in enumerate(a)])
        _, _, per_layer = self._tile_table(bm, bn)
        meta = []
        for i, (W, b) in enumerate(zip(self.Ws, self.bs)):
            xn, yn, xf, yf = (a[i] for a in acts)
            row = [0] * int(tk.META)
            vals = dict(w=W.data_ptr(), b=b.data_ptr() if b is not None else 0, xn=xn.data_ptr(), yn=yn.data_ptr(),
                        xf=xf.data_ptr(), yf=yf.data_ptr(), out=W.shape[0], inn=W.shape[1], nn=xn.shape[0],
                        nf=xf.shape[0], sxn=xn.stride(0), syn=yn.stride(0), sxf=xf.stride(0), syf=yf.stride(0),
                        g_off=self._g_off[i], gb_off=self._gb_off[i], tiles_n=per_layer[i][0],
                        tiles=per_layer[i][1], has_b=int(b is not None))
            for name, v in vals.items():
                row[_COL[name]] = v
            meta.append(row)
        table = torch.tensor(meta or [[0] * int(tk.META)], dtype=torch.int64)
        if self._ws.is_cuda:
            table = table.pin_memory().to(self._ws.device, non_blocking=True)
        self._acts[key] = table  # the key also names the block shape: the table holds the tile counts
        for old in [k for k in self._acts if k not in self._pinned][:max(len(self._acts) - _ACT_CACHE, 0)]:
            del self._acts[old]
        return table

    @torch.no_grad()
    def update_(self, Xns, Yns, Xfs, Yfs, lr, beta, max_norm=None, *, centred=False, tf32=None):
        """Apply contrastive_update_ to every layer of the group, in one launch; returns None.

        Xns[i] [Nn_i, in_i], Yns[i] [Nn_i, out_i], Xfs[i] [Nf_i, in_i], Yfs[i] [Nf_i, out_i]: one
        float dtype (float32, bfloat16 or float16) for every activity of every layer, unit stride
        along features (rows may be strided). lr, beta, max_norm, centred: contrastive_update_'s,
        the same for every layer (max_norm clips each layer's dW on its own). tf32: float32
        activities multiply on TF32 tensor cores (None: when torch's float32 matmul precision is
        not "highest", as torch.matmul does); ignored for 16-bit activities."""
        _check_scalars(lr, beta, max_norm, centred, None, op=_OP)
        if max_norm is not None:  # the clip factor reads a norm summed with float64 atomics
            alert_nondeterministic(f"{_OP} with max_norm (backend='triton')", "backend='torch'")
        if tf32 is not None and not isinstance(tf32, bool):
            raise TypeError(f"{_OP}: tf32 must be None (follow torch's matmul precision) or a bool, got {tf32!r}")
        acts = (Xns, Yns, Xfs, Yfs)
        key = _act_key(acts, len(self.Ws))
        meta = self._acts.get(key) if key is not None else None
        capturing = self._ws.is_cuda and torch.cuda.is_current_stream_capturing()
        if meta is None:  # checked once per set of activity tensors (the key pins what the checks read)
            if capturing:
                raise RuntimeError(f"{_OP}: these activity tensors were not seen before the CUDA-graph capture: "
                                   "call the update once outside the capture with the same tensors (it builds and "
                                   "caches the pointer tables, host-to-device copies that a capture cannot hold)")
            acts = _check_acts(self.Ws, acts)
            if not self.Ws:
                return
            if acts[0][0].dtype not in _KERNEL_DTYPES:
                raise TypeError(f"{_OP}: the grouped kernel takes float32 / bfloat16 / float16 activities, got "
                                f"{acts[0][0].dtype} (backend='torch' for float64)")
        else:
            self._acts.move_to_end(key)
            if capturing:  # a captured graph reads this table at every replay: never evict it
                self._pinned.add(key)
        act = acts[0][0].dtype
        if tf32 is None:
            tf32 = torch.get_float32_matmul_precision() != "highest"
        bm, bn, bk, warps, stages = self.blocks(act)
        tiles, n_tiles, _ = self._tile_table(bm, bn)
        if meta is None:
            meta = self._meta(key, acts, bm, bn)
        lr_beta = lr / (2.0 * beta if centred else beta)
        with torch.autocast(self._ws.device.type, enabled=False):
            tk.contrastive_many(meta, tiles, self._ws, self._norm, self._badb, self._cnt, n_tiles, lr_beta,
                                None if max_norm is None else float(max_norm), act, self.Ws[0].dtype, tf32,
                                bm, bn, bk, warps, stages)
        # the kernel writes through raw addresses, which autograd does not see: bump the version
        # counters as an in-place torch op would, so a graph that saved W refuses a stale backward
        increment_version(self._written)


def _act_key(acts, n_layers):
    """What a cached table depends on, from the four activity lists: each tensor's address,
    shape, strides and dtype; None when the lists are malformed (the checks then say why)."""
    try:
        if any(len(a) != n_layers for a in acts):
            return None
        return tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for a in acts for t in a)
    except (TypeError, AttributeError, RuntimeError):
        return None


def _check_layers(Ws, bs, op="ContrastiveGroup"):
    if not isinstance(Ws, (list, tuple)):
        raise TypeError(f"{op}: Ws must be a list of tensors, got {type(Ws).__name__}")
    Ws = list(Ws)
    if bs is None:
        bs = [None] * len(Ws)
    if not isinstance(bs, (list, tuple)):
        raise TypeError(f"{op}: bs must be None or a list (of tensors or None), got {type(bs).__name__}")
    bs = list(bs)
    if len(bs) != len(Ws):
        raise ValueError(f"{op}: bs has {len(bs)} entries but Ws has {len(Ws)}")
    for i, (W, b) in enumerate(zip(Ws, bs)):
        _check_params(W, b, op=op, names=(f"W[{i}]", f"b[{i}]"))
        for name, t in ((f"W[{i}]", W), (f"b[{i}]", b)):
            if t is None:
                continue
            if t.device != Ws[0].device:
                raise ValueError(f"{op}: {name} is on {t.device} but W[0] is on {Ws[0].device}")
            if t.dtype != Ws[0].dtype:
                raise TypeError(f"{op}: {name} has dtype {t.dtype} but W[0] has {Ws[0].dtype} "
                                "(one parameter dtype per group)")
            if not t.is_contiguous():
                raise ValueError(f"{op}: {name} must be contiguous (a parameter; contrastive_update_ takes "
                                 f"strided ones), got strides {t.stride()}")
    named = [(f"W[{i}]", W) for i, W in enumerate(Ws)] + [(f"b[{i}]", b) for i, b in enumerate(bs) if b is not None]
    if not any(t.is_meta for _, t in named):
        _check_disjoint(op, named)
    return Ws, bs


def _check_acts(Ws, acts, op=_OP):
    """Each list as long as Ws, each layer's phases as contrastive_update_ checks them, one dtype
    for every activity, unit stride along features. Returns the four lists."""
    acts = tuple(acts)
    for name, a in zip(("Xns", "Yns", "Xfs", "Yfs"), acts):
        if not isinstance(a, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list of tensors, got {type(a).__name__}")
        if len(a) != len(Ws):
            raise ValueError(f"{op}: {name} has {len(a)} entries but Ws has {len(Ws)}")
    first = None
    for i, W in enumerate(Ws):
        xn, yn, xf, yf = (f"{p}[{i}]" for p in _PHASES)
        _check_phase(W, ((xn, acts[0][i]), (yn, acts[1][i])), op=op, wname=f"W[{i}]")
        _check_phase(W, ((xf, acts[2][i]), (yf, acts[3][i])), op=op, wname=f"W[{i}]")
        for p, a in zip(_PHASES, acts):
            t = a[i]
            if first is None:
                first = (f"{p}[{i}]", t.dtype)
            elif t.dtype != first[1]:
                raise TypeError(f"{op}: {p}[{i}] has dtype {t.dtype} but {first[0]} has {first[1]} "
                                "(one activity dtype for every layer)")
            if t.shape[1] > 1 and t.stride(1) != 1:
                raise ValueError(f"{op}: {p}[{i}] must have unit stride along its features (rows may be "
                                 f"strided), got strides {t.stride()}: pass .contiguous()")
    return tuple(list(a) for a in acts)


_groups = collections.OrderedDict()


def contrastive_update_many_(Ws, bs, Xns, Yns, Xfs, Yfs, lr, beta, max_norm=None, *, centred=False, tf32=None,
                             block_m=0, block_n=0, block_k=0, num_warps=0, num_stages=0, backend=None):
    """contrastive_update_ of every layer i: W_i, b_i (bs: None, or a list of tensors / None) from
    Xns[i], Yns[i] (nudged), Xfs[i], Yfs[i] (free), in place, without autograd; returns None.

    Layers may differ in shape and rows; all W and b share one dtype and device, all activities
    one dtype. Each layer is gated (non-finite dW: W_i and b_i untouched; non-finite db: b_i
    untouched) and clipped (max_norm) on its own, as contrastive_update_ does. Empty lists: no-op.

    backend "triton": one grouped launch for all layers (this module's docstring: the tables it
    caches, CUDA graphs). "torch" (and CPU tensors under "auto", and float64): a loop of
    geokern.reference.contrastive.contrastive_update_. tf32 and the block / warp knobs: see
    ContrastiveGroup (the group made for these parameters is cached, the last few of them).
    """
    knobs = (block_m, block_n, block_k, num_warps, num_stages)
    group = key = None
    if backend != "torch" and isinstance(Ws, (list, tuple)) and Ws:
        key = _param_key(Ws, bs, knobs)
        group = _groups.get(key)
    ok = isinstance(Xns, (list, tuple)) and Xns and isinstance(Xns[0], torch.Tensor)
    if group is not None and ok:  # the parameters were checked when the group was made
        if _resolve(backend, group.Ws[0].device, (group.Ws[0].dtype, Xns[0].dtype), op=_OP) == "triton":
            _groups.move_to_end(key)
            return group.update_(Xns, Yns, Xfs, Yfs, lr, beta, max_norm, centred=centred, tf32=tf32)
    Ws, bs = _check_layers(Ws, bs, op=_OP)
    acts = _check_acts(Ws, (Xns, Yns, Xfs, Yfs))
    _check_scalars(lr, beta, max_norm, centred, None, op=_OP)
    if not Ws:
        return
    be = _resolve(backend, Ws[0].device, (Ws[0].dtype, acts[0][0].dtype), op=_OP)
    if be == "torch":
        mx = None if max_norm is None else float(max_norm)
        with torch.no_grad(), torch.autocast(Ws[0].device.type, enabled=False):
            for i, (W, b) in enumerate(zip(Ws, bs)):
                ref.contrastive_update_(W, b, *(a[i] for a in acts), float(lr), float(beta), mx, centred)
        return
    key = _param_key(Ws, bs, knobs)
    if key not in _groups:
        _groups[key] = ContrastiveGroup(Ws, bs, block_m=block_m, block_n=block_n, block_k=block_k,
                                        num_warps=num_warps, num_stages=num_stages)
        if len(_groups) > _GROUP_CACHE:
            _groups.popitem(last=False)
    group = _groups[key]
    group.update_(*acts, lr, beta, max_norm, centred=centred, tf32=tf32)


def _param_key(Ws, bs, knobs):
    """What a cached group depends on: the knobs and each W's and b's address, shape, strides and dtype."""
    try:
        bs = [None] * len(Ws) if bs is None else bs
        return knobs + tuple(None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype) for t in (*Ws, *bs))
    except (TypeError, AttributeError, RuntimeError):
        return None
