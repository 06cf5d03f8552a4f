// maxplus_pack_kernel: the padded k-major operand copies the forward kernels stream.
#pragma once

#include "semiring.cuh"

namespace geokern {
namespace {

// pack_operand's kernel: word r of column c of one matrix, r < R, c < C (C, R padded):
// x(c, k) = in[c * sc + k * sk] staged (stand-in clamp, widening), or the semiring zero
// beyond (cols, klen); a word is x(c, r) (PER = 1, type W = Acc) or the pair
// (x(c, 2r), x(c, 2r + 1)), low half first (PER = 2, packed 16-bit). Each thread writes
// its words down one column (coalesced along c) from PER * 8 consecutive k of the input
// (for A, 32 bytes of one row per thread, each load instruction touching 32 rows).
//
// in: one operand as [nb, rows, cols_] (any strides; sbat 0 when nb = 1) -> out: [nb, R, C]
// words, k-major. One thread: 8 consecutive words r0..r0+7 of one column c of one matrix, in a
// grid-stride loop over the nb * (R / 8) * C such groups.
template <typename T, typename W, bool MIN, int PER>
__global__ void maxplus_pack_kernel(const T* __restrict__ in, W* __restrict__ out, int64_t sbat, int sc, int sk,
                                    int cols, int klen, int C, int R, int64_t total) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int c = int(e % C);
    const int64_t rest = e / C;
    const int r0 = int(rest % (R / 8)) * 8;
    const int64_t bat = rest / (R / 8);
    const T* src = in + bat * sbat + int64_t(c) * sc;
    W* dst = out + (bat * R + r0) * int64_t(C) + c;
    const bool live = c < cols;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if constexpr (PER == 1) {
        const int k = r0 + q;
        dst[int64_t(q) * C] = live && k < klen ? stage_in<T, W, MIN>(src[int64_t(k) * sk]) : zero_of<T, W, MIN>();
      } else {
        using P = Packed<T>;
        using H = typename P::H;
        const int k = 2 * (r0 + q);
        const H z = P::template zero<MIN>();
        const H x0 = live && k < klen ? P::template in<MIN>(reinterpret_cast<const H*>(src)[int64_t(k) * sk]) : z;
        const H x1 =
            live && k + 1 < klen ? P::template in<MIN>(reinterpret_cast<const H*>(src)[int64_t(k + 1) * sk]) : z;
        dst[int64_t(q) * C] = bits(P::pair(x0, x1));
      }
    }
  }
}

}  // namespace
}  // namespace geokern
