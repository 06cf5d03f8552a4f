"""The one registry of benchmark cases: every module geokern/bench/<family>.py defines
`cases()` returning a list of Case; runner and benchmarks/ both read it from here."""

import dataclasses
import importlib
import pkgutil
from typing import Callable

import geokern.bench as _pkg

_NOT_FAMILIES = {"registry", "runner", "ceilings", "__main__"}


@dataclasses.dataclass
class Case:
    """One (op, shape, dtype, direction) with the implementations to time.

    make_inputs() builds one input set; each callable in `impls` (backend name ->
    fn(*inputs)) and `peers` (peer name -> fn(*inputs)) runs the op on it. `reference`
    (fn(*inputs) -> tensor or tuple) is what every impl is checked against before it is
    timed; `tol` is the relative error allowed. `amount` is bytes (metric TB/s) or
    operations (TFLOP/s, Tops/s) per call; `ceiling` names a key of the ceilings dict.
    `baselines` names peers that compute another function on the same shapes (SDPA beside an
    attention of other weights): they run once before timing (an error or out of memory skips
    them) but are not checked against `reference`, which they do not compute.
    """

    op: str
    shape: str
    dtype: str
    direction: str
    make_inputs: Callable
    impls: dict
    peers: dict
    reference: Callable
    amount: float
    metric: str
    ceiling: str
    tol: float = 1e-2
    input_bytes: int = 0
    baselines: tuple = ()

    @property
    def key(self):
        return f"{self.op}-{self.shape}-{self.dtype}-{self.direction}"


def families():
    names = [m.name for m in pkgutil.iter_modules(_pkg.__path__)]
    return sorted(n for n in names if n not in _NOT_FAMILIES and not n.startswith("_"))


def own_timing(family):
    """The family's module when it times its own way instead of do_bench (it defines
    measure(match, progress) -> rows and print_table(rows)), else None."""
    mod = importlib.import_module(f"geokern.bench.{family}")
    return mod if hasattr(mod, "measure") else None


def cases(family=None):
    out = []
    for fam in families():
        if family is None or fam == family:
            out += importlib.import_module(f"geokern.bench.{fam}").cases()
    return out
