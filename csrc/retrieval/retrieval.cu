// Metric-weighted retrieval cost and retrieval attention (spec retrieval_lior.md sections 1-2).
//
// Every metric reaches here as a diagonal metric w [F] (float32) on features (geokern/metric.py:
// phi is linear, so phi(k - q) = phi(k) - phi(q)); dv = k - q is formed directly, never expanded
// as |q|^2 + |k|^2 - 2 q.k, so there is no cancellation when q is close to k.
//
// Shapes: q [NB0, NB1, LQ, F]; k [1|NB0, 1|NB1, M, F]; v [1|NB0, 1|NB1, M, DV]; r (float32) and
// mask (bool) broadcast to [NB0, NB1, LQ, M] (size-1 dims read with stride 0, never expanded).
//
// Attention forward (decode-oriented flash-decoding): the rows that share one set of keys and
// values (a shared bank: every row of the batch) form a "kv batch"; a CTA takes G of those rows and
// one split of the keys, so each tile of V is loaded once for G rows. Logits of a key tile go to
// shared memory, the online-softmax statistics are kept per row, and each thread owns VEC
// consecutive columns of V and accumulates P V for its G rows in float32. Several key sets
// (segments, e.g. a per-row sequence and a shared bank) run in the same launch; with more than one
// split in total, the partial (max, sum, acc) of every split are merged by a second kernel.
//
// Backward: dP = dO V^T and dV = P^T dO are float32 batched GEMMs (cuBLAS) per kv batch; a pair
// kernel recomputes P from the lse and forms dcost = -beta P (dP - delta); the cost's backward
// (shared with retrieval_cost) then reduces dcost to dq (per query, over keys), dk (per key, over
// the queries that see it), dw and dR in float32, again with dv formed directly. dP and P take
// [rows, M] float32 each: the backward runs over chunks of queries so that each stays under
// GEOKERN_RETRIEVAL_BWD_CHUNK elements (default 2^26).
//
// Tuning knobs, read at each call: GEOKERN_RETRIEVAL_CTAS (the forward's target number of blocks
// when it chooses key splits; default 2 per SM), GEOKERN_RETRIEVAL_BANK_SPLITS (at most this many
// splits of a key set shared by several rows; default one per 64 keys).
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdlib>

#include "common.cuh"

namespace geokern {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxSeg = 4;
constexpr int kCH = 64;  // keys per tile in the attention forward

struct S4 {
  int64_t s[4];
};

// Strides of a 4-D tensor with zero on its size-1 dims (broadcast reads).
S4 bstrides(const at::Tensor& t) {
  S4 r;
  for (int d = 0; d < 4; ++d) r.s[d] = t.size(d) == 1 ? 0 : t.stride(d);
  return r;
}

template <typename F>
void dispatch_kernel_dtype(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": dtype must be float32, float16 or bfloat16, got ", c10::toString(st));
  }
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// ---- the cost ----------------------------------------------------------------------------

template <typename T>
__global__ void cost_fwd_kernel(const T* __restrict__ q, S4 sq, const T* __restrict__ k, S4 sk,
                                const float* __restrict__ w, const float* __restrict__ r, S4 sr,
                                float* __restrict__ out, int64_t rows, int64_t NB1, int64_t LQ, int64_t M,
                                int F, float eps) {
  extern __shared__ float sm[];
  float* qs = sm;
  float* ws = sm + F;
  for (int f = threadIdx.x; f < F; f += blockDim.x) ws[f] = w[f];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t i = row % LQ, b = row / LQ, b1 = b % NB1, b0 = b / NB1;
    __syncthreads();
    for (int f = threadIdx.x; f < F; f += blockDim.x)
      qs[f] = static_cast<float>(q[b0 * sq.s[0] + b1 * sq.s[1] + i * sq.s[2] + f * sq.s[3]]);
    __syncthreads();
    const T* kb = k + b0 * sk.s[0] + b1 * sk.s[1];
    const float* rb = r + b0 * sr.s[0] + b1 * sr.s[1] + i * sr.s[2];
    for (int64_t j = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; j < M; j += int64_t(gridDim.y) * blockDim.x) {
      float s = 0.f;
      for (int f = 0; f < F; ++f) {
        const float d = static_cast<float>(kb[j * sk.s[2] + f * sk.s[3]]) - qs[f];
        s = fmaf(ws[f] * d, d, s);
      }
      out[row * M + j] = rb[j * sr.s[3]] * sqrtf(fmaxf(s, 0.f) + eps);
    }
  }
}

// The cost's backward over one side. For every point x of X (queries, or keys), over the points
// y of Y that meet it (with dcost g_xy and R_xy):
//   c = g R / spd * [s >= 0],   out_x = w * sum_y c (x - y),   outw_x = sum_y c (x - y)^2 / 2,
//   drx_x = sum_y g spd,        drp_xy = g spd
// With X = queries, out is dq (dv = k - q, dq = -sum ddv); with X = keys, out is dk. X has its own
// batch extents (nx0, nx1): where one is 1 but the batch is NB, the points of every batch meet x.
// One block per point x: threads take one y each to form c, then (feature, slice) pairs sum it.
struct XY {
  const void* x;
  S4 sx;  // [b0, b1, l, f]
  const void* y;
  S4 sy;
  const float* w;
  const float* g;
  S4 sg;  // [b0, b1, xl, yl]
  const float* r;
  S4 sr;  // [b0, b1, xl, yl]
  int64_t NB0, NB1, LX, LY, nx0, nx1;
  int F;
  float eps;
  float* out;   // [nx0 * nx1 * LX, F]
  float* outw;  // optional, same shape
  float* drx;   // optional [nx0 * nx1 * LX]
  float* drp;   // optional, strides sdp over [b0, b1, xl, yl]
  S4 sdp;
  int accumulate;
};

