// What the ultrametric CUDA kernels share (the decode state: ultrametric.cu; attention:
// attention.cu): digits of any integer dtype, prefix codes spread over a warp, the weighted table
// reads of reference.ultrametric.read_codes and the warp-wide add of one row to its K + 1 buckets.
// Tables are dense float32 [N, D] bucket sums (+ int32 [N] counts), one row per prefix code (the
// breadth-first trie id, N = sum_{l<=K} p^l <= 2^16, so K <= 15 and K + 1 <= 16 lanes). The Triton
// twins are kernels/ultrametric/scan.py (_digit, _add_rows, _read_rows), whose arithmetic order
// these follow.
#pragma once

#include <cmath>

#include "common.cuh"

namespace geokern {
namespace ultra {

constexpr int kMaxK = 15;  // N = sum_{l<=K} p^l <= 2^16 (the Python side refuses more): K + 1 <= 16 lanes
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kMaxCodes = int64_t(1) << 16;

// Digits of any integer dtype behind one warp-uniform switch rather than a template parameter:
// the query and key digits of one call may differ in dtype, and a template per pair would
// multiply every kernel's instantiations by 25.
struct Digits {
  const void* ptr;
  int kind;  // 0 uint8, 1 int8, 2 int16, 3 int32, 4 int64

  __device__ __forceinline__ long long raw(int64_t i) const {
    switch (kind) {
      case 0: return static_cast<const uint8_t*>(ptr)[i];
      case 1: return static_cast<const int8_t*>(ptr)[i];
      case 2: return static_cast<const int16_t*>(ptr)[i];
      case 3: return static_cast<const int32_t*>(ptr)[i];
      default: return static_cast<const int64_t*>(ptr)[i];
    }
  }

