// Soft-mode ultrametric attention (the soft LCP kernel: reference.soft_lcp_attention, spec section
// 3) on CUDA: forward (y, lse) and backward (dq, dk, dv), without atomics. The numerics are the
// Triton kernel's (kernels/ultrametric/soft.py, whose docstring states the maths and the gradient
// formulas): per level d = q_l - k_l (formed before any scaling), c += d d, lcp += exp2(c nb) with
// nb = -beta log2 e folded; the weight exp2(lcp log2 alpha) normalised online in log2 units; the
// spec's 1e-9 clamp of the weight sum applied in log space; lse in natural log. The hard mode's
// CUDA structure (attention.cu): a warp per row, float32 FMA loops, no shared memory (the rows of
// a block re-read their keys from L1). Design and counts: README.md beside this file.
//
// Forward: a warp per query row; lane j computes the pair weight of key j0 + j (K + 1 exp2), then
// lanes own channels (NC each) and add p_j v_j for the 32 keys in a float32 FMA loop.
// Backward, three passes, each output written once by its owner (deterministic):
//   prep   a warp per query: lsc = log2 max(den, 1e-9), delta = dy . y (0 where the clamp holds);
//   dq     a warp per query, lanes own keys: lcp and pc, dp = dy . v_j (lanes over channels, then a
//          31-shuffle reduce-scatter), dL/dlcp, the level sums again: dq (2K + 1 exp2 per pair);
//   dk/dv  a warp per key, lanes own the queries of its R heads that see it: the same per pair,
//          dv and dk (2K + 1 exp2 per pair).

#include <cfloat>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common.cuh"

