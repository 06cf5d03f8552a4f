// Max-plus / min-plus matrix product C[i, j] = max_k a[i, k] + b[k, j] (or min), with
// optional argmax (ties -> smallest k) and margin (winner minus runner-up), and its
// backward (dC scattered along the argmax route).
//
// Forward: a register-blocked GEMM-shaped kernel. There are no max-plus tensor cores,
// so the ceiling is the fp32 lanes: each k step is one FADD and one FMNMX per output
// (PERF.md: the pair runs at ~80% of 16.7 T steps/s on an H100). To feed the lanes
// from registers each thread owns an 8 x 8 tile of C (64 add+max pairs per 16 shared
// loads), the block a 128 x 128 tile (256 threads). Per K step of 8 the block stages
// A k-major (As[k][m], so a thread's 4 consecutive rows are one 128-bit load) and B
// (Bs[k][n]) in double-buffered shared memory; the next tile's global loads are issued
// into registers before the current tile is consumed. With argmax or margin, 16-bit
// inputs are widened to float when staged (sums in float32, double for double); the
// value-only 16-bit path is maxplus_fwd_packed_kernel below (half2 / bf16x2, two k per
// instruction). Either way the result equals the exact max rounded once (rounding is
// monotone). Measured on an H100 at 4096^3: float32 20.7 T ops/s (62% of the lane
// ceiling), packed bf16 / fp16 32.5 T ops/s, float32 with argmax 9.2 T ops/s.
//
// NaN propagates through max.NaN / min.NaN (fmaxf would drop it). Out-of-range k are
// staged as the semiring zero (-inf for max-plus), which can never win or tie a
// comparison against a real k (comparisons are strict), so tails need no branches.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "common.cuh"

namespace geokern {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 8, kThreads = 256, kPad = 4, kGroupM = 8;
constexpr int kArgmax = 1, kMargin = 2;  // MODE bits

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
  int M, N, K;
  int64_t sam, sak, sbk, sbn;
  int64_t batch;
  Batch L;
};

// Better-than and NaN-propagating combine for max-plus (MIN = false) or min-plus.
template <bool MIN, typename Acc>
__device__ __forceinline__ bool better(Acc s, Acc best) {
  return MIN ? s < best : s > best;
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

template <typename Acc>
struct Vec4 {
  Acc v[4];
};

// Four consecutive Acc from shared memory: one 128-bit load for float.
template <typename Acc>
__device__ __forceinline__ Vec4<Acc> lds4(const Acc* p) {
  Vec4<Acc> r;
  if constexpr (std::is_same_v<Acc, float>) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    r.v[0] = f.x; r.v[1] = f.y; r.v[2] = f.z; r.v[3] = f.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) r.v[i] = p[i];
  }
  return r;
}

