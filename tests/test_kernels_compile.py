"""Every Triton entry kernel of the hypercomplex-attention and LIoR families, the hypercomplex
linear decode kernel and blocked GEMM kernel, the ultrametric
signature and top-1 kernels (and the ultrametric scan and read kernels and the LIoR kernels with
float64 scalars, as torch.compile passes them) compiles to sm_90
machine code, on any machine (no GPU needed: Triton's bundled ptxas runs on the CPU).

The CI tests run these kernels under the CPU interpreter (TRITON_INTERPRET=1), which accepts
code the compiler rejects (a plain Python global read inside a kernel, a variable of two widths
across an if). Each family compiles in a fresh process with TRITON_INTERPRET=0 set before
import, for the constexpr values its launcher passes and the signature types it launches with
(ints as i32, Python floats as fp32, tensors' element types); float32 and bfloat16 cover the two
code paths of the dtype (ieee vs tensor-core dots, the rounding narrow). The sizes are the
distinct code paths, not every size: the whole module stays under a minute on two cores."""

from _helpers import run_isolated

_PRELUDE = """
    import os
    os.environ["TRITON_INTERPRET"] = "0"  # before triton.jit decorates the kernels
    # the full autotune lists whatever the caller runs with (GEOKERN_AUTOTUNE=0, as make gpu runs
    # the suite, leaves one config each: the tests that compile every config must see users' lists)
    os.environ["GEOKERN_AUTOTUNE"] = "1"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    TARGET = GPUTarget("cuda", 90, 32)

    def compile_ok(kernel, sig, constexprs, num_warps=4, num_stages=3):
        sig = {**sig, **{name: "constexpr" for name in constexprs}}
        assert list(sig) == list(kernel.arg_names), (kernel.__name__, list(sig), kernel.arg_names)
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        try:
            out = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
        except Exception as e:
            raise AssertionError(f"{kernel.__name__} {constexprs} does not compile for sm_90: {e}") from e
        assert "cubin" in out.asm, (kernel.__name__, constexprs)
        return out
"""


def test_hypercomplex_attention_kernels_compile_for_sm90():
    """The forward and both backward kernels, for both algebras (N = 4, 8), causal and not,
    float32 ("ieee" dots) and bfloat16, with the launcher's tiles (_blocks). The two cases with a
    backward compile with float64 scalars (qk_scale, scale), as torch.compile passes Python floats
    (eager launches pass float32, the third case): before the kernels cast them at entry, fp64 P
    and dS reached _bad_column_terms' loop and the compiled backward failed on the H100
    ("Loop-carried variable a has initial type fp32 but is re-assigned to fp64"). With float64
    scalars no float64 arithmetic is left beyond the entry casts (at most 3 .f64 per scalar:
    the parameter, its load, the cast)."""
    run_isolated(_PRELUDE + """
    import torch
    from geokern.kernels.hypercomplex_attention import (_blocks, hypercomplex_attention_bwd_dkdv_kernel as dkdv,
                                                        hypercomplex_attention_bwd_dq_kernel as dq,
                                                        hypercomplex_attention_fwd_kernel as fwd)

    strides = {f"s{t}{i}": "i32" for t in "qkvab" for i in range(4)}
    ints = {name: "i32" for name in ("H", "G", "Tq", "Tk", "D", "off")}
    # (dtype, N, head dim D, causal, the backward too): float32 quaternions causal, bfloat16
    # octonions (both tile shapes: D = 16 -> 64 x 64 tiles of width 128, D = 64 -> 32 x 32 of
    # width 512; the latter's backward, the slowest to compile, only through its forward's code)
    for dt, n, d, causal, bwd in (("fp32", 4, 64, True, True), ("bf16", 8, 16, False, True),
                                  ("bf16", 8, 64, True, False)):
        block_d = max(16, triton.next_power_of_2(d))
        bm, bn, warps, stages = _blocks(n, block_d, torch.float32 if dt == "fp32" else torch.bfloat16)
        meta = dict(CAUSAL=causal, N=n, PREC="ieee" if dt == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_D=block_d, VW=block_d * (1 if n == 4 else 8))
        t = f"*{dt}"
        ins = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "qn_ptr": t, "kn_ptr": t}
        for ft in ("fp64",) if bwd else ("fp32",):
            out = [(1, compile_ok(fwd, {**ins, "e_ptr": "*fp32", "y_ptr": t, "lse_ptr": "*fp32", **strides, **ints,
                                    "qk_scale": ft}, meta, warps, stages))]
            if bwd:
                scalars = {**strides, **ints, "qk_scale": ft, "scale": ft}
                stats = {"lse_ptr": "*fp32", "delta_ptr": "*fp32"}
                out.append((2, compile_ok(dq, {**ins, "e_ptr": "*fp32", "et_ptr": "*fp32", "dy_ptr": t, **stats,
                                           "dq_ptr": t, "dqn_ptr": t, **scalars}, meta, warps, stages)))
                out.append((2, compile_ok(dkdv, {**ins, "et_ptr": "*fp32", "dy_ptr": t, **stats, "dk_ptr": t,
                                             "dkn_ptr": t, "dv_ptr": t, **scalars}, meta, warps, stages)))
            for i, (nscalars, o) in enumerate(out):
                f64 = o.asm["ptx"].count(".f64") if ft == "fp64" else 0
                assert f64 <= 3 * nscalars, (("fwd", "dq", "dkdv")[i], dt, n, ft, f64)
    """, timeout=300)