constexpr int kRedThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kRedThreads) cost_reduce_kernel(const XY p) {
  extern __shared__ float sm[];
  float* xs = sm;                  // [F]
  float* ws = xs + p.F;            // [F]
  float* cs = ws + p.F;            // [kRedThreads]
  float* red = cs + kRedThreads;   // [2 * kRedThreads]
  const int t = threadIdx.x;
  const int F = p.F;
  const T* X = static_cast<const T*>(p.x);
  const T* Y = static_cast<const T*>(p.y);
  for (int f = t; f < F; f += kRedThreads) ws[f] = p.w[f];
  const int64_t npts = p.nx0 * p.nx1 * p.LX;
  const int fstep = F < kRedThreads ? F : kRedThreads;
  const int nsl = kRedThreads / fstep;
  const bool loop0 = p.nx0 == 1 && p.NB0 > 1, loop1 = p.nx1 == 1 && p.NB1 > 1;
  for (int64_t xp = blockIdx.x; xp < npts; xp += gridDim.x) {
    const int64_t xl = xp % p.LX, xb = xp / p.LX, xb1 = xb % p.nx1, xb0 = xb / p.nx1;
    __syncthreads();
    for (int f = t; f < F; f += kRedThreads)
      xs[f] = static_cast<float>(X[xb0 * p.sx.s[0] + xb1 * p.sx.s[1] + xl * p.sx.s[2] + f * p.sx.s[3]]);
    __syncthreads();
    const int64_t b0lo = loop0 ? 0 : xb0, b0hi = loop0 ? p.NB0 : xb0 + 1;
    const int64_t b1lo = loop1 ? 0 : xb1, b1hi = loop1 ? p.NB1 : xb1 + 1;
    float dr_acc = 0.f;
    for (int fb = 0; fb < F; fb += fstep) {
      const int f = fb + t % fstep, sl = t / fstep;
      const bool fact = sl < nsl && f < F;
      float a1 = 0.f, a2 = 0.f;
      for (int64_t b0 = b0lo; b0 < b0hi; ++b0)
        for (int64_t b1 = b1lo; b1 < b1hi; ++b1) {
          const T* yb = Y + b0 * p.sy.s[0] + b1 * p.sy.s[1];
          const float* gb = p.g + b0 * p.sg.s[0] + b1 * p.sg.s[1] + xl * p.sg.s[2];
          const float* rb = p.r + b0 * p.sr.s[0] + b1 * p.sr.s[1] + xl * p.sr.s[2];
          for (int64_t y0 = 0; y0 < p.LY; y0 += kRedThreads) {
            const int64_t y = y0 + t;
            float c = 0.f;
            if (y < p.LY) {
              const float gd = gb[y * p.sg.s[3]];
              float s = 0.f;
              for (int ff = 0; ff < F; ++ff) {
                const float d = xs[ff] - static_cast<float>(yb[y * p.sy.s[2] + ff * p.sy.s[3]]);
                s = fmaf(ws[ff] * d, d, s);
              }
              const float spd = sqrtf(fmaxf(s, 0.f) + p.eps);
              c = s >= 0.f ? gd * rb[y * p.sr.s[3]] / spd : 0.f;
              if (fb == 0) {
                dr_acc = fmaf(gd, spd, dr_acc);
                if (p.drp) p.drp[b0 * p.sdp.s[0] + b1 * p.sdp.s[1] + xl * p.sdp.s[2] + y * p.sdp.s[3]] = gd * spd;
              }
            }
            __syncthreads();
            cs[t] = c;
            __syncthreads();
            if (fact) {
              const int64_t ny = p.LY - y0 < kRedThreads ? p.LY - y0 : kRedThreads;
              const float xf = xs[f];
              for (int yy = sl; yy < ny; yy += nsl) {
                const float cc = cs[yy];
                if (cc != 0.f) {
                  const float d = xf - static_cast<float>(yb[(y0 + yy) * p.sy.s[2] + f * p.sy.s[3]]);
                  a1 = fmaf(cc, d, a1);
                  a2 = fmaf(cc * d, d, a2);
                }
              }
            }
          }
        }
      __syncthreads();
      red[t] = a1;
      red[kRedThreads + t] = a2;
      __syncthreads();
      if (t < fstep && fb + t < F) {
        float s1 = 0.f, s2 = 0.f;
        for (int q = 0; q < nsl; ++q) {
          s1 += red[q * fstep + t];
          s2 += red[kRedThreads + q * fstep + t];
        }
        const int64_t o = xp * F + fb + t;
        s1 *= ws[fb + t];
        s2 *= 0.5f;
        p.out[o] = p.accumulate ? p.out[o] + s1 : s1;
        if (p.outw) p.outw[o] = p.accumulate ? p.outw[o] + s2 : s2;
      }
    }
    if (p.drx) {
      __syncthreads();
      red[t] = dr_acc;
      __syncthreads();
      for (int h = kRedThreads / 2; h > 0; h >>= 1) {
        if (t < h) red[t] += red[t + h];
        __syncthreads();
      }
      if (t == 0) p.drx[xp] = p.accumulate ? p.drx[xp] + red[0] : red[0];
    }
  }
}

// ---- attention forward -------------------------------------------------------------------

struct SegDesc {
  const void* k;
  const void* v;
  const float* r;
  const uint8_t* mask;
  S4 sk, sv, sr, sm;
  int64_t M;
  int64_t n0k, n1k, n0r, n1r;  // kv-batch extents and row extents per batch dim (one of each pair is 1)
  int64_t KB, rpk, rg;         // kv batches, rows per kv batch, row groups of G
  int64_t splits, kps;         // key splits and keys per split
  int64_t split_off, cta_off;
};

struct FwdParams {
  SegDesc seg[kMaxSeg];
  int nseg;
  const void* q;
  S4 sq;
  const float* w;
  int64_t NB1, LQ, DV, rows, S_total;
  int F, CT;
  float scale, eps;  // scale = beta * log2(e)
  float* part_acc;   // [S_total, rows, DV]
  float* part_m;     // [S_total, rows] (log2 units)
  float* part_l;
  void* out;  // [rows, DV] when direct (one split in all)
  float* lse;
  int direct;
};

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&o)[N]) {
  if constexpr (N == 1) {
    o[0] = static_cast<float>(p[0]);
  } else {
    const Vec<T, N> x = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
    for (int e = 0; e < N; ++e) o[e] = static_cast<float>(x.v[e]);
  }
}

// acc[g] += sum_j p[j][g] v[j] over the nk keys of a tile, for the first GG of G rows; U value
// vectors are loaded before their multiply-adds so that U loads are in flight per thread.
template <typename T, int G, int VEC, int GG, int U>
__device__ __forceinline__ void pv_tile(float (&acc)[G][VEC], const float* ps, const T* vp, int64_t sv, int nk) {
  int jj = 0;
  for (; jj + U <= nk; jj += U) {
    float vv[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) load_vec<T, VEC>(vp + (jj + u) * sv, vv[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float* pr = ps + (jj + u) * G;
#pragma unroll
      for (int g = 0; g < GG; ++g) {
        const float pg = pr[g];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][e] = fmaf(pg, vv[u][e], acc[g][e]);
      }
    }
  }
  for (; jj < nk; ++jj) {
    float vv[VEC];
    load_vec<T, VEC>(vp + jj * sv, vv);
    const float* pr = ps + jj * G;
#pragma unroll
    for (int g = 0; g < GG; ++g)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[g][e] = fmaf(pr[g], vv[e], acc[g][e]);
  }
}

