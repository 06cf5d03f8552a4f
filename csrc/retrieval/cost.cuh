// The retrieval cost R * sqrt(dv^T diag(w) dv + eps), dv = k - q, and its backward over one side
// (included by retrieval.cu only: the family is one translation unit).
//
// dv is formed directly, never expanded as |q|^2 + |k|^2 - 2 q.k, so there is no cancellation when
// q is close to k. The backward kernel also serves the attention's backward, which hands it dcost.
#pragma once

#include "common.cuh"

namespace geokern {
namespace {

// q: [NB0, NB1, LQ, F]; k: [1|NB0, 1|NB1, M, F]; r: broadcasting to [NB0, NB1, LQ, M];
// out: [rows, M] float32, rows = NB0 * NB1 * LQ. A CTA takes rows blockIdx.x + i * gridDim.x (q's
// row and w staged in shared memory); its threads take keys j = blockIdx.y * blockDim.x + t, step
// gridDim.y * blockDim.x.
template <typename T>
__global__ void retrieval_cost_fwd_kernel(const T* __restrict__ q, Strides4 sq, const T* __restrict__ k,
                                          Strides4 sk, const float* __restrict__ w, const float* __restrict__ r,
                                          Strides4 sr, float* __restrict__ out, int64_t rows, int64_t NB1, int64_t LQ,
                                          int64_t M, int F, float eps) {
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
      out[row * M + j] = rb[j * sr.s[3]] * sqrtf((s < 0.f ? 0.f : s) + eps);  // keeps a NaN (fmaxf drops it)
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
  Strides4 sx;  // [b0, b1, l, f]
  const void* y;
  Strides4 sy;
  const float* w;
  const float* g;
  Strides4 sg;  // [b0, b1, xl, yl]
  const float* r;
  Strides4 sr;  // [b0, b1, xl, yl]
  int64_t NB0, NB1, LX, LY, nx0, nx1;
  int F;
  float eps;
  float* out;   // [nx0 * nx1 * LX, F]
  float* outw;  // optional, same shape
  float* drx;   // optional [nx0 * nx1 * LX]
  float* drp;   // optional, strides sdp over [b0, b1, xl, yl]
  Strides4 sdp;
  int accumulate;
};

constexpr int kRedThreads = 256;

// x: [nx0, nx1, LX, F] (queries or keys); y: [.., LY, F]; g, r: [NB0, NB1, LX, LY] (strided);
// out / outw: [nx0 * nx1 * LX, F], drx: [nx0 * nx1 * LX]. A CTA of kRedThreads takes points
// x = blockIdx.x + i * gridDim.x and sums over the y of every batch that meets x.
template <typename T>
__global__ void __launch_bounds__(kRedThreads) retrieval_cost_bwd_kernel(const XY p) {
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
              float spd = 0.f;
              // a zero dcost (a masked key, an empty row) adds nothing, even where its key or R is
              // inf (0 * inf would be NaN)
              if (gd != 0.f) {
                float s = 0.f;
                for (int ff = 0; ff < F; ++ff) {
                  const float d = xs[ff] - static_cast<float>(yb[y * p.sy.s[2] + ff * p.sy.s[3]]);
                  s = fmaf(ws[ff] * d, d, s);
                }
                spd = sqrtf((s < 0.f ? 0.f : s) + p.eps);
                // spd = 0 (eps = 0, x = y): sqrt's subgradient 0 there, not g r / 0
                c = s >= 0.f && spd > 0.f ? gd * rb[y * p.sr.s[3]] / spd : 0.f;
              }
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

}  // namespace
}  // namespace geokern
