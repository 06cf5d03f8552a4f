"""Hardware counters of the kernels behind benchmark rows: the measured cause of a row's miss
(issues #16-#21 ask each miss to be stated with its measured cause). GPU only, under Nsight Compute.

    python scripts/ncu_rows.py profile OUT --match REGEX [--impls triton,cuda] [--budget SECONDS]
    python scripts/ncu_rows.py summary OUT          (the table again, from OUT/rows.csv)

`profile` runs this script again under ncu (--clock-control none: METHOD.md leaves the clocks alone;
--profile-from-start off). The inner run takes the registry's cases whose "op shape dtype direction"
matches REGEX (as geokern.bench --match does), and for each of the case's implementations named in
--impls (their names in the case: "triton", "cuda", "sdpa", ...; all when not given) makes the inputs,
runs the call twice unprofiled (compiling and autotuning happen there), then once between
cudaProfilerStart / Stop inside an NVTX range named "op shape dtype direction impl": ncu profiles the
kernels of that one call only, each with the sections below (one replay per pass; a call of a few
ms is profiled in seconds). The report (OUT/rows.ncu-rep, deleted after unless --keep-report) is then
printed as CSV twice, with the kernels' own names and renamed by their NVTX range, to OUT/rows.csv, and summarised per kernel in
OUT/rows.txt: duration, DRAM / L2 / SM throughput (% of peak), achieved and theoretical occupancy,
registers, shared memory, and the three largest warp stall reasons (cycles per issued instruction).
A case whose call fails is reported and skipped; --budget stops starting cases (the report keeps
the ones done).
"""

import argparse
import csv
import io
import os
import re
import subprocess
import sys
import time

SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis")
STALLS = r"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
COLUMNS = (  # (heading, metric name in the details page)
    ("us", "Duration"),
    ("dram%", "DRAM Throughput"),
    ("l2%", "L2 Cache Throughput"),
    ("sm%", "Compute (SM) Throughput"),
    ("occ%", "Achieved Occupancy"),
    ("theo%", "Theoretical Occupancy"),
    ("regs", "Registers Per Thread"),
    ("smem", "Dynamic Shared Memory Per Block"),
)


def _inner(match, impls, budget):
    import torch

    from geokern.bench import registry

    t0 = time.monotonic()
    for case in registry.cases():
        label = f"{case.op} {case.shape} {case.dtype} {case.direction}"
        if not re.search(match, label):
            continue
        if time.monotonic() - t0 > budget:
            print(f"budget spent before {label}", flush=True)
            break
        try:
            inputs = case.make_inputs()
        except Exception as e:  # out of memory for a peer-sized input, say
            print(f"{label}: inputs failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        for name, fn in {**case.impls, **case.peers}.items():
            if impls and name not in impls:
                continue
            try:
                for _ in range(2):
                    fn(*inputs)
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                with torch.cuda.nvtx.range(f"{label} {name}"):
                    fn(*inputs)
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
                print(f"{label} {name}: profiled", flush=True)
            except Exception as e:
                torch.cuda.profiler.stop()
                print(f"{label} {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
        del inputs
        torch.cuda.empty_cache()


def _details(report, rename):
    args = ["ncu", "--import", report, "--page", "details", "--csv"]
    if rename:
        args += ["--print-nvtx-rename", "kernel"]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def _kernels(text):
    """{result ID: {"kernel": name, metric name: (value, unit)}} from a details CSV."""
    rows = list(csv.DictReader(io.StringIO(text[text.find('"ID"'):])))
    out = {}
    for r in rows:
        k = out.setdefault(r["ID"], {"kernel": r["Kernel Name"]})
        k[r["Metric Name"]] = (r["Metric Value"], r.get("Metric Unit", ""))
    return out


_US = {"s": 1e6, "second": 1e6, "ms": 1e3, "msecond": 1e3, "ns": 1e-3, "nsecond": 1e-3}  # ncu picks a duration's unit


def _number(v):
    try:
        return float(str(v).replace(",", ""))
    except ValueError:
        return None


def summary(out):
    with open(os.path.join(out, "rows.csv")) as f:
        own, _, named = f.read().partition("\n#### renamed by NVTX range\n")
    own, named = _kernels(own), (_kernels(named) if named else {})
    lines = ["label | kernel | " + " | ".join(h for h, _ in COLUMNS) + " | top stalls (cycles per issue)",
             "---|---|" + "---|" * len(COLUMNS) + "---"]
    for rid, k in own.items():
        cells = []
        for _, metric in COLUMNS:
            value, unit = k.get(metric, ("-", ""))
            n = _number(value)
            if metric == "Duration" and n is not None:
                n *= _US.get(unit.strip().lower(), 1.0)
            cells.append("-" if n is None else f"{n:.4g}" + (unit.strip() if metric.startswith("Dynamic") else ""))
        stalls = sorted(((name, _number(v[0])) for name, v in k.items()
                         if name.startswith("smsp__average_warps_issue_stalled_") and _number(v[0])),
                        key=lambda s: -s[1])[:3]
        stall = ", ".join(f"{re.sub(r'smsp__average_warps_issue_stalled_|_per_issue_active.ratio', '', n)} {v:.2g}"
                          for n, v in stalls)
        label = named.get(rid, {}).get("kernel", "?")
        lines.append(f"{label} | {k['kernel'][:60]} | " + " | ".join(cells) + f" | {stall}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "rows.txt"), "w") as f:
        f.write(text)
    print(text)


def profile(out, match, impls, budget, keep=False):
    os.makedirs(out, exist_ok=True)
    report = os.path.join(out, "rows")
    cmd = ["ncu", "--clock-control", "none", "--profile-from-start", "off", "--nvtx", "-f", "-o", report,
           *[a for s in SECTIONS for a in ("--section", s)], "--metrics", STALLS,
           sys.executable, os.path.abspath(__file__), "inner", "--match", match, "--budget", str(budget)]
    if impls:
        cmd += ["--impls", ",".join(impls)]
    with open(os.path.join(out, "ncu.log"), "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"ncu exit {rc} (log: {out}/ncu.log)", flush=True)
    if not os.path.exists(report + ".ncu-rep"):
        return 1
    text = _details(report + ".ncu-rep", False)
    try:  # the labels: without them the table still has every kernel
        text += "\n#### renamed by NVTX range\n" + _details(report + ".ncu-rep", True)
    except subprocess.CalledProcessError as e:
        print(f"ncu --print-nvtx-rename failed: {e.stderr[:300]}", flush=True)
    with open(os.path.join(out, "rows.csv"), "w") as f:
        f.write(text)
    if not keep:  # tens of MB: the CSV holds what the summary reads
        os.remove(report + ".ncu-rep")
    summary(out)
    return rc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("profile", "summary", "inner"))
    p.add_argument("out", nargs="?", default=".")
    p.add_argument("--match", default="")
    p.add_argument("--impls", default="")
    p.add_argument("--budget", type=float, default=240.0)
    p.add_argument("--keep-report", action="store_true", help="keep OUT/rows.ncu-rep (deleted by default)")
    a = p.parse_args(argv)
    impls = [s for s in a.impls.split(",") if s]
    if a.what == "inner":
        return _inner(a.match, impls, a.budget)
    if a.what == "summary":
        return summary(a.out)
    return profile(a.out, a.match, impls, a.budget, a.keep_report)


if __name__ == "__main__":
    sys.exit(main())
