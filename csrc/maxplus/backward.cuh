// maxplus_bwd_kernel: dC scattered along the argmax route.
#pragma once

#include "params.cuh"

namespace geokern {
namespace {

// dA[i, argmax[i, j]] += g[i, j], dB[argmax[i, j], j] += g[i, j].
//
// g, idx: [batch, M, N] contiguous -> da: [.., M, K], db: [.., K, N], float32 or double buffers
// of A's and B's shapes, batch strides zero where the input was broadcast (L). One thread: one
// entry (i, j) of one batch, in a grid-stride loop: two atomic adds.
template <typename T, typename Acc>
__global__ void maxplus_bwd_kernel(const T* __restrict__ g, const int64_t* __restrict__ idx,
                                   Acc* __restrict__ da, Acc* __restrict__ db, int M, int N, int K,
                                   int64_t total, Batch L) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t mn = int64_t(M) * N;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t bat = e / mn, ij = e % mn;
    const int i = int(ij / N), j = int(ij % N);
    const int64_t k = idx[e];
    const Acc v = static_cast<Acc>(g[e]);
    int64_t oa, ob;
    L.offsets(bat, oa, ob);
    atomicAdd(da + oa + int64_t(i) * K + k, v);
    atomicAdd(db + ob + k * N + j, v);
  }
}

}  // namespace
}  // namespace geokern