def test_octonion_second_pass_is_not_pipelined():
    """nonfinite_fwd's key loop must not be software-pipelined: pipelined (float32 octonions), the
    compiler re-read k^ and v inside the per-key loop from a shared buffer the next block's copy had
    already overwritten, and the H100 lost the inf key's terms. Its PTX function (noinline) holds no
    asynchronous copy; the main kernel's pipelined loop does (the check sees them)."""
    run_isolated(_PRELUDE + """
    import re
    import torch
    from geokern.kernels.hypercomplex_attention import _blocks, hypercomplex_attention_fwd_kernel as fwd

    strides = {f"s{t}{i}": "i32" for t in "qkvab" for i in range(4)}
    ints = {name: "i32" for name in ("H", "G", "Tq", "Tk", "D", "off")}
    bm, bn, warps, _ = _blocks(8, 16, torch.float32)
    meta = dict(CAUSAL=False, N=8, PREC="ieee", BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=16, VW=128)
    ins = {name: "*fp32" for name in ("q_ptr", "k_ptr", "v_ptr", "qn_ptr", "kn_ptr")}
    ptx = compile_ok(fwd, {**ins, "e_ptr": "*fp32", "y_ptr": "*fp32", "lse_ptr": "*fp32", **strides, **ints,
                           "qk_scale": "fp32"}, meta, warps).asm["ptx"]
    funcs = re.split(r"^(?=\\.(?:visible \\.entry|func))", ptx, flags=re.M)
    # (the function appears twice: its declaration, then its body)
    second = max((f for f in funcs if "nonfinite_fwd" in f.split("(")[0]), key=len)
    main = [f for f in funcs if f.startswith(".visible .entry")]
    assert len(main) == 1 and "ret;" in second, [f[:80] for f in funcs]
    assert "cp.async" in main[0], "the main kernel's key loop is no longer pipelined: the check sees nothing"
    assert "cp.async" not in second, "nonfinite_fwd's key loop is software-pipelined again"
    """, timeout=300)


# A kernel lowered as a launch specialises it (the binder Triton's launcher uses, fed CPU tensors:
# 16-byte aligned pointers, ints divisible by 16 or equal to 1), only as far as LLVM IR, where Triton
# fixes its shared memory: no ptxas, which takes minutes for these kernels on two cores. Without the
# specialisation nothing is vectorised or pipelined and the shared memory comes out smaller.
_LOWER = """
    import os
    os.environ["TRITON_INTERPRET"] = "0"  # before triton.jit decorates the kernels
    # the full autotune lists whatever the caller runs with (GEOKERN_AUTOTUNE=0, as make gpu runs
    # the suite, leaves one config each: the tests that compile every config must see users' lists)
    os.environ["GEOKERN_AUTOTUNE"] = "1"
    import torch, triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    import geokern.kernels.hypercomplex_attention as K

    BACKEND = make_backend(GPUTarget("cuda", 90, 32))
    DTS = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

    def launch_args(which, dt, n, D, Tq=128, Tk=128, H=2, Hk=2):
        # (kernel, args, meta) as hypercomplex_attention_fwd / _bwd launch it, causal (the superset:
        # the non-finite second passes are compiled in)
        q = torch.zeros(1, H, Tq, D, dtype=DTS[dt])
        k = torch.zeros(1, Hk, Tk, D, dtype=DTS[dt])
        meta = K._common(q, k, True, n)[-1]
        rows, e, st = torch.zeros(1, H, Tq), torch.zeros(64, 64), K._strides(q, k, k, q, k)
        sc = (H, H // Hk, Tq, Tk, D, Tk - Tq, 0.5, 0.5)
        if which == "fwd":
            return K.hypercomplex_attention_fwd_kernel, (q, k, k, q, k, e, q, rows, *st, *sc[:-1]), meta
        if which == "dq":
            return K.hypercomplex_attention_bwd_dq_kernel, (q, k, k, q, k, e, e, q, rows, rows, q, q, *st, *sc), meta
        return K.hypercomplex_attention_bwd_dkdv_kernel, (q, k, k, q, k, e, q, rows, rows, k, k, k, *st, *sc), meta

    def lower(kernel, args, meta):
        # (TTGIR text, shared memory bytes)
        bound, spec, _ = create_function_from_signature(kernel.signature, kernel.params, BACKEND)(*args, **meta)
        options = {"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]}
        consts = {k: v for k, v in meta.items() if k not in options}
        _, sig, constexprs, attrs = kernel._pack_args(BACKEND, {**consts, **options}, bound, spec, options)
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
        opts = BACKEND.parse_options(options)
        metadata, stages = {"hash": "0", "target": BACKEND.target, **opts.__dict__}, {}
        BACKEND.add_stages(stages, opts, src.language)
        ctx = ir.context()
        ir.load_dialects(ctx)
        BACKEND.load_dialects(ctx)
        mod = src.make_ir(BACKEND.target, opts, BACKEND.get_codegen_implementation(opts), BACKEND.get_module_map(), ctx)
        for ext, stage in stages.items():
            mod = stage(mod, metadata)
            if ext == "ttgir":
                ttgir = str(mod)
            if ext == "llir":
                return ttgir, metadata["shared"]
"""


