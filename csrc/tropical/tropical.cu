// Fused tropical (max-plus) attention, forward and backward (definition:
// geokern/reference/tropical.py). The core is two chained max-plus products,
// S = Q (x) K^T over D and Y = S (x) V over keys, with the causal mask and the score
// centring y[i, d] = max_j (s[i, j] + v[j, d]) - max_j s[i, j] (max-plus is
// shift-equivariant, so the centring is applied once at the end); the gauge fixes run in
// PyTorch around it. There are no tensor cores for max-plus: the forward is fp32 adds and
// maxima fed from shared memory, every input staged once per block with cp.async so the
// loads overlap the other stage's math. Ties keep the smallest key, NaN propagates, and a
// key the causal mask hides never enters. Tile layout, thread map and measurements:
// README.md beside this file.

#include "common.cuh"

namespace geokern {
namespace {

constexpr int kBQ = 128, kBJ = 64, kThreads = 256, kPad = 4;
constexpr int kQS = kBQ + kPad, kKS = kBJ + kPad;  // row strides of Qt / St and Kt
constexpr int kArgmax = 1, kMargin = 2;             // MODE bits

struct FwdParams {
  const float* q;
  const float* k;
  const float* v;
  float* y;
  int* idx;
  int* jm;
  float* mg;
  int64_t sq[4], sk[4], sv[4];  // strides (b, h, t, d)
  int H, G, Tq, Tk, D;
  int BH, nqb;  // (batch, head) pairs and query blocks: the grid is their product
  bool causal, center;
};

__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float min_nan(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ void lds4(const float* p, float* out) {
  const float4 f = *reinterpret_cast<const float4*>(p);
  out[0] = f.x; out[1] = f.y; out[2] = f.z; out[3] = f.w;
}

// One float global -> shared through cp.async (LDGSTS: no register, no wait until
// cp_async_wait_all); n = 0 reads nothing and stores 0.
__device__ __forceinline__ void cp_async_f32(float* dst, const float* src, int n) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// One column of a tile, this thread's share: N rows STEP apart, dst[r * DSTEP] <-
// src[r * sstep]; rows with r * STEP >= left (past the tensor's end) are zero-filled,
// with `safe` (a valid address) as their source.
template <int N, int STEP, int DSTEP>
__device__ __forceinline__ void stage_column(float* dst, const float* src, int64_t sstep, int left,
                                             const float* safe) {
  if (left >= N * STEP) {
#pragma unroll
    for (int r = 0; r < N; ++r) cp_async_f32(dst + r * DSTEP, src + r * sstep, 4);
  } else {
#pragma unroll
    for (int r = 0; r < N; ++r) {
      const bool in = r * STEP < left;
      cp_async_f32(dst + r * DSTEP, in ? src + r * sstep : safe, in ? 4 : 0);
    }
  }
}

template <int BD>
constexpr int smem_floats() {
  return BD * kQS + BD * kKS + kBJ * (BD + kPad) + kBJ * kQS;
}

// Query row i (0..7) of thread row ty in the block: ty*4 + i, then 64 + ty*4 + i - 4.
__device__ __forceinline__ constexpr int row_of(int i) { return i < 4 ? i : 60 + i; }

// Stage 2 over keys [jb, je) of the block: the max-plus update of Y from St and Vs.
// MASK: query row_of(i) of this thread sees key jj iff jj <= rel + row_of(i); hidden
// (row, key) pairs are skipped (a NaN or +inf value there must not enter).
template <int BD, int MODE, bool MASK>
__device__ __forceinline__ void value_stage(const float* St, const float* Vs, int jb, int je, int j0, int rel,
                                            int ty, int tx, float (&top1)[8][BD / 16], int (&idx)[8][BD / 16],
                                            float (&top2)[8][BD / 16]) {
  constexpr int CY = BD / 16, VS = BD + kPad;
  const float* sp = St + jb * kQS + ty * 4;
  const float* vp = Vs + jb * VS + tx * 4;
#pragma unroll((MODE == 0 && BD == 64) ? 4 : 2)
  for (int jj = jb; jj < je; ++jj, sp += kQS, vp += VS) {
    float a[8], b[CY];
    lds4(sp, a);
    lds4(sp + 64, a + 4);
    lds4(vp, b);
    if constexpr (CY == 8) lds4(vp + 64, b + 4);
    const int j = j0 + jj;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const bool seen = !MASK || jj - rel <= row_of(i);
#pragma unroll
      for (int c = 0; c < CY; ++c) {
        float x = a[i] + b[c];
        if constexpr (MASK) x = seen ? x : -INFINITY;
        if constexpr ((MODE & kMargin) != 0) top2[i][c] = fmaxf(top2[i][c], fminf(top1[i][c], x));
        if constexpr ((MODE & kArgmax) != 0) {
          const bool take = x > top1[i][c] || (x != x && top1[i][c] == top1[i][c]);
          top1[i][c] = take ? x : top1[i][c];
          idx[i][c] = take ? j : idx[i][c];
        } else {
          top1[i][c] = max_nan(top1[i][c], x);
        }
      }
    }
  }
}

// (v, j) replaces the running (bv, bj) of the score maximum: larger, or equal at a
// smaller key; NaN counts as the largest value (the first NaN wins), as argmax does.
__device__ __forceinline__ bool beats(float v, int j, float bv, int bj) {
  if (v != v) return bv == bv || j < bj;
  return v > bv || (v == bv && j < bj);
}

// q: [B, H, Tq, D], k, v: [B, Hkv, Tk, D] float32, any strides; y, idx: [B, H, Tq, D] and
// jm, mg: [B, H, Tq] contiguous. One CTA (256 threads): kBQ = 128 queries of one (batch,
// head) over all their visible keys, kBJ = 64 at a time; 1-D grid nqb * B * H, heaviest
// query blocks first. D <= BD (64 or 128); MODE adds the routes (kArgmax) and margins (kMargin).
template <int BD, int MODE>
__global__ void __launch_bounds__(kThreads, (BD <= 64 && MODE == 0) ? 2 : 1)
tropical_attention_fwd_kernel(const FwdParams p) {
  constexpr int CY = BD / 16;            // channels of Y per thread: 4 (D <= 64) or 8 (D <= 128)
  constexpr int STEP = kThreads / BD;    // tile rows one pass of the block stages
  constexpr int VS = BD + kPad;          // row stride of Vs
  extern __shared__ __align__(16) float smem[];
  float* Qt = smem;              // [BD][kQS]
  float* Kt = Qt + BD * kQS;     // [BD][kKS]
  float* Vs = Kt + BD * kKS;     // [kBJ][VS]
  float* St = Vs + kBJ * VS;     // [kBJ][kQS]

  // the heaviest blocks first: every (batch, head)'s last query block, then the one before, ...
  const int lin = int(blockIdx.x);
  const int qb = p.nqb - 1 - lin / p.BH;
  const int64_t bh = lin % p.BH;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / p.G;
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  const int q0 = qb * kBQ;
  const int off = p.Tk - p.Tq;
  const float* qg = p.q + b * p.sq[0] + h * p.sq[1];
  const float* kg = p.k + b * p.sk[0] + hk * p.sk[1];
  const float* vg = p.v + b * p.sv[0] + hk * p.sv[1];

  // Staging: thread t copies column cd of rows cr, cr + STEP, ... of each tile.
  const int cd = t % BD, cr = t / BD;
  const bool col_in = cd < p.D;
  const float* kcol = kg + cd * p.sk[3] + cr * p.sk[2];
  const float* vcol = vg + cd * p.sv[3] + cr * p.sv[2];
  const int kend = p.causal ? min(p.Tk, q0 + kBQ + off) : p.Tk;

  // Q (d-major) and the first key block; channels past D are -inf in Q (they never win a
  // score) and 0 in K and V (finite, so -inf + 0 = -inf): set once, no copy overwrites them.
  // Rows past Tq or Tk are zero-filled (never stored / masked).
  if (col_in) {
    stage_column<kBQ / STEP, STEP, STEP>(Qt + cd * kQS + cr, qg + cd * p.sq[3] + (q0 + cr) * p.sq[2],
                                         STEP * p.sq[2], p.Tq - q0 - cr, qg);
    stage_column<kBJ / STEP, STEP, STEP>(Kt + cd * kKS + cr, kcol, STEP * p.sk[2], p.Tk - cr, kg);
  } else {
#pragma unroll
    for (int r = 0; r < kBQ / STEP; ++r) Qt[cd * kQS + cr + r * STEP] = -INFINITY;
#pragma unroll
    for (int r = 0; r < kBJ / STEP; ++r) {
      Kt[cd * kKS + cr + r * STEP] = 0.f;
      Vs[(cr + r * STEP) * VS + cd] = 0.f;
    }
  }

  float top1[8][CY], top2[8][CY];
  int idx[8][CY];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int c = 0; c < CY; ++c) {
      top1[i][c] = -INFINITY;
      top2[i][c] = -INFINITY;
      idx[i][c] = 0;
    }
  // this thread's running score maximum per row (over its keys; lanes combine at the end)
  float m[8];
  int jm[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    m[i] = -INFINITY;
    jm[i] = 0;
  }
  const int row0 = q0 + ty * 4;  // the global row of row_of(0)

