"""Time the headline benchmark rows of whichever geokern is importable, for before / after
comparisons of one change in one run on one machine (scripts/compare.sh runs it per tree).

    python scripts/headline.py --label new --out rows.jsonl [--match REGEX]

Implementations only (no peers: they do not change with geokern's code); inputs rotated
through buffers larger than L2 as the runner does; each implementation checked against the
case's reference before it is timed. One JSON line per (case, implementation).
"""

import argparse
import itertools
import json
import math

import torch
from triton.testing import do_bench

from geokern.bench import registry
from geokern.bench.runner import _rel_err as rel_err  # the runner's check, in this tree and in older ones

# one or two rows per family: what the README's tables headline
HEADLINE = (r"^(quaternion_mul 67108864x4 bf16 fwd|octonion_mul 33554432x8 fp32 bwd"
            r"|maxplus_matmul 4096x4096x4096 (fp32|bf16|int16) fwd|maxplus_matmul 64x65536x64 fp32 fwd"
            r"|tropical_attention B4H8T4096D64 fp32 (fwd|bwd)"
            r"|retrieval_attention B4-H16-N4096-D64 bf16 (fwd|fwd\+bwd)"
            r"|retrieval_decode B32-n8-T512\+bank4096-dv768 (fp32|bf16) fwd"
            r"|contrastive_update_ in4096-out4096-N256 (fp32|bf16) fwd)$")
L2_BYTES = 50 << 20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--match", default=HEADLINE)
    p.add_argument("--impls", default="cuda,triton", help="comma-separated implementation names to time")
    args = p.parse_args()
    import re

    want = set(args.impls.split(","))
    with open(args.out, "a") as f:
        for case in registry.cases():
            if not re.search(args.match, f"{case.op} {case.shape} {case.dtype} {case.direction}"):
                continue
            sets = [case.make_inputs()]
            if case.input_bytes:
                n = min(8, max(1, math.ceil(3 * L2_BYTES / case.input_bytes)))
                sets += [case.make_inputs() for _ in range(n - 1)]
            ref = case.reference(*sets[0])
            for name, fn in case.impls.items():
                if name not in want:
                    continue
                err = rel_err(fn(*sets[0]), ref)
                it = itertools.cycle(sets)
                ms = do_bench(lambda: fn(*next(it)), warmup=25, rep=300, return_mode="median") if err <= case.tol else None
                row = {"label": args.label, "case": case.key, "impl": name, "ms": ms, "err": err}
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")
            del sets, ref
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
