// Max-plus / min-plus matrix product C[i, j] = max_k a[i, k] + b[k, j] (or min), with
// optional argmax (ties -> smallest k) and margin (winner minus runner-up), and its
// backward (dC scattered along the argmax route).
//
// Forward: a register-blocked GEMM-shaped kernel. There are no max-plus tensor cores,
// so the ceiling is the fp32 lanes: each k step is one FADD and one FMNMX per output
// (PERF.md: the pair runs at ~80% of 16.7 T steps/s on an H100; FMNMX issues at half
// rate). To feed the lanes from registers each thread owns an 8 x 8 tile of C (64
// add+max pairs per 4 128-bit shared loads), the block a 128 x 128 tile (256 threads).
//
// The kernels stream operand copies made once per call by pack_operand
// (maxplus_pack_kernel): per matrix, rows of
// 32-bit words (k for the 32-bit kernel, k pairs for the packed one; 64-bit for double),
// k-major, M / N rounded up to 128, K up to kKQuant, the padding the semiring zero, each
// value already staged (integers clamped to the stand-in, 16-bit widened for the 32-bit
// kernel). So a k tile (16 rows) is plain 16-byte cp.async copies at fixed offsets from
// one pointer per operand, double-buffered in shared memory (As[k][m], Bs[k][n]): the k
// loop has no bounds, strides, conversions or clamps (sm_90 SASS per 16-row tile: float32
// 2153 instructions for 2048 FADD + FMNMX, packed bf16 2153 for 2048 HADD2/HFMA2 + HMNMX2,
// int32 and int16x2 1129 for 1024 VIADDMNMX, float32 argmax 2345; with the previous
// in-kernel strided loads, 2371, 2426, -, 1422 and 2573). A float input already in that
// layout (B row-major, or A k-major, with M, N multiples of 128 and K of kKQuant)
// is streamed as it is. The copies cost one read and write of A and B (H100, 4096^3:
// float32 A 0.076 ms against 5.43 ms for the product; bf16 / int16 0.05 ms each for A and
// B against 2.85 / 2.28 ms). Out-of-range rows /
// columns are computed on the padding and never stored. With argmax or margin, 16-bit
// inputs take the 32-bit kernel widened to float (sums in float32, double for double);
// the value-only 16-bit path is maxplus_fwd_packed_kernel below (half2 / bf16x2, two k
// per instruction). Either way the result equals the exact max rounded once (rounding is
// monotone). Measured (H100, 4096^3, add and max one op each, call time with the copies):
// float32 24.9 T ops/s (74.5% of the 33.45 T lane ceiling), with argmax 12.7, bf16 /
// fp16 46.6 (69.7% of 66.9), int16 57.8 (86.4%), int32 29.5 (88.2%); before this
// layout 23.3, 12.2, 39.5 / 39.2, 45.0 and 25.4. float32 stays under the 78-80% that
// the bare FADD + FMNMX pair reaches in PERF.md's microbenchmark: the kernel alone runs
// at 75.6%, its loop 95% useful instructions.
//
// Argmax without margin costs one compare per k tile, not per k: each thread keeps the
// best sum of the current k tile (add + max per step, as value-only), and at the end
// of the tile a strict compare against the running best records the tile (earlier tiles
// keep ties). The epilogue then recomputes the sums of the winning tile from global
// memory and returns the first k whose sum equals the best: ties go to the smallest k.
//
// Integers (int32, int16; forward only). Each staged value is clamped to the stand-in
// S for the sentinel (-2**(bits-2) for max-plus, 2**(bits-2) - 1 for min-plus), so for
// inputs in [-INT_BOUND, INT_BOUND] (geokern.reference.maxplus) no sum wraps and every
// sum with S lies beyond +-2 INT_BOUND; the epilogue stores those as the sentinel
// (argmax 0). int32 steps are a plain add and max (min), which ptxas fuses into one
// VIADDMNMX on sm_90 (the PTX of __viaddmax_s32); int16 value-only runs the packed kernel
// with __viaddmax_s16x2 / __viaddmin_s16x2 (two k per instruction) on sm_90, int16 with
// argmax, or before sm_90 (where DPX is emulated by several SIMD instructions), the 32-bit
// kernel on int.
//
// Split-K: when the output has too few tiles to fill the GPU (skinny M or N, long K),
// blockIdx.z takes one slice of K; each slice writes its raw best (and argmax) to a
// workspace and maxplus_split_reduce_kernel combines the slices in k order (a later
// slice wins only if strictly better, so ties keep the smallest k; NaN sticks).
//
// NaN propagates through max.NaN / min.NaN (fmaxf would drop it). Out-of-range k are
// staged as the semiring zero (-inf for max-plus, S for integers), which can never win or
// tie a comparison against a real k (comparisons are strict), so tails need no branches.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>

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