  // Per key block: K was staged during the last block's stage 2, V is staged during this
  // block's stage 1; two barriers per block.
  for (int j0 = 0; j0 < kend; j0 += kBJ) {
    cp_async_wait_all();
    __syncthreads();  // K (and Q) landed for every thread; the last block's stage 2 is done
    if (col_in)
      stage_column<kBJ / STEP, STEP, STEP * VS>(Vs + cr * VS + cd, vcol + int64_t(j0) * p.sv[2], STEP * p.sv[2],
                                                p.Tk - j0 - cr, vg);

    // stage 1: s[i, j] = max_d q[i, d] + k[j, d]
    float s[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[i][c] = -INFINITY;
    {
      const float* qp = Qt + ty * 4;
      const float* kp = Kt + tx * 4;
#pragma unroll 4
      for (int d = 0; d < BD; ++d, qp += kQS, kp += kKS) {
        float a[8], kv[4];
        lds4(qp, a);
        lds4(qp + 64, a + 4);
        lds4(kp, kv);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int c = 0; c < 4; ++c) s[i][c] = max_nan(s[i][c], a[i] + kv[c]);
      }
    }
    const bool diag = p.causal && (j0 + kBJ - 1 > q0 + off);
    if (diag || j0 + kBJ > p.Tk) {
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int gj = j0 + tx * 4 + c;
          const bool seen = gj < p.Tk && (!p.causal || gj <= row0 + row_of(i) + off);
          s[i][c] = seen ? s[i][c] : -INFINITY;
        }
    }
    if (p.center) {
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if constexpr ((MODE & kArgmax) != 0) {  // keys ascend: a strict compare keeps the first
            const float x = s[i][c];
            const bool take = x > m[i] || (x != x && m[i] == m[i]);
            m[i] = take ? x : m[i];
            jm[i] = take ? j0 + tx * 4 + c : jm[i];
          } else {
            m[i] = max_nan(m[i], s[i][c]);
          }
        }
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float* row = St + (tx * 4 + c) * kQS;
      *reinterpret_cast<float4*>(row + ty * 4) = make_float4(s[0][c], s[1][c], s[2][c], s[3][c]);
      *reinterpret_cast<float4*>(row + 64 + ty * 4) = make_float4(s[4][c], s[5][c], s[6][c], s[7][c]);
    }
    cp_async_wait_all();
    __syncthreads();  // St and V visible; every read of this K block is done
    if (col_in && j0 + kBJ < kend)
      stage_column<kBJ / STEP, STEP, STEP>(Kt + cd * kKS + cr, kcol + int64_t(j0 + kBJ) * p.sk[2],
                                           STEP * p.sk[2], p.Tk - j0 - kBJ - cr, kg);

