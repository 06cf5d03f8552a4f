"""Where the host time of an eager call goes, per public op (issue #16, step 1). GPU only.

    python scripts/profile_calls.py --out DIR [--match REGEX] [--calls 25] [--depth 5] [--floors first|all]
                                    [--budget SECONDS]

For each call of geokern/bench/overhead.py (tiny inputs, and the trainer's decode shape for
retrieval_attention), in fp32 and bf16, in the family's order (overhead.plan: the decode shape, then
one call per ops module, then the rest), with each kernel backend and with the floors (an empty
custom op, and an aten new_empty, through an autograd.Function; by default with each call's first
dtype only: they do no work that depends on it): a warm-up, the unprofiled time per call, then two
torch.profiler runs over --calls eager calls, each call inside record_function("geokern_call"):

  ops     CPU + CUDA activities, no Python stacks: the tree of dispatcher events per call (the
          custom op, aten::to casts, allocations, cudaLaunchKernel / cuLaunchKernel) with their
          inclusive time, and every piece of GPU work per call: kernels, memcpy, memset, each
          marked `own` (a geokern kernel: its name holds the family) or `EXTRA`.
  python  CPU with Python stacks: the Python frames per call (argument checks, broadcasting,
          backend choice, autograd Function.apply, the Triton launcher). The Python tracer
          slows every frame several-fold: read the shares, not the absolute microseconds.

Categories sum the outermost event of each kind; kinds nest (a launch inside the custom op),
so they overlap and do not add up to the call. torch.library.custom_op ops (the floor's) record
no dispatcher event of their own in torch 2.14; triton_op and C++ ops do. Writes DIR/profile_calls.txt and .json
(two files, ~3 KB of JSON a profile), rewritten after each call and dtype ("partial": true until the
end): a run stopped by a time limit keeps the profiles it made. Cost: the profiler's own start, stop
and event tree (more with Python stacks) dominate, ~0.9 s a profile at 50 calls on the H100 (d29c939),
less at 25; kernels compiled and autotuned by the overhead family just before are read from Triton's
disk cache.
"""

import argparse
import collections
import json
import os
import re
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from geokern.bench import overhead

MARK = "geokern_call"
OWN = ("hypercomplex", "maxplus", "tropical", "retrieval", "ultrametric", "lior", "contrastive")  # a geokern kernel's name holds its family
OP_KINDS = {  # dispatcher and CUDA-runtime events, by name (the first that matches)
    "autograd Function forward": r"Function$",
    "custom-op dispatch": r"^geokern(_bench)?::",
    "dtype casts / copies": r"^aten::(to|_to_copy|copy_|contiguous|clone|type_as)$",
    "allocation": r"^aten::(empty|empty_strided|empty_like|new_empty|new_zeros|new_full|zeros|ones|full|zeros_like|full_like)$",
    "other aten ops": r"^aten::",
    "kernel launch": r"^(cudaLaunchKernel|cudaLaunchKernelExC|cuLaunchKernel|cuLaunchKernelEx)",
    "memcpy / memset / sync": r"^(cudaMemcpy|cudaMemset|cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize)",
}
PY_KINDS = {  # Python frames, by "file(line): function"
    "argument checks": r"_checks\.py|_retrieval_args\.py|\): _?check|broadcast",
    "backend choice": r"_backend\.py",
    "autograd Function.apply": r"apply of FunctionMeta|autograd/function\.py",
    "custom-op Python layer": r"torch/_ops\.py|torch/_library/",
    "Triton launcher": r"triton/",
    "metric / shape plumbing": r"metric\.py|\): _to4|\): _user_to4|\): _r4|\): _features|\): as_batched",
}


def _name(e):
    return re.sub(r" (object )?at 0x[0-9a-f]+", "", e.name)


def _walk(e, path, depth, tree, kinds, seen, out):
    """Adds e's inclusive time under its path; per kind, e counts when no ancestor matched it."""
    path = path + (_name(e),)
    if len(path) <= depth:
        tree[path][0] += e.cpu_time_total
        tree[path][1] += 1
    hit = set()
    for kind, rx in kinds.items():
        if kind not in seen and re.search(rx, path[-1]):
            out[kind] += e.cpu_time_total
            hit.add(kind)
            break  # the first kind that matches: "other aten ops" after the named ones
    for c in e.cpu_children:
        _walk(c, path, depth, tree, kinds, seen | hit, out)


def _summarise(prof, n, depth, kinds, min_share=0.01):
    """(per-call tree rows, per-call kinds, per-call GPU work) of one profiler run over n calls."""
    tree, out = collections.defaultdict(lambda: [0.0, 0]), collections.Counter()
    # the CPU ranges only: with CUDA activity the profiler mirrors each range as a GPU annotation
    calls = [e for e in prof.events() if e.name == MARK and e.device_type == torch.autograd.DeviceType.CPU]
    if len(calls) != n:
        raise RuntimeError(f"expected {n} '{MARK}' ranges in the profile, found {len(calls)}")
    for e in calls:
        _walk(e, (), depth + 1, tree, kinds, frozenset(), out)
    total = sum(e.cpu_time_total for e in calls) / n
    rows = [{"path": " > ".join(p[1:]) or MARK, "depth": len(p) - 1, "us": us / n, "per_call": k / n}
            for p, (us, k) in tree.items() if us / n >= min_share * total]
    gpu = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name != MARK:
            gpu[_name(e)][0] += 1
            gpu[_name(e)][1] += e.time_range.elapsed_us()
    work = [{"name": k, "per_call": c / n, "us": us / max(c, 1), "own": any(f in k for f in OWN)}
            for k, (c, us) in sorted(gpu.items(), key=lambda kv: -kv[1][0])]
    return rows, {k: v / n for k, v in out.items()}, work


