"""Device ceilings measured in the same run as the kernels they judge."""

import torch


def measure(do_bench):
    """copy bandwidth (TB/s, read + write), bf16 cuBLAS GEMM (TFLOP/s), fp32 lane rate, special-function rate."""
    n = (2 << 30) // 4  # 2 GiB of float32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    copy = 2 * src.numel() * 4 / (ms * 1e-3) / 1e12
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b)
    gemm = 2 * m**3 / (ms * 1e-3) / 1e12
    props = torch.cuda.get_device_properties(0)
    clock_ghz = getattr(props, "clock_rate", 1_980_000) / 1e6  # kHz; 1.98 GHz if torch hides it
    lanes = props.multi_processor_count * 128 * clock_ghz * 1e9 / 1e12
    # packed 16-bit (half2 / bf16x2 / int16x2) instructions do two lanes' work each
    # the special-function unit (MUFU: ex2, lg2, rcp, rsqrt, sin, cos): 16 results per clock per SM
    # on sm_80 / sm_90 (CUDA programming guide, arithmetic instruction throughput), in T results/s
    sfu = props.multi_processor_count * 16 * clock_ghz * 1e9 / 1e12
    return {"copy_tb_s": copy, "bf16_gemm_tflop_s": gemm, "fp32_lane_tops": lanes, "packed16_lane_tops": 2 * lanes,
            "sfu_tops": sfu}