    // stage 2: y[i, d] = max_j s[i, j] + v[j, d]; on the diagonal, the keys all of this
    // thread's rows see run unmasked and those none sees are skipped
    const int jn = min(kBJ, kend - j0);
    if (diag) {
      const int rel = row0 + off - j0;  // key jj is visible to row_of(i) iff jj <= rel + row_of(i)
      const int all = min(jn, max(0, rel + 1)), any = min(jn, max(0, rel + row_of(7) + 1));
      value_stage<BD, MODE, false>(St, Vs, 0, all, j0, rel, ty, tx, top1, idx, top2);
      value_stage<BD, MODE, true>(St, Vs, all, any, j0, rel, ty, tx, top1, idx, top2);
    } else {
      value_stage<BD, MODE, false>(St, Vs, 0, jn, j0, 0, ty, tx, top1, idx, top2);
    }
  }

  // epilogue: the row maxima over the 16 lanes of a row, centre, store y (and the routes / margins)
  if (p.center) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int o = 8; o >= 1; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m[i], o);
        if constexpr ((MODE & kArgmax) != 0) {
          const int oj = __shfl_xor_sync(0xffffffffu, jm[i], o);
          if (beats(om, oj, m[i], jm[i])) {
            m[i] = om;
            jm[i] = oj;
          }
        } else {
          m[i] = max_nan(m[i], om);
        }
      }
  }
  float gap[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    gap[i] = INFINITY;
    const int gi = row0 + row_of(i);
    const float shift = p.center ? m[i] : 0.f;
#pragma unroll
    for (int c = 0; c < CY; ++c) {
      const int d = c < 4 ? tx * 4 + c : 64 + tx * 4 + c - 4;
      if (d < p.D) {
        if constexpr ((MODE & kMargin) != 0) gap[i] = min_nan(gap[i], top1[i][c] - top2[i][c]);
        if (gi < p.Tq) {
          const int64_t o = (bh * p.Tq + gi) * p.D + d;
          p.y[o] = top1[i][c] - shift;
          if constexpr ((MODE & kArgmax) != 0) p.idx[o] = idx[i][c];
        }
      }
    }
    if constexpr ((MODE & kMargin) != 0) {
#pragma unroll
      for (int o = 8; o >= 1; o >>= 1) gap[i] = min_nan(gap[i], __shfl_xor_sync(0xffffffffu, gap[i], o));
    }
    if (tx == 0 && gi < p.Tq) {
      if constexpr ((MODE & kArgmax) != 0) p.jm[bh * p.Tq + gi] = jm[i];
      if constexpr ((MODE & kMargin) != 0) p.mg[bh * p.Tq + gi] = gap[i];
    }
  }
}

