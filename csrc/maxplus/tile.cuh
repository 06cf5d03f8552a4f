// The 128 x 128 output tile both forward kernels share: block order, each thread's 8 x 8
// entries, the cp.async copies of the k tiles, and the write of one entry (or its split-K
// partial).
#pragma once

#include <cuda_pipeline.h>

#include "params.cuh"
#include "semiring.cuh"

namespace geokern {
namespace {

template <typename Acc>
struct Vec4 {
  Acc v[4];
};

// Four consecutive Acc from shared memory: one 128-bit load for 32-bit Acc.
template <typename Acc>
__device__ __forceinline__ Vec4<Acc> lds4(const Acc* p) {
  if constexpr (sizeof(Acc) == 4) {
    return *reinterpret_cast<const Vec4<Acc>*>(__builtin_assume_aligned(p, 16));
  } else {
    Vec4<Acc> r;
#pragma unroll
    for (int i = 0; i < 4; ++i) r.v[i] = p[i];
    return r;
  }
}

// (m0, n0) of this block's tile: kGroupM tile rows share the B tiles they read in L2.
__device__ __forceinline__ void tile_origin(int M, int N, int& m0, int& n0) {
  const int tm = (M + kBM - 1) / kBM, tn = (N + kBN - 1) / kBN;
  const int pid = blockIdx.x, per_group = kGroupM * tn;
  const int first_m = (pid / per_group) * kGroupM;
  const int gm = min(tm - first_m, kGroupM);
  m0 = (first_m + (pid % per_group) % gm) * kBM;
  n0 = ((pid % per_group) / gm) * kBN;
}

// Output row (column) of a thread's i-th entry: two groups of 4, 64 apart.
__device__ __forceinline__ int sub(int base, int lane, int i) {
  return base + (i < 4 ? lane * 4 + i : 64 + lane * 4 + i - 4);
}

// f(i, j, m, n) for each of this thread's 8 x 8 entries inside C.
template <typename F>
__device__ __forceinline__ void for_outputs(int M, int N, int m0, int n0, int ty, int tx, F&& f) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int m = sub(m0, ty, i);
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int n = sub(n0, tx, j);
      if (n < N) f(i, j, m, n);
    }
  }
}

// Streams the k tiles of one packed operand (rows of 128 words starting at a tile's
// first column, row pitch ld words) into shared memory, 16 bytes per cp.async: each
// thread copies R / kRowsPass chunks, at fixed offsets from the tile's first row.
template <typename W, int R>
struct TileCopy {
  static constexpr int kVec = 16 / sizeof(W), kPerRow = kBM / kVec, kRowsPass = kThreads / kPerRow;
  static_assert(R % kRowsPass == 0, "whole passes");
  const W* src;     // this thread's first chunk of the next tile
  int64_t pass, step;  // words between a thread's chunks in one tile; between tiles
  int dst;          // its first chunk's word offset in a shared buffer
  __device__ __forceinline__ TileCopy(const W* tile0, int64_t ld, int t) {
    const int row = t / kPerRow, col = (t % kPerRow) * kVec;
    src = tile0 + row * ld + col;
    pass = kRowsPass * ld;
    step = R * ld;
    dst = row * (kBM + kPad) + col;
  }
  __device__ __forceinline__ void next(W (*S)[kBM + kPad]) {
#pragma unroll
    for (int r = 0; r < R / kRowsPass; ++r)
      __pipeline_memcpy_async(&S[0][0] + dst + r * kRowsPass * (kBM + kPad), src + r * pass, 16);
    src += step;
  }
};

// Writes one output entry: finished into C (and argmax) or, under split-K, raw into this
// block's workspace slice.
template <typename T, typename Acc, bool MIN>
__device__ __forceinline__ void put(const Params<T, Acc>& p, int64_t o, Acc v, int k, bool want_k) {
  if (p.part) {
    const int64_t po = int64_t(blockIdx.z) * p.batch * p.M * p.N + o;
    p.part[po] = v;
    if (want_k) p.part_idx[po] = k;
    return;
  }
  bool dead;
  p.c[o] = finish<T, Acc, MIN>(v, dead);
  if (want_k) p.idx[o] = dead ? 0 : k;
}

}  // namespace
}  // namespace geokern