  // Clamped to [0, p - 1]: digits the ops do not check on the host (check_digits=False, CUDA-graph
  // capture, the decode state by default: a host read would synchronise) keep every table access
  // in bounds; the decode kernels mark them NaN besides (bad_digits).
  __device__ __forceinline__ int at(int64_t i, int p) const {
    return int(min(max(raw(i), 0LL), static_cast<long long>(p - 1)));
  }
};

inline Digits digits_of(const Tensor& t, const char* op, const char* name) {
  const ScalarType st = t.scalar_type();
  int kind = -1;
  if (st == dtype::u8) kind = 0;
  else if (st == ScalarType::Char) kind = 1;
  else if (st == dtype::i16) kind = 2;
  else if (st == dtype::i32) kind = 3;
  else if (st == dtype::i64) kind = 4;
  GK_CHECK(kind >= 0, op, ": ", name, " must have an integer dtype, got ", st);
  return {t.const_data_ptr(), kind};
}

// sum_{l<=K} p^l, or kMaxCodes + 1 once past kMaxCodes (p <= kMaxCodes: no product overflows)
inline int64_t num_codes(int64_t p, int64_t K) {
  int64_t n = 0, pw = 1;
  for (int64_t l = 0; l <= K; ++l, pw *= p) {
    n += pw;
    if (n > kMaxCodes) return kMaxCodes + 1;
  }
  return n;
}

// Whether digit row `row` holds a digit outside [0, p - 1] (before the clamp of Digits::at), on
// every lane (a ballot: every lane must call it). The decode kernels mark such rows NaN: their ops
// do not read the digits on the host by default (a sync per step).
__device__ __forceinline__ bool bad_digits(const Digits& dig, int64_t row, int K, int p) {
  const int lane = threadIdx.x % 32;
  bool bad = false;
  for (int l = lane; l < K; l += 32) {
    const long long d = dig.raw(row * K + l);
    bad = bad || d < 0 || d >= p;
  }
  return __any_sync(kFull, bad);
}

// Blocks of `per_block` warps for one warp per row.
inline int blocks_for(int64_t rows, int per_block, const char* op) {
  const int64_t n = (rows + per_block - 1) / per_block;
  GK_CHECK(n <= INT32_MAX, op, ": ", rows, " rows exceed one launch");
  return int(n);
}

// Digit row `row` (digits row * K .. row * K + K - 1) as prefix codes spread over the warp: lane
// l <= K gets the code of level l and digit l (the level's own digit; lane 0: the root, code 0).
// Lanes past K keep the deepest code. Every lane must call it (it shuffles).
__device__ __forceinline__ void prefix_code(const Digits& dig, int64_t row, int K, int p, int& code, int& digit) {
  const int lane = threadIdx.x % 32;
  const int mine = lane < K ? dig.at(row * K + lane, p) : 0;
  int val = 0, base = 0, pw = 1;
  code = 0;
  digit = 0;
  for (int l = 1; l <= K; ++l) {
    const int d = __shfl_sync(kFull, mine, l - 1);
    base += pw;
    pw *= p;
    val = val * p + d;
    if (lane >= l) {
      code = base + val;
      digit = d;
    }
  }
}

// Adds one row's values v[c] / div (lanes stride over the D channels; div = 1 is exact, so the
// forward's and the decode's values enter unchanged) to its K + 1 buckets of tab [N, D], and 1 to
// their counts when cnt is not null. Float32 atomics (no return value: RED): rows added by one
// launch may share buckets. Every lane must call it (it shuffles the codes prefix_code spread).
template <typename VT>
__device__ __forceinline__ void add_row(float* tab, int* cnt, int code, int K, int D, const VT* v, float div) {
  const int lane = threadIdx.x % 32;
  if (cnt && lane <= K) atomicAdd(cnt + code, 1);
  for (int c0 = 0; c0 < D; c0 += 32) {  // warp-uniform bounds: the shuffles need every lane
    const int c = c0 + lane;
    const float x = c < D ? static_cast<float>(v[c]) / div : 0.f;
    for (int l = 0; l <= K; ++l) {
      const int row = __shfl_sync(kFull, code, l);
      if (c < D) atomicAdd(tab + int64_t(row) * D + c, x);
    }
  }
}

// The read weights of reference.ultrametric.read_codes, as the Triton kernels take them.
struct ReadWeights {
  int K, p;
  float log2a, am1;  // log2 alpha and alpha - 1
  bool excl;         // alpha <= 1: the disjoint sibling buckets
};

inline ReadWeights read_weights(double alpha, int64_t K, int64_t p) {
  return {int(K), int(p), float(std::log2(alpha)), float(alpha - 1.0), alpha <= 1.0};
}

__device__ __forceinline__ int reads(const ReadWeights& q) { return q.excl ? (q.p - 1) * q.K + 1 : q.K + 1; }

// Read m of a row (every weight >= 0, nothing cancels), any m (past reads(q) a valid row), with
// the codes spread as prefix_code leaves them; every lane must call this (it shuffles). alpha > 1:
// the K + 1 prefix rows, w_0 = 1, w_l = alpha^(l-1) (alpha - 1). alpha <= 1: for l = 1..K the
// p - 1 siblings of the level-l row with alpha^(l-1), then the level-K row with alpha^K. The
// order is the Triton read's (_read_rows), so are the sums.
__device__ __forceinline__ void read_pair(const ReadWeights& q, int m, int code, int digit, int& row, float& w) {
  if (!q.excl) {
    row = __shfl_sync(kFull, code, min(m, q.K));
    w = m == 0 ? 1.f : q.am1 * exp2f(float(m - 1) * q.log2a);
    return;
  }
  const int l = min(m / (q.p - 1), q.K - 1) + 1;  // past the siblings: the level-K row
  const int cl = __shfl_sync(kFull, code, l), dl = __shfl_sync(kFull, digit, l);
  if (m >= (q.p - 1) * q.K) {
    row = cl;
    w = exp2f(float(q.K) * q.log2a);
  } else {
    const int j = m % (q.p - 1);  // the j-th digit other than dl
    row = cl - dl + (j < dl ? j : j + 1);
    w = exp2f(float(l - 1) * q.log2a);
  }
}

// sum_m w_m cnt[row_m] of one row, on every lane. Reads go 32 at a time (lane i forms read
// m0 + i and loads its count); the sum takes them in order through shuffles. Loads bypass L1
// (.cg): in the attention scan the same block's atomics change the counts between reads.
__device__ __forceinline__ float read_den(const ReadWeights& q, const int* cnt, int code, int digit) {
  const int lane = threadIdx.x % 32, M = reads(q);
  float den = 0.f;
  for (int m0 = 0; m0 < M; m0 += 32) {
    int row;
    float w;
    read_pair(q, m0 + lane, code, digit, row, w);
    const float c = m0 + lane < M ? float(__ldcg(cnt + row)) : 0.f;
    for (int j = 0; j < min(32, M - m0); ++j) den += __shfl_sync(kFull, w, j) * __shfl_sync(kFull, c, j);
  }
  return den;
}

template <int VEC>
__device__ __forceinline__ void axpy(float (&acc)[VEC], float w, const float* row) {
  if constexpr (VEC == 4) {
    const float4 f = __ldcg(reinterpret_cast<const float4*>(row));
    acc[0] += w * f.x;
    acc[1] += w * f.y;
    acc[2] += w * f.z;
    acc[3] += w * f.w;
  } else {
    acc[0] += w * __ldcg(row);
  }
}

// acc += sum_m w_m tab[row_m][c .. c + VEC - 1] for this lane's channels (c < D; every lane must
// call it): 32 reads formed at a time, then taken in order through shuffles, the row loads
// unrolled 8 deep so they are in flight together. VEC = 4: float4 loads (D % 4 == 0, tab 16-byte
// aligned).
template <int VEC>
__device__ __forceinline__ void read_acc(const ReadWeights& q, const float* tab, int D, int c, int code, int digit,
                                         float (&acc)[VEC]) {
  const int lane = threadIdx.x % 32, M = reads(q);
  for (int m0 = 0; m0 < M; m0 += 32) {
    int row;
    float w;
    read_pair(q, m0 + lane, code, digit, row, w);
#pragma unroll 8
    for (int j = 0; j < min(32, M - m0); ++j) {
      const int r = __shfl_sync(kFull, row, j);
      const float wj = __shfl_sync(kFull, w, j);
      if (c < D) axpy<VEC>(acc, wj, tab + int64_t(r) * D + c);
    }
  }
}

}  // namespace ultra
}  // namespace geokern