// The first k in [k0, min(k0 + BK, kend)) whose sum equals best; k0 if none (NaN). Fully
// unrolled without an early exit, so the 2 BK loads are in flight together (a loop that
// stops at the first match pays the memory latency once per k).
template <typename T, typename Acc, bool MIN, int BK>
__device__ __forceinline__ int resolve(const T* a, const T* b, const Params<T, Acc>& p, int m, int n, int k0,
                                    int kend, Acc best) {
  int found = k0;
  bool hit = false;
#pragma unroll
  for (int kk = 0; kk < BK; ++kk) {
    const int k = k0 + kk;
    if (k < kend) {
      const Acc s = stage_in<T, Acc, MIN>(a[m * p.sam + k * p.sak]) + stage_in<T, Acc, MIN>(b[k * p.sbk + n * p.sbn]);
      found = !hit && s == best ? k : found;
      hit = hit || s == best;
    }
  }
  return found;
}

template <typename T, typename Acc, bool MIN, int MODE>
__global__ void __launch_bounds__(kThreads, MODE == 0 ? 2 : 1)
maxplus_fwd_kernel(const Params<T, Acc> p) {
  constexpr bool kTile = MODE == kArgmax;  // argmax per k tile, resolved in the epilogue
  constexpr int BK = kTileRows * 4 / sizeof(Acc);  // k per tile: 16 (8 for double)
  static_assert(kKQuant % BK == 0, "tiles divide the K padding");
  __shared__ __align__(16) Acc As[2][BK][kBM + kPad];
  __shared__ __align__(16) Acc Bs[2][BK][kBN + kPad];
  const Acc zero = zero_of<T, Acc, MIN>();
  int m0, n0;
  tile_origin(p.M, p.N, m0, n0);

  const int t = threadIdx.x;
  const int tx = t % 16, ty = t / 16;  // compute: rows ty*4 (+64), cols tx*4 (+64)
  const int kbeg = blockIdx.z * p.ksplit, kend = min(p.K, kbeg + p.ksplit);
  const int ktiles = (min(p.K, kbeg + p.ksplit) - kbeg + kKQuant - 1) / kKQuant * (kKQuant / BK);

  for (int64_t bat = blockIdx.y; bat < p.batch; bat += gridDim.y) {
    int64_t oa, ob;
    p.L.offsets(bat, oa, ob);
    const T* a = p.a + oa;
    const T* b = p.b + ob;
    p.LP.offsets(bat, oa, ob);
    TileCopy<Acc, BK> ca(static_cast<const Acc*>(p.pa) + oa + int64_t(kbeg) * p.lda + m0, p.lda, t);
    TileCopy<Acc, BK> cb(static_cast<const Acc*>(p.pb) + ob + int64_t(kbeg) * p.ldb + n0, p.ldb, t);

    Acc top1[8][8], top2[8][8], tb[8][8];
    int idx[8][8];
    unsigned tix[8][4];  // kTile: the winning tile of entries (i, 2q) and (i, 2q + 1), 16 bits each
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        top1[i][j] = zero;
        if constexpr (MODE & kMargin) top2[i][j] = zero;
        if constexpr (MODE & kArgmax) idx[i][j] = 0;
        if constexpr (kTile) tix[i][j / 2] = 0;
      }

    __syncthreads();  // the previous batch's last reads are done
    ca.next(As[0]);
    cb.next(Bs[0]);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
      const int buf = kt & 1;
      if (kt + 1 < ktiles) {  // the next tile: buf ^ 1 was last read before the previous barrier
        ca.next(As[buf ^ 1]);
        cb.next(Bs[buf ^ 1]);
        __pipeline_commit();
      }
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        const Vec4<Acc> a0 = lds4(&As[buf][kk][ty * 4]), a1 = lds4(&As[buf][kk][64 + ty * 4]);
        const Vec4<Acc> b0 = lds4(&Bs[buf][kk][tx * 4]), b1 = lds4(&Bs[buf][kk][64 + tx * 4]);
        Acc av[8], bv[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          av[i] = a0.v[i]; av[4 + i] = a1.v[i];
          bv[i] = b0.v[i]; bv[4 + i] = b1.v[i];
        }
        const int k = kbeg + kt * BK + kk;
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if constexpr (MODE == 0) {
              top1[i][j] = addmax<MIN>(av[i], bv[j], top1[i][j]);
            } else if constexpr (kTile) {
              tb[i][j] = kk == 0 ? av[i] + bv[j] : addmax<MIN>(av[i], bv[j], tb[i][j]);
            } else {
              const Acc s = av[i] + bv[j];
              if constexpr (MODE & kMargin) {
                const Acc worse = MIN ? fmax(top1[i][j], s) : fmin(top1[i][j], s);
                top2[i][j] = MIN ? fmin(top2[i][j], worse) : fmax(top2[i][j], worse);
              }
              if constexpr (MODE & kArgmax) idx[i][j] = better<MIN>(s, top1[i][j]) ? k : idx[i][j];
              top1[i][j] = combine<MIN>(top1[i][j], s);
            }
          }
      }
      if constexpr (kTile) {  // record the tile where the best improves (two SEL + one LOP3 per pair)
        const unsigned ktd = unsigned(kt) * 0x10001u;
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const unsigned lo = improves<MIN>(tb[i][2 * q], top1[i][2 * q]) ? ktd : tix[i][q];
            const unsigned hi = improves<MIN>(tb[i][2 * q + 1], top1[i][2 * q + 1]) ? ktd : tix[i][q];
            tix[i][q] = (lo & 0xFFFFu) | (hi & 0xFFFF0000u);
            top1[i][2 * q] = combine<MIN>(top1[i][2 * q], tb[i][2 * q]);
            top1[i][2 * q + 1] = combine<MIN>(top1[i][2 * q + 1], tb[i][2 * q + 1]);
          }
      }
      __pipeline_wait_prior(0);  // this thread's copies of the next tile have landed
      __syncthreads();
    }

    const int64_t out0 = bat * int64_t(p.M) * p.N;
    for_outputs(p.M, p.N, m0, n0, ty, tx, [&](int i, int j, int m, int n) {
      const int64_t o = out0 + int64_t(m) * p.N + n;
      int k = 0;
      if constexpr (kTile) {
        const int tile = j % 2 ? int(tix[i][j / 2] >> 16) : int(tix[i][j / 2] & 0xFFFFu);
        k = resolve<T, Acc, MIN, BK>(a, b, p, m, n, kbeg + tile * BK, kend, top1[i][j]);
      } else if constexpr (MODE & kArgmax) {
        k = idx[i][j];
      }
      put<T, Acc, MIN>(p, o, top1[i][j], k, MODE & kArgmax);
      if constexpr (MODE & kMargin) {
        const Acc t1 = top1[i][j], t2 = top2[i][j];
        const Acc gap = MIN ? t2 - t1 : t1 - t2;
        p.margin[o] = static_cast<T>((t2 == zero && t1 == t1) ? Acc(INFINITY) : gap);
      }
    });
  }
}