def test_hypercomplex_attention_tiles_fit_shared_memory():
    """The launcher's tiles and stages (_blocks) fit the H100's 232448 bytes of shared memory:
    the H100 refused the float32 octonion backward at D = 24 (BLOCK_D = 32, 64 x 64 tiles: 287744
    bytes, OutOfResources at launch; D = 64 at 32 x 32: 274944, D = 128 at 16 x 16: 271616, and the
    float32 quaternion forward and backward at D = 128: 278784, 345088). The largest cases of each
    kernel (float32; the widest value rows) in two processes, and the 16-bit tiles the benchmarks
    measured kept (unchanged: at most 164864 bytes, the bfloat16 quaternion backward at D = 128,
    as read with Triton 3.6). The kernels have no autotune lists: a launch, with GEOKERN_AUTOTUNE
    or without, takes _blocks' one config."""
    run_isolated(_LOWER + """
    from concurrent.futures import ProcessPoolExecutor

    def shared(case):
        return case, lower(*launch_args(*case))[1]

    # 16-bit: the tiles the benchmarks measured (no change), float32: smaller where they did not fit
    for n, bd, rows in ((4, 16, 64), (4, 128, 64), (8, 16, 64), (8, 32, 64), (8, 64, 32), (8, 128, 16)):
        for dt in (torch.bfloat16, torch.float16):
            assert K._blocks(n, bd, dt) == (rows, rows, 8 if n == 8 else 4, 3), (n, bd, dt, K._blocks(n, bd, dt))
    cases = [("dkdv", "f32", 8, 24), ("dkdv", "f32", 8, 64), ("dkdv", "f32", 8, 128), ("dkdv", "f32", 4, 128),
             ("fwd", "f32", 4, 128), ("dq", "f32", 8, 128)]
    with ProcessPoolExecutor(2) as pool:
        for case, sh in pool.map(shared, cases):
            print(case, K._blocks(case[2], max(16, triton.next_power_of_2(case[3])), DTS[case[1]]), sh)
            assert sh <= K.SMEM_LIMIT, (case, sh, "more shared memory than an H100 has")
    """, timeout=400)


def test_octonion_dkdv_gemm_operands_keep_their_layout():
    """nonfinite_dkdv's dk GEMM must not take q in dO's layout. When it zeroed q's bad rows by a
    select with a row flag reduced from dO' ([rows, 8 BLOCK_D], a reshaped dot result), the 16-bit
    octonion TTGIR stored q into the wgmma's swizzled buffer from a 64 x 256 linear layout whose
    column bases lay outside q's 32 columns, and on the H100 dk of the keys hidden from a NaN
    query row came out finite but wrong (attention_bwd._gemm_operand). No local_alloc of the
    dkdv kernel may take a tensor in a linear layout with a basis beyond the tensor's shape."""
    run_isolated(_LOWER + """
    import ast, re

    def bad_allocs(ttgir):
        layouts = {}
        for name, body in re.findall(r"^#(linear\\d*) = #ttg\\.linear<\\{(.*)\\}>$", ttgir, flags=re.M):
            layouts[name] = [v for part in re.findall(r"\\w+ = (\\[.*?\\]\\])", body + ",")
                             for v in ast.literal_eval(part)]
        seen, out = 0, []
        for shape, name in re.findall(r"ttg\\.local_alloc %\\S+ : \\(tensor<([\\dx]+)x\\w+, #(\\w+)>\\)", ttgir):
            seen += 1
            dims = [int(x) for x in shape.split("x")]
            if any(c >= d for basis in layouts.get(name, []) for c, d in zip(basis, dims)):
                out.append((shape, name))
        return seen, out

    for dt, D, Tq, Tk, H, Hk in (("bf16", 24, 20, 27, 2, 2), ("f16", 16, 20, 20, 2, 1)):
        ttgir, _ = lower(*launch_args("dkdv", dt, 8, D, Tq, Tk, H, Hk))
        seen, bad = bad_allocs(ttgir)
        assert seen >= 6 and "nonfinite_dkdv" in ttgir, (dt, seen)  # the check sees the second pass
        assert not bad, (dt, D, bad)
    """, timeout=300)


