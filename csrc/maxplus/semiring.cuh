// Max-plus arithmetic shared by every kernel: the integer sentinel and its stand-in, one
// (add, max) step with NaN propagation, and 16-bit pairs packed in 32-bit words.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <limits>
#include <type_traits>

#include "common.cuh"

namespace geokern {
namespace {

// ---- integers: the sentinel, its stand-in, the exact range ----------------------------

template <typename T>
constexpr bool kIsInt = std::is_integral_v<T>;

template <typename T>  // int16_t or int32_t
struct IntSem {
  static constexpr int kQuarter = 1 << (8 * sizeof(T) - 2);
  static constexpr int kBound = (kQuarter - 2) / 3;  // INT_BOUND
  static constexpr int kLimit = 2 * kBound;          // |finite result| <= kLimit
  template <bool MIN>
  static constexpr int stand_in() { return MIN ? kQuarter - 1 : -kQuarter; }
  template <bool MIN>
  static constexpr T sentinel() { return MIN ? std::numeric_limits<T>::max() : std::numeric_limits<T>::min(); }
};

// The semiring zero as staged: -inf / +inf, or the integer stand-in.
template <typename T, typename Acc, bool MIN>
__device__ __forceinline__ Acc zero_of() {
  if constexpr (kIsInt<T>) return IntSem<T>::template stand_in<MIN>();
  else return MIN ? Acc(INFINITY) : Acc(-INFINITY);
}

// One input value as staged in the accumulation type.
template <typename T, typename Acc, bool MIN>
__device__ __forceinline__ Acc stage_in(T x) {
  if constexpr (kIsInt<T>) {
    constexpr int s = IntSem<T>::template stand_in<MIN>();
    return MIN ? min(int(x), s) : max(int(x), s);
  } else {
    return static_cast<Acc>(x);
  }
}

// Whether an input value lies outside the exact range (the sentinel is inside): entries that
// read it become the overflow marker (maxplus_mark_kernel). Floats: never.
template <typename T, bool MIN>
__device__ __forceinline__ bool out_of_range(T x) {
  if constexpr (kIsInt<T>) {
    return (int(x) > IntSem<T>::kBound || int(x) < -IntSem<T>::kBound) && x != IntSem<T>::template sentinel<MIN>();
  } else {
    return false;
  }
}

// A raw best as output: integers beyond +-kLimit are the sentinel (`dead`, argmax 0).
template <typename T, typename Acc, bool MIN>
__device__ __forceinline__ T finish(Acc v, bool& dead) {
  if constexpr (kIsInt<T>) {
    dead = MIN ? v > IntSem<T>::kLimit : v < -IntSem<T>::kLimit;
    return dead ? IntSem<T>::template sentinel<MIN>() : T(v);
  } else {
    dead = false;
    return static_cast<T>(v);
  }
}

// ---- one step -------------------------------------------------------------------------

// Better-than for max-plus (MIN = false) or min-plus.
template <bool MIN, typename Acc>
__device__ __forceinline__ bool better(Acc s, Acc best) {
  return MIN ? s < best : s > best;
}

// Whether the tile best t displaces the running best (strictly better, or the first NaN;
// once the best is NaN it stays NaN in combine, whatever this says).
template <bool MIN, typename Acc>
__device__ __forceinline__ bool improves(Acc t, Acc best) {
  return MIN ? !(t >= best) : !(t <= best);
}

template <bool MIN>
__device__ __forceinline__ float combine(float acc, float s) {
  float r;
  if constexpr (MIN) asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(acc), "f"(s));
  else asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(acc), "f"(s));
  return r;
}

template <bool MIN>
__device__ __forceinline__ double combine(double acc, double s) {
  // no max.NaN.f64: take s when it is better or NaN; a NaN acc is kept
  return (better<MIN>(s, acc) || s != s) ? s : acc;
}

template <bool MIN>
__device__ __forceinline__ int combine(int acc, int s) {
  return MIN ? min(acc, s) : max(acc, s);
}

// acc (+) (a + b). For int, ptxas fuses the plain add and min / max into one VIADDMNMX
// on sm_90 (the PTX that __viaddmax_s32 / __viaddmin_s32 expand to there; written plainly
// it spilled slightly less at 128 registers).
template <bool MIN, typename Acc>
__device__ __forceinline__ Acc addmax(Acc a, Acc b, Acc acc) {
  return combine<MIN>(acc, a + b);
}

// ---- 16-bit pairs ----------------------------------------------------------------------

// A pair (k, k + 1) of 16-bit values in one 32-bit word (low half k) and the step that adds
// and maxes both lanes in one instruction pair: half2 / bf16x2 (HADD2 + HMNMX2), or int16x2
// (one VIADDMNMX, DPX). collapse() takes the better lane once at the end.
template <typename T>
struct Packed;

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename H_, typename H2_, unsigned short kInfBits>  // half2 / bf16x2
struct PackedFloat {
  using H = H_;
  using H2 = H2_;
  template <bool MIN>
  static __device__ __forceinline__ H zero() {
    const unsigned short bits = MIN ? kInfBits : kInfBits | 0x8000u;  // +inf / -inf
    H h;
    memcpy(&h, &bits, sizeof(h));
    return h;
  }
  template <bool MIN>
  static __device__ __forceinline__ H in(H x) { return x; }
  static __device__ __forceinline__ H2 pair(H lo, H hi) {
    H2 r;
    r.x = lo;
    r.y = hi;
    return r;
  }
  template <bool MIN>
  static __device__ __forceinline__ H2 step(H2 acc, H2 a, H2 b) {
    const H2 s = __hadd2(a, b);
    return MIN ? __hmin2_nan(acc, s) : __hmax2_nan(acc, s);
  }
  template <bool MIN>
  static __device__ __forceinline__ float collapse(H2 v) {
    return to_float(MIN ? __hmin_nan(v.x, v.y) : __hmax_nan(v.x, v.y));
  }
};
template <>
struct Packed<Half> : PackedFloat<__half, __half2, 0x7C00> {};
template <>
struct Packed<BFloat16> : PackedFloat<__nv_bfloat16, __nv_bfloat162, 0x7F80> {};
template <>
struct Packed<int16_t> {
  using H = int16_t;
  using H2 = unsigned;
  template <bool MIN>
  static __device__ __forceinline__ H zero() { return IntSem<int16_t>::stand_in<MIN>(); }
  template <bool MIN>
  static __device__ __forceinline__ H in(H x) { return H(stage_in<int16_t, int, MIN>(x)); }
  static __device__ __forceinline__ H2 pair(H lo, H hi) {
    return unsigned(uint16_t(lo)) | (unsigned(uint16_t(hi)) << 16);
  }
  template <bool MIN>
  static __device__ __forceinline__ H2 step(H2 acc, H2 a, H2 b) {
    return MIN ? __viaddmin_s16x2(a, b, acc) : __viaddmax_s16x2(a, b, acc);
  }
  template <bool MIN>
  static __device__ __forceinline__ int collapse(H2 v) {
    const int x = int16_t(v & 0xFFFFu), y = int16_t(v >> 16);
    return MIN ? min(x, y) : max(x, y);
  }
};

template <typename H2>
__device__ __forceinline__ unsigned bits(H2 x) {
  unsigned u;
  memcpy(&u, &x, sizeof(u));
  return u;
}

}  // namespace
}  // namespace geokern
