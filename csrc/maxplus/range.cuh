// maxplus_mark_kernel: integer entries that read an out-of-range input become the overflow marker.
#pragma once

#include "params.cuh"
#include "semiring.cuh"

namespace geokern {
namespace {

// The flags come from maxplus_pack_kernel, which sees every input value while it copies the
// operands: fa[a's batch][i] is set when row i of that A holds a value outside
// [-INT_BOUND, INT_BOUND] other than the sentinel, fb[b's batch][j] likewise for column j of B.
// Such entries of C become the marker (the extreme opposite the sentinel), argmax 0. Only
// flagged entries are written, so in-range inputs cost a read of the flags (bytes, in L2).
//
// c, idx: [batch, M, N] -> the same, marked. LP: the packed operands' batch layout, whose
// batch strides are multiples of a_mat / b_mat words per packed matrix (a's own batch index
// is the offset / a_mat). One block: one output row (batch, i) per step of a grid-stride
// loop, its threads along j.
template <typename T, bool MIN>
__global__ void maxplus_mark_kernel(T* __restrict__ c, int64_t* __restrict__ idx, const uint8_t* __restrict__ fa,
                                    const uint8_t* __restrict__ fb, int M, int N, int64_t rows, Batch LP,
                                    int64_t a_mat, int64_t b_mat) {
  constexpr T marker = MIN ? std::numeric_limits<T>::min() : std::numeric_limits<T>::max();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t bat = r / M;
    const int i = int(r % M);
    int64_t oa, ob;
    LP.offsets(bat, oa, ob);
    const bool row_bad = fa[oa / a_mat * M + i] != 0;
    const uint8_t* fcol = fb + ob / b_mat * N;
    T* crow = c + r * N;
    int64_t* irow = idx ? idx + r * N : nullptr;
    for (int j = threadIdx.x; j < N; j += blockDim.x) {
      if (row_bad || fcol[j]) {
        crow[j] = marker;
        if (irow) irow[j] = 0;
      }
    }
  }
}

}  // namespace
}  // namespace geokern