def test_lior_kernels_compile_for_sm90():
    """The step, the recurrence forward / backward (every autotune config once, each flag both
    ways; the forward's step loop and its chunked loop) and the action, float32 and bfloat16."""
    run_isolated(_PRELUDE + """
    from geokern.kernels import lior

    params = {"rho": "fp32", "eta": "fp32", "xi": "fp32"}
    for dt, p, has_j in (("fp32", 3, True), ("bf16", 1, False)):
        t = f"*{dt}"
        compile_ok(lior.lior_step_kernel, {"m_ptr": t, "ring_ptr": t, "x_ptr": t, "j_ptr": t, "pos_ptr": "*i64",
                                           "N": "i32", "D": "i32", **params},
                   dict(P=p, HAS_J=has_j, BLOCK=lior.STEP_BLOCK))

    fwd, bwd = lior.lior_recurrence_fwd_kernel, lior.lior_recurrence_bwd_kernel
    assert fwd.configs and bwd.configs
    dims = {"T": "i32", "B": "i32", "D": "i32", **params}
    # (dtype, P, HAS_J, HAS_M0, HAS_H): flags on and off, P a power of two and not
    cases = [("fp32", 3, True, True, True), ("bf16", 4, False, False, False), ("bf16", 1, True, False, True)]
    for i, (dt, p, has_j, has_m0, has_h) in enumerate(cases):
        t = f"*{dt}"
        flags = dict(P=p, PP=lior._pp(p), HAS_J=has_j, HAS_M0=has_m0, HAS_H=has_h)
        # every autotune config on the first case (its tile sizes and warps), one on the others
        # (and the first chunked-loop config, TC > 0, on every case)
        chunked = [c for c in fwd.configs if c.kwargs.get("TC", 0) > 0][:1]
        assert chunked, "no autotune config of the forward takes the chunked loop"
        for cfg in fwd.configs if i == 0 else fwd.configs[:1] + chunked:
            compile_ok(fwd.fn, {"x_ptr": t, "j_ptr": t, "m0_ptr": t, "h_ptr": t, "out_ptr": t, **dims},
                       {**flags, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
        bchunked = [c for c in lior._bwd_configs() if c.kwargs["TC"] > 0]
        assert bchunked and any(c.kwargs["TC"] == 0 for c in lior._bwd_configs()), "the backward's two loops"
        # the first case: every step-loop config and each chunk shape (TC, VEC) once (the warps only
        # spread the same code wider); the others: a step-loop config and the first and longest chunks
        longest = max(bchunked, key=lambda c: c.kwargs["VEC"] * c.kwargs["TC"] * c.num_warps)
        shapes = {(c.kwargs["TC"], c.kwargs["VEC"]): c for c in reversed(bchunked)}
        first = [c for c in lior._bwd_configs() if c.kwargs["TC"] == 0] + list(shapes.values())
        for cfg in first if i == 0 else [lior._bwd_configs()[0], bchunked[0], longest]:
            compile_ok(bwd.fn, {"g_ptr": t, "x_ptr": t, "j_ptr": t, "m0_ptr": t, "h_ptr": t, "out_ptr": t,
                                "dx_ptr": t, "dm0_ptr": t, "dh_ptr": t, "dj_ptr": "*fp32", **dims},
                       {**flags, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)

    # BF as lior_action picks it (one feature: BF = 1, many: BF = 128, F > 128: ONE_F False), every
    # autotune config (RE, AHEAD, warps) on the first case and the old launcher's on every case
    act, full = lior.lior_action_kernel, lior._action_configs()
    assert any(c.kwargs["AHEAD"] > 0 for c in full)
    assert any(c.kwargs == lior.ACTION_OLD_CONFIG.kwargs and c.num_warps == lior.ACTION_OLD_CONFIG.num_warps
               for c in full), "the old launcher's config is no longer among the autotuner's"
    for i, (dt, bf, one_f) in enumerate((("fp32", 16, True), ("bf16", 128, True), ("fp32", 1, True),
                                         ("fp32", 128, False))):
        f32 = "*fp32"
        for cfg in full if i == 0 else [lior.ACTION_OLD_CONFIG, full[-1]]:
            compile_ok(act.fn, {"phi_ptr": f"*{dt}", "w_ptr": f32, "r_ptr": f32, "cost_ptr": f32,
                                "int_ptr": f32, "mean_ptr": f32, "count_ptr": "*i64", "W": "i32",
                                "B": "i32", "F": "i32", "s_pw": "i32", "s_pb": "i32", "s_rw": "i32",
                                "s_rb": "i32", "eps": "fp32", "dtau": "fp32"},
                       dict(BF=bf, ONE_F=one_f, **cfg.kwargs), cfg.num_warps, cfg.num_stages)
    """, timeout=300)


def test_lior_kernels_take_float64_scalars_without_float64_loops():
    """Under torch.compile the LIoR kernels' float arguments (rho, eta, xi; eps, dtau) arrive as
    float64 (inductor's signature for a Python float; eager Triton passes float32). On the H100 the
    recurrence kernels then failed to compile ("Loop-carried variable m has initial type fp32 but
    is re-assigned to fp64") and the action's running total had the same fault: every kernel
    compiles either way, and with float64 scalars no float64 arithmetic is left beyond the entry
    casts (a .param declaration, a load and a cvt per scalar)."""
    run_isolated(_PRELUDE + """
    import inspect
    from geokern.kernels import lior

    flags = dict(P=3, PP=lior._pp(3), HAS_J=True, HAS_M0=True, HAS_H=True)
    cases = [(lior.lior_step_kernel, dict(P=3, HAS_J=True, BLOCK=lior.STEP_BLOCK), ("rho", "eta", "xi")),
             (lior.lior_recurrence_fwd_kernel.fn, {**flags, **lior.lior_recurrence_fwd_kernel.configs[0].kwargs},
              ("rho", "eta", "xi")),
             (lior.lior_recurrence_bwd_kernel.fn, {**flags, **lior.lior_recurrence_bwd_kernel.configs[0].kwargs},
              ("rho", "eta", "xi")),
             (lior.lior_recurrence_bwd_kernel.fn, {**flags, "HAS_J": False,
                                                   **lior.lior_recurrence_bwd_kernel.configs[0].kwargs},
              ("rho", "eta", "xi")),
             (lior.lior_recurrence_bwd_kernel.fn, {**flags, "BD": 128, "TC": 8, "VEC": 1}, ("rho", "eta", "xi")),
             (lior.lior_recurrence_bwd_kernel.fn, {**flags, "HAS_J": False, "BD": 128, "TC": 8, "VEC": 1},
              ("rho", "eta", "xi")),
             (lior.lior_action_kernel.fn, dict(BF=128, ONE_F=True, RE=4096, AHEAD=1), ("eps", "dtau")),
             (lior.lior_action_kernel.fn, dict(BF=16, ONE_F=True, RE=4096, AHEAD=0), ("eps", "dtau"))]
    for kernel, cons, floats in cases:
        for ft in ("fp32", "fp64"):
            sig = {n: (("*i64" if n in ("pos_ptr", "count_ptr") else "*fp32") if n.endswith("_ptr")
                       else ft if n in floats else "i32")
                   for n in inspect.signature(kernel.fn).parameters if n not in cons}
            ptx = compile_ok(kernel, sig, cons).asm["ptx"]
            assert ptx.count(".f64") <= 3 * len(floats), (kernel.__name__, cons, ft, ptx.count(".f64"))
    """, timeout=300)


