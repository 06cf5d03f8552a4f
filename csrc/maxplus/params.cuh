// Max-plus forward and backward: tile sizes and what the host hands the kernels (the batch
// layout, the forward's parameters).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace geokern {
namespace {

constexpr int kBM = 128, kBN = 128, kThreads = 256, kPad = 4, kGroupM = 8;
constexpr int kBK = 8;        // the fewest k in any kernel's tile (double); argmax tile numbers count these
constexpr int kKQuant = 32;   // K is padded to, and split into, multiples of this (every kernel's k tile divides it)
constexpr int kTileRows = 16; // shared-memory rows per k tile (k, or k pairs in the packed kernel), 4-byte words
constexpr int kArgmax = 1, kMargin = 2;  // MODE bits
constexpr int kMaxSplits = 256;

struct Batch {  // up to kMaxDims batch dims (outermost first), strides in elements
  int64_t size[kMaxDims];
  int64_t a[kMaxDims], b[kMaxDims];
  __device__ __forceinline__ void offsets(int64_t bat, int64_t& oa, int64_t& ob) const {
    oa = ob = 0;
#pragma unroll
    for (int d = kMaxDims - 1; d >= 0; --d) {
      const int64_t i = bat % size[d];
      bat /= size[d];
      oa += i * a[d];
      ob += i * b[d];
    }
  }
};

template <typename T, typename Acc>
struct Params {
  const T* a;
  const T* b;
  T* c;
  int64_t* idx;
  T* margin;
  Acc* part;      // split-K: raw best per slice, [slice][batch][M][N]; null without split
  int* part_idx;  // split-K with argmax: the slice's winning k
  int M, N, K;
  int sam, sak, sbk, sbn;  // element strides within one matrix (0 along a dim of size 1)
  int ksplit;              // k per slice (a multiple of kKQuant), K without split
  int64_t batch;
  Batch L;
  // The operands as the kernels stream them (pack_operand): per matrix, rows of words
  // (k for the 32-bit kernel, k pairs for the packed one) of lda = M and ldb = N rounded
  // up to 128, K padded to kKQuant, padding = the semiring zero; LP: their batch strides.
  const void* pa;
  const void* pb;
  int lda, ldb;
  Batch LP;
};

}  // namespace
}  // namespace geokern