namespace geokern {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kMaxK = 16;   // digits and level gradients live in registers
constexpr int kMaxNC = 8;   // channels per lane: D <= 256
constexpr float kLog2Clamp = -29.897352853986263f;  // log2(1e-9), the clamp of the weight sum
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// 2^x on the special-function unit, as Triton's tl.exp2 (ex2.approx.f32; 2^-inf = +0).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

struct SoftParams {
  const void *q, *k, *v;  // q [B, H, Tq, K], k [B, Hkv, Tk, K] float digits, v [B, Hkv, Tk, D]
  const void *dy, *y;     // backward: [B, H, Tq, D]
  const bool* keep;       // [B, Tk] or null
  const float* lse_in;    // backward: the forward's lse [B, H, Tq]
  float *lsc, *delta;     // backward scratch [B, H, Tq]: log2 max(den, 1e-9), dy . y
  void *out, *dq, *dk, *dv;
  float* lse;             // forward: [B, H, Tq]
  int H, R, Hkv, Tq, Tk, K, D, off;  // off = Tk - Tq: query i sits at position off + i
  bool causal;
  float nb, log2a, lna, c0;  // -beta log2 e, log2 alpha, ln alpha, 2 beta
};

template <typename VT>
__device__ __forceinline__ void load_digits(const VT* p, int K, float (&r)[kMaxK]) {
#pragma unroll
  for (int l = 0; l < kMaxK; ++l) r[l] = l < K ? static_cast<float>(p[l]) : 0.f;
}

// Walks the levels of one pair: per level l, d = q_l - k_l (formed before any scaling), c += d d,
// and f(l, d, P_l) with P_l = exp2(nb c) the partial product (one exp2). `mine` are the digits of
// the warp's own row (registers), `other` the pair's other row (memory; the query's when
// MINE_IS_Q is false).
template <bool MINE_IS_Q, typename VT, typename F>
__device__ __forceinline__ void walk_levels(const float (&mine)[kMaxK], const VT* other, int K, float nb, F&& f) {
  float c = 0.f;
#pragma unroll
  for (int l = 0; l < kMaxK; ++l) {
    if (l >= K) break;
    const float o = static_cast<float>(other[l]);
    const float d = MINE_IS_Q ? mine[l] - o : o - mine[l];
    c = fmaf(d, d, c);
    f(l, d, ex2(c * nb));
  }
}

// lcp of one pair: the sum of its partial products. K exp2.
template <bool MINE_IS_Q, typename VT>
__device__ __forceinline__ float soft_lcp(const float (&mine)[kMaxK], const VT* other, int K, float nb) {
  float lcp = 0.f;
  walk_levels<MINE_IS_Q>(mine, other, K, nb, [&](int, float, float P) { lcp += P; });
  return lcp;
}

// The level sums again, for the digit gradients: acc_m += G (lcp - sum_{l<m} P_l) d_m, G = dL/dlcp
// (the caller scales by -+2 beta). K exp2.
template <bool MINE_IS_Q, typename VT>
__device__ __forceinline__ void level_grads(const float (&mine)[kMaxK], const VT* other, int K, float nb, float g,
                                            float lcp, float (&acc)[kMaxK]) {
  float below = 0.f;
  walk_levels<MINE_IS_Q>(mine, other, K, nb, [&](int l, float d, float P) {
    acc[l] = fmaf(g * (lcp - below), d, acc[l]);
    below += P;
  });
}

// x[t] summed over the warp's lanes, lane t receiving the sum of entry t: 31 shuffles. Stage O
// halves the entries a lane holds: it keeps the half its bit O selects and adds its partner's.
// (A template per stage: with a loop over O, nvcc left x in local memory.)
template <int O>
__device__ __forceinline__ void reduce_scatter_stage(float (&x)[32], int lane) {
  const bool up = lane & O;
#pragma unroll
  for (int t = 0; t < O; ++t) {
    const float send = up ? x[t] : x[t + O];
    const float mine = up ? x[t + O] : x[t];
    x[t] = mine + __shfl_xor_sync(kFull, send, O);
  }
  if constexpr (O > 1) reduce_scatter_stage<O / 2>(x, lane);
}

__device__ __forceinline__ float reduce_scatter32(float (&x)[32], int lane) {
  reduce_scatter_stage<16>(x, lane);
  return x[0];
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// out[l] = scale times the warp's sum of acc[l] (the digit gradient of the warp's row), by lane 0;
// 0 + x so that a row nothing was added to gets +0.
template <typename VT>
__device__ __forceinline__ void store_levels(VT* out, const float (&acc)[kMaxK], int K, float scale, int lane) {
#pragma unroll
  for (int l = 0; l < kMaxK; ++l) {
    if (l >= K) break;
    const float t = warp_sum(acc[l]);
    if (lane == 0) out[l] = static_cast<VT>(0.f + scale * t);
  }
}

__device__ __forceinline__ bool key_kept(const SoftParams& a, int b, int j) {
  return !a.keep || a.keep[int64_t(b) * a.Tk + j];
}

// The first key row of query row `row`'s group, its batch, and the keys [0, hi) it may see.
struct QueryRow {
  int64_t kbase;
  int b, i, hi;
};

__device__ __forceinline__ QueryRow query_row(const SoftParams& a, int64_t row) {
  QueryRow r;
  r.i = int(row % a.Tq);
  const int64_t bh = row / a.Tq;
  r.b = int(bh / a.H);
  r.kbase = (int64_t(r.b) * a.Hkv + int(bh % a.H) / a.R) * a.Tk;
  r.hi = a.causal ? min(a.Tk, a.off + r.i + 1) : a.Tk;
  return r;
}

// Grid: a warp per query row (B H Tq rows). y = acc / l times min(1, den / 1e-9), lse = log den.
template <typename VT, int NC>
__global__ void __launch_bounds__(kThreads) ultrametric_soft_fwd_kernel(const SoftParams a, int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const QueryRow qr = query_row(a, row);
  const VT* k = static_cast<const VT*>(a.k);
  const VT* v = static_cast<const VT*>(a.v);
  float qd[kMaxK];
  load_digits(static_cast<const VT*>(a.q) + row * a.K, a.K, qd);
  float m = -INFINITY, l = 0.f, acc[NC] = {};
  for (int j0 = 0; j0 < qr.hi; j0 += 32) {
    const int j = j0 + lane;
    const bool vis = j < qr.hi && key_kept(a, qr.b, j);
    const float s = vis ? soft_lcp<true>(qd, k + (qr.kbase + j) * a.K, a.K, a.nb) * a.log2a : -INFINITY;
    float mt = s;
    for (int o = 16; o > 0; o /= 2) mt = fmaxf(mt, __shfl_xor_sync(kFull, mt, o));
    const float mn = fmaxf(m, mt);
    const float ms = mn == -INFINITY ? 0.f : mn;  // no visible key yet: exp2(-inf) = 0, not NaN
    const float p = ex2(s - ms), scale = ex2(m - ms);
    l = l * scale + p;  // this lane's part of the sum, rescaled as the others
    // a hidden key carries -1: skipped, never multiplied, so its NaN / inf reaches no row
    const float pv = vis ? p : -1.f;
#pragma unroll
    for (int e = 0; e < NC; ++e) acc[e] *= scale;
    const int n = min(32, qr.hi - j0);
    for (int jj = 0; jj < n; ++jj) {
      const float pj = __shfl_sync(kFull, pv, jj);
      if (pj < 0.f) continue;  // warp-uniform
      const VT* vr = v + (qr.kbase + j0 + jj) * a.D;
#pragma unroll
      for (int e = 0; e < NC; ++e) {
        const int c = lane + 32 * e;
        if (c < a.D) acc[e] = fmaf(pj, static_cast<float>(vr[c]), acc[e]);
      }
    }
    m = mn;
  }
  l = warp_sum(l);
  const float lse2 = (m == -INFINITY ? 0.f : m) + log2f(l);
  const float f = ex2(fminf(lse2 - kLog2Clamp, 0.f)) / (l > 0.f ? l : 1.f);
  // A visible non-finite value leaves its channel's acc non-finite (NaN absorbs, inf stays or meets
  // 0 / -inf as NaN). Only then, the Triton kernel's rule (count_nonfinite / apply_nonfinite): NaN
  // where a NaN or both infinities are seen, else the infinity seen; a second pass, off the hot loop.
  bool bad = false;
#pragma unroll
  for (int e = 0; e < NC; ++e) bad |= !(fabsf(acc[e]) <= FLT_MAX);
  if (__any_sync(kFull, bad)) {
    bool nan[NC] = {}, pinf[NC] = {}, ninf[NC] = {};
    for (int j0 = 0; j0 < qr.hi; j0 += 32) {
      const int j = j0 + lane;
      const bool vis = j < qr.hi && key_kept(a, qr.b, j);
      const int n = min(32, qr.hi - j0);
      for (int jj = 0; jj < n; ++jj) {
        if (!__shfl_sync(kFull, vis, jj)) continue;
        const VT* vr = v + (qr.kbase + j0 + jj) * a.D;
#pragma unroll
        for (int e = 0; e < NC; ++e) {
          const int c = lane + 32 * e;
          if (c >= a.D) continue;
          const float x = static_cast<float>(vr[c]);
          nan[e] |= x != x;
          pinf[e] |= x == INFINITY;
          ninf[e] |= x == -INFINITY;
        }
      }
    }
#pragma unroll
    for (int e = 0; e < NC; ++e)
      acc[e] = nan[e] || (pinf[e] && ninf[e]) ? NAN : pinf[e] ? INFINITY : ninf[e] ? -INFINITY : acc[e];
  }
  VT* y = static_cast<VT*>(a.out) + row * a.D;
#pragma unroll
  for (int e = 0; e < NC; ++e) {
    const int c = lane + 32 * e;
    if (c < a.D) y[c] = static_cast<VT>(acc[e] * f);
  }
  if (lane == 0) a.lse[row] = lse2 * kLn2;
}

// Grid: a warp per query row. lsc = log2 max(den, 1e-9) from the forward's lse (as the Triton
// launcher: lse * log2 e, then the clamp, NaN kept), delta = dy . y where den > 1e-9, else 0 (y no
// longer depends on den there).
template <typename VT>
__global__ void __launch_bounds__(kThreads) ultrametric_soft_prep_kernel(const SoftParams a, int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const VT* dy = static_cast<const VT*>(a.dy) + row * a.D;
  const VT* y = static_cast<const VT*>(a.y) + row * a.D;
  float t = 0.f;
  for (int c = lane; c < a.D; c += 32) t = fmaf(static_cast<float>(dy[c]), static_cast<float>(y[c]), t);
  t = warp_sum(t);
  if (lane == 0) {
    const float lse2 = a.lse_in[row] * kLog2e;
    a.lsc[row] = lse2 != lse2 ? lse2 : fmaxf(lse2, kLog2Clamp);
    a.delta[row] = lse2 > kLog2Clamp ? t : 0.f;
  }
}

// Grid: a warp per query row; lanes own the keys [j0, j0 + 32). dq_m = -2 beta sum_j G_ij R_ijm d_ijm.
template <typename VT, int NC>
__global__ void __launch_bounds__(kThreads) ultrametric_soft_dq_kernel(const SoftParams a, int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const QueryRow qr = query_row(a, row);
  const VT* k = static_cast<const VT*>(a.k);
  const VT* v = static_cast<const VT*>(a.v);
  const VT* dyp = static_cast<const VT*>(a.dy) + row * a.D;
  float qd[kMaxK], dy[NC], dq[kMaxK] = {};
  load_digits(static_cast<const VT*>(a.q) + row * a.K, a.K, qd);
#pragma unroll
  for (int e = 0; e < NC; ++e) dy[e] = lane + 32 * e < a.D ? static_cast<float>(dyp[lane + 32 * e]) : 0.f;
  const float lsc = a.lsc[row], delta = a.delta[row];
  for (int j0 = 0; j0 < qr.hi; j0 += 32) {
    const int j = j0 + lane;
    const bool vis = j < qr.hi && key_kept(a, qr.b, j);
    const VT* kr = k + (qr.kbase + j) * a.K;
    const float lcp = vis ? soft_lcp<true>(qd, kr, a.K, a.nb) : 0.f;
    const float pc = vis ? ex2(lcp * a.log2a - lsc) : 0.f;
    // dp_j = dy . v_j: lanes over channels (coalesced rows of v), one partial per key
    float part[32];
    const int n = min(32, qr.hi - j0);
#pragma unroll
    for (int jj = 0; jj < 32; ++jj) {
      part[jj] = 0.f;
      if (jj < n) {
        const VT* vr = v + (qr.kbase + j0 + jj) * a.D;
#pragma unroll
        for (int e = 0; e < NC; ++e)
          if (lane + 32 * e < a.D) part[jj] = fmaf(dy[e], static_cast<float>(vr[lane + 32 * e]), part[jj]);
      }
    }
    const float dp = reduce_scatter32(part, lane);
    if (vis) level_grads<true>(qd, kr, a.K, a.nb, pc * (dp - delta) * a.lna, lcp, dq);
  }
  store_levels(static_cast<VT*>(a.dq) + row * a.K, dq, a.K, -a.c0, lane);
}

// Grid: a warp per key row (B Hkv Tk rows); lanes own the queries of its R heads that see it
// (positions >= the key's, causal). dv_j = sum_i pc_ij dy_i, dk_m = 2 beta sum_i G_ij R_ijm d_ijm.
// A padded key gets zeros.
template <typename VT, int NC>
__global__ void __launch_bounds__(kThreads) ultrametric_soft_dkv_kernel(const SoftParams a, int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int j = int(row % a.Tk);
  const int64_t g = row / a.Tk;
  const int b = int(g / a.Hkv), hk = int(g % a.Hkv);
  const VT* q = static_cast<const VT*>(a.q);
  const VT* dyp = static_cast<const VT*>(a.dy);
  float kd[kMaxK], v[NC], dk[kMaxK] = {}, dv[NC] = {};
  load_digits(static_cast<const VT*>(a.k) + row * a.K, a.K, kd);
  const VT* vp = static_cast<const VT*>(a.v) + row * a.D;
#pragma unroll
  for (int e = 0; e < NC; ++e) v[e] = lane + 32 * e < a.D ? static_cast<float>(vp[lane + 32 * e]) : 0.f;
  if (key_kept(a, b, j)) {  // warp-uniform
    const int lo = a.causal ? max(j - a.off, 0) : 0;
    for (int r = 0; r < a.R; ++r) {
      const int64_t qbase = (int64_t(b) * a.H + int64_t(hk) * a.R + r) * a.Tq;
      for (int i0 = lo; i0 < a.Tq; i0 += 32) {
        const int i = i0 + lane;
        const bool vis = i < a.Tq;
        const VT* qp = q + (qbase + i) * a.K;
        const float lcp = vis ? soft_lcp<false>(kd, qp, a.K, a.nb) : 0.f;
        const float lsc = vis ? a.lsc[qbase + i] : 0.f, delta = vis ? a.delta[qbase + i] : 0.f;
        const float pc = vis ? ex2(lcp * a.log2a - lsc) : 0.f;
        // dv += pc_i dy_i and dp_i = dy_i . v: lanes over channels (coalesced rows of dy)
        float part[32];
        const int n = min(32, a.Tq - i0);
#pragma unroll
        for (int ii = 0; ii < 32; ++ii) {
          part[ii] = 0.f;
          const float pi = __shfl_sync(kFull, pc, ii);
          if (ii < n) {
            const VT* dr = dyp + (qbase + i0 + ii) * a.D;
#pragma unroll
            for (int e = 0; e < NC; ++e) {
              const int c = lane + 32 * e;
              if (c >= a.D) continue;
              const float x = static_cast<float>(dr[c]);
              dv[e] = fmaf(pi, x, dv[e]);
              part[ii] = fmaf(x, v[e], part[ii]);
            }
          }
        }
        const float dp = reduce_scatter32(part, lane);
        if (vis) level_grads<false>(kd, qp, a.K, a.nb, pc * (dp - delta) * a.lna, lcp, dk);
      }
    }
  }
  store_levels(static_cast<VT*>(a.dk) + row * a.K, dk, a.K, a.c0, lane);
  VT* dvo = static_cast<VT*>(a.dv) + row * a.D;
#pragma unroll
  for (int e = 0; e < NC; ++e)
    if (lane + 32 * e < a.D) dvo[lane + 32 * e] = static_cast<VT>(dv[e]);
}

struct Dims {
  int64_t B, H, Hkv, Tq, Tk, K, D;
};

unsigned blocks(int64_t rows) { return unsigned((rows + kWarps - 1) / kWarps); }

// The checks both ops share; v's device runs the op.
Dims check(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& keep,
           double alpha, double beta, bool causal) {
  GK_CHECK(v.device().type() == torch::headeronly::DeviceType::CUDA, op, ": v must be a CUDA tensor, got ",
           v.device());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    GK_CHECK(t->device() == v.device(), op, ": ", name, " is on ", t->device(), " but v is on ", v.device());
    GK_CHECK(t->dim() == 4 && t->is_contiguous(), op, ": ", name, " must be contiguous 4-D, got ", t->sizes());
    GK_CHECK(t->scalar_type() == v.scalar_type(), op, ": ", name, " must have v's dtype ", v.scalar_type(),
             ", got ", t->scalar_type());
  }
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  GK_CHECK(k.size(0) == d.B && k.size(3) == d.K && v.size(0) == d.B && v.size(1) == d.Hkv && v.size(2) == d.Tk, op,
           ": k must be [", d.B, ", Hkv, Tk, ", d.K, "] and v [", d.B, ", Hkv, Tk, D], got ", k.sizes(), ", ",
           v.sizes());
  GK_CHECK(d.Hkv >= 1 && d.H % d.Hkv == 0, op, ": the ", d.Hkv, " heads of k must divide the ", d.H, " of q");
  GK_CHECK(d.K >= 1 && d.K <= kMaxK && d.D <= 32 * kMaxNC, op, ": the CUDA soft kernels hold K <= ", kMaxK,
           " digits and D <= ", 32 * kMaxNC, " channels per row in registers, got K ", d.K, ", D ", d.D,
           " (use backend='triton')");
  GK_CHECK(alpha > 0 && alpha < INFINITY, op, ": alpha must be a finite number > 0, got ", alpha);
  GK_CHECK(beta >= 0 && beta < INFINITY, op, ": lcp_beta must be a finite number >= 0, got ", beta);
  GK_CHECK(!causal || d.Tq <= d.Tk || d.Tq == 1, op, ": causal attention needs Tk >= Tq (or Tq == 1), got Tq ",
           d.Tq, ", Tk ", d.Tk);
  const int64_t max_rows = int64_t(INT32_MAX) * kWarps;  // blocks of kWarps rows on the grid's x
  GK_CHECK(d.B <= INT32_MAX && d.Tk <= INT32_MAX / 2 && d.Tq <= INT32_MAX / 2 && d.B * d.H * d.Tq <= max_rows &&
               d.B * d.Hkv * d.Tk <= max_rows,
           op, ": B ", d.B, ", H ", d.H, ", Tq ", d.Tq, ", Tk ", d.Tk, " past the kernels' int32 positions and grid");
  if (keep.has_value())
    GK_CHECK(keep->device() == v.device() && keep->scalar_type() == dtype::b8 && keep->is_contiguous() &&
                 keep->dim() == 2 && keep->size(0) == d.B && keep->size(1) == d.Tk,
             op, ": keep must be contiguous bool [", d.B, ", ", d.Tk, "] on ", v.device(), ", got ",
             keep->scalar_type(), " ", keep->sizes());
  return d;
}

SoftParams params(const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& keep,
                  double alpha, double beta, bool causal) {
  SoftParams a{};
  a.q = q.const_data_ptr(), a.k = k.const_data_ptr(), a.v = v.const_data_ptr();
  a.keep = keep.has_value() ? keep->const_data_ptr<bool>() : nullptr;
  a.H = int(d.H), a.R = int(d.H / d.Hkv), a.Hkv = int(d.Hkv), a.Tq = int(d.Tq), a.Tk = int(d.Tk), a.K = int(d.K);
  a.D = int(d.D), a.off = int(d.Tk - d.Tq), a.causal = causal;
  // the Triton launcher's constants (_soft_scalars), rounded to float32 as its kernel arguments
  a.nb = float(-beta * 1.4426950408889634), a.log2a = float(std::log2(alpha)), a.lna = float(std::log(alpha));
  a.c0 = float(2.0 * beta);
  return a;
}

// f(VT{}, std::integral_constant<int, NC>{}) with NC channels per lane for D.
template <typename F>
void dispatch(const Tensor& v, int64_t D, const char* op, F&& f) {
  dispatch_kernel_dtype(v.scalar_type(), op, [&](auto vt) {
    if (D <= 64) f(vt, std::integral_constant<int, 2>{});
    else if (D <= 128) f(vt, std::integral_constant<int, 4>{});
    else f(vt, std::integral_constant<int, 8>{});
  });
}

std::tuple<Tensor, Tensor> ultrametric_soft_attention_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                           const std::optional<Tensor>& keep, double alpha,
                                                           double lcp_beta, bool causal) {
  const char* op = "ultrametric_soft_attention_cuda";
  const Dims d = check(op, q, k, v, keep, alpha, lcp_beta, causal);
  const ops::Options o = ops::options(v);
  Tensor y = ops::empty({d.B, d.H, d.Tq, d.D}, o);
  Tensor lse = ops::empty({d.B, d.H, d.Tq}, o.dtype(dtype::f32));
  const int64_t rows = d.B * d.H * d.Tq;
  if (rows == 0) return {y, lse};
  const DeviceGuard guard(v.get_device_index());
  SoftParams a = params(d, q, k, v, keep, alpha, lcp_beta, causal);
  a.out = y.mutable_data_ptr(), a.lse = lse.mutable_data_ptr<float>();
  const cudaStream_t stream = current_stream(v);
  dispatch(v, d.D, op, [&](auto vt, auto nc) {  // Tk = 0: no key, y 0 and lse -inf, from the kernel
    ultrametric_soft_fwd_kernel<decltype(vt), decltype(nc)::value><<<blocks(rows), kThreads, 0, stream>>>(a, rows);
    GK_LAUNCH_CHECK();
  });
  return {y, lse};
}