def test_ultrametric_kernels_take_float64_scalars_without_float64_loops():
    """Under torch.compile the ultrametric kernels' float arguments (log2a, am1) arrive as float64
    (the fullgraph tests failed on the H100 when they reached the loops): the scan and read
    kernels compile either way, and with float64 scalars no float64 arithmetic is left beyond
    the entry casts."""
    run_isolated(_PRELUDE + """
    import inspect
    from geokern.kernels.ultrametric import scan as sc

    ptrs = {"tdig_ptr": "*i64", "sdig_ptr": "*i64", "val_ptr": "*bf16", "slse_ptr": "*fp32", "keep_ptr": "*i8",
            "tab_ptr": "*fp32", "cnt_ptr": "*i32", "out_ptr": "*bf16", "lse_ptr": "*fp32"}
    cases = [(sc.ultrametric_scan_kernel, dict(FWD=True, SCALE_LSE=False, KEEP_SRC=True, EXCL=excl, C=64, CB=64,
                                               BD=64))
             for excl in (False, True)]  # EXCL: alpha <= 1 reads disjoint buckets
    # POISON: the decode query's marking of out-of-range digits (on with EXCL, off without)
    cases += [(sc.ultrametric_read_kernel, dict(FWD=True, EXCL=excl, C=64, BD=64, POISON=excl)) for excl in (False, True)]
    for kernel, cons in cases:
        for ft in ("fp32", "fp64"):
            sig = {n: ptrs.get(n, ft if n in ("log2a", "am1") else "i32")
                   for n in inspect.signature(kernel.fn).parameters if n not in cons}
            ptx = compile_ok(kernel, sig, cons).asm["ptx"]
            assert ptx.count(".f64") <= 4, (kernel.__name__, ft, ptx.count(".f64"))
    """, timeout=300)


def test_ultrametric_scan_kernels_compile_for_sm90_with_small_chunks():
    """The causal scan and the summary kernel for the chunk sizes a caller may pass, with the
    launcher's blocks (kernels.ultrametric.chunk_block, _bd): chunk=4 and a small v (D = 3, as
    tests/test_ultrametric_edges.py::test_alpha_below_one_is_exact uses) once put a C x C = 4 x 4
    block into tl.dot, which the GPU compiler refuses (K >= 16; the interpreter runs it), and a
    chunk that is no power of two (5) into tl.arange. Forward and backward (their source and
    target roles differ), both weightings (EXCL), float32 and bfloat16 v; the default chunk (64)
    with float64 scalars is test_ultrametric_kernels_take_float64_scalars_without_float64_loops."""
    run_isolated(_PRELUDE + """
    import inspect
    from geokern.kernels import ultrametric as um
    from geokern.kernels.ultrametric import scan as sc

    def sig_of(kernel, cons, dt):
        ptrs = {"tdig_ptr": "*i64", "sdig_ptr": "*i64", "val_ptr": f"*{dt}", "lse_ptr": "*fp32",
                "slse_ptr": "*fp32", "keep_ptr": "*i1", "tab_ptr": "*fp32", "cnt_ptr": "*i32",
                "out_ptr": f"*{dt}"}
        return {n: ptrs.get(n, "fp32" if n in ("log2a", "am1") else "i32")
                for n in inspect.signature(kernel.fn).parameters if n not in cons}

    # (chunk, D, v dtype, forward, EXCL)
    for C, D, dt, fwd, excl in ((4, 3, "fp32", True, True), (4, 3, "fp32", False, True),
                                (5, 3, "bf16", True, False), (16, 8, "bf16", False, False)):
        blocks = dict(C=C, CB=um.chunk_block(C), BD=um._bd(D))
        cons = dict(FWD=fwd, SCALE_LSE=not fwd, KEEP_SRC=fwd, EXCL=excl, **blocks)
        compile_ok(sc.ultrametric_scan_kernel, sig_of(sc.ultrametric_scan_kernel, cons, dt), cons)
        cons = dict(SCALE_LSE=not fwd, KEEP_SRC=fwd, COUNT=fwd, **blocks, POISON=fwd)  # POISON: the decode append's
        compile_ok(sc.ultrametric_summary_kernel, sig_of(sc.ultrametric_summary_kernel, cons, dt), cons)
    """, timeout=300)