template <typename T, typename Acc, bool MIN, int MODE>
__global__ void __launch_bounds__(kThreads, MODE == 0 ? 2 : 1)
maxplus_fwd_kernel(const Params<T, Acc> p) {
  __shared__ __align__(16) Acc As[2][kBK][kBM + kPad];
  __shared__ __align__(16) Acc Bs[2][kBK][kBN + kPad];
  constexpr Acc kZero = MIN ? Acc(INFINITY) : Acc(-INFINITY);

  // grouped program order: kGroupM tile rows share the B tiles they read in L2
  const int tm = (p.M + kBM - 1) / kBM, tn = (p.N + kBN - 1) / kBN;
  const int pid = blockIdx.x, per_group = kGroupM * tn;
  const int first_m = (pid / per_group) * kGroupM;
  const int gm = min(tm - first_m, kGroupM);
  const int m0 = (first_m + (pid % per_group) % gm) * kBM;
  const int n0 = ((pid % per_group) / gm) * kBN;

  const int t = threadIdx.x;
  const int tx = t % 16, ty = t / 16;  // compute: rows ty*4 (+64), cols tx*4 (+64)
  const int la_k = t % kBK, la_m = t / kBK;  // A loader: 8 threads along k, 32 rows per pass
  const int lb_n = t % kBN, lb_k = t / kBN;  // B loader: 128 threads along n, 2 k per pass
  const int ktiles = (p.K + kBK - 1) / kBK;

  for (int64_t bat = blockIdx.y; bat < p.batch; bat += gridDim.y) {
    int64_t oa, ob;
    p.L.offsets(bat, oa, ob);
    const T* a = p.a + oa;
    const T* b = p.b + ob;

    Acc ra[4], rb[4];  // the next tile, in flight from global memory
    auto load = [&](int kt) {
      const int ka = kt * kBK + la_k;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int m = m0 + la_m + 32 * r;
        ra[r] = (m < p.M && ka < p.K) ? Acc(a[m * p.sam + ka * p.sak]) : kZero;
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int kb = kt * kBK + lb_k + 2 * r, n = n0 + lb_n;
        rb[r] = (n < p.N && kb < p.K) ? Acc(b[kb * p.sbk + n * p.sbn]) : kZero;
      }
    };
    auto stage = [&](int buf) {
#pragma unroll
      for (int r = 0; r < 4; ++r) As[buf][la_k][la_m + 32 * r] = ra[r];
#pragma unroll
      for (int r = 0; r < 4; ++r) Bs[buf][lb_k + 2 * r][lb_n] = rb[r];
    };

    Acc top1[8][8], top2[8][8];
    int idx[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        top1[i][j] = kZero;
        if constexpr (MODE & kMargin) top2[i][j] = kZero;
        if constexpr (MODE & kArgmax) idx[i][j] = 0;
      }

    __syncthreads();  // the previous batch's last reads are done
    load(0);
    stage(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
      const int buf = kt & 1;
      if (kt + 1 < ktiles) load(kt + 1);
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        const Vec4<Acc> a0 = lds4(&As[buf][kk][ty * 4]), a1 = lds4(&As[buf][kk][64 + ty * 4]);
        const Vec4<Acc> b0 = lds4(&Bs[buf][kk][tx * 4]), b1 = lds4(&Bs[buf][kk][64 + tx * 4]);
        Acc av[8], bv[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          av[i] = a0.v[i]; av[4 + i] = a1.v[i];
          bv[i] = b0.v[i]; bv[4 + i] = b1.v[i];
        }
        const int k = kt * kBK + kk;
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const Acc s = av[i] + bv[j];
            if constexpr (MODE & kMargin) {
              const Acc worse = MIN ? fmax(top1[i][j], s) : fmin(top1[i][j], s);
              top2[i][j] = MIN ? fmin(top2[i][j], worse) : fmax(top2[i][j], worse);
            }
            if constexpr (MODE & kArgmax) idx[i][j] = better<MIN>(s, top1[i][j]) ? k : idx[i][j];
            top1[i][j] = combine<MIN>(top1[i][j], s);
          }
      }
      if (kt + 1 < ktiles) stage(buf ^ 1);
      __syncthreads();
    }

    const int64_t out0 = bat * int64_t(p.M) * p.N;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int m = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
      if (m >= p.M) continue;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int n = n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
        if (n >= p.N) continue;
        const int64_t o = out0 + int64_t(m) * p.N + n;
        p.c[o] = static_cast<T>(top1[i][j]);
        if constexpr (MODE & kArgmax) p.idx[o] = idx[i][j];
        if constexpr (MODE & kMargin) {
          const Acc t1 = top1[i][j], t2 = top2[i][j];
          const Acc gap = MIN ? t2 - t1 : t1 - t2;
          p.margin[o] = static_cast<T>((t2 == kZero && t1 == t1) ? Acc(INFINITY) : gap);
        }
      }
    }
  }
}