// The first e maximising q[e] + k[e] (NaN counts as largest), strided rows of length D.
__device__ __forceinline__ int route_e(const float* q, int64_t sq, const float* k, int64_t sk, int D) {
  float best = -INFINITY;
  int arg = 0;
  for (int e = 0; e < D; ++e) {
    const float x = q[e * sq] + k[e * sk];
    if (x > best || (x != x && best == best)) { best = x; arg = e; }
  }
  return arg;
}

struct BwdParams {
  const float* g;    // (B, H, Tq, D) contiguous
  const float* q;    // strided
  const float* k;    // strided
  const int* idx;    // (B, H, Tq, D)
  const int* jm;     // (B, H, Tq)
  float* dq;         // (B, H, Tq, D) contiguous
  float* dk;         // (B, Hkv, Tk, D) contiguous
  float* dv;
  int64_t sq[4], sk[4];
  int H, G, Tq, Tk, D;
};

// g, idx, dq: [B, H, Tq, D] contiguous; q: [B, H, Tq, D], k: [B, Hkv, Tk, D] strided;
// dk, dv: [B, Hkv, Tk, D] contiguous float32 accumulators. One thread per (b, h, i, d)
// (grid-stride over total = B * H * Tq * D): g[i, d] into dv[j, d], dq[i, e], dk[j, e]
// along its recorded key j and the score's first maximising e.
__global__ void tropical_attention_bwd_kernel(const BwdParams p, int64_t total) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int d = int(e % p.D);
    const int64_t row = e / p.D;  // (b * H + h) * Tq + i
    const int i = int(row % p.Tq);
    const int64_t bh = row / p.Tq, b = bh / p.H, h = bh % p.H, hk = h / p.G;
    const float g = p.g[e];
    const int j = p.idx[e];
    const int64_t kv = ((b * (p.H / p.G) + hk) * p.Tk + j) * p.D;
    atomicAdd(p.dv + kv + d, g);
    const float* qr = p.q + b * p.sq[0] + h * p.sq[1] + i * p.sq[2];
    const float* kr = p.k + b * p.sk[0] + hk * p.sk[1] + int64_t(j) * p.sk[2];
    const int r = route_e(qr, p.sq[3], kr, p.sk[3], p.D);
    atomicAdd(p.dq + row * p.D + r, g);
    atomicAdd(p.dk + kv + r, g);
  }
}

