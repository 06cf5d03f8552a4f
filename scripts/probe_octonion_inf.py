"""Probe of the GPU-only failure of test_inf_in_v_matches_reference[full-f32-+inf-8] (octonions,
float32, "ieee" dots): one inf in v gave a finite y, as if nonfinite_fwd dropped the inf key and its
per-key terms (`extra`) added nothing. Suspect (TTGIR, triton 3.6 and 3.8): nonfinite_fwd's key loop
is software-pipelined (num_stages=3: k / kn / v in 2 shared buffers, cp.async for key block i + 2
into the slot of block i, issued before the `if tl.max(badk)` branch), and the per-key loop inside
that branch reads kn and v AGAIN from that slot (ttg.local_load in the inner scf.for): it reads the
prefetch (zeros past Tk: kbj = vj = 0, extra = 0). bfloat16 (loop not pipelined) and N = 4 (the
per-key loop reads val, in registers) have no such read.

Each variant is attention_fwd.py with textual changes, imported from a temp file and launched as
hypercomplex_attention_fwd does, in its own child process (all in parallel: compiling dominates).
"unfixed" is the source before the fix (nonfinite_fwd's key loop pipelined); the other u_* variants
change that. Cases: "full" (the failing test) and "long" (Tk = 200, the inf in key block 2 of 4).
Expected if the suspicion holds (sm_90 TTGIR, triton 3.6: the variants with the shared-buffer re-read
are unfixed, u_tf32, u_always2, u_debug; u_noguard has no scf.if and its loop is not pipelined):
package, fixed, u_stages1, u_gload, u_noguard OK; the others BAD, u_debug showing vj of the inf key
read as zeros ("full") or another key's v ("long") while bad, badk and the rows using it are right.

    python scripts/probe_octonion_inf.py          (H100: ~60 s)
    TRITON_INTERPRET=1 python scripts/probe_octonion_inf.py   (CPU: everything OK)
"""
import importlib.util, os, subprocess, sys, tempfile, time
import torch

FIXED_LOOP = "for start in tl.range(0, _last_key(pid_m, Tk, off, CAUSAL, BLOCK_M), BLOCK_N, num_stages=1):"
PLAIN_LOOP = "for start in range(0, _last_key(pid_m, Tk, off, CAUSAL, BLOCK_M), BLOCK_N):"
KEYSEL = ("kbj = tl.sum(tl.where(sel[:, None], kn, 0.0), axis=0) * conj\n"
          "                    vj = tl.sum(tl.where(sel[:, None], v, 0.0), axis=0)\n")
GLOAD = ("jrow = start + jj + tl.arange(0, 1)\n"
         "                    kbj = tl.sum(load_rows(kn_ptr, b, hk, jrow, offs_d, sb0, sb1, sb2, sb3, jrow < Tk, dvalid)"
         ".to(tl.float32), axis=0) * conj\n"
         "                    vj = tl.sum(load_rows(v_ptr, b, hk, jrow, offs_d, sv0, sv1, sv2, sv3, jrow < Tk, dvalid)"
         ".to(tl.float32), axis=0)\n")