// Value-only 16-bit path: packed half2 / bf16x2 add and max (HADD2 + HMNMX2), each
// instruction doing two k steps: a pair (k, k + 1) of one row of A and the same pair of
// one column of B share a 32-bit register, and the two lanes are collapsed once in the
// epilogue. Sums are rounded to 16 bits at every step, which loses nothing: rounding is
// monotone, so max_k round(a + b) = round(max_k (a + b)), the exactly rounded result
// (overflow to inf included). Ties between k are not tracked, so argmax / margin take
// the float32 kernel above.
template <typename T>
struct Packed;
template <>
struct Packed<at::Half> {
  using H = __half;
  using H2 = __half2;
  static __device__ __forceinline__ H neg_inf() { return __ushort_as_half(0xFC00); }
  static __device__ __forceinline__ H pos_inf() { return __ushort_as_half(0x7C00); }
  static __device__ __forceinline__ H2 pair(H lo, H hi) { return __halves2half2(lo, hi); }
  static __device__ __forceinline__ H lo(H2 v) { return __low2half(v); }
  static __device__ __forceinline__ H hi(H2 v) { return __high2half(v); }
};
template <>
struct Packed<at::BFloat16> {
  using H = __nv_bfloat16;
  using H2 = __nv_bfloat162;
  static __device__ __forceinline__ H neg_inf() { return __ushort_as_bfloat16(0xFF80); }
  static __device__ __forceinline__ H pos_inf() { return __ushort_as_bfloat16(0x7F80); }
  static __device__ __forceinline__ H2 pair(H lo, H hi) { return __halves2bfloat162(lo, hi); }
  static __device__ __forceinline__ H lo(H2 v) { return __low2bfloat16(v); }
  static __device__ __forceinline__ H hi(H2 v) { return __high2bfloat16(v); }
};

constexpr int kBK2 = 16;  // k per tile of the packed kernel: 8 pairs

template <typename T, bool MIN>
__global__ void __launch_bounds__(kThreads, 2) maxplus_fwd_packed_kernel(const Params<T, float> p) {
  using P = Packed<T>;
  using H = typename P::H;
  using H2 = typename P::H2;
  __shared__ __align__(16) H2 As[2][kBK2 / 2][kBM + kPad];
  __shared__ __align__(16) H2 Bs[2][kBK2 / 2][kBN + kPad];
  const H zero = MIN ? P::pos_inf() : P::neg_inf();

  const int tm = (p.M + kBM - 1) / kBM, tn = (p.N + kBN - 1) / kBN;
  const int pid = blockIdx.x, per_group = kGroupM * tn;
  const int first_m = (pid / per_group) * kGroupM;
  const int gm = min(tm - first_m, kGroupM);
  const int m0 = (first_m + (pid % per_group) % gm) * kBM;
  const int n0 = ((pid % per_group) / gm) * kBN;

  const int t = threadIdx.x;
  const int tx = t % 16, ty = t / 16;
  const int la_m = t / 2, la_p = (t % 2) * 4;    // A loader: 8 consecutive k of one row
  const int lb_n = t % kBN, lb_p = (t / kBN) * 4;  // B loader: 8 k of one column
  const int ktiles = (p.K + kBK2 - 1) / kBK2;

  for (int64_t bat = blockIdx.y; bat < p.batch; bat += gridDim.y) {
    int64_t oa, ob;
    p.L.offsets(bat, oa, ob);
    const H* a = reinterpret_cast<const H*>(p.a) + oa;
    const H* b = reinterpret_cast<const H*>(p.b) + ob;
    H2 ra[4], rb[4];
    auto load = [&](int kt) {
      const int m = m0 + la_m;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int k = kt * kBK2 + 2 * (la_p + q);
        const H x0 = (m < p.M && k < p.K) ? a[m * p.sam + k * p.sak] : zero;
        const H x1 = (m < p.M && k + 1 < p.K) ? a[m * p.sam + (k + 1) * p.sak] : zero;
        ra[q] = P::pair(x0, x1);
      }
      const int n = n0 + lb_n;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int k = kt * kBK2 + 2 * (lb_p + q);
        const H y0 = (n < p.N && k < p.K) ? b[k * p.sbk + n * p.sbn] : zero;
        const H y1 = (n < p.N && k + 1 < p.K) ? b[(k + 1) * p.sbk + n * p.sbn] : zero;
        rb[q] = P::pair(y0, y1);
      }
    };
    auto stage = [&](int buf) {
#pragma unroll
      for (int q = 0; q < 4; ++q) As[buf][la_p + q][la_m] = ra[q];
#pragma unroll
      for (int q = 0; q < 4; ++q) Bs[buf][lb_p + q][lb_n] = rb[q];
    };

    H2 acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = P::pair(zero, zero);

    __syncthreads();
    load(0);
    stage(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
      const int buf = kt & 1;
      if (kt + 1 < ktiles) load(kt + 1);
#pragma unroll
      for (int kp = 0; kp < kBK2 / 2; ++kp) {
        H2 av[8], bv[8];
        // 4 pairs = 16 bytes: one 128-bit shared load each
        *reinterpret_cast<uint4*>(av) = *reinterpret_cast<const uint4*>(&As[buf][kp][ty * 4]);
        *reinterpret_cast<uint4*>(av + 4) = *reinterpret_cast<const uint4*>(&As[buf][kp][64 + ty * 4]);
        *reinterpret_cast<uint4*>(bv) = *reinterpret_cast<const uint4*>(&Bs[buf][kp][tx * 4]);
        *reinterpret_cast<uint4*>(bv + 4) = *reinterpret_cast<const uint4*>(&Bs[buf][kp][64 + tx * 4]);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const H2 s = __hadd2(av[i], bv[j]);
            acc[i][j] = MIN ? __hmin2_nan(acc[i][j], s) : __hmax2_nan(acc[i][j], s);
          }
      }
      if (kt + 1 < ktiles) stage(buf ^ 1);
      __syncthreads();
    }

    H* c = reinterpret_cast<H*>(p.c);
    const int64_t out0 = bat * int64_t(p.M) * p.N;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int m = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
      if (m >= p.M) continue;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int n = n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
        if (n >= p.N) continue;
        const H x = P::lo(acc[i][j]), y = P::hi(acc[i][j]);
        c[out0 + int64_t(m) * p.N + n] = MIN ? __hmin_nan(x, y) : __hmax_nan(x, y);
      }
    }
  }
}