// The centring: m[i] = s[i, jm[i]] entered every y[i, :] with a minus sign.
// g: [B, H, Tq, D], jm: [B, H, Tq] contiguous; dq, dk as above. One thread per query row
// (grid-stride over rows = B * H * Tq): -sum_d g[i, d] into dq[i, e], dk[jm[i], e].
__global__ void tropical_attention_bwd_center_kernel(const BwdParams p, int64_t rows) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < rows; row += stride) {
    const int i = int(row % p.Tq);
    const int64_t bh = row / p.Tq, b = bh / p.H, h = bh % p.H, hk = h / p.G;
    float dm = 0.f;
    for (int d = 0; d < p.D; ++d) dm -= p.g[row * p.D + d];
    const int j = p.jm[row];
    const float* qr = p.q + b * p.sq[0] + h * p.sq[1] + i * p.sq[2];
    const float* kr = p.k + b * p.sk[0] + hk * p.sk[1] + int64_t(j) * p.sk[2];
    const int r = route_e(qr, p.sq[3], kr, p.sk[3], p.D);
    atomicAdd(p.dq + row * p.D + r, dm);
    atomicAdd(p.dk + ((b * (p.H / p.G) + hk) * p.Tk + j) * p.D + r, dm);
  }
}

// ---- host ---------------------------------------------------------------------------

void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  GK_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", q.device());
  GK_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k and v must be on one device");
  const auto st = q.scalar_type();
  GK_CHECK(st == dtype::f32 || st == dtype::f16 || st == dtype::bf16, op,
              ": q must be float32, float16 or bfloat16 (float64 runs on the triton or torch backend), got ", st);
  GK_CHECK(k.scalar_type() == st && v.scalar_type() == st, op, ": q, k and v must share one dtype");
  GK_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, H, T, D), got ",
              fmt(q.sizes()), ", ", fmt(k.sizes()), ", ", fmt(v.sizes()));
  GK_CHECK(same_shape(k.sizes(), v.sizes()), op, ": k and v must have one shape, got ", fmt(k.sizes()), " and ",
              fmt(v.sizes()));
  GK_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k ", fmt(k.sizes()),
              " must match q ", fmt(q.sizes()), " in B and D");
  GK_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": k's head count ", fmt(k.size(1)),
              " must divide q's ", fmt(q.size(1)));
  GK_CHECK(q.size(3) >= 1 && q.size(3) <= 128, op, ": the CUDA kernel takes head dims 1..128, got ",
              fmt(q.size(3)), " (use the triton backend)");
  const int64_t lim = std::numeric_limits<int>::max();
  GK_CHECK(q.size(2) * q.size(3) < lim && k.size(2) * k.size(3) < lim, op,
              ": T * D must be < 2**31 per head, got q ", fmt(q.sizes()), ", k ", fmt(k.sizes()));
}