DSIZE = "(2 + 2 * BLOCK_N + BLOCK_M * BLOCK_D + 2 * BLOCK_N * BLOCK_D)"  # bad, guard, badk, rows using each key, extra, kbj, vj
DEBUG = [  # (old, new, count): stores into an extra float32 tensor dbg, per program (last key block wins)
    ("e_ptr, y_ptr, lse_ptr,", "e_ptr, y_ptr, lse_ptr, dbg_ptr,", 3),
    ("    if bad > 0:\n", f"    tl.store(dbg_ptr + (bh * tl.num_programs(0) + pid_m) * {DSIZE}, bad.to(tl.float32))\n"
     "    if bad > 0:\n", 1),
    ("    R: tl.constexpr = BLOCK_M * BLOCK_D // N\n",
     f"    R: tl.constexpr = BLOCK_M * BLOCK_D // N\n    dbase = (bh * tl.num_programs(0) + pid_m) * {DSIZE}\n", 1),
    ("        acc = mm_acc(p.to(DT), tl.where(badk", "        gd = tl.max(tl.where(badk, 1, 0))  # stored for the last key block with a bad key\n"
     "        tl.store(dbg_ptr + dbase + 2 + tl.arange(0, BLOCK_N), badk.to(tl.float32), mask=gd > 0)\n"
     "        tl.store(dbg_ptr + dbase + 1, gd.to(tl.float32), mask=gd > 0)\n"
     "        acc = mm_acc(p.to(DT), tl.where(badk", 1),
    ("                pj = tl.sum(", "                tl.store(dbg_ptr + dbase + 2 + BLOCK_N + jj, tl.sum(tl.where(use, 1, 0)).to(tl.float32))\n"
     "                pj = tl.sum(", 1),
    (KEYSEL, KEYSEL + "                    o = dbase + 2 + 2 * BLOCK_N + BLOCK_M * BLOCK_D + jj * BLOCK_D + offs_d\n"
     "                    tl.store(dbg_ptr + o, kbj)\n                    tl.store(dbg_ptr + o + BLOCK_N * BLOCK_D, vj)\n", 1),
    ("    # logsumexp's lse", "    tl.store(dbg_ptr + dbase + 2 + 2 * BLOCK_N + tl.arange(0, BLOCK_M)[:, None] * BLOCK_D + offs_d[None, :], extra)\n"
     "    # logsumexp's lse", 1),
]
U = [(FIXED_LOOP, PLAIN_LOOP, 1)]  # back to the source before the fix
VARIANTS = {  # name: (textual changes, launch overrides)
    "package": (None, {}), "fixed": ([], {}), "unfixed": (U, {}),
    "u_tf32": (U, {"PREC": "tf32"}),
    "u_noguard": (U + [("        if tl.max(tl.where(badk, 1, 0)) > 0:\n", "        if True:\n", 1)], {}),
    "u_stages1": (U, {"num_stages": 1}),
    "u_always2": (U + [("    if bad > 0:\n", "    if bad >= 0:\n", 1)], {}),
    "u_gload": (U + [(KEYSEL, GLOAD, 1)], {}),
    "u_debug": (U + DEBUG, {}),
}
CASES = {"full": (1, 2, 1, 7, 9, 16, 3, 5), "long": (1, 2, 1, 7, 200, 16, 150, 5)}  # B H Hkv Tq Tk D, inf at v[0,0,j,d]