template <typename T, int G, int VEC>
__global__ void __launch_bounds__(256) attn_fwd_kernel(const FwdParams p) {
  extern __shared__ __align__(16) float sm[];
  float* ps = sm;                // [kCH][G] probabilities, key-major (vector reads over g)
  float* xs = ps + kCH * G;      // [G][kCH] logits (log2 units)
  float* alpha_s = xs + G * kCH;  // [G]
  float* m_s = alpha_s + G;       // [G]
  float* l_s = m_s + G;           // [G]
  float* ws = l_s + G;            // [F]
  float* qs = ws + p.F;           // [G][F]
  __shared__ int64_t rowid[G], qoff[G], roff[G], moff[G];
  const int t = threadIdx.x, NT = blockDim.x, F = p.F;

  int s = 0;
  while (s + 1 < p.nseg && int64_t(blockIdx.x) >= p.seg[s + 1].cta_off) ++s;
  const SegDesc& sg = p.seg[s];
  int64_t local = int64_t(blockIdx.x) - sg.cta_off;
  const int64_t rgi = local % sg.rg;
  local /= sg.rg;
  const int64_t sp = local % sg.splits;
  local /= sg.splits;
  const int64_t kb = local % sg.KB, ct = local / sg.KB;
  const int64_t kb0 = kb / sg.n1k, kb1 = kb % sg.n1k;
  const int64_t r0 = rgi * G;
  const int gact = int(sg.rpk - r0 < G ? sg.rpk - r0 : G);

  if (t < G) {
    const int64_t rr = r0 + (t < gact ? t : 0);
    const int64_t i = rr % p.LQ, t2 = rr / p.LQ, ro1 = t2 % sg.n1r, ro0 = t2 / sg.n1r;
    const int64_t b0 = sg.n0k == 1 ? ro0 : kb0, b1 = sg.n1k == 1 ? ro1 : kb1;
    rowid[t] = (b0 * p.NB1 + b1) * p.LQ + i;
    qoff[t] = b0 * p.sq.s[0] + b1 * p.sq.s[1] + i * p.sq.s[2];
    roff[t] = b0 * sg.sr.s[0] + b1 * sg.sr.s[1] + i * sg.sr.s[2];
    moff[t] = b0 * sg.sm.s[0] + b1 * sg.sm.s[1] + i * sg.sm.s[2];
    m_s[t] = -INFINITY;
    l_s[t] = 0.f;
  }
  for (int f = t; f < F; f += NT) ws[f] = p.w[f];
  __syncthreads();
  const T* Q = static_cast<const T*>(p.q);
  for (int idx = t; idx < G * F; idx += NT) {
    const int g = idx / F, f = idx % F;
    qs[idx] = static_cast<float>(Q[qoff[g] + f * p.sq.s[3]]);
  }
  const T* K = static_cast<const T*>(sg.k) + kb0 * sg.sk.s[0] + kb1 * sg.sk.s[1];
  const T* V = static_cast<const T*>(sg.v) + kb0 * sg.sv.s[0] + kb1 * sg.sv.s[1];
  const int64_t c0 = (ct * NT + t) * VEC;
  const bool cvalid = c0 < p.DV;
  float acc[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[g][e] = 0.f;

  const int64_t kbeg = sp * sg.kps;
  const int64_t kend = kbeg + sg.kps < sg.M ? kbeg + sg.kps : sg.M;
  const int nwarps = NT / 32, warp = t / 32, lane = t % 32;
  for (int64_t kc = kbeg; kc < kend; kc += kCH) {
    const int nk = int(kend - kc < kCH ? kend - kc : kCH);
    __syncthreads();
    // logits of the tile, -inf where masked or past the end
    for (int idx = t; idx < G * kCH; idx += NT) {
      const int g = idx / kCH, jj = idx % kCH;
      float x = -INFINITY;
      if (g < gact && jj < nk) {
        const int64_t j = kc + jj;
        if (sg.mask == nullptr || sg.mask[moff[g] + j * sg.sm.s[3]]) {
          float sq = 0.f;
          const float* qg = qs + g * F;
          for (int f = 0; f < F; ++f) {
            const float d = static_cast<float>(K[j * sg.sk.s[2] + f * sg.sk.s[3]]) - qg[f];
            sq = fmaf(ws[f] * d, d, sq);
          }
          x = -p.scale * sg.r[roff[g] + j * sg.sr.s[3]] * sqrtf(fmaxf(sq, 0.f) + p.eps);
        }
      }
      xs[idx] = x;
    }
    __syncthreads();
    // online-softmax statistics, one warp per row
    for (int g = warp; g < G; g += nwarps) {
      float cm = -INFINITY;
      for (int jj = lane; jj < kCH; jj += 32) cm = fmaxf(cm, xs[g * kCH + jj]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
      const float mold = m_s[g];
      const float mnew = fmaxf(mold, cm);
      const bool none = mnew == -INFINITY;  // nothing kept so far: p = 0, alpha = 1
      float sum = 0.f;
      for (int jj = lane; jj < kCH; jj += 32) {
        const float pv = none ? 0.f : exp2f(xs[g * kCH + jj] - mnew);
        ps[jj * G + g] = pv;
        sum += pv;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (lane == 0) {
        const float alpha = none ? 1.f : exp2f(mold - mnew);
        alpha_s[g] = alpha;
        m_s[g] = mnew;
        l_s[g] = l_s[g] * alpha + sum;
      }
    }
    __syncthreads();
    if (cvalid) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float a = alpha_s[g];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][e] *= a;
      }
      const T* vp = V + kc * sg.sv.s[2] + c0 * sg.sv.s[3];
      // a CTA of one row (a per-row key set) skips the other G - 1 rows' multiply-adds
      if (gact == 1) pv_tile<T, G, VEC, 1, 8>(acc, ps, vp, sg.sv.s[2], nk);
      else pv_tile<T, G, VEC, G, 4>(acc, ps, vp, sg.sv.s[2], nk);
    }
  }
  __syncthreads();
  if (p.direct) {
    T* O = static_cast<T*>(p.out);
    if (cvalid) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (g < gact) {
          const float l = l_s[g];
          const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            if (c0 + e < p.DV) O[rowid[g] * p.DV + c0 + e] = static_cast<T>(acc[g][e] * inv);
        }
      }
    }
    if (ct == 0 && t < gact) {
      const float l = l_s[t];
      p.lse[rowid[t]] = l > 0.f ? (m_s[t] + log2f(l)) * kLn2 : -INFINITY;
    }
  } else {
    const int64_t slot = sg.split_off + sp;
    if (cvalid) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (g < gact) {
          float* pa = p.part_acc + (slot * p.rows + rowid[g]) * p.DV + c0;
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            if (c0 + e < p.DV) pa[e] = acc[g][e];
        }
      }
    }
    if (ct == 0 && t < gact) {
      p.part_m[slot * p.rows + rowid[t]] = m_s[t];
      p.part_l[slot * p.rows + rowid[t]] = l_s[t];
    }
  }
}

