"""Scaffolding every Triton family shares: the launch hook, the autotune config lists and
the jit helpers more than one family uses."""

import triton
import triton.language as tl

from geokern._backend import AUTOTUNE, interpret_mode


def next_pow2(n):
    """triton.next_power_of_2 of a host size in plain Python: Triton's is a constexpr_function, whose
    host call costs 2-8 us (up to six per launch). Anything but a plain int (a SymInt while
    torch.compile traces with dynamic shapes) goes to Triton's, which keeps it symbolic."""
    if type(n) is int and n > 0:
        return 1 << (n - 1).bit_length()
    return triton.next_power_of_2(n)


def cdiv(a, b):
    """triton.cdiv of host sizes in plain Python (a constexpr_function too: ~4 us a host call, and
    launchers make several); non-int arguments (SymInts) go to Triton's."""
    if type(a) is int and type(b) is int:
        return (a + b - 1) // b
    return triton.cdiv(a, b)


def launch(kernel):
    """`kernel` ready for `[grid](...)` from inside a torch.library.triton_op.

    On the GPU through torch.library.wrap_triton, so torch.compile traces into the kernel; an
    eager call runs it directly only with wrap_triton off (geokern's ops turn it off:
    geokern.ops._registry.launching_directly; on, each launch goes through a higher-order op,
    hundreds of microseconds). Under TRITON_INTERPRET=1 the interpreter's kernels cannot be
    wrapped, so they run directly (eager only)."""
    if interpret_mode():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def autotune_configs(full, *, test, interp):
    """The autotune list of one kernel: `interp` under the CPU interpreter (small tiles keep
    CI fast), `test` when GEOKERN_AUTOTUNE=0 (one config, no tuning time), else `full`.
    Each is a list of triton.Config, or a callable that makes one (built only when chosen)."""
    chosen = interp if interpret_mode() else (full if AUTOTUNE else test)
    return list(chosen() if callable(chosen) else chosen)


# The interpreter's bfloat16 cast truncates on some Triton versions (3.8) and ignores
# fp_downcast_rounding, so there narrow rounds by hand.
_INTERPRET = tl.constexpr(interpret_mode())


@triton.jit
def narrow(x, dt: tl.constexpr):
    """x cast to dt, rounded to nearest even as torch rounds (NaN stays NaN, overflow gives inf)."""
    if dt == tl.bfloat16 and _INTERPRET:
        xf = x.to(tl.float32)
        bits = xf.to(tl.uint32, bitcast=True)
        hi = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        return tl.where(xf != xf, xf.to(dt), hi.to(tl.bfloat16, bitcast=True))
    elif dt == tl.float16 or dt == tl.bfloat16:
        return x.to(dt, fp_downcast_rounding="rtne")
    else:
        return x.to(dt)


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b accumulated in float32. PREC = "upcast" (the interpreter, whose 16-bit dot is
    wrong in triton 3.8) multiplies float32 copies instead: the same products, exact."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def mm_acc(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b in float32 (PREC as in mm)."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc, input_precision=PREC)


@triton.jit
def atan2(y, x):
    """atan2(y, x) of float32 y, x, within 3 ulp (the interpreter has no libdevice, so both run
    this): Cephes atanf's polynomial on t = min / max of |y|, |x| in [0, 1], reduced past
    tan(pi / 8) by atan(t) = pi / 4 + atan((t - 1) / (t + 1)), then the octant and quadrant.
    IEEE's special cases: +-0 and +-inf in either argument by their signs (atan2(+-0, -0) =
    +-pi, atan2(+-inf, -inf) = +-3 pi / 4), NaN in either gives NaN. Signs are applied by
    multiplying (Triton negates as 0 - a, which turns -0.0 into +0.0)."""
    ax = tl.abs(x)
    ay = tl.abs(y)
    steep = ay > ax
    hi = tl.where(steep, ay, ax)
    lo = tl.where(steep, ax, ay)
    # 0 / 0 and inf / inf have no ratio: both zero gives angle 0 (then the signs), both inf pi / 4
    # div_rn: a plain / compiles to div.full.f32 (up to 2 ulp), which would eat the 3-ulp budget
    t = tl.where(hi == 0.0, 0.0, tl.where(ax == ay, 1.0, tl.div_rn(lo, tl.where(hi == 0.0, 1.0, hi))))
    big = t > 0.41421356237309503
    u = tl.where(big, tl.div_rn(t - 1.0, t + 1.0), t)
    z = u * u
    p = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * u + u
    r = tl.where(big, 0.78539816339744831 + p, p)
    r = tl.where(steep, 1.5707963267948966 - r, r)
    r = tl.where(x.to(tl.int32, bitcast=True) < 0, 3.1415926535897931 - r, r)  # sign bit: -0.0 too
    r = r * tl.where(y.to(tl.int32, bitcast=True) < 0, -1.0, 1.0)
    return tl.where((x != x) | (y != y), x + y, r)