def test_ultrametric_signature_and_top1_kernels_compile_for_sm90():
    """The fused signature kernel (projection and head-vector forms, float32 "ieee" and bfloat16
    tensor-core dots, the launcher's tiles for D <= 128 and D = 256) and the top-1 scan (causal
    and padded or not, float32 and bfloat16)."""
    run_isolated(_PRELUDE + """
    import inspect
    from geokern.kernels.ultrametric import signatures as sg, top1 as t1

    def sig_of(kernel, cons, ptrs):
        return {n: ptrs.get(n, "i32") for n in inspect.signature(kernel.fn).parameters if n not in cons}

    for dt, has_w, D, K in (("fp32", True, 64, 8), ("bf16", True, 128, 16), ("bf16", False, 64, 8),
                            ("fp32", False, 256, 32)):
        BT, BC, BD, BK = sg.blocks(D, K)
        cons = dict(HAS_W=has_w, PREC="ieee" if dt == "fp32" else "tf32", BT=BT, BC=BC, BD=BD, BK=BK)
        ptrs = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "planes_ptr": "*fp32", "out_ptr": "*i8"}
        compile_ok(sg.ultrametric_signatures_kernel, sig_of(sg.ultrametric_signatures_kernel, cons, ptrs), cons,
                   4 if BD <= 128 else 8)

    for dt, causal, keep, D in (("fp32", True, True, 64), ("bf16", False, False, 128), ("bf16", True, False, 64)):
        BM, BN, BD = t1.blocks(D)
        cons = dict(HAS_KEEP=keep, CAUSAL=causal, PREC="ieee" if dt == "fp32" else "tf32", BM=BM, BN=BN, BD=BD)
        ptrs = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "qd_ptr": "*i8", "kd_ptr": "*i8", "keep_ptr": "*i1",
                "idx_ptr": "*i64", "lcp_ptr": "*i32", "sim_ptr": "*fp32"}
        compile_ok(t1.ultrametric_top1_kernel, sig_of(t1.ultrametric_top1_kernel, cons, ptrs), cons)
    """, timeout=300)


def test_ultrametric_soft_kernels_compile_for_sm90():
    """The soft-mode forward and backward (kernels/ultrametric/soft.py) with the launcher's GPU
    tiles: bfloat16 causal with a padding mask (tensor-core dots), float32 non-causal ("ieee"
    dots), K = 8 and K = 3 (KP = 4); with float64 scalars (torch.compile) no float64 arithmetic
    is left past the entry casts. And the widest value rows (D = 256 and the largest, SOFT_MAX_D =
    512, at float32 and bfloat16, K = 16) in the H100's shared memory (the compiler does not check
    it without a device: the float32 forward's 64-key tiles at D = 256 needed 237568 bytes and
    failed at launch there)."""
    run_isolated(_PRELUDE + """
    import inspect
    import torch
    from geokern.kernels.ultrametric import soft_blocks
    from geokern.kernels.ultrametric.soft import (ultrametric_soft_attention_bwd_kernel as bwd,
                                                  ultrametric_soft_attention_fwd_kernel as fwd)

    floats = ("nb", "log2a", "lna", "c0")
    dts = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for dt, K, D, causal, keep, ft in (("bf16", 8, 64, True, True, "fp32"), ("fp32", 3, 64, False, False, "fp64"),
                                       ("fp32", 16, 256, True, True, "fp32"), ("fp32", 16, 512, True, True, "fp32"),
                                       ("bf16", 16, 512, False, False, "fp32")):
        t = f"*{dt}"
        ptrs = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "keep_ptr": "*i1" if keep else t, "y_ptr": t, "dy_ptr": t,
                "lse_ptr": "*fp32", "lsc_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": "*fp32", "dk_ptr": t,
                "dv_ptr": t}
        for kernel, is_fwd in ((fwd, True), (bwd, False)):
            bm, bn, warps = soft_blocks(D, is_fwd, dts[dt])
            meta = dict(K=K, KP=max(2, triton.next_power_of_2(K)), CAUSAL=causal, HAS_KEEP=keep,
                        PREC="ieee" if dt == "fp32" else "tf32", BM=bm, BN=bn, BD=D)
            cons = {n: meta[n] for n in kernel.arg_names if n in meta}
            sig = {n: ptrs.get(n, ft if n in floats else "i32")
                   for n in inspect.signature(kernel.fn).parameters if n not in cons}
            out = compile_ok(kernel, sig, cons, warps)
            ptx = out.asm["ptx"]
            if ft == "fp64":
                assert ptx.count(".f64") <= 8, (kernel.__name__, ptx.count(".f64"))
            assert "ex2.approx" in ptx, kernel.__name__
            assert out.metadata.shared <= 232448, (kernel.__name__, dt, D, out.metadata.shared, "bytes of shared memory")
    """, timeout=400)