std::tuple<Tensor, Tensor, Tensor> ultrametric_soft_attention_backward_cuda(
    const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& keep,
    const Tensor& y, const Tensor& lse, double alpha, double lcp_beta, bool causal) {
  const char* op = "ultrametric_soft_attention_backward_cuda";
  const Dims d = check(op, q, k, v, keep, alpha, lcp_beta, causal);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"grad", &grad}, {"y", &y}})
    GK_CHECK(t->device() == v.device() && t->scalar_type() == v.scalar_type() && t->is_contiguous() &&
                 t->dim() == 4 && t->size(0) == d.B && t->size(1) == d.H && t->size(2) == d.Tq &&
                 t->size(3) == d.D,
             op, ": ", name, " must be contiguous ", v.scalar_type(), " [", d.B, ", ", d.H, ", ", d.Tq, ", ", d.D,
             "] on ", v.device(), ", got ", t->scalar_type(), " ", t->sizes());
  GK_CHECK(lse.device() == v.device() && lse.scalar_type() == dtype::f32 && lse.is_contiguous() && lse.dim() == 3 &&
               lse.size(0) == d.B && lse.size(1) == d.H && lse.size(2) == d.Tq,
           op, ": lse must be contiguous float32 [", d.B, ", ", d.H, ", ", d.Tq, "], got ", lse.scalar_type(), " ",
           lse.sizes());
  Tensor dq = ops::empty({d.B, d.H, d.Tq, d.K}, ops::options(q));
  Tensor dk = ops::empty({d.B, d.Hkv, d.Tk, d.K}, ops::options(k));
  Tensor dv = ops::empty({d.B, d.Hkv, d.Tk, d.D}, ops::options(v));
  const int64_t qrows = d.B * d.H * d.Tq, krows = d.B * d.Hkv * d.Tk;
  if (qrows + krows == 0) return {dq, dk, dv};
  const DeviceGuard guard(v.get_device_index());
  Tensor scratch = ops::empty({2, std::max<int64_t>(qrows, 1)}, ops::options(lse));
  SoftParams a = params(d, q, k, v, keep, alpha, lcp_beta, causal);
  a.dy = grad.const_data_ptr(), a.y = y.const_data_ptr(), a.lse_in = lse.const_data_ptr<float>();
  a.lsc = scratch.mutable_data_ptr<float>(), a.delta = a.lsc + std::max<int64_t>(qrows, 1);
  a.dq = dq.mutable_data_ptr(), a.dk = dk.mutable_data_ptr(), a.dv = dv.mutable_data_ptr();
  const cudaStream_t stream = current_stream(v);
  dispatch(v, d.D, op, [&](auto vt, auto nc) {  // Tq = 0: dk, dv zeros; Tk = 0: dq zeros (from the kernels)
    using VT = decltype(vt);
    constexpr int NC = decltype(nc)::value;
    if (qrows) {
      ultrametric_soft_prep_kernel<VT><<<blocks(qrows), kThreads, 0, stream>>>(a, qrows);
      GK_LAUNCH_CHECK();
      ultrametric_soft_dq_kernel<VT, NC><<<blocks(qrows), kThreads, 0, stream>>>(a, qrows);
      GK_LAUNCH_CHECK();
    }
    if (krows) {
      ultrametric_soft_dkv_kernel<VT, NC><<<blocks(krows), kThreads, 0, stream>>>(a, krows);
      GK_LAUNCH_CHECK();
    }
  });
  return {dq, dk, dv};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(geokern, CUDA, m) {
  m.impl("ultrametric_soft_attention_cuda", TORCH_BOX(&ultrametric_soft_attention_cuda));
  m.impl("ultrametric_soft_attention_backward_cuda", TORCH_BOX(&ultrametric_soft_attention_backward_cuda));
}

}  // namespace geokern