// Value-only packed path: half2 / bf16x2 add and max (HADD2 + HMNMX2), or int16x2
// VIADDMNMX (DPX), each instruction doing two k steps: a pair (k, k + 1) of one row of A
// and the same pair of one column of B share a 32-bit register, and the two lanes are
// collapsed once in the epilogue. 16-bit float sums are rounded at every step, which
// loses nothing: rounding is monotone, so max_k round(a + b) = round(max_k (a + b)), the
// exactly rounded result (overflow to inf included). Ties between k are not tracked, so
// argmax / margin take the 32-bit kernel above.
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
struct Packed<at::Half> : PackedFloat<__half, __half2, 0x7C00> {};
template <>
struct Packed<at::BFloat16> : PackedFloat<__nv_bfloat16, __nv_bfloat162, 0x7F80> {};
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

// Launches the packed kernel for 16-bit T (true), or does nothing (false).
template <typename T, typename Acc>
bool launch_packed(const Params<T, Acc>& p, bool minplus, dim3 grid, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16> || std::is_same_v<T, int16_t>) {
    if (minplus) maxplus_fwd_packed_kernel<T, Acc, true><<<grid, kThreads, 0, stream>>>(p);
    else maxplus_fwd_packed_kernel<T, Acc, false><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  } else {
    return false;
  }
}