def test_contrastive_many_kernel_compiles_for_sm90():
    """The grouped many-layer update (its ticket, the spin on a layer's arrivals, the pointer
    casts from the address table) for float32 activities on IEEE and TF32 dots, bfloat16 and
    float16 activities, float32, bfloat16 and float16 W, clip on and off, with the launcher's
    default tiles."""
    run_isolated(_PRELUDE + """
    import torch
    from geokern.kernels import contrastive as tk
    from geokern.ops._contrastive_many import default_blocks

    sig = {"meta_ptr": "*i64", "tiles_ptr": "*i32", "ws_ptr": "*fp32", "norm_ptr": "*fp64", "badb_ptr": "*i32",
           "cnt_ptr": "*i32", "n_tiles": "i32", "n_layers": "i32", "lr_beta": "fp32", "max_norm": "fp32"}
    for act, wdt, prec, clip in ((torch.float32, "fp32", "ieee", True), (torch.float32, "fp32", "tf32", False),
                                 (torch.bfloat16, "fp32", "tf32", True), (torch.bfloat16, "bf16", "tf32", False),
                                 (torch.float16, "fp16", "tf32", True)):
        bm, bn, bk, warps, stages = default_blocks(act)
        compile_ok(tk.contrastive_many_kernel, sig,
                   dict(ACT=tk._KIND[act], W_DT=wdt, PREC=prec, HAS_CLIP=clip, BM=bm, BN=bn, BK=bk, RB=128),
                   warps, stages)
    """, timeout=300)


def test_hypercomplex_linear_decode_kernel_compiles_for_sm90():
    """The decode forward (kernels/hypercomplex_linear.py) with decode_plan's tiles at the decode
    size (32 rows: BM = 32, a stacked [n * 32, 64] accumulator) and at one row (BM = 16), both
    algebras, bfloat16 (tensor-core dots; must become wgmma: its N * BM rows are >= 64) and
    float32 ("ieee" dots), whole-K and split (float32 partials), every autotune config on the
    first case; and the split-sum kernel. The interpreter runs what the compiler may refuse."""
    run_isolated(_PRELUDE + """
    from geokern.kernels import hypercomplex_linear as hl
    from geokern.reference.hypercomplex import left_mul_blocks

    kernel = hl.hypercomplex_linear_decode_kernel
    assert kernel.configs
    ints = {name: "i32" for name in ("M", "KB", "NB", "splits", "sam", "sak", "swk", "swn")}
    # (dtype, n, rows, split)
    cases = [("bf16", 4, 32, True), ("bf16", 8, 32, False), ("bf16", 8, 1, True), ("fp32", 4, 7, False)]
    for i, (dt, n, M, split) in enumerate(cases):
        BM, BN, _ = hl.decode_plan(M, n, 8192 // n, 8192 // n, 132)
        t = f"*{dt}"
        sig = {"a_ptr": t, **{f"w{c}": t for c in range(8)}, "bias_ptr": t, "c_ptr": "*fp32" if split else t, **ints}
        meta = dict(NEG=hl.neg_mask(left_mul_blocks(n)[1]), N=n, HAS_BIAS=not split, SPLIT=split,
                    PRECISION="ieee" if dt == "fp32" else "tf32", BM=BM, BN=BN)
        for cfg in kernel.configs if i == 0 else kernel.configs[:1]:
            # any strides (a strided x or weights: neither vectorised nor pipelined, but it compiles)
            compile_ok(kernel.fn, sig, {**meta, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
        # as a contiguous launch specialises it: unit K strides (constexpr 1), 16-divisible pointers
        # and sizes. Then the loads must be asynchronous copies (the loop is software-pipelined)
        # and the bf16 dots wgmma (the stacked N * BM >= 64 rows; [16, 64] tiles would be mma.sync)
        cfg = kernel.configs[1]
        cons = {**meta, **cfg.kwargs, "sak": 1, "swk": 1}
        full = {name: "constexpr" if name in cons else sig[name] for name in kernel.arg_names}
        attrs = {(j,): [["tt.divisibility", 16]] for j, name in enumerate(kernel.arg_names)
                 if full[name].startswith("*") or name in ("KB", "NB", "sam", "swn")}
        out = triton.compile(ASTSource(fn=kernel.fn, signature=full, constexprs=cons, attrs=attrs), target=TARGET,
                             options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = out.asm["ptx"]
        assert "cp.async" in ptx, (dt, n, M, "the decode kernel's K loop is not pipelined")
        if dt == "bf16":
            assert "wgmma" in ptx, (n, M, "no wgmma: the stacked dot fell back to mma.sync")
    compile_ok(hl.hypercomplex_linear_split_sum_kernel, {"ws_ptr": "*fp32", "bias_ptr": "*bf16", "c_ptr": "*bf16",
                                                         "total": "i32", "cols": "i32", "splits": "i32"},
               dict(HAS_BIAS=True, BLOCK=1024))
    """, timeout=400)


