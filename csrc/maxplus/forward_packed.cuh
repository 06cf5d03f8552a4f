// maxplus_fwd_packed_kernel: the value-only 16-bit forward on k pairs (half2, bf16x2,
// int16x2 DPX).
#pragma once

#include "tile.cuh"

namespace geokern {
namespace {

// Each instruction does two k steps: a pair (k, k + 1) of one row of A and the same pair of
// one column of B share a 32-bit register (Packed<T>), and the two lanes are collapsed once in
// the epilogue. 16-bit float sums are rounded at every step, which loses nothing: rounding is
// monotone, so max_k round(a + b) = round(max_k (a + b)), the exactly rounded result (overflow
// to inf included). Ties between k are not tracked, so argmax / margin take maxplus_fwd_kernel.
//
// pa: [.., Kp / 2, lda], pb: [.., Kp / 2, ldb] words of 16-bit k pairs -> c: [batch, M, N]
// (value only). One CTA (256 threads): the 128 x 128 tile of C at blockIdx.x, over the K slice
// blockIdx.z, for batches blockIdx.y + i * gridDim.y; one thread: 8 x 8 entries of two lanes.
template <typename T, typename Acc, bool MIN>
__global__ void __launch_bounds__(kThreads, 2) maxplus_fwd_packed_kernel(const Params<T, Acc> p) {
  using P = Packed<T>;
  using H = typename P::H;
  using H2 = typename P::H2;
  constexpr int KP = kTileRows;  // k pairs per tile
  static_assert(kKQuant % (2 * KP) == 0, "tiles divide the K padding");
  // pairs as raw 32-bit words (the compute reads them as H2)
  __shared__ __align__(16) unsigned As[2][KP][kBM + kPad];
  __shared__ __align__(16) unsigned Bs[2][KP][kBN + kPad];
  const H zero = P::template zero<MIN>();
  int m0, n0;
  tile_origin(p.M, p.N, m0, n0);

  const int t = threadIdx.x;
  const int tx = t % 16, ty = t / 16;
  const int kbeg = blockIdx.z * p.ksplit;
  const int ktiles = (min(p.K, kbeg + p.ksplit) - kbeg + kKQuant - 1) / kKQuant * (kKQuant / (2 * KP));

  for (int64_t bat = blockIdx.y; bat < p.batch; bat += gridDim.y) {
    int64_t oa, ob;
    p.LP.offsets(bat, oa, ob);
    TileCopy<unsigned, KP> ca(static_cast<const unsigned*>(p.pa) + oa + int64_t(kbeg / 2) * p.lda + m0, p.lda, t);
    TileCopy<unsigned, KP> cb(static_cast<const unsigned*>(p.pb) + ob + int64_t(kbeg / 2) * p.ldb + n0, p.ldb, t);

    H2 acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = P::pair(zero, zero);

    __syncthreads();
    ca.next(As[0]);
    cb.next(Bs[0]);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
      const int buf = kt & 1;
      if (kt + 1 < ktiles) {
        ca.next(As[buf ^ 1]);
        cb.next(Bs[buf ^ 1]);
        __pipeline_commit();
      }
#pragma unroll
      for (int kp = 0; kp < KP; ++kp) {
        H2 av[8], bv[8];
        // 4 pairs = 16 bytes: one 128-bit shared load each
        *reinterpret_cast<uint4*>(av) = *reinterpret_cast<const uint4*>(&As[buf][kp][ty * 4]);
        *reinterpret_cast<uint4*>(av + 4) = *reinterpret_cast<const uint4*>(&As[buf][kp][64 + ty * 4]);
        *reinterpret_cast<uint4*>(bv) = *reinterpret_cast<const uint4*>(&Bs[buf][kp][tx * 4]);
        *reinterpret_cast<uint4*>(bv + 4) = *reinterpret_cast<const uint4*>(&Bs[buf][kp][64 + tx * 4]);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = P::template step<MIN>(acc[i][j], av[i], bv[j]);
      }
      __pipeline_wait_prior(0);
      __syncthreads();
    }

    const int64_t out0 = bat * int64_t(p.M) * p.N;
    for_outputs(p.M, p.N, m0, n0, ty, tx, [&](int i, int j, int m, int n) {
      put<T, Acc, MIN>(p, out0 + int64_t(m) * p.N + n, Acc(P::template collapse<MIN>(acc[i][j])), 0, false);
    });
  }
}

}  // namespace
}  // namespace geokern