// pack_operand's kernel: word r of column c of one matrix, r < R, c < C (C, R padded):
// x(c, k) = in[c * sc + k * sk] staged (stand-in clamp, widening), or the semiring zero
// beyond (cols, klen); a word is x(c, r) (PER = 1, type W = Acc) or the pair
// (x(c, 2r), x(c, 2r + 1)), low half first (PER = 2, packed 16-bit). Each thread writes
// 8 words of one column (coalesced along c) and reads its 8 PER consecutive k (A's rows:
// 32 bytes of one row per thread, each load instruction touching 32 rows; a tiled
// transpose through shared memory, reading whole rows, should be faster).
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

// Split-K: combines the slices' raw bests in k order into C (and argmax).
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

// dA[i, argmax[i, j]] += g[i, j], dB[argmax[i, j], j] += g[i, j]. g and argmax are
// contiguous (batch, M, N); da / db are float32 (double) buffers of A's and B's shapes
// whose batch strides are zero where the input was broadcast.
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

// ---- host ---------------------------------------------------------------------------

// The batch layout of (a, b) over `lead`; false if more than kMaxDims dims remain.
bool make_batch(const std::vector<int64_t>& lead, const at::Tensor& a, const at::Tensor& b, Batch* B) {
  RowLayout R;
  const int64_t comp[3] = {0, 0, 0};
  if (!make_row_layout(lead, {broadcast_strides(a, lead, 2), broadcast_strides(b, lead, 2)}, comp, &R)) return false;
  // RowLayout keeps dims 0..ndim-1 outermost first; pad in front with size-1 dims
  const int pad = kMaxDims - R.ndim;
  for (int d = 0; d < kMaxDims; ++d) {
    const bool real = d >= pad;
    B->size[d] = real ? R.size[d - pad] : 1;
    B->a[d] = real ? R.stride[0][d - pad] : 0;
    B->b[d] = real ? R.stride[1][d - pad] : 0;
  }
  return true;
}

void check_pair(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.is_cuda(), op, ": a must be a CUDA tensor, got device ", a.device());
  TORCH_CHECK(b.device() == a.device(), op, ": b is on ", b.device(), " but a is on ", a.device());
  const auto st = a.scalar_type();
  TORCH_CHECK(at::isFloatingType(st) || st == at::kInt || st == at::kShort, op,
              ": a must be floating point, int32 or int16, got ", st);
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b has dtype ", b.scalar_type(), " but a has ",
              a.scalar_type());
  TORCH_CHECK(a.dim() >= 2 && b.dim() >= 2, op, ": a and b need at least 2 dims, got ", fmt(a.sizes()), " and ",
              fmt(b.sizes()));
  TORCH_CHECK(a.size(-1) == b.size(-2), op, ": a (..., M, K) and b (..., K, N) disagree on K: ", fmt(a.sizes()),
              " and ", fmt(b.sizes()));
  const int64_t lim = std::numeric_limits<int>::max();
  const int64_t span_a = (a.size(-2) - 1) * std::abs(a.stride(-2)) + (a.size(-1) - 1) * std::abs(a.stride(-1));
  const int64_t span_b = (b.size(-2) - 1) * std::abs(b.stride(-2)) + (b.size(-1) - 1) * std::abs(b.stride(-1));
  TORCH_CHECK(span_a < lim && span_b < lim && a.size(-2) < lim && b.size(-1) < lim, op,
              ": one matrix of a or b spans 2**31 elements or more; the kernel uses 32-bit offsets within a matrix");
}

// Number of K slices for speed: enough blocks for two per SM when the output tiles alone
// are too few, each slice at least 256 k. GEOKERN_MAXPLUS_SPLITS=n forces n (1: off).
int choose_splits_for_speed(int64_t tiles, int64_t K) {
  if (const char* env = std::getenv("GEOKERN_MAXPLUS_SPLITS")) {
    const int n = std::atoi(env);
    if (n > 0) return int(std::min<int64_t>({n, kMaxSplits, (K + kKQuant - 1) / kKQuant}));
  }
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t want = 2 * int64_t(sms);
  if (tiles >= want / 2) return 1;
  return int(std::max<int64_t>(1, std::min<int64_t>({(want + tiles - 1) / tiles, K / 256, kMaxSplits})));
}

