// Retrieval attention forward (included by retrieval.cu only: the family is one translation unit).
//
// Decode-oriented flash-decoding: the rows that share one set of keys and values (a shared bank:
// every row of the batch) form a "kv batch"; a CTA takes G of those rows and one split of the keys,
// so each tile of V is loaded once for G rows. Logits of a key tile go to shared memory, the
// online-softmax statistics are kept per row (in log2 units), and each thread owns VEC consecutive
// columns of V and accumulates P V for its G rows in float32. Several key sets (segments: the row's
// keys and a shared bank) run in the same launch; with more than one split in total, the partial
// (max, sum, acc) of every split are merged by retrieval_attention_combine_kernel.
#pragma once

#include "common.cuh"

namespace geokern {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxSeg = 4;  // key segments one launch takes
constexpr int kCH = 64;     // keys per tile

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

struct SegDesc {
  const void* k;
  const void* v;
  const float* r;
  const uint8_t* mask;
  Strides4 sk, sv, sr, sm;
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
  Strides4 sq;
  const float* w;
  int64_t NB1, LQ, DV, rows, S_total;
  int F, CT;
  float scale, eps;  // scale = beta * log2(e); the running max m is in -cost units (m * scale: log2 units)
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
// A masked key's logit is a NaN of its own bit pattern (fmaxf skips it; a NaN computed from a NaN
// input is the canonical 0x7fffffff) and its weight -0.f: a masked key contributes nothing whatever
// its value, so its multiply-add is skipped, not done with a weight of 0 (0 * NaN = NaN). One
// compare per weight and row, not per value element.
constexpr int kMaskedBits = 0x7fc0dead;
__device__ __forceinline__ bool masked_logit(float x) { return __float_as_int(x) == kMaskedBits; }
__device__ __forceinline__ bool masked_weight(float p) { return p == 0.f && signbit(p); }

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
        if (!masked_weight(pg)) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[g][e] = fmaf(pg, vv[u][e], acc[g][e]);
        }
      }
    }
  }
  for (; jj < nk; ++jj) {
    float vv[VEC];
    load_vec<T, VEC>(vp + jj * sv, vv);
    const float* pr = ps + jj * G;
#pragma unroll
    for (int g = 0; g < GG; ++g)
      if (!masked_weight(pr[g])) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][e] = fmaf(pr[g], vv[e], acc[g][e]);
      }
  }
}

// q: [NB0, NB1, LQ, F]; per segment k: [n0k, n1k, M, F], v: [n0k, n1k, M, DV], r / mask broadcasting
// to [NB0, NB1, LQ, M]. One CTA: one segment, one kv batch, one split of its keys, G of its rows and
// NT * VEC columns of V; it writes out [rows, DV] and lse [rows] (direct), else its split's partials
// part_acc [S_total, rows, DV] and part_m / part_l [S_total, rows].
template <typename T, int G, int VEC>
__global__ void __launch_bounds__(256) retrieval_attention_fwd_kernel(const FwdParams p) {
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
    // logits of the tile, -inf past the end, the masked-key NaN (kMaskedBits) where masked
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
          // max(sq, 0) that keeps a NaN (fmaxf drops it): NaN in, NaN out
          // in cost units (x = -cost): beta log2(e) multiplies only differences from the row's best,
          // so beta * cost past float32 still gives the softmax's limit (the nearest keys share it)
          x = -sg.r[roff[g] + j * sg.sr.s[3]] * sqrtf((sq < 0.f ? 0.f : sq) + p.eps);
        } else if (jj < nk) {
          x = __int_as_float(kMaskedBits);  // a masked key: weight -0.f, which pv_tile skips (its value may be NaN)
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
        const float xv = xs[g * kCH + jj];
        // exp2f never returns -0.f: it marks a masked key, which pv_tile skips rather than multiply
        // its value by 0 (0 * NaN is NaN)
        // a NaN logit stays NaN even in a row with nothing finite yet (fmaxf dropped it from mnew);
        // -inf (padding, overflow) is 0 without reading -inf * scale, which is NaN at beta = 0
        const float pv = masked_logit(xv) ? -0.f
                         : none           ? ((xv != xv) ? xv : 0.f)
                         : (xv == -INFINITY ? 0.f : exp2f((xv - mnew) * p.scale));
        ps[jj * G + g] = pv;
        sum += pv;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (lane == 0) {
        const float alpha = none ? 1.f : (mold == -INFINITY ? 0.f : exp2f((mold - mnew) * p.scale));
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
          const float inv = l == 0.f ? 0.f : 1.f / l;  // (l NaN: NaN in, NaN out)
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            if (c0 + e < p.DV) O[rowid[g] * p.DV + c0 + e] = static_cast<T>(acc[g][e] * inv);
        }
      }
    }
    if (ct == 0 && t < gact) {
      const float l = l_s[t];
      // -inf where beta * cost_min passes float32: the true lse, rounded
      p.lse[rowid[t]] = l == 0.f ? -INFINITY : (m_s[t] * p.scale + log2f(l)) * kLn2;
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
// splits is a chain of dependent loads unless many are in flight (one load per iteration is
// latency-bound): kCombineGroups groups of threads take every kCombineGroups-th split, each with
// kCombineBatch loads issued before their multiply-adds.
constexpr int kCombineCols = 64, kCombineGroups = 4, kCombineBatch = 8;

// part_acc: [S, rows, DV], part_m / part_l: [S, rows] (log2 units) -> out: [rows, DV], lse: [rows]
// (natural log). A CTA of kCombineGroups x kCombineCols threads takes (row, column tile) blocks
// blockIdx.x + i * gridDim.x.
template <typename T>
__global__ void __launch_bounds__(kCombineCols * kCombineGroups)
retrieval_attention_combine_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_m,
                                   const float* __restrict__ part_l, T* __restrict__ out, float* __restrict__ lse,
                                   int64_t rows, int64_t S, int64_t DV, float scale) {
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
        const float a = m == -INFINITY || ms == -INFINITY ? 0.f : exp2f((ms - m) * scale);  // m: -cost units
        wsm[s] = a;
        l = fmaf(a, part_l[s * rows + row], l);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
      if (threadIdx.x == 0) {
        wsm[S] = l == 0.f ? 0.f : 1.f / l;  // (l NaN: NaN in, NaN out)
        if (cc == 0) lse[row] = l == 0.f ? -INFINITY : (m * scale + log2f(l)) * kLn2;
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

}  // namespace
}  // namespace geokern
