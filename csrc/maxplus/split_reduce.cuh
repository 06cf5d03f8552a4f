// maxplus_split_reduce_kernel: split-K slices combined in k order.
#pragma once

#include "semiring.cuh"

namespace geokern {
namespace {

// Split-K: combines the slices' raw bests in k order into C (and argmax); a later slice wins
// only if strictly better (ties keep the smallest k), and a NaN sticks.
//
// part: [splits, total] raw bests in Acc (part_idx: their k, or null) -> c, idx: [total] with
// total = batch * M * N. One thread: one output entry, in a grid-stride loop.
template <typename T, typename Acc, bool MIN>
__global__ void maxplus_split_reduce_kernel(const Acc* __restrict__ part, const int* __restrict__ part_idx,
                                            T* __restrict__ c, int64_t* __restrict__ idx, int splits,
                                            int64_t total) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    Acc best = part[e];
    int k = part_idx ? part_idx[e] : 0;
    for (int s = 1; s < splits; ++s) {
      const Acc v = part[s * total + e];
      if (best == best && improves<MIN>(v, best)) {  // strictly better, or the first NaN
        best = v;
        if (part_idx) k = part_idx[s * total + e];
      }
    }
    bool dead;
    c[e] = finish<T, Acc, MIN>(best, dead);
    if (idx) idx[e] = dead ? 0 : k;
  }
}

}  // namespace
}  // namespace geokern