template <int BD, int MODE>
void launch_fwd(const FwdParams& p, dim3 grid, cudaStream_t stream) {
  constexpr int bytes = smem_floats<BD>() * int(sizeof(float));
  int dev = 0, optin = 0;
  GK_CUDA_CHECK(cudaGetDevice(&dev));
  GK_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  GK_CHECK(bytes <= optin, "tropical_attention_cuda: head dims above 64 need ", fmt(bytes),
              " bytes of shared memory per block, this GPU gives ", fmt(optin), " (use the triton backend)");
  auto kernel = tropical_attention_fwd_kernel<BD, MODE>;
  GK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  GK_LAUNCH_CHECK();
}

template <int BD>
void launch_fwd_mode(const FwdParams& p, int mode, dim3 grid, cudaStream_t stream) {
  if (mode == 0) launch_fwd<BD, 0>(p, grid, stream);
  else if (mode == kArgmax) launch_fwd<BD, kArgmax>(p, grid, stream);
  else if (mode == kMargin) launch_fwd<BD, kMargin>(p, grid, stream);
  else launch_fwd<BD, kArgmax | kMargin>(p, grid, stream);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> tropical_attention_cuda(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, bool causal, bool center,
    bool want_argmax, bool want_margin) {
  const char* op = "tropical_attention_cuda";
  check_qkv(op, q_in, k_in, v_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), Tq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Tk = k_in.size(2);
  GK_CHECK(!causal || Tk >= Tq || Tq == 1, op, ": causal attention needs Tk >= Tq (or Tq == 1), got q ",
              fmt(q_in.sizes()), ", k ", fmt(k_in.sizes()));
  GK_CHECK(Tk >= 1 || Tq == 0, op, ": k needs at least one key, got ", fmt(k_in.sizes()));
  const auto f32 = ops::options(q_in).dtype(dtype::f32);
  const Tensor q = ops::to(q_in, dtype::f32), k = ops::to(k_in, dtype::f32), v = ops::to(v_in, dtype::f32);
  Tensor y = ops::empty({B, H, Tq, D}, f32);
  Tensor idx = ops::empty(want_argmax ? IntRef({B, H, Tq, D}) : IntRef({0}),
                             ops::options(q_in).dtype(dtype::i32));
  Tensor jm = ops::empty(want_argmax ? IntRef({B, H, Tq}) : IntRef({0}),
                            ops::options(q_in).dtype(dtype::i32));
  Tensor mg = ops::empty(want_margin ? IntRef({B, H, Tq}) : IntRef({0}), f32);
  if (y.numel() > 0) {
    GK_CHECK(B * H <= 65535, op, ": B * H must be <= 65535, got ", fmt(B * H));
    const int64_t nqb = (Tq + kBQ - 1) / kBQ;
    GK_CHECK(nqb * B * H <= std::numeric_limits<int>::max(), op, ": B * H * ceil(Tq / 128) must be < 2**31, got q ",
                fmt(q_in.sizes()));
    const DeviceGuard guard(q.get_device_index());
    const cudaStream_t stream = current_stream(q);
    FwdParams p{q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(),
                y.mutable_data_ptr<float>(), want_argmax ? idx.mutable_data_ptr<int>() : nullptr,
                want_argmax ? jm.mutable_data_ptr<int>() : nullptr, want_margin ? mg.mutable_data_ptr<float>() : nullptr,
                {}, {}, {}, int(H), int(H / Hkv), int(Tq), int(Tk), int(D), int(B * H), int(nqb), causal, center};
    for (int d = 0; d < 4; ++d) {
      p.sq[d] = q.stride(d);
      p.sk[d] = k.stride(d);
      p.sv[d] = v.stride(d);
    }
    const dim3 grid(unsigned(nqb * B * H));
    const int mode = (want_argmax ? kArgmax : 0) | (want_margin ? kMargin : 0);
    if (D <= 64) launch_fwd_mode<64>(p, mode, grid, stream);
    else launch_fwd_mode<128>(p, mode, grid, stream);
  }
  const auto dt = q_in.scalar_type();
  return {ops::to(y, dt), idx, jm, ops::to(mg, dt)};
}

std::tuple<Tensor, Tensor, Tensor> tropical_attention_backward_cuda(
    const Tensor& grad, const Tensor& q_in, const Tensor& k_in, const Tensor& argmax,
    const Tensor& rowarg, bool center) {
  const char* op = "tropical_attention_backward_cuda";
  check_qkv(op, q_in, k_in, k_in);
  GK_CHECK(grad.device() == q_in.device() && same_shape(grad.sizes(), q_in.sizes()), op,
              ": grad must be on q's device with q's shape ", fmt(q_in.sizes()), ", got ", fmt(grad.sizes()));
  GK_CHECK(argmax.scalar_type() == dtype::i32 && same_shape(argmax.sizes(), q_in.sizes()), op,
              ": argmax must be int32 with q's shape ", fmt(q_in.sizes()), ", got ", fmt(argmax.sizes()));
  GK_CHECK(!center || (rowarg.scalar_type() == dtype::i32 && rowarg.dim() == 3 && rowarg.numel() ==
                          q_in.size(0) * q_in.size(1) * q_in.size(2)), op,
              ": rowarg must be int32 of shape (B, H, Tq), got ", fmt(rowarg.sizes()));
  const int64_t B = q_in.size(0), H = q_in.size(1), Tq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Tk = k_in.size(2);
  const auto f32 = ops::options(q_in).dtype(dtype::f32);
  Tensor dq = ops::zeros({B, H, Tq, D}, f32);
  Tensor dk = ops::zeros({B, Hkv, Tk, D}, f32);
  Tensor dv = ops::zeros({B, Hkv, Tk, D}, f32);
  const int64_t total = grad.numel();
  if (total > 0) {
    const DeviceGuard guard(q_in.get_device_index());
    const cudaStream_t stream = current_stream(q_in);
    const Tensor g = ops::contiguous(ops::to(grad, dtype::f32)), q = ops::to(q_in, dtype::f32), k = ops::to(k_in, dtype::f32);
    const Tensor ix = ops::contiguous(argmax), jr = ops::contiguous(rowarg);
    BwdParams p{g.const_data_ptr<float>(), q.const_data_ptr<float>(), k.const_data_ptr<float>(),
                ix.const_data_ptr<int>(), center ? jr.const_data_ptr<int>() : nullptr,
                dq.mutable_data_ptr<float>(), dk.mutable_data_ptr<float>(), dv.mutable_data_ptr<float>(),
                {}, {}, int(H), int(H / Hkv), int(Tq), int(Tk), int(D)};
    for (int d = 0; d < 4; ++d) {
      p.sq[d] = q.stride(d);
      p.sk[d] = k.stride(d);
    }
    tropical_attention_bwd_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(p, total);
    GK_LAUNCH_CHECK();
    if (center) {
      const int64_t rows = B * H * Tq;
      tropical_attention_bwd_center_kernel<<<grid_for(rows, kThreads), kThreads, 0, stream>>>(p, rows);
      GK_LAUNCH_CHECK();
    }
  }
  const auto dt = grad.scalar_type();
  return {ops::to(dq, dt), ops::to(dk, dt), ops::to(dv, dt)};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(geokern, CUDA, m) {
  m.impl("tropical_attention_cuda", TORCH_BOX(&tropical_attention_cuda));
  m.impl("tropical_attention_backward_cuda", TORCH_BOX(&tropical_attention_backward_cuda));
}

}  // namespace geokern
