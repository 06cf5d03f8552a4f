"""Argument checks of geokern.ops.retrieval (kept apart so that module stays short): numbers,
R, broadcasting to the cost shape, the tuning knobs, the bank segment; and the autocast
dtype convention (the deterministic-algorithms alert is ops._registry.alert_nondeterministic)."""

import math
import numbers

import torch

from geokern._checks import broadcast_shapes, check_same, check_tensor
from geokern.reference import retrieval as ref

def _check_number(op, name, x, positive=False):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(x).__name__}")
    if not math.isfinite(x) or (positive and x <= 0) or (not positive and x < 0):
        raise ValueError(f"{op}: {name} must be finite and {'> 0' if positive else '>= 0'}, got {x}")


def _check_r_number(op, name, x):
    # a number R is one value for every pair: an infinite or NaN one would make every cost inf / NaN
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{op}: {name} must be a tensor or a real number, got {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{op}: {name} must be finite when given as a number, got {x}")


def _check_broadcast(op, name, shape, target, squeeze):
    ok = len(shape) <= len(target)
    if ok:
        try:
            ok = tuple(broadcast_shapes(shape, target)) == tuple(target)
        except RuntimeError:
            ok = False
    if not ok:
        hint = " (a per-query value of a 2-D query is [B, 1])" if squeeze else " (per query: [..., Lq, 1])"
        raise ValueError(f"{op}: {name} of shape {tuple(shape)} must broadcast to the cost shape {tuple(target)}{hint}")


def _check_knobs(op, **knobs):
    """The tuning knobs as the schema's tuple (num_ctas, bank_splits, pipeline, norm_mma, bwd_chunk)."""
    for name, x in knobs.items():
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{op}: {name} must be an int, got {type(x).__name__}")
        if name in ("pipeline", "norm_mma") and x not in (-1, 0, 1):
            raise ValueError(f"{op}: {name} must be -1 (choose), 0 or 1, got {x}")
        if name not in ("pipeline", "norm_mma") and x < 0:
            raise ValueError(f"{op}: {name} must be 0 (choose) or positive, got {x}")
    return tuple(knobs.values())


def _check_bank(op, bank, query, values, R, lead, squeeze):
    """(bank_keys, bank_values, bank_R) checked; bank_R defaults to R where R does not depend on the key."""
    if not isinstance(bank, (tuple, list)) or len(bank) not in (2, 3):
        raise TypeError(f"{op}: bank must be a tuple (keys, values) or (keys, values, R), got "
                        f"{type(bank).__name__}{'' if not isinstance(bank, (tuple, list)) else f' of {len(bank)}'}")
    bk, bv = bank[0], bank[1]
    check_tensor(op, "bank keys", bk, min_dim=2)
    check_tensor(op, "bank values", bv, min_dim=2)
    check_same(op, {"query": query, "bank keys": bk, "bank values": bv})
    if bk.shape[-1] != query.shape[-1] or bv.shape[-1] != values.shape[-1] or bv.shape[-2] != bk.shape[-2]:
        raise ValueError(f"{op}: bank keys must be [..., C, {query.shape[-1]}] and bank values [..., C, "
                         f"{values.shape[-1]}]; got {tuple(bk.shape)} and {tuple(bv.shape)}")
    _, bk3, bv3, _ = ref.as_batched(query, bk, bv)
    own = bk3.shape[:-2], bv3.shape[:-2]
    for shape in own:
        try:
            ok = tuple(broadcast_shapes(shape, lead)) == tuple(lead)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{op}: the bank's leading dims {tuple(shape)} must broadcast to the batch shape "
                             f"{tuple(lead)} of query, keys and values")
    if len(bank) == 3:
        br = bank[2]
    elif not isinstance(R, torch.Tensor) or R.dim() == 0 or R.shape[-1] == 1:
        br = R  # a number or one R per query applies to both segments
    else:
        raise ValueError(f"{op}: R of shape {tuple(R.shape)} depends on the key; pass the bank's own R as "
                         "bank=(keys, values, R)")
    cost_shape = tuple(lead) + ((1,) if squeeze else (query.shape[-2],)) + (bk.shape[-2],)
    user_shape = cost_shape[:-2] + cost_shape[-1:] if squeeze else cost_shape
    if isinstance(br, torch.Tensor):
        if not br.dtype.is_floating_point or br.device != query.device:
            raise TypeError(f"{op}: bank R must be a floating-point tensor on {query.device} or a number, "
                            f"got {br.dtype} on {br.device}")
        _check_broadcast(op, "bank R", br.shape, user_shape, squeeze)
    else:
        _check_r_number(op, "bank R", br)
    return bk, bv, br


def _autocast(query, keys, values, bank):
    """Under torch.autocast, the attention runs in the autocast dtype, as torch's
    scaled_dot_product_attention does (floating inputs cast; the bank's too)."""
    dev = query.device.type
    if not torch.is_autocast_enabled(dev):
        return query, keys, values, bank
    dt = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    bank = None if bank is None else tuple(cast(t) for t in bank[:2]) + tuple(bank[2:])
    return cast(query), cast(keys), cast(values), bank