// Merges the splits of every row: out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s. One block
// per (row, kCombineCols columns), so that the partials are read by many SMs at once. The sum over
// splits is a chain of dependent loads unless many are in flight: kCombineGroups groups of threads
// take every kCombineGroups-th split, each with kCombineBatch loads issued before their
// multiply-adds (one load per iteration took 20 us of a 55 us decode call on the H100, latency-bound).
constexpr int kCombineCols = 64, kCombineGroups = 4, kCombineBatch = 8;

template <typename T>
__global__ void __launch_bounds__(kCombineCols * kCombineGroups)
attn_combine_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_m,
                    const float* __restrict__ part_l, T* __restrict__ out, float* __restrict__ lse, int64_t rows,
                    int64_t S, int64_t DV) {
  extern __shared__ float wsm[];  // [S] weights, then 1 / total
  __shared__ float red[kCombineGroups][kCombineCols];
  const int col = threadIdx.x % kCombineCols, grp = threadIdx.x / kCombineCols;
  const int64_t cc_n = (DV + kCombineCols - 1) / kCombineCols;
  for (int64_t bid = blockIdx.x; bid < rows * cc_n; bid += gridDim.x) {
    const int64_t row = bid / cc_n, cc = bid % cc_n;
    __syncthreads();  // the last iteration's readers of wsm and red are done
    if (threadIdx.x < 32) {
      float m = -INFINITY;
      for (int64_t s = threadIdx.x; s < S; s += 32) m = fmaxf(m, part_m[s * rows + row]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      float l = 0.f;
      for (int64_t s = threadIdx.x; s < S; s += 32) {
        const float ms = part_m[s * rows + row];
        const float a = m == -INFINITY || ms == -INFINITY ? 0.f : exp2f(ms - m);
        wsm[s] = a;
        l = fmaf(a, part_l[s * rows + row], l);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
      if (threadIdx.x == 0) {
        wsm[S] = l > 0.f ? 1.f / l : 0.f;
        if (cc == 0) lse[row] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
      }
    }
    __syncthreads();
    const int64_t c = cc * kCombineCols + col;
    float a = 0.f;
    if (c < DV) {
      const float* pa = part_acc + row * DV + c;
      const int64_t step = rows * DV;  // from one split's partial to the next
      int64_t s = grp;
      for (; s + (kCombineBatch - 1) * kCombineGroups < S; s += kCombineBatch * kCombineGroups) {
        float x[kCombineBatch];
#pragma unroll
        for (int i = 0; i < kCombineBatch; ++i) x[i] = pa[(s + i * kCombineGroups) * step];
#pragma unroll
        for (int i = 0; i < kCombineBatch; ++i) a = fmaf(wsm[s + i * kCombineGroups], x[i], a);
      }
      for (; s < S; s += kCombineGroups) a = fmaf(wsm[s], pa[s * step], a);
    }
    red[grp][col] = a;
    __syncthreads();
    if (grp == 0 && c < DV) {
      float t = 0.f;
#pragma unroll
      for (int g = 0; g < kCombineGroups; ++g) t += red[g][col];
      out[row * DV + c] = static_cast<T>(t * wsm[S]);
    }
  }
}

// ---- attention backward: P and dcost per (kv batch, row, key) ----------------------------

struct PairParams {
  const void* q;
  S4 sq;
  const void* k;
  S4 sk;
  const float* r;
  S4 sr;
  const uint8_t* mask;
  S4 sm;
  const float* w;
  const float* lse;    // [rows]
  const float* delta;  // [rows]
  float* dp;           // in: dO V^T [KB, RPK, M]; out: dcost
  float* P;            // out: P [KB, RPK, M]
  int64_t NB1, LQ, M, n1k, n0r, n1r, n0k, KB, rpk;
  int F;
  float beta, eps;
};

template <typename T>
__global__ void attn_pair_kernel(const PairParams p) {
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const int64_t total = p.KB * p.rpk * p.M;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % p.M, rest = idx / p.M, rr = rest % p.rpk, kb = rest / p.rpk;
    const int64_t kb0 = kb / p.n1k, kb1 = kb % p.n1k;
    const int64_t i = rr % p.LQ, t2 = rr / p.LQ, ro1 = t2 % p.n1r, ro0 = t2 / p.n1r;
    const int64_t b0 = p.n0k == 1 ? ro0 : kb0, b1 = p.n1k == 1 ? ro1 : kb1;
    const int64_t row = (b0 * p.NB1 + b1) * p.LQ + i;
    const float lse = p.lse[row];
    float pr = 0.f;
    if (lse != -INFINITY &&
        (p.mask == nullptr || p.mask[b0 * p.sm.s[0] + b1 * p.sm.s[1] + i * p.sm.s[2] + j * p.sm.s[3]])) {
      const T* qr = Q + b0 * p.sq.s[0] + b1 * p.sq.s[1] + i * p.sq.s[2];
      const T* kr = K + b0 * p.sk.s[0] + b1 * p.sk.s[1] + j * p.sk.s[2];
      float s = 0.f;
      for (int f = 0; f < p.F; ++f) {
        const float d = static_cast<float>(kr[f * p.sk.s[3]]) - static_cast<float>(qr[f * p.sq.s[3]]);
        s = fmaf(p.w[f] * d, d, s);
      }
      const float rv = p.r[b0 * p.sr.s[0] + b1 * p.sr.s[1] + i * p.sr.s[2] + j * p.sr.s[3]];
      pr = expf(-p.beta * rv * sqrtf(fmaxf(s, 0.f) + p.eps) - lse);
    }
    p.P[idx] = pr;
    p.dp[idx] = -p.beta * pr * (p.dp[idx] - p.delta[row]);
  }
}

// ---- host side ---------------------------------------------------------------------------

int num_sms() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

void check_4d(const char* op, const char* name, const at::Tensor& t, int64_t last, const char* what) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [NB0, NB1, L, ", what, "], got shape ", fmt(t.sizes()));
  if (last >= 0)
    TORCH_CHECK(t.size(3) == last, op, ": ", name, " must have last dim ", fmt(last), ", got shape ", fmt(t.sizes()));
}

void check_dev(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of q");
}

// extent of a batch dim: 1 or the batch size
int64_t join(const char* op, const char* name, int64_t cur, int64_t s) {
  TORCH_CHECK(s == 1 || cur == 1 || s == cur, op, ": batch dims of ", name, " do not broadcast (", fmt(s), " vs ",
              fmt(cur), ")");
  return s == 1 ? cur : s;
}

void check_bcast(const char* op, const char* name, const at::Tensor& t, const std::vector<int64_t>& full) {
  check_4d(op, name, t, -1, "M");
  for (int d = 0; d < 4; ++d)
    TORCH_CHECK(t.size(d) == 1 || t.size(d) == full[d], op, ": ", name, " of shape ", fmt(t.sizes()),
                " must broadcast to ", fmt(full));
}