// Launches the packed kernel for 16-bit T (true), or does nothing (false).
template <typename T, typename Acc>
bool launch_packed(const Params<T, Acc>& p, bool minplus, dim3 grid, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) {
    if (minplus) maxplus_fwd_packed_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
    else maxplus_fwd_packed_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  } else {
    return false;
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
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": a must be floating point, got ", a.scalar_type());
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> maxplus_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                                                            bool minplus, bool want_argmax, bool want_margin) {
  const char* op = "maxplus_cuda";
  check_pair(op, a_in, b_in);
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
  if (K == 0) {  // the semiring zero, no route
    c.fill_(minplus ? INFINITY : -INFINITY);
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
  const dim3 grid(tiles, unsigned(std::min<int64_t>(batch, 65535)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "maxplus_cuda", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    Params<scalar_t, Acc> p{a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                            c.mutable_data_ptr<scalar_t>(),
                            want_argmax ? idx.mutable_data_ptr<int64_t>() : nullptr,
                            want_margin ? mg.mutable_data_ptr<scalar_t>() : nullptr,
                            int(M), int(N), int(K), a.stride(-2), a.stride(-1), b.stride(-2), b.stride(-1),
                            batch, L};
    if (!want_argmax && !want_margin && launch_packed(p, minplus, grid, stream)) return;
    auto go = [&](auto min_c, auto mode_c) {
      maxplus_fwd_kernel<scalar_t, Acc, decltype(min_c)::value, decltype(mode_c)::value>
          <<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto by_mode = [&](auto min_c) {
      const int mode = (want_argmax ? kArgmax : 0) | (want_margin ? kMargin : 0);
      if (mode == 0) go(min_c, std::integral_constant<int, 0>{});
      else if (mode == kArgmax) go(min_c, std::integral_constant<int, kArgmax>{});
      else if (mode == kMargin) go(min_c, std::integral_constant<int, kMargin>{});
      else go(min_c, std::integral_constant<int, kArgmax | kMargin>{});
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
