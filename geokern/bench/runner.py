"""`python -m geokern.bench`: time every registered case against its peers and ceilings.

For each case: check every implementation against the reference (an implementation
that fails is reported as failed, never timed), time it with do_bench (median, inputs
rotated through buffers larger than L2), and write one JSON per op family plus a PNG
plot to the output folder, in the schema of DESIGN.md. A family that times its own way (the
host overhead of a call, geokern/bench/overhead.py) gives its rows and table through its
`measure` and `print_table` instead, into the same JSON file.
"""

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time

import torch

from geokern.bench import ceilings, registry

L2_BYTES = 50 << 20


def _device_slug():
    name = torch.cuda.get_device_name(0)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _commit(given=None):
    """The commit measured: --commit when given (a copy of the tree without .git), else git's."""
    if given:
        return given
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.check_output(["git", "-C", root, "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _rel_err(out, ref):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    worst = 0.0
    for o, r in zip(outs, refs):
        o, r = o.double(), r.double()
        if torch.isnan(o).any() and not torch.isnan(r).any():
            return math.inf
        den = r.norm().item() or 1.0
        worst = max(worst, (o - r).norm().item() / den)
    return worst


def _time(fn, input_sets, do_bench):
    it = itertools.cycle(input_sets)
    return do_bench(lambda: fn(*next(it)), warmup=25, rep=200, return_mode="median")


HOST_CALLS = 20  # back-to-back calls timed on the host clock per row, at most
HOST_BUDGET_MS = 50  # and about this long at most (a 0.8 s call: once)
HOST_BOUND = 0.8  # host time per call >= this fraction of the timed ms: the row is marked host-bound


def _host_ms(fn, input_sets, ms, clock=time.perf_counter):
    """The host's own time per call (ms): calls back to back, timed before the one
    synchronisation after them (overhead.loop_time). do_bench's events measure the GPU's span of a
    call, which is the host's time instead when the host cannot keep the GPU fed: then the row
    times the wrapper, not the kernel (the Triton ops' launches through torch's higher-order op did
    that on the H100, unnoticed; af39454). A call that synchronises inside reads as host-bound too."""
    from geokern.bench.overhead import loop_time

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    it = itertools.cycle(input_sets)
    n = max(1, min(HOST_CALLS, int(HOST_BUDGET_MS / ms))) if ms else HOST_CALLS
    return loop_time(lambda: fn(*next(it)), n, clock=clock, sync=sync)[1] * 1e3


def run_case(case, ceils, do_bench, progress):
    sets = [case.make_inputs()]
    if case.input_bytes:
        n = min(8, max(1, math.ceil(3 * L2_BYTES / case.input_bytes)))
        sets += [case.make_inputs() for _ in range(n - 1)]
    ref = case.reference(*sets[0])
    timed = {}
    for name, fn in itertools.chain(case.impls.items(), case.peers.items()):
        progress(f"{case.key} {name}")
        try:
            out = fn(*sets[0])
            err = 0.0 if name in case.baselines else _rel_err(out, ref)
        except Exception as e:  # an unsupported peer (out of memory, compile failure)
            timed[name] = (None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}", None)
            torch.cuda.empty_cache()
            continue
        if not err <= case.tol:
            timed[name] = (None, f"failed check: relative error {err:.2e} > {case.tol:.0e}", None)
            continue
        ms = _time(fn, sets, do_bench)
        timed[name] = (ms, None, _host_ms(fn, sets, ms))
    peer_name = next(iter(case.peers), None)
    peer_ms = timed.get(peer_name, (None,))[0] if peer_name else None
    rows = []
    for name, (ms, err, host_ms) in timed.items():
        is_peer = name in case.peers
        value = case.amount / (ms * 1e-3) / 1e12 if ms else None
        rows.append(
            {
                "op": case.op,
                "backend": name,
                "shape": case.shape,
                "dtype": case.dtype,
                "direction": case.direction,
                "ms": ms,
                "metric": case.metric,
                "value": value,
                "peer": None if is_peer else peer_name,
                "peer_ms": None if is_peer else peer_ms,
                "speedup_vs_peer": (peer_ms / ms) if (ms and peer_ms and not is_peer) else None,
                "fraction_of_ceiling": (value / ceils[case.ceiling]) if value else None,
                "error": err,
                "host_ms": host_ms,
                "host_bound": bool(ms and host_ms is not None and host_ms >= HOST_BOUND * ms),
            }
        )
    del sets
    torch.cuda.empty_cache()
    return rows


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_table(rows, file=sys.stdout):
    head = f"{'op':<22} {'shape':<22} {'dtype':<9} {'dir':<7} {'backend':<16} {'ms':>9} {'value':>9} {'metric':<8} {'of ceil':>7} {'vs peer':>8}"
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        line = (
            f"{r['op']:<22} {r['shape']:<22} {r['dtype']:<9} {r['direction']:<7} {r['backend']:<16} "
            f"{_fmt(r['ms'], '9.4f')} {_fmt(r['value'], '9.2f')} {r['metric']:<8} "
            f"{_fmt(r['fraction_of_ceiling'] and 100 * r['fraction_of_ceiling'], '6.1f')}% "
            f"{_fmt(r['speedup_vs_peer'], '7.2f')}x"
        )
        if r.get("error"):
            line += f"  [{r['error']}]"
        if r.get("host_bound"):
            line += f"  [host-bound: {r['host_ms']:.4f} ms of host time a call]"
        print(line, file=file)


def plot(family, rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys(f"{r['op']}\n{r['shape']} {r['dtype']} {r['direction']}" for r in rows))
    names = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ys = []
        for c in cases:
            r = next((r for r in rows if r["backend"] == name and f"{r['op']}\n{r['shape']} {r['dtype']} {r['direction']}" == c), None)
            ys.append(100 * r["fraction_of_ceiling"] if r and r["fraction_of_ceiling"] else 0)
        ax.bar([x + i * width for x in range(len(cases))], ys, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, fontsize=7)
    ax.set_ylabel("% of ceiling")
    ax.set_title(f"geokern {family} on {torch.cuda.get_device_name(0)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m geokern.bench", description=__doc__)
    p.add_argument("--family", action="append", help="op families to run (default: all): " + ", ".join(registry.families()))
    p.add_argument("--out", help="output folder (default: benchmarks/results/<device>/)")
    p.add_argument("--commit", help="the commit to record in the result files (default: git rev-parse HEAD)")
    p.add_argument("--match", help="only the cases whose 'op shape dtype direction' matches this regular expression")
    p.add_argument("--budget", type=float, help="seconds from the start after which no further case starts (the rows "
                   "so far are written, marked partial): set it under an outer time limit to keep the table")
    p.add_argument("--jobs", type=int, default=0, help="a family that times its own way (overhead): processes that "
                   "compile its Triton kernels at once before it times anything (default 0: none)")
    args = p.parse_args(argv)
    start = time.monotonic()
    if not torch.cuda.is_available():
        print("geokern.bench times GPU kernels and needs a CUDA device; none is visible here.")
        return 0
    from triton.testing import do_bench

    import geokern

    out = args.out or os.path.join("benchmarks", "results", _device_slug())
    os.makedirs(out, exist_ok=True)
    fams = args.family or registry.families()
    ceils = None  # a run of own-timing families only (overhead) compares nothing with the ceilings
    if not all(registry.own_timing(f) for f in fams):
        print("measuring ceilings ...", flush=True)
        ceils = ceilings.measure(do_bench)
        print(", ".join(f"{k} = {v:.2f}" for k, v in ceils.items()), flush=True)
    info = geokern.info()
    header = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": info["triton"],
        "cuda": torch.version.cuda,
        "commit": _commit(args.commit),
        "ceilings": ceils,
    }
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    spent = []  # set once --budget stopped a case from starting

    def stop():
        if args.budget is not None and time.monotonic() - start > args.budget:
            spent.append(True)
        return bool(spent)

    for fam in fams:
        own = registry.own_timing(fam)
        checkpoint = lambda so_far, fam=fam: _save(out, fam, header, so_far, partial=True)  # noqa: E731
        if own:  # host wall clock, not do_bench (geokern/bench/overhead.py says why)
            rows = own.measure(args.match, lambda s: print("  " + s, file=sys.stderr, flush=True),
                               checkpoint=checkpoint, stop=stop, jobs=args.jobs)
        else:
            rows = _run_cases(fam, args.match, ceils, do_bench, tqdm, checkpoint, stop)
            plot(fam, rows, os.path.join(out, f"{fam}.png"))
        _save(out, fam, header, rows, partial=bool(spent))
        print(f"\n== {fam} ({header['device']}, torch {header['torch']}, triton {header['triton']}) ==")
        (own.print_table if own else print_table)(rows)
    return 0


def _save(out, fam, header, rows, partial=False):
    # rewritten after every case as well as at the end: a run stopped by a time limit keeps the
    # rows it measured ("partial": true says the family did not finish)
    with open(os.path.join(out, f"{fam}.json"), "w") as f:
        json.dump({**header, **({"partial": True} if partial else {}), "rows": rows}, f, indent=1)


def _run_cases(fam, match, ceils, do_bench, tqdm, checkpoint=lambda rows: None, stop=lambda: False):
    cases = [c for c in registry.cases(fam)
             if not match or re.search(match, f"{c.op} {c.shape} {c.dtype} {c.direction}")]
    bar = tqdm(total=len(cases), desc=fam, file=sys.stderr) if tqdm else None
    rows = []
    for i, case in enumerate(cases):
        if stop():
            print(f"  budget spent: {len(cases) - i} of {len(cases)} {fam} cases not run", file=sys.stderr, flush=True)
            break
        rows += run_case(case, ceils, do_bench, (bar.set_postfix_str if bar else (lambda s: print("  " + s, file=sys.stderr, flush=True))))
        checkpoint(rows)
        if bar:
            bar.update()
    if bar:
        bar.close()
    return rows


if __name__ == "__main__":
    sys.exit(main())