def _profile(fn, n, stack):
    acts = [ProfilerActivity.CPU] + ([] if stack else [ProfilerActivity.CUDA])
    torch.cuda.synchronize()
    with profile(activities=acts, with_stack=stack) as prof:
        for _ in range(n):
            with record_function(MARK):
                fn()
        torch.cuda.synchronize()
    return prof


def profile_one(fn, n, depth):
    for _ in range(overhead.WARMUP):
        fn()
    eager_s, host_s = overhead.median_loop_time(fn)  # the overhead family's loop (its N_CALLS, REPEATS)
    ops_tree, ops_kinds, gpu = _summarise(_profile(fn, n, False), n, depth, OP_KINDS)
    py_tree, py_kinds, _ = _summarise(_profile(fn, n, True), n, depth, PY_KINDS)
    return {"eager_us": eager_s * 1e6, "host_us": host_s * 1e6, "ops_kinds": ops_kinds, "ops_tree": ops_tree,
            "python_kinds": py_kinds, "python_tree": py_tree, "gpu": gpu,
            "extra_gpu_per_call": sum(w["per_call"] for w in gpu if not w["own"]), "error": None}


def _report(r, file):
    print(f"\n## {r['label']} {r['backend']}", file=file)
    if r["error"]:
        print(f"  FAILED: {r['error']}", file=file)
        return
    print(f"  unprofiled: {r['eager_us']:.1f} us/call eager, {r['host_us']:.1f} us/call on the host", file=file)
    for title, kinds, tree in (("ops", r["ops_kinds"], r["ops_tree"]), ("python (traced: shares only)",
                                                                       r["python_kinds"], r["python_tree"])):
        print(f"  {title}: " + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items()) + " (us/call, nested)", file=file)
        for row in tree:
            print(f"    {'  ' * row['depth']}{row['path'].split(' > ')[-1][:90]:<{92 - 2 * row['depth']}} "
                  f"{row['us']:8.1f} us  x{row['per_call']:g}", file=file)
    print(f"  GPU work per call ({r['extra_gpu_per_call']:g} besides geokern's kernels):", file=file)
    for w in r["gpu"]:
        print(f"    {'own  ' if w['own'] else 'EXTRA'} x{w['per_call']:<5g} {w['us']:7.2f} us  {w['name'][:110]}", file=file)


def _write(out, results, calls, partial):
    """DIR/profile_calls.txt and .json with the profiles so far (partial: the run has not ended)."""
    head = (f"# geokern call profile: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {calls} calls each"
            + (f" (partial: {len(results)} profiles so far)" if partial else ""))
    with open(os.path.join(out, "profile_calls.txt"), "w") as f:
        print(head, file=f)
        for r in results:
            _report(r, f)
    with open(os.path.join(out, "profile_calls.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "calls": calls,
                   **({"partial": True} if partial else {}), "results": results}, f, indent=1)
    return head


def main(argv=None):
    p = argparse.ArgumentParser(prog="scripts/profile_calls.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for profile_calls.txt and profile_calls.json")
    p.add_argument("--match", help="only the calls whose 'op shape dtype fwd' matches this regular expression")
    # 25 (was 50): each profile's tree is the mean over the calls of a deterministic sequence of
    # events; the unprofiled time beside it, and the overhead family, give the timings to quote
    p.add_argument("--calls", type=int, default=25, help="eager calls per profile (default 25)")
    p.add_argument("--depth", type=int, default=5, help="levels of the per-call trees printed (default 5)")
    p.add_argument("--floors", choices=("first", "all"), default="first",
                   help="profile the floors with each call's first dtype only (default), or with every dtype")
    p.add_argument("--budget", type=float, help="seconds after which no further call starts (the files say partial)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_calls.py profiles CUDA calls and needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    results, start, floored, stopped = [], time.time(), set(), False
    pairs = overhead.plan(args.match)
    for i, (call, dname) in enumerate(pairs):
        if args.budget is not None and time.time() - start > args.budget:
            stopped = True
            print(f"budget spent: {len(pairs) - i} of {len(pairs)} call/dtype pairs not profiled", file=sys.stderr)
            break
        label = call.label(dname)
        inputs = call.make(overhead.DTYPES[dname])
        fns = {}
        if args.floors == "all" or (call.op, call.shape) not in floored:
            floored.add((call.op, call.shape))
            fns = {"floor": lambda x=inputs: overhead.floor_call(*x),
                   "floor-aten": lambda x=inputs: overhead.aten_floor_call(*x)}
        fns.update({be: (lambda be=be, x=inputs: call.run(be, *x)) for be in overhead.KERNEL_BACKENDS})
        for be, fn in fns.items():
            print(f"  {label} {be}", file=sys.stderr, flush=True)
            r = {"op": call.op, "shape": call.shape, "dtype": dname, "backend": be, "label": label}
            try:
                r.update(profile_one(fn, args.calls, args.depth))
            except Exception as e:  # an unavailable backend or a failed call: reported, never hidden
                r["error"] = f"{type(e).__name__}: {str(e).strip()[:200]}"
            results.append(r)
        del inputs
        torch.cuda.empty_cache()
        _write(args.out, results, args.calls, partial=True)
    head = _write(args.out, results, args.calls, partial=stopped)
    print(head)
    for r in results:
        _report(r, sys.stdout)
    print(f"\n{len(results)} profiles in {time.time() - start:.0f} s; written to {args.out}/profile_calls.{{txt,json}}")


if __name__ == "__main__":
    main()
