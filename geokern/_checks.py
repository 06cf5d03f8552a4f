"""Input validation shared by every public op: clear errors naming the argument."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op, name, t, *, dtypes=FLOAT_DTYPES, last_dim=None, min_dim=1):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({allowed}), got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dim(s), got shape {tuple(t.shape)}")
    if last_dim is not None and t.shape[-1] != last_dim:
        raise ValueError(
            f"{op}: {name} must have last dim {last_dim}, got shape {tuple(t.shape)}"
        )


def host_reads_allowed(t):
    """Whether an input check may read t's values on the host (a digit range check's min / max):
    not while torch.compile traces (a data-dependent read breaks the graph, an error under
    fullgraph) and not while t's CUDA stream is captured into a CUDA graph (the sync would break
    the capture). is_compiling comes first: dynamo cannot trace torch.cuda.is_current_stream_capturing
    either (a torch.* call that returns a bool), and a compiled graph has no host reads to skip."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_same(op, named):
    """All tensors in `named` ({name: tensor}) share one dtype and one device."""
    (n0, t0), *rest = named.items()
    for n, t in rest:
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: {n} has dtype {t.dtype} but {n0} has {t0.dtype}")
        if t.device != t0.device:
            raise ValueError(f"{op}: {n} is on {t.device} but {n0} is on {t0.device}")


def broadcast_shapes(*shapes):
    """torch.broadcast_shapes (a torch.Size; RuntimeError if they do not broadcast) for
    shapes of Python ints, without its cost (about 40 us a call, a large part of an op's
    launch overhead on small inputs)."""
    n = 0
    for s in shapes:  # not max(..., default=0): dynamo (torch.compile fullgraph) rejects default=
        n = max(n, len(s))
    out = [1] * n
    for s in shapes:
        for i, d in enumerate(s, n - len(s)):
            if d != 1:
                if out[i] != 1 and out[i] != d:
                    raise RuntimeError(f"shapes {[tuple(x) for x in shapes]} do not broadcast (dim {i - n})")
                out[i] = d
    return torch.Size(out)


def broadcast_leading(op, a_name, a, b_name, b):
    """The broadcast shape of all dims but the last, or a ValueError naming both inputs."""
    try:
        return broadcast_shapes(a.shape[:-1], b.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"{op}: leading dims of {a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} "
            "do not broadcast"
        ) from None


def autocast_promote(*ts):
    """Inside an autocast region for the first tensor's device, float tensors of mixed dtypes
    in the widest of them (autocast's "promote" rule, as torch.mul and torch.cat get it);
    otherwise unchanged. Ops that run in their inputs' dtype call it before check_same."""
    if not all(isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES for t in ts):
        return ts
    if not torch.is_autocast_enabled(ts[0].device.type):
        return ts
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return tuple(t if t.dtype == dt else t.to(dt) for t in ts)


GRID_ROWS = 65535  # CUDA's limit on a launch grid's y and z dimensions


def check_grid_rows(op, backend, B, H):
    """For kernels launched with one program row per (batch, head): B * H <= GRID_ROWS, else a
    ValueError naming the op, the backend and the way out (the torch backend)."""
    if B * H > GRID_ROWS:
        raise ValueError(f"{op}: backend {backend!r} launches one program row per (batch, head): B * H must be "
                         f"<= {GRID_ROWS}, got B={B}, H={H} (use backend='torch')")