// the cost: q [NB0, NB1, LQ, F], k [.., M, F], w [F] float32, r float32 broadcasting to the cost
struct CostShape {
  int64_t NB0, NB1, LQ, M, F;
};

CostShape check_cost(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                     const at::Tensor& r) {
  check_4d(op, "q", q, -1, "F");
  const int64_t F = q.size(3);
  check_4d(op, "k", k, F, "F");
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  check_dev(op, "k", k, q);
  check_dev(op, "w", w, q);
  check_dev(op, "r", r, q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == F && w.scalar_type() == at::kFloat && w.is_contiguous(), op,
              ": w must be a contiguous float32 [", fmt(F), "], got shape ", fmt(w.sizes()));
  TORCH_CHECK(r.scalar_type() == at::kFloat, op, ": r must be float32");
  CostShape s{join(op, "k", q.size(0), k.size(0)), join(op, "k", q.size(1), k.size(1)), q.size(2), k.size(2), F};
  check_bcast(op, "r", r, {s.NB0, s.NB1, s.LQ, s.M});
  return s;
}

int64_t grid_x(int64_t work, int64_t per_sm = 16) {
  return std::max<int64_t>(1, std::min<int64_t>(work, int64_t(num_sms()) * per_sm));
}

at::Tensor retrieval_cost_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& r,
                               double eps) {
  const char* op = "retrieval_cost_cuda";
  const CostShape s = check_cost(op, q, k, w, r);
  at::Tensor out = at::empty({s.NB0, s.NB1, s.LQ, s.M}, q.options().dtype(at::kFloat));
  const int64_t rows = s.NB0 * s.NB1 * s.LQ;
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kernel_dtype(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const int threads = 256;
    const int64_t gy = std::min<int64_t>((s.M + threads - 1) / threads, 64);
    const int64_t gx = std::min<int64_t>(rows, std::max<int64_t>(1, int64_t(num_sms()) * 64 / gy));
    cost_fwd_kernel<T><<<dim3(unsigned(gx), unsigned(gy)), threads, 2 * s.F * sizeof(float), stream>>>(
        q.const_data_ptr<T>(), bstrides(q), k.const_data_ptr<T>(), bstrides(k), w.const_data_ptr<float>(),
        r.const_data_ptr<float>(), bstrides(r), out.mutable_data_ptr<float>(), rows, s.NB1, s.LQ, s.M, int(s.F),
        float(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// R modes as in kernels/retrieval.py: per batch, per query, per key, per pair
int r_mode(const at::Tensor& r) { return int(r.size(2) != 1) + 2 * int(r.size(3) != 1); }

// Shapes of the gradients (geokern/ops/retrieval.py computes the same for the fake and CPU ops):
// dq at the full batch [NB0, NB1, LQ, F]; dk at [n0, n1, M, F] with n = max(k's, r's if R is per
// key); dR per batch / query at [NB0, NB1, LQ, 1], per key at [n0, n1, 1, M], per pair full.
std::vector<int64_t> dk_extent(const at::Tensor& k, const at::Tensor& r) {
  const bool key = r_mode(r) == 2;
  return {std::max(k.size(0), key ? r.size(0) : 1), std::max(k.size(1), key ? r.size(1) : 1)};
}

std::vector<int64_t> dr_shape(const at::Tensor& k, const at::Tensor& r, int64_t NB0, int64_t NB1, int64_t LQ,
                              int64_t M) {
  switch (r_mode(r)) {
    case 0:
    case 1: return {NB0, NB1, LQ, 1};
    case 2: {
      const auto e = dk_extent(k, r);
      return {e[0], e[1], 1, M};
    }
    default: return {NB0, NB1, LQ, M};
  }
}

template <typename T>
void launch_reduce(const XY& p, cudaStream_t stream) {
  const int64_t npts = p.nx0 * p.nx1 * p.LX;
  if (npts == 0) return;
  const size_t smem = (2 * p.F + 3 * kRedThreads) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "retrieval: coordinate dim ", fmt(p.F), " too large for the CUDA backward");
  cost_reduce_kernel<T><<<unsigned(grid_x(npts, 16)), kRedThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dq, dk, dr, dw of the cost from dcost g (strides sg over [b0, b1, LQ, M], float32). The query
// side (dq, dwp and drq: dR per batch / query / pair) is written; the key side (dk and drk: dR per
// key) is added to when acc_k (the backward runs over chunks of queries). mode is R's mode
// (r_mode of the whole R: a chunk of one query would look like R per key).
template <typename T>
void cost_backward_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& r,
                        const float* g, S4 sg, const CostShape& s, float eps, at::Tensor& dq, at::Tensor& dk,
                        at::Tensor& drq, at::Tensor& drk, at::Tensor& dwp, bool acc_k, cudaStream_t stream,
                        int mode) {
  const S4 sq = bstrides(q), sk = bstrides(k), sr = bstrides(r);
  XY a{};
  a.x = q.const_data_ptr<T>();
  a.sx = sq;
  a.y = k.const_data_ptr<T>();
  a.sy = sk;
  a.w = w.const_data_ptr<float>();
  a.g = g;
  a.sg = sg;
  a.r = r.const_data_ptr<float>();
  a.sr = sr;
  a.NB0 = s.NB0;
  a.NB1 = s.NB1;
  a.LX = s.LQ;
  a.LY = s.M;
  a.nx0 = s.NB0;
  a.nx1 = s.NB1;
  a.F = int(s.F);
  a.eps = eps;
  a.out = dq.mutable_data_ptr<float>();
  a.outw = dwp.mutable_data_ptr<float>();
  a.drx = mode < 2 ? drq.mutable_data_ptr<float>() : nullptr;
  if (mode == 3) {
    a.drp = drq.mutable_data_ptr<float>();
    a.sdp = bstrides(drq);
  }
  a.accumulate = 0;
  launch_reduce<T>(a, stream);
  // keys: the roles swap (x = key, y = query), the pair arrays are read transposed
  XY b = a;
  b.x = a.y;
  b.sx = sk;
  b.y = a.x;
  b.sy = sq;
  b.sg = S4{{sg.s[0], sg.s[1], sg.s[3], sg.s[2]}};
  b.sr = S4{{sr.s[0], sr.s[1], sr.s[3], sr.s[2]}};
  b.LX = s.M;
  b.LY = s.LQ;
  b.nx0 = dk.size(0);
  b.nx1 = dk.size(1);
  b.out = dk.mutable_data_ptr<float>();
  b.outw = nullptr;
  b.drx = mode == 2 ? drk.mutable_data_ptr<float>() : nullptr;
  b.drp = nullptr;
  b.accumulate = acc_k;
  launch_reduce<T>(b, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> retrieval_cost_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, const at::Tensor& r,
    double eps) {
  const char* op = "retrieval_cost_backward_cuda";
  const CostShape s = check_cost(op, q, k, w, r);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == s.NB0 && grad.size(1) == s.NB1 && grad.size(2) == s.LQ &&
                  grad.size(3) == s.M && grad.scalar_type() == at::kFloat,
              op, ": grad must be float32 of shape ", fmt(std::vector<int64_t>{s.NB0, s.NB1, s.LQ, s.M}), ", got ",
              fmt(grad.sizes()));
  check_dev(op, "grad", grad, q);
  const auto fopt = q.options().dtype(at::kFloat);
  const auto dke = dk_extent(k, r);
  at::Tensor dq = at::zeros({s.NB0, s.NB1, s.LQ, s.F}, fopt);
  at::Tensor dk = at::zeros({dke[0], dke[1], s.M, s.F}, fopt);
  at::Tensor dr = at::zeros(dr_shape(k, r, s.NB0, s.NB1, s.LQ, s.M), fopt);
  at::Tensor dwp = at::zeros({s.NB0 * s.NB1 * s.LQ, s.F}, fopt);
  if (grad.numel() > 0) {
    const c10::cuda::CUDAGuard guard(q.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    dispatch_kernel_dtype(q.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      cost_backward_into<T>(q, k, w, r, grad.const_data_ptr<float>(), bstrides(grad), s, float(eps), dq, dk, dr, dr,
                            dwp, false, stream, r_mode(r));
    });
  }
  return {dq, dk, dr, dwp.sum(0)};
}

// ---- attention: host ---------------------------------------------------------------------

struct AttnShape {
  int64_t NB0, NB1, LQ, F, DV;
};

AttnShape check_attn(const char* op, const at::Tensor& q, at::TensorList ks, at::TensorList vs, const at::Tensor& w,
                     at::TensorList rs, const c10::List<std::optional<at::Tensor>>& masks) {
  check_4d(op, "q", q, -1, "F");
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  const int64_t F = q.size(3);
  const size_t n = ks.size();
  TORCH_CHECK(n >= 1 && n <= size_t(kMaxSeg), op, ": between 1 and ", fmt(kMaxSeg), " key segments, got ", fmt(n));
  TORCH_CHECK(vs.size() == n && rs.size() == n && masks.size() == n, op,
              ": k, v, r and mask must list one entry per segment");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == F && w.scalar_type() == at::kFloat && w.is_contiguous(), op,
              ": w must be a contiguous float32 [", fmt(F), "]");
  check_dev(op, "w", w, q);
  int64_t NB0 = q.size(0), NB1 = q.size(1);
  const int64_t DV = vs[0].dim() == 4 ? vs[0].size(3) : -1;
  for (size_t s = 0; s < n; ++s) {
    check_4d(op, "k", ks[s], F, "F");
    check_4d(op, "v", vs[s], DV, "DV");
    TORCH_CHECK(vs[s].size(2) == ks[s].size(2), op, ": v must have as many rows as k in every segment");
    TORCH_CHECK(ks[s].scalar_type() == q.scalar_type() && vs[s].scalar_type() == q.scalar_type(), op,
                ": q, k and v must share one dtype");
    check_dev(op, "k", ks[s], q);
    check_dev(op, "v", vs[s], q);
    check_dev(op, "r", rs[s], q);
    TORCH_CHECK(rs[s].scalar_type() == at::kFloat, op, ": r must be float32");
    NB0 = join(op, "k", NB0, ks[s].size(0));
    NB1 = join(op, "k", NB1, ks[s].size(1));
    NB0 = join(op, "v", NB0, vs[s].size(0));
    NB1 = join(op, "v", NB1, vs[s].size(1));
  }
  TORCH_CHECK(q.size(0) == 1 || q.size(0) == NB0, op, ": batch dims of q do not broadcast");
  TORCH_CHECK(q.size(1) == 1 || q.size(1) == NB1, op, ": batch dims of q do not broadcast");
  for (size_t s = 0; s < n; ++s) {
    const std::vector<int64_t> full{NB0, NB1, q.size(2), ks[s].size(2)};
    check_bcast(op, "r", rs[s], full);
    const std::optional<at::Tensor> m = masks[s];
    if (m.has_value()) {
      TORCH_CHECK(m->scalar_type() == at::kBool, op, ": mask must be bool");
      check_dev(op, "mask", *m, q);
      check_bcast(op, "mask", *m, full);
    }
  }
  return {NB0, NB1, q.size(2), F, DV};
}

// kv grouping of a segment: the batch dims where neither k nor v varies are shared
void group(SegDesc& d, const at::Tensor& k, const at::Tensor& v, int64_t NB0, int64_t NB1, int64_t LQ) {
  d.n0k = std::max(k.size(0), v.size(0));
  d.n1k = std::max(k.size(1), v.size(1));
  d.n0r = d.n0k == 1 ? NB0 : 1;
  d.n1r = d.n1k == 1 ? NB1 : 1;
  d.KB = d.n0k * d.n1k;
  d.rpk = d.n0r * d.n1r * LQ;
}

int64_t env_int(const char* name, int64_t dflt) {
  const char* e = std::getenv(name);
  return e && *e ? std::atoll(e) : dflt;
}

std::tuple<at::Tensor, at::Tensor> retrieval_attention_cuda(const at::Tensor& q, at::TensorList ks,
                                                            at::TensorList vs, const at::Tensor& w,
                                                            at::TensorList rs,
                                                            const c10::List<std::optional<at::Tensor>>& masks,
                                                            double beta, double eps) {
  const char* op = "retrieval_attention_cuda";
  const AttnShape a = check_attn(op, q, ks, vs, w, rs, masks);
  const int64_t rows = a.NB0 * a.NB1 * a.LQ;
  at::Tensor out = at::empty({a.NB0, a.NB1, a.LQ, a.DV}, vs[0].options());
  at::Tensor lse = at::empty({a.NB0, a.NB1, a.LQ}, q.options().dtype(at::kFloat));
  if (rows == 0) return {out, lse};
  const int nseg = int(ks.size());
  int64_t Mtot = 0;
  for (int s = 0; s < nseg; ++s) Mtot += ks[s].size(2);
  if (Mtot == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  const c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();

  FwdParams p{};
  p.nseg = 0;
  p.q = q.const_data_ptr();
  p.sq = bstrides(q);
  p.w = w.const_data_ptr<float>();
  p.NB1 = a.NB1;
  p.LQ = a.LQ;
  p.DV = a.DV;
  p.rows = rows;
  p.F = int(a.F);
  p.scale = float(beta) * kLog2e;
  p.eps = float(eps);

  const size_t esz = q.element_size();
  int vec = a.DV % 4 == 0 ? 4 : 1;
  int64_t G = 1;
  std::vector<SegDesc> segs;
  std::vector<at::Tensor> keep;  // contiguous copies where a kernel needs them
  for (int s = 0; s < nseg; ++s) {
    if (ks[s].size(2) == 0) continue;
    SegDesc d{};
    at::Tensor v = vs[s];
    if (v.stride(3) != 1 && v.size(3) > 1) {
      v = v.contiguous();
      keep.push_back(v);
    }
    d.k = ks[s].const_data_ptr();
    d.v = v.const_data_ptr();
    d.r = rs[s].const_data_ptr<float>();
    const std::optional<at::Tensor> m = masks[s];
    d.mask = m.has_value() ? reinterpret_cast<const uint8_t*>(m->const_data_ptr()) : nullptr;
    d.sk = bstrides(ks[s]);
    d.sv = bstrides(v);
    d.sr = bstrides(rs[s]);
    if (m.has_value()) d.sm = bstrides(*m);
    d.M = ks[s].size(2);
    group(d, ks[s], v, a.NB0, a.NB1, a.LQ);
    if (d.rpk > 1) G = 16;
    if (!aligned16(d.v) || (d.sv.s[2] % 4) != 0 || (d.sv.s[0] % 4) != 0 || (d.sv.s[1] % 4) != 0) vec = 1;
    segs.push_back(d);
  }
  (void)esz;
  // threads own VEC consecutive columns; a CTA covers NT * VEC columns
  const int64_t vcols = (a.DV + vec - 1) / vec;
  const int NT = int(std::min<int64_t>(256, std::max<int64_t>(32, (vcols + 31) / 32 * 32)));
  p.CT = int(std::max<int64_t>(1, (vcols + NT - 1) / NT));
  const int64_t sms = num_sms();
  const int64_t target = env_int("GEOKERN_RETRIEVAL_CTAS", 2 * sms);
  // bank-like segments (many rows per kv batch, long CTAs) go first in the grid
  std::stable_sort(segs.begin(), segs.end(), [](const SegDesc& x, const SegDesc& y) { return x.rpk > y.rpk; });
  int64_t S_total = 0, ctas = 0;
  for (SegDesc& d : segs) {
    d.rg = (d.rpk + G - 1) / G;
    const int64_t base = d.rg * d.KB * p.CT;
    const int64_t max_splits = (d.M + kCH - 1) / kCH;
    int64_t want = std::max<int64_t>(1, std::min<int64_t>(max_splits, (target + base - 1) / base));
    // a kv batch of many rows (a shared bank): each split writes rows x DV floats of partials
    if (d.rpk > 1) want = std::min(want, std::max<int64_t>(1, env_int("GEOKERN_RETRIEVAL_BANK_SPLITS", max_splits)));
    // keep the split workspace (rows x DV floats per split) bounded
    const int64_t cap = std::max<int64_t>(1, (int64_t(256) << 20) / std::max<int64_t>(1, rows * a.DV * 4));
    want = std::min(want, cap);
    d.kps = (d.M + want - 1) / want;
    d.splits = (d.M + d.kps - 1) / d.kps;
    d.split_off = S_total;
    d.cta_off = ctas;
    S_total += d.splits;
    ctas += base * d.splits;
    p.seg[p.nseg++] = d;
  }
  p.S_total = S_total;
  p.direct = S_total == 1;
  at::Tensor part;
  if (!p.direct) {
    part = at::empty({S_total * rows * (a.DV + 2)}, q.options().dtype(at::kFloat));
    p.part_acc = part.mutable_data_ptr<float>();
    p.part_m = p.part_acc + S_total * rows * a.DV;
    p.part_l = p.part_m + S_total * rows;
  }
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  const size_t smem = (2 * kCH * G + 3 * G + a.F + G * a.F) * sizeof(float);
  TORCH_CHECK(smem <= 200 * 1024, op, ": coordinate dim ", fmt(a.F), " too large for the CUDA kernel");
  TORCH_CHECK(ctas < (int64_t(1) << 31), op, ": too many blocks");
  dispatch_kernel_dtype(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    auto go = [&](auto kern) {
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kern<<<unsigned(ctas), NT, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (G == 16) {
      if (vec == 4) go(attn_fwd_kernel<T, 16, 4>);
      else go(attn_fwd_kernel<T, 16, 1>);
    } else {
      if (vec == 4) go(attn_fwd_kernel<T, 1, 4>);
      else go(attn_fwd_kernel<T, 1, 1>);
    }
    if (!p.direct) {
      const size_t csm = (S_total + 1 + 4) * sizeof(float);  // + one 16-byte vector of slack
      TORCH_CHECK(csm + sizeof(float) * kCombineGroups * kCombineCols <= 48 * 1024, op, ": too many key splits");
      const int64_t blocks = rows * ((a.DV + kCombineCols - 1) / kCombineCols);
      attn_combine_kernel<T><<<unsigned(grid_x(blocks, 64)), kCombineCols * kCombineGroups, csm, stream>>>(
          p.part_acc, p.part_m, p.part_l, out.mutable_data_ptr<T>(), p.lse, rows, S_total, a.DV);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, lse};
}

// [NB0, NB1, L, C] (4-D, size-1 dims broadcast) as [KB, RPK, C] float32 in the segment's grouping
at::Tensor grouped_rows(const at::Tensor& t, const SegDesc& d, int64_t NB0, int64_t NB1) {
  at::Tensor e = t.to(at::kFloat).expand({NB0, NB1, t.size(2), t.size(3)});
  // [n0k, n0r, n1k, n1r, L, C] -> [n0k, n1k, n0r, n1r, L, C]
  e = e.reshape({d.n0k, d.n0r, d.n1k, d.n1r, t.size(2), t.size(3)}).permute({0, 2, 1, 3, 4, 5});
  return e.reshape({d.KB, d.rpk, t.size(3)});
}

// One segment's backward for the queries [i0, i0 + n) (every tensor narrowed to them along dim 2):
// dq, dR per batch / query / pair and dw are added to the full outputs there; dk, dv and dR per
// key are accumulated over the chunks.
void segment_backward_chunk(const char* op, const AttnShape& a, int64_t i0, int64_t n, const at::Tensor& dout,
                            const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                            const at::Tensor& r, const std::optional<at::Tensor>& m, const at::Tensor& lse,
                            const at::Tensor& delta, double beta, double eps, at::Tensor& dq, at::Tensor& dk,
                            at::Tensor& dv, at::Tensor& dr, at::Tensor& dw, cudaStream_t stream) {
  const int64_t M = k.size(2);
  const int mode = r_mode(r);
  auto rows_of = [&](const at::Tensor& t) { return t.size(2) == 1 ? t : t.narrow(2, i0, n); };
  const at::Tensor qc = q.narrow(2, i0, n), rc = rows_of(r);
  const std::optional<at::Tensor> mc = m.has_value() ? std::optional<at::Tensor>(rows_of(*m)) : std::nullopt;
  const at::Tensor lse_c = lse.narrow(2, i0, n).contiguous(), delta_c = delta.narrow(2, i0, n).contiguous();
  SegDesc d{};
  group(d, k, v, a.NB0, a.NB1, n);
  const at::Tensor dog = grouped_rows(dout.narrow(2, i0, n), d, a.NB0, a.NB1);  // [KB, RPK, DV]
  const at::Tensor vg = v.to(at::kFloat).expand({d.n0k, d.n1k, M, a.DV}).reshape({d.KB, M, a.DV});
  at::Tensor dp = at::bmm(dog, vg.transpose(1, 2)).contiguous();  // [KB, RPK, M]
  at::Tensor P = at::empty_like(dp);
  PairParams pp{};
  pp.q = qc.const_data_ptr();
  pp.sq = bstrides(qc);
  pp.k = k.const_data_ptr();
  pp.sk = bstrides(k);
  pp.r = rc.const_data_ptr<float>();
  pp.sr = bstrides(rc);
  pp.mask = mc.has_value() ? reinterpret_cast<const uint8_t*>(mc->const_data_ptr()) : nullptr;
  if (mc.has_value()) pp.sm = bstrides(*mc);
  pp.w = w.const_data_ptr<float>();
  pp.lse = lse_c.const_data_ptr<float>();
  pp.delta = delta_c.const_data_ptr<float>();
  pp.dp = dp.mutable_data_ptr<float>();
  pp.P = P.mutable_data_ptr<float>();
  pp.NB1 = a.NB1;
  pp.LQ = n;
  pp.M = M;
  pp.n1k = d.n1k;
  pp.n0r = d.n0r;
  pp.n1r = d.n1r;
  pp.n0k = d.n0k;
  pp.KB = d.KB;
  pp.rpk = d.rpk;
  pp.F = int(a.F);
  pp.beta = float(beta);
  pp.eps = float(eps);
  // dcost in the grouped layout, as strides over [b0, b1, n, M]
  S4 sg;
  sg.s[0] = a.NB0 == 1 ? 0 : (d.n0k == 1 ? d.n1r * n * M : d.n1k * d.rpk * M);
  sg.s[1] = a.NB1 == 1 ? 0 : (d.n1k == 1 ? n * M : d.rpk * M);
  sg.s[2] = M;
  sg.s[3] = 1;
  const auto fopt = q.options().dtype(at::kFloat);
  at::Tensor dq_c = at::empty({a.NB0, a.NB1, n, a.F}, fopt);
  at::Tensor dwp = at::empty({a.NB0 * a.NB1 * n, a.F}, fopt);
  at::Tensor drq = mode == 2 ? dr : at::empty({a.NB0, a.NB1, n, mode == 3 ? M : 1}, fopt);
  dispatch_kernel_dtype(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    attn_pair_kernel<T><<<unsigned(grid_x((dp.numel() + 255) / 256, 32)), 256, 0, stream>>>(pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cost_backward_into<T>(qc, k, w, rc, dp.const_data_ptr<float>(), sg, CostShape{a.NB0, a.NB1, n, M, a.F},
                          float(eps), dq_c, dk, drq, dr, dwp, i0 > 0, stream, mode);
  });
  dv.add_(at::bmm(P.transpose(1, 2), dog).reshape({d.n0k, d.n1k, M, a.DV}));
  dq.narrow(2, i0, n).add_(dq_c);
  dw.add_(dwp.sum(0));
  if (mode != 2) dr.narrow(2, i0, n).copy_(drq);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
retrieval_attention_backward_cuda(const at::Tensor& dout, const at::Tensor& q, at::TensorList ks, at::TensorList vs,
                                  const at::Tensor& w, at::TensorList rs,
                                  const c10::List<std::optional<at::Tensor>>& masks, const at::Tensor& out,
                                  const at::Tensor& lse, const std::optional<at::Tensor>& dlse, double beta,
                                  double eps) {
  const char* op = "retrieval_attention_backward_cuda";
  const AttnShape a = check_attn(op, q, ks, vs, w, rs, masks);
  const std::vector<int64_t> oshape{a.NB0, a.NB1, a.LQ, a.DV};
  TORCH_CHECK(dout.sizes() == at::IntArrayRef(oshape) && out.sizes() == at::IntArrayRef(oshape), op,
              ": dout and out must have shape ", fmt(oshape));
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == a.NB0 && lse.size(1) == a.NB1 && lse.size(2) == a.LQ &&
                  lse.scalar_type() == at::kFloat,
              op, ": lse must be float32 [NB0, NB1, LQ]");
  const auto fopt = q.options().dtype(at::kFloat);
  at::Tensor dq = at::zeros({a.NB0, a.NB1, a.LQ, a.F}, fopt);
  at::Tensor dw = at::zeros({a.F}, fopt);
  std::vector<at::Tensor> dks, dvs, drs;
  const c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor delta = dout.to(at::kFloat).mul(out.to(at::kFloat)).sum(-1);
  if (dlse.has_value()) delta = delta.sub(dlse->to(at::kFloat).expand({a.NB0, a.NB1, a.LQ}));
  // dP and P are [rows, M] float32 per chunk of queries: at most about this many elements each
  const int64_t chunk_elems = env_int("GEOKERN_RETRIEVAL_BWD_CHUNK", int64_t(1) << 26);
  for (size_t s = 0; s < ks.size(); ++s) {
    const at::Tensor &k = ks[s], &v = vs[s], &r = rs[s];
    const int64_t M = k.size(2);
    const auto dke = dk_extent(k, r);
    at::Tensor dk = at::zeros({dke[0], dke[1], M, a.F}, fopt);
    at::Tensor dr = at::zeros(dr_shape(k, r, a.NB0, a.NB1, a.LQ, M), fopt);
    at::Tensor dv = at::zeros({std::max(k.size(0), v.size(0)), std::max(k.size(1), v.size(1)), M, a.DV}, fopt);
    if (a.LQ > 0 && M > 0) {
      const int64_t step = std::max<int64_t>(1, std::min<int64_t>(a.LQ, chunk_elems / std::max<int64_t>(1, a.NB0 * a.NB1 * M)));
      for (int64_t i0 = 0; i0 < a.LQ; i0 += step)
        segment_backward_chunk(op, a, i0, std::min(step, a.LQ - i0), dout, q, k, v, w, r, masks[s], lse, delta, beta,
                               eps, dq, dk, dv, dr, dw, stream);
    }
    dks.push_back(dk);
    dvs.push_back(dv);
    drs.push_back(dr);
  }
  return {dq, dks, dvs, drs, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(geokern, CUDA, m) {
  m.impl("retrieval_cost_cuda", &retrieval_cost_cuda);
  m.impl("retrieval_cost_backward_cuda", &retrieval_cost_backward_cuda);
  m.impl("retrieval_attention_cuda", &retrieval_attention_cuda);
  m.impl("retrieval_attention_backward_cuda", &retrieval_attention_backward_cuda);
}

}  // namespace geokern
