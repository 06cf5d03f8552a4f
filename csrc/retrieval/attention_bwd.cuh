// Retrieval attention backward: P and dcost per (kv batch, row, key) (included by retrieval.cu only:
// the family is one translation unit).
//
// dP = dO V^T and dV = P^T dO are float32 batched GEMMs (cuBLAS) per kv batch, run by the host code;
// retrieval_attention_bwd_kernel recomputes P from the lse and forms dcost = -beta P (dP - delta);
// the cost's backward kernel (cost.cuh) then reduces dcost to dq (per query, over keys), dk (per key,
// over the queries that see it), dw and dR in float32, with dv formed directly.
#pragma once

#include "common.cuh"

namespace geokern {
namespace {

struct PairParams {
  const void* q;
  Strides4 sq;
  const void* k;
  Strides4 sk;
  const float* r;
  Strides4 sr;
  const uint8_t* mask;
  Strides4 sm;
  const float* w;
  const float* lse;    // [rows]
  const float* delta;  // [rows]
  float* dp;           // in: dO V^T [KB, RPK, M]; out: dcost
  float* P;            // out: P [KB, RPK, M]
  int64_t NB1, LQ, M, n1k, n0r, n1r, n0k, KB, rpk;
  int F;
  float beta, eps;
};

// dp: [KB, RPK, M] float32 (kv batch, its rows, keys), dO V^T in and dcost = -beta P (dP - delta)
// out; P: [KB, RPK, M] out; lse, delta: [rows] of the full [NB0, NB1, LQ]. One thread per element
// (grid-stride) recomputes the logit from q, k, w and r, and P from the row's lse.
template <typename T>
__global__ void retrieval_attention_bwd_kernel(const PairParams p) {
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
    bool kept = false;
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
      pr = expf(-p.beta * rv * sqrtf((s < 0.f ? 0.f : s) + p.eps) - lse);  // (a NaN s stays NaN)
      kept = true;
    }
    p.P[idx] = pr;
    // a masked key (or an empty row) has dcost 0 even where dO V^T read a NaN value of it
    p.dp[idx] = kept ? -p.beta * pr * (p.dp[idx] - p.delta[row]) : 0.f;
  }
}

}  // namespace
}  // namespace geokern
