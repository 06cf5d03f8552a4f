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
//
// flags (integers; null for floats): [nb, cols] bytes, zeroed by the host; set to 1 where the
// column (a row of A, a column of B) holds an out-of-range value (out_of_range). Several
// threads may set one flag: all store the same 1.
template <typename T, typename W, bool MIN, int PER>
__global__ void maxplus_pack_kernel(const T* __restrict__ in, W* __restrict__ out, uint8_t* __restrict__ flags,
                                    int64_t sbat, int sc, int sk, int cols, int klen, int C, int R, int64_t total) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int c = int(e % C);
    const int64_t rest = e / C;
    const int r0 = int(rest % (R / 8)) * 8;
    const int64_t bat = rest / (R / 8);
    const T* src = in + bat * sbat + int64_t(c) * sc;
    W* dst = out + (bat * R + r0) * int64_t(C) + c;
    const bool live = c < cols;
    bool bad = false;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if constexpr (PER == 1) {
        const int k = r0 + q;
        const bool here = live && k < klen;
        const T x = here ? src[int64_t(k) * sk] : T(0);
        bad |= here && out_of_range<T, MIN>(x);
        dst[int64_t(q) * C] = here ? stage_in<T, W, MIN>(x) : zero_of<T, W, MIN>();
      } else {
        using P = Packed<T>;
        using H = typename P::H;
        const int k = 2 * (r0 + q);
        const H z = P::template zero<MIN>();
        const bool h0 = live && k < klen, h1 = live && k + 1 < klen;
        const H r0v = h0 ? reinterpret_cast<const H*>(src)[int64_t(k) * sk] : z;
        const H r1v = h1 ? reinterpret_cast<const H*>(src)[int64_t(k + 1) * sk] : z;
        if constexpr (kIsInt<T>) bad |= (h0 && out_of_range<T, MIN>(r0v)) || (h1 && out_of_range<T, MIN>(r1v));
        const H x0 = h0 ? P::template in<MIN>(r0v) : z;
        const H x1 = h1 ? P::template in<MIN>(r1v) : z;
        dst[int64_t(q) * C] = bits(P::pair(x0, x1));
      }
    }
    if (flags && bad) flags[bat * cols + c] = 1;
  }
}

}  // namespace
}  // namespace geokern
