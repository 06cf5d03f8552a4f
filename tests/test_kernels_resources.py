"""The octonion attention kernels' machine resources on sm_90, on any machine (Triton's bundled
ptxas and cuobjdump run on the CPU): registers and local-memory stack per thread.

When a kernel's register demand is far above the 255 a thread can have, ptxas does not spill a
little: it falls back to a 32-register allocation with kilobytes of local-memory stack per
thread (the octonion kernels had 13-40 KB before common._emm and _blocks' float32 register
budget). That is slow, and the driver reserves the stack for every resident thread of every SM
in each CUDA context (gigabytes on an H100: twelve test processes ran out of GPU memory)."""

from _helpers import run_isolated
from test_kernels_compile import _LOWER

# stack above this means the register allocation has gone wrong (the kernels measured at most
# ~2 KB with Triton 3.6's ptxas, 32 registers came with 13 KB and more)
STACK_LIMIT = 4096


def test_octonion_attention_kernels_keep_their_registers():
    """The octonion forward, dq and dk / dv kernels, bfloat16 at D = 64 (32 x 32 tiles) and float32
    at D = 16 (the "ieee" path), compiled as a launch specialises them: no 32-register fallback
    and under 4 KB of stack per thread."""
    run_isolated(_LOWER + f"""
    import subprocess
    from concurrent.futures import ProcessPoolExecutor
    from triton.runtime.jit import create_function_from_signature
    import triton.backends.nvidia

    CUOBJDUMP = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")

    def usage(case):
        kernel, args, meta = launch_args(*case)
        bound, spec, _ = create_function_from_signature(kernel.signature, kernel.params, BACKEND)(*args, **meta)
        options = {{"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]}}
        consts = {{k: v for k, v in meta.items() if k not in options}}
        _, sig, constexprs, attrs = kernel._pack_args(BACKEND, {{**consts, **options}}, bound, spec, options)
        out = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                             target=BACKEND.target, options=options)
        path = f"/tmp/geokern_resources_{{os.getpid()}}.cubin"
        with open(path, "wb") as f:
            f.write(out.asm["cubin"])
        dump = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
        os.unlink(path)
        found = [dict(kv.split(":") for kv in line.split() if kv.startswith(("REG:", "STACK:")))
                 for line in dump.stdout.splitlines() if "REG:" in line]
        assert found, dump.stdout
        return case, min(int(u["REG"]) for u in found), max(int(u["STACK"]) for u in found)

    cases = [(w, dt, 8, D) for dt, D in (("bf16", 64), ("f32", 16)) for w in ("fwd", "dq", "dkdv")]
    with ProcessPoolExecutor(2) as pool:
        for case, reg, stack in pool.map(usage, cases):
            print(case, "REG", reg, "STACK", stack)
            assert reg > 32, (case, reg, "ptxas fell back to 32 registers")
            assert stack < {STACK_LIMIT}, (case, stack, "bytes of stack per thread")
    """, timeout=500)