// Number of K slices: 1 where splitting is not allowed (margin), else at least `least`.
int choose_splits(int64_t tiles, int64_t K, bool allowed, int64_t least) {
  if (!allowed) return 1;
  return int(std::max<int64_t>(least, choose_splits_for_speed(tiles, K)));
}

// The copy of one operand that the forward kernels stream: for a (..., M, K) (is_a) or
// b (..., K, N), a contiguous (..., R, C) tensor of words, C = M (N) rounded up to 128,
// R = K padded to kKQuant (halved for packed pairs), padding the semiring zero (see
// maxplus_pack_kernel). `word` is the words' dtype (Acc, or int32 for packed pairs).
template <typename T, typename W, int PER>
at::Tensor pack_operand(const at::Tensor& x, bool is_a, bool minplus, at::ScalarType word, cudaStream_t stream) {
  const int64_t rows = x.size(-2), cols_ = x.size(-1);
  const int64_t cols = is_a ? rows : cols_, klen = is_a ? cols_ : rows;
  const int64_t C = (cols + kBM - 1) / kBM * kBM, R = (klen + kKQuant - 1) / kKQuant * kKQuant / PER;
  if constexpr (PER == 1 && std::is_same_v<T, W> && !kIsInt<T>) {  // floats need no staging: x itself, if laid out so
    const at::Tensor v = is_a ? x.transpose(-1, -2) : x;
    if (R == klen && C == cols && v.is_contiguous() && aligned16(v.const_data_ptr())) return v;
  }
  const at::Tensor x3 = x.reshape({-1, rows, cols_});
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(R);
  shape.push_back(C);
  at::Tensor out = at::empty(shape, x.options().dtype(word));
  const int64_t nb = x3.size(0), total = nb * (R / 8) * C;
  if (total == 0) return out;
  const int64_t sbat = nb > 1 ? x3.stride(0) : 0;
  // strides of size-1 dims never multiply a nonzero index: 0 keeps them in 32 bits
  const int s_row = rows > 1 ? int(x3.stride(1)) : 0, s_col = cols_ > 1 ? int(x3.stride(2)) : 0;
  const int sc = is_a ? s_row : s_col, sk = is_a ? s_col : s_row;
  auto go = [&](auto min_c) {
    maxplus_pack_kernel<T, W, decltype(min_c)::value, PER><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
        x3.const_data_ptr<T>(), reinterpret_cast<W*>(out.mutable_data_ptr()), sbat, sc, sk, int(cols), int(klen),
        int(C), int(R), total);
  };
  if (minplus) go(std::true_type{});
  else go(std::false_type{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> maxplus_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                                                            bool minplus, bool want_argmax, bool want_margin) {
  const char* op = "maxplus_cuda";
  check_pair(op, a_in, b_in);
  const bool is_int = !at::isFloatingType(a_in.scalar_type());
  TORCH_CHECK(!(is_int && want_margin), op, ": margin is float-only, got ", a_in.scalar_type(), " inputs");
  at::Tensor a = a_in, b = b_in;
  auto lead = broadcast_leading("maxplus_cuda", a, b, 2);
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  std::vector<int64_t> shape = lead;
  shape.push_back(M);
  shape.push_back(N);
  at::Tensor c = at::empty(shape, a.options());
  at::Tensor idx = at::empty(want_argmax ? at::IntArrayRef(shape) : at::IntArrayRef({0}),
                             a.options().dtype(at::kLong));
  at::Tensor mg = at::empty(want_margin ? at::IntArrayRef(shape) : at::IntArrayRef({0}), a.options());
  if (c.numel() == 0) return {c, idx, mg};
  if (K == 0) {  // the semiring zero (the integer sentinel), no route
    if (a.scalar_type() == at::kInt) c.fill_(minplus ? INT32_MAX : INT32_MIN);
    else if (a.scalar_type() == at::kShort) c.fill_(minplus ? INT16_MAX : INT16_MIN);
    else c.fill_(minplus ? INFINITY : -INFINITY);
    if (want_argmax) idx.fill_(-1);
    if (want_margin) mg.fill_(INFINITY);
    return {c, idx, mg};
  }
  Batch L;
  if (!make_batch(lead, a, b, &L)) {
    std::vector<int64_t> fa = lead, fb = lead;
    fa.insert(fa.end(), {M, K});
    fb.insert(fb.end(), {K, N});
    a = a.expand(fa).contiguous();
    b = b.expand(fb).contiguous();
    TORCH_CHECK(make_batch(lead, a, b, &L), op, ": could not build a batch layout");
  }
  const int64_t batch = c.numel() / (M * N);
  c10::cuda::CUDAGuard guard(a.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int tiles = int(((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN));
  // argmax alone records 16-bit tile numbers: at most 65535 tiles of kBK per slice
  const int64_t least = want_argmax && !want_margin ? (K + 65535 * kBK - 1) / (65535 * kBK) : 1;
  const int want_splits = choose_splits(int64_t(tiles) * batch, K, !want_margin, least);
  // k per slice: a multiple of every kernel's k tile; the slice count follows from it
  const int64_t ksplit = ((K + want_splits - 1) / want_splits + kKQuant - 1) / kKQuant * kKQuant;
  const int splits = int((K + ksplit - 1) / ksplit);
  const dim3 grid(tiles, unsigned(std::min<int64_t>(batch, 65535)), unsigned(splits));
  // strides of size-1 dims never multiply a nonzero index: 0 keeps them in 32 bits
  const int sam = M > 1 ? int(a.stride(-2)) : 0, sak = K > 1 ? int(a.stride(-1)) : 0;
  const int sbk = K > 1 ? int(b.stride(-2)) : 0, sbn = N > 1 ? int(b.stride(-1)) : 0;
  // int16x2 DPX is one instruction from sm_90 on; before, it is emulated (several SIMD
  // instructions and 1 KB of spills in the packed kernel), so int16 takes the int32 kernel
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.get_device()));
  const bool packed_ok = a.scalar_type() != at::kShort || major >= 9;
  AT_DISPATCH_FLOATING_TYPES_AND4(at::kHalf, at::kBFloat16, at::kInt, at::kShort, a.scalar_type(), "maxplus_cuda", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double,
                                   std::conditional_t<std::is_integral_v<scalar_t>, int, float>>;
    const auto acc_type = std::is_same_v<Acc, double> ? at::kDouble : std::is_same_v<Acc, int> ? at::kInt : at::kFloat;
    at::Tensor part, part_idx;
    if (splits > 1) {
      part = at::empty({splits, c.numel()}, a.options().dtype(acc_type));
      if (want_argmax) part_idx = at::empty({splits, c.numel()}, a.options().dtype(at::kInt));
    }
    Params<scalar_t, Acc> p{a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                            c.mutable_data_ptr<scalar_t>(),
                            want_argmax ? idx.mutable_data_ptr<int64_t>() : nullptr,
                            want_margin ? mg.mutable_data_ptr<scalar_t>() : nullptr,
                            splits > 1 ? part.mutable_data_ptr<Acc>() : nullptr,
                            splits > 1 && want_argmax ? part_idx.mutable_data_ptr<int>() : nullptr,
                            int(M), int(N), int(K), sam, sak, sbk, sbn, int(ksplit), batch, L};
    const int mode = (want_argmax ? kArgmax : 0) | (want_margin ? kMargin : 0);
    constexpr bool k16 = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16> ||
                         std::is_same_v<scalar_t, int16_t>;
    const bool packed = k16 && mode == 0 && packed_ok;
    at::Tensor pa, pb;  // the operands as the kernel streams them
    if constexpr (k16) {
      if (packed) {
        pa = pack_operand<scalar_t, unsigned, 2>(a, true, minplus, at::kInt, stream);
        pb = pack_operand<scalar_t, unsigned, 2>(b, false, minplus, at::kInt, stream);
      }
    }
    if (!packed) {
      pa = pack_operand<scalar_t, Acc, 1>(a, true, minplus, acc_type, stream);
      pb = pack_operand<scalar_t, Acc, 1>(b, false, minplus, acc_type, stream);
    }
    TORCH_CHECK(make_batch(lead, pa, pb, &p.LP), op, ": could not build a batch layout for the packed operands");
    p.pa = pa.const_data_ptr();
    p.pb = pb.const_data_ptr();
    p.lda = int(pa.size(-1));
    p.ldb = int(pb.size(-1));
    auto reduce = [&](auto min_c) {
      if (splits == 1) return;
      const int64_t total = c.numel();
      maxplus_split_reduce_kernel<scalar_t, Acc, decltype(min_c)::value>
          <<<grid_for(total, kThreads), kThreads, 0, stream>>>(p.part, p.part_idx, p.c, p.idx, splits, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto go = [&](auto min_c, auto mode_c) {
      constexpr int mode = decltype(mode_c)::value;
      if constexpr (std::is_integral_v<scalar_t> && (mode & kMargin)) {
        TORCH_CHECK(false, "maxplus_cuda: margin is float-only");
      } else {
        maxplus_fwd_kernel<scalar_t, Acc, decltype(min_c)::value, mode><<<grid, kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    auto by_mode = [&](auto min_c) {
      if (packed) launch_packed(p, decltype(min_c)::value, grid, stream);
      else if (mode == 0) go(min_c, std::integral_constant<int, 0>{});
      else if (mode == kArgmax) go(min_c, std::integral_constant<int, kArgmax>{});
      else if (mode == kMargin) go(min_c, std::integral_constant<int, kMargin>{});
      else go(min_c, std::integral_constant<int, kArgmax | kMargin>{});
      reduce(min_c);
    };
    if (minplus) by_mode(std::true_type{});
    else by_mode(std::false_type{});
  });
  return {c, idx, mg};
}

std::tuple<at::Tensor, at::Tensor> maxplus_backward_cuda(const at::Tensor& grad, const at::Tensor& argmax,
                                                         at::IntArrayRef a_shape, at::IntArrayRef b_shape) {
  const char* op = "maxplus_backward_cuda";
  TORCH_CHECK(grad.is_cuda() && argmax.device() == grad.device(), op,
              ": grad and argmax must be CUDA tensors on one device, got ", grad.device(), " and ",
              argmax.device());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": grad must be floating point, got ",
              grad.scalar_type());
  TORCH_CHECK(argmax.scalar_type() == at::kLong && argmax.sizes() == grad.sizes(), op,
              ": argmax must be int64 with grad's shape ", fmt(grad.sizes()), ", got ", argmax.scalar_type(), " ",
              fmt(argmax.sizes()));
  TORCH_CHECK(grad.dim() >= 2 && a_shape.size() >= 2 && b_shape.size() >= 2, op,
              ": grad, a_shape and b_shape need at least 2 dims");
  const int64_t M = grad.size(-2), N = grad.size(-1), K = a_shape.back();
  TORCH_CHECK(a_shape[a_shape.size() - 2] == M && b_shape.back() == N && b_shape[b_shape.size() - 2] == K, op,
              ": a_shape ", fmt(a_shape), " and b_shape ", fmt(b_shape), " do not match grad ", fmt(grad.sizes()));
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor da = at::zeros(a_shape, grad.options().dtype(acc));
  at::Tensor db = at::zeros(b_shape, grad.options().dtype(acc));
  std::vector<int64_t> lead(grad.sizes().begin(), grad.sizes().end() - 2);
  Batch L;
  bool full = false;
  if (!make_batch(lead, da, db, &L)) {  // rare: accumulate at the full batch shape, then reduce
    std::vector<int64_t> fa = lead, fb = lead;
    fa.insert(fa.end(), {M, K});
    fb.insert(fb.end(), {K, N});
    da = at::zeros(fa, da.options());
    db = at::zeros(fb, db.options());
    TORCH_CHECK(make_batch(lead, da, db, &L), op, ": could not build a batch layout");
    full = true;
  }
  const int64_t total = grad.numel();
  if (total > 0 && K > 0) {
    c10::cuda::CUDAGuard guard(grad.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    const at::Tensor g = grad.contiguous(), ix = argmax.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "maxplus_backward_cuda", [&] {
      using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      maxplus_bwd_kernel<scalar_t, Acc><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), ix.const_data_ptr<int64_t>(), da.mutable_data_ptr<Acc>(),
          db.mutable_data_ptr<Acc>(), int(M), int(N), int(K), total, L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (full) {
    da = da.sum_to_size(a_shape);
    db = db.sum_to_size(b_shape);
  }
  return {da.to(grad.scalar_type()), db.to(grad.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(geokern, CUDA, m) {
  m.impl("maxplus_cuda", &maxplus_cuda);
  m.impl("maxplus_backward_cuda", &maxplus_backward_cuda);
}

}  // namespace geokern