def child(name):
    import warnings; warnings.filterwarnings("ignore")  # the interpreter's inf * 0
    from geokern.kernels.hypercomplex_attention import _common, attention_fwd, LOG2E
    from geokern.reference import hypercomplex_attention as ref
    import geokern
    edits, over = VARIANTS[name]
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    if edits is not None:
        src = open(attention_fwd.__file__).read()
        assert src.count(FIXED_LOOP) == 1, "the fix is not in attention_fwd.py: the u_* variants would be wrong"
        for old, new, n in edits:
            assert src.count(old) == n, (name, old)
            src = src.replace(old, new)
        path = os.path.join(os.environ["PROBE_DIR"], f"fwd_{name}.py")
        open(path, "w").write(src)
        spec = importlib.util.spec_from_file_location(f"probe_fwd_{name}", path)
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    for case, (B, H, Hk, Tq, Tk, D, j, d) in CASES.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, h, t, D, dtype=torch.float64).float().to(dev) for h, t in ((H, Tq), (Hk, Tk), (Hk, Tk)))
        v[0, 0, j, d] = float("inf")
        y64 = ref.octonion_attention(q.double(), k.double(), v.double(), False)
        if edits is None:
            y = geokern.octonion_attention(q, k, v, causal=False, backend="triton")
        else:
            qn, kn = ref.normalize_channels(q, 8), ref.normalize_channels(k, 8)
            e = ref.epilogue_matrix(8).float().to(dev)
            _, _, _, _, _, _, meta = _common(q, k, False, 8)
            meta.update(over)
            y = torch.empty_like(q); lse = torch.empty(B, H, Tq, device=dev)
            grid = ((Tq + meta["BLOCK_M"] - 1) // meta["BLOCK_M"], B * H)
            size = 2 + 2 * meta["BLOCK_N"] + meta["BLOCK_M"] * meta["BLOCK_D"] + 2 * meta["BLOCK_N"] * meta["BLOCK_D"]
            dbg = torch.full((grid[0] * grid[1] * size,), -12345.0, device=dev)
            st = [s for t in (q, k, v, qn, kn) for s in t.stride()]
            mod.hypercomplex_attention_fwd_kernel[grid](q, k, v, qn, kn, e, y, lse, *([dbg] if "debug" in name else []), *st,
                                                        H, H // Hk, Tq, Tk, D, Tk - Tq, ref.default_scale(D) * LOG2E, **meta)
        fin = torch.isfinite(y64)
        same = all(torch.equal(f(y.cpu()), f(y64.cpu())) for f in (torch.isnan, torch.isposinf, torch.isneginf))
        err = (y.double() - y64)[fin & torch.isfinite(y)].abs().max().item()
        print(f"{name:10s} {case:5s} {'OK ' if same and err < 1e-3 else 'BAD'} nonfinite pattern equal: {same}, "
              f"finite max err {err:.3g}, non-finite in y: {(~torch.isfinite(y)).sum().item()} (ref {(~fin).sum().item()})")
        if edits is not None and "debug" in name:  # program (bh 0, query block 0); the inf key's block is the last one
            BN, BM, BD = meta["BLOCK_N"], meta["BLOCK_M"], meta["BLOCK_D"]
            g = dbg[:size].cpu(); jj = j % BN
            ex = g[2 + 2 * BN:2 + 2 * BN + BM * BD].view(BM, BD)[:Tq, :D]
            kbj, vj = (g[2 + 2 * BN + BM * BD + o:][jj * BD:jj * BD + D] for o in (0, BN * BD))
            kb_true = kn[0, 0, j].cpu() * torch.tensor([1.0] + [-1.0] * 7).repeat(D // 8)
            print(f"   debug: bad {g[0].item()}, guard max(badk) {g[1].item()}, badk keys {(g[2:2 + BN] > 0).nonzero().flatten().tolist()}"
                  f" (expect [{jj}]), rows using the inf key {g[2 + BN + jj].item()} (expect {Tq})\n"
                  f"   debug: extra non-finite {(~torch.isfinite(ex)).sum().item()} max|finite| {ex[torch.isfinite(ex)].abs().max().item():.3g};"
                  f" per-key vj == v[j]: {torch.equal(vj, v[0, 0, j].cpu())}, kbj == conj(kn[j]): {torch.allclose(kbj, kb_true)}\n"
                  f"   debug: vj read {vj[:8].tolist()}\n   debug: v[j]    {v[0, 0, j, :8].tolist()}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1]); sys.exit(0)
    import triton
    print("triton", triton.__version__, "torch", torch.__version__, "interpreter" if os.environ.get("TRITON_INTERPRET") == "1"
          else torch.cuda.get_device_name(), flush=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PROBE_DIR": tmp, "TRITON_CACHE_DIR": os.path.join(tmp, "cache")}
        procs = {n: subprocess.Popen([sys.executable, __file__, n], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True) for n in VARIANTS}
        for n, p in procs.items():
            try:
                out, _ = p.communicate(timeout=max(1, float(os.environ.get("PROBE_TIMEOUT", 110)) - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                p.kill(); out = p.communicate()[0] + "\n(timed out)"
            print(out.rstrip() if p.returncode == 0 else f"{n}: FAILED rc={p.returncode}\n{out[-2000:]}", flush=True)
    print(f"{time.time() - t0:.0f} s")