def test_hypercomplex_linear_blocked_gemm_compiles_for_sm90():
    """The blocked large-M forward (hypercomplex_linear_fwd_blocked_kernel: a K loop per component
    block, unrolled N times, each with its own software pipeline) for both algebras, bfloat16
    and float32 ("ieee" dots), bias or not: the largest tiles (128 x 256, 8 warps, 3 stages:
    the most shared memory) and one small-tile config (16 rows) as a contiguous launch
    specialises it (unit K strides, 16-divisible pointers and sizes), and once with any strides.
    Specialised, every inner loop must be pipelined (cp.async), the bfloat16 dots of tiles of
    at least 64 rows wgmma (both operands from shared memory: no sign applied to either), and
    the N loops' buffers must fit the H100's 227 KiB of shared memory (the compiler does not
    check that without a device; the launch would fail). Every autotune config took almost
    10 minutes on this CPU (too slow for this module); these take about 25 s."""
    run_isolated(_PRELUDE + """
    import re
    from geokern.kernels import hypercomplex_linear as hl
    from geokern.reference.hypercomplex import left_mul_blocks

    kernel = hl.hypercomplex_linear_fwd_blocked_kernel
    assert kernel.configs
    ints = {name: "i32" for name in ("M", "KB", "NB", "sam", "sak", "swk", "swn")}
    big = max(kernel.configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"] * c.num_stages)
    small = min(kernel.configs, key=lambda c: c.kwargs["BM"])
    # (dtype, n, bias, configs, any strides too)
    for dt, n, bias, cfgs, any_strides in (("bf16", 4, True, (big, small), False), ("bf16", 8, False, (big,), True),
                                           ("fp32", 4, True, (small,), False)):
        t = f"*{dt}"
        sig = {"a_ptr": t, **{f"w{c}": t for c in range(8)}, "bias_ptr": t, "c_ptr": t, **ints}
        meta = dict(NEG=hl.neg_mask(left_mul_blocks(n)[1]), N=n, HAS_BIAS=bias,
                    PRECISION="ieee" if dt == "fp32" else "tf32")
        for cfg in cfgs:
            if any_strides:  # a strided x or weights: compiles, not necessarily pipelined
                compile_ok(kernel.fn, sig, {**meta, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
            cons = {**meta, **cfg.kwargs, "sak": 1, "swk": 1}
            full = {name: "constexpr" if name in cons else sig[name] for name in kernel.arg_names}
            attrs = {(k,): [["tt.divisibility", 16]] for k, name in enumerate(kernel.arg_names)
                     if full[name].startswith("*") or name in ("KB", "NB", "sam", "swn")}
            out = triton.compile(ASTSource(fn=kernel.fn, signature=full, constexprs=cons, attrs=attrs),
                                 target=TARGET, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            ptx, tag = out.asm["ptx"], (dt, n, str(cfg))
            assert "cp.async" in ptx, (tag, "the blocked kernel's K loops are not pipelined")
            if dt == "bf16" and cfg.kwargs["BM"] >= 64:
                assert "wgmma" in ptx, (tag, "no wgmma: the blocked kernel's dots fell back to mma.sync")
                # A from shared memory: a descriptor after the accumulator list, not a second
                # register list (the stepwise kernel's sign-flipped x tile is the latter)
                assert not re.search(r"wgmma\\.mma_async[^;]*\\}\\s*,\\s*\\{", ptx), (tag, "A operand in registers")
            assert out.metadata.shared <= 232448, (tag, out.metadata.shared, "more shared memory than an H100 has")
    """, timeout=400)


def test_maxplus_int_range_pass_compiles_for_sm90():
    """The integer range pass (clamp + out-of-range flags by atomic max over L's chunks) for int16
    and int32, both semirings, with both of the launcher's tiles (A's rows, B's columns)."""
    run_isolated(_PRELUDE + """
    from geokern.kernels import maxplus as mk
    from geokern.reference.maxplus import int_bound, int_sentinel

    for dt, ty in (("int16", "i16"), ("int32", "i32")):
        import torch
        tdt = getattr(torch, dt)
        for minplus in (False, True):
            consts = mk._int_constants(tdt, minplus)
            sig = {"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "f_ptr": "*i32", "R": "i32", "L": "i32", "RB": "i32",
                   "CL": "i32", **{s: "i32" for s in ("sxb", "sxr", "sxl", "syb", "syr", "syl")}}
            for br, bl in ((8, 128), (64, 16)):
                out = compile_ok(mk.int_prepare_kernel, sig, dict(
                    Q=int_bound(tdt), S_IN=consts["S_IN"], SENT=int_sentinel(tdt, "minplus" if minplus else "maxplus"),
                    MIN=minplus, BR=br, BL=bl))
                assert "atom" in out.asm["ptx"] or "red." in out.asm["ptx"], "the flags' atomic max is gone"
    """, timeout=300)


def test_contrastive_metric_kernels_compile_for_sm90():
    """The metric / rotor update (its rotation loop, the float32 atan2, the gate, the wrap) for
    float32 and bfloat16 state, dL from a pointer and as a float64 scalar (as torch.compile passes
    Python floats), and the parallel row-sum stage with 64-bit row counts."""
    run_isolated(_PRELUDE + """
    from geokern.kernels import contrastive_metric as tk

    for dt, dl_ptr, ft, rows in (("fp32", True, "fp32", "i32"), ("bf16", False, "fp64", "i64")):
        out = compile_ok(tk.metric_update_kernel,
                   {"src_ptr": f"*{dt}", "n_src": rows, "src_stride": "i32", "n_rows": rows, "lam_ptr": f"*{dt}",
                    "lam_stride": "i32", "theta_ptr": f"*{dt}", "theta_stride": "i32", "pairs_ptr": "*i32",
                    "n_pairs": "i32", "dl_ptr": "*fp32", "dl_value": ft, "s": ft, "n": "i32"},
                   dict(DL_PTR=dl_ptr, BLOCK_R=64, BLOCK_N=64, BLOCK_P=64))
        # atan2's two divisions correctly rounded (a plain / is div.full.f32, up to 2 ulp off)
        assert "div.rn.f32" in out.asm["ptx"], "atan2 lost its div_rn"
        compile_ok(tk.row_sums_kernel,
                   {"x_ptr": f"*{dt}", "n_rows": rows, "stride": "i32", "part_ptr": "*fp32", "n": "i32",
                    "rows_per_program": "i32"}, dict(BLOCK_R=64, BLOCK_N=64))
    """, timeout=300)
