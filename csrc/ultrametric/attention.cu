// Hard-mode ultrametric attention (definition: geokern/reference/ultrametric.py) and its gradient
// to v on CUDA: the Triton design (kernels/ultrametric: __init__.py's _run and plan, scan.py) with
// the same tables, plan and float32 sums. Positions are cut into chunks of C and the chunks into S
// segments per group g = b * Hkv + key head; every (group, segment) owns a dense table [N, D]
// (+ counts, forward). Summary: each segment adds its sources to its table; prefix: slot s becomes
// the sum of the segments before it (after it, backward), slot S the total; then the causal scan
// (each segment walks its chunks in time order: the chunk's targets read the table and add the
// chunk's own visible sources densely, then those sources enter the table) or, non-causal, one
// read of the total. Forward: sources keys (v), targets queries (R heads per group). Backward:
// sources queries (dy / max(den, 1e-9), R heads into one table), targets keys (dv, written once).
// Design, bytes and flops: README.md beside this file.

#include <tuple>
#include <type_traits>
#include <utility>

#include "tables.cuh"

namespace geokern {
namespace {

using namespace ultra;

constexpr int kScanThreads = 256, kScanWarps = kScanThreads / 32;
constexpr int kReadThreads = 128, kReadWarps = kReadThreads / 32;
constexpr int kPrefixThreads = 256;
constexpr int kDefaultChunk = 64;                     // kernels/ultrametric.default_chunk on the GPU
constexpr int64_t kScratchBytes = int64_t(1) << 28;  // kernels/ultrametric.SCRATCH_BYTES

struct ScanParams {
  Digits tdig, sdig;  // targets' [B, HT, TT, K] and sources' [B, HS, TS, K] digits
  const void* val;    // sources' values [B, HS, TS, D]: v (forward) or dy (backward)
  const float* slse;  // backward: the forward's lse of the source queries [B, HS, TS]
  const bool* keep;   // [B, Tk] or null
  float* tab;         // [G, slots, N, D]
  int* cnt;           // [G, slots, N], forward only
  void* out;          // y [B, H, Tq, D] (forward) or dv [B, Hkv, Tk, D]
  float* lse;         // forward: [B, H, Tq]
  // heads, heads per group, rows and position offset (row = position - off) of targets and sources
  int HT, NT, TT, tgt_off, HS, NS, TS, src_off;
  int Tk, Hkv, N, D, slots, cps, nchunks, C;
  ReadWeights rw;
};

// Source at position pos of head `head`: whether it enters (in range; forward a kept key,
// backward a query that sees a key), its row and the divisor of its values (backward
// max(exp(lse), 1e-9), the Triton _src_rows' dy / den; forward 1, exact).
template <bool FWD>
__device__ __forceinline__ bool source(const ScanParams& a, int b, int head, int pos, int64_t& srow, float& div) {
  const int r = pos - a.src_off;
  div = 1.f;
  srow = 0;
  if (r < 0 || r >= a.TS) return false;
  srow = (int64_t(b) * a.HS + head) * a.TS + r;
  if constexpr (FWD) {
    return !a.keep || a.keep[int64_t(b) * a.Tk + pos];
  } else {
    const float l = a.slse[srow];
    if (l == -INFINITY) return false;
    div = fmaxf(expf(l), 1e-9f);
    return true;
  }
}

// Adds the sources at positions [P0, P1) of the group's NS source heads to tab (and cnt, forward),
// one warp per source row.
template <typename VT, bool FWD>
__device__ void add_sources(const ScanParams& a, float* tab, int* cnt, int b, int hk, int P0, int P1) {
  const int n = P1 - P0, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t it = warp; it < int64_t(n) * a.NS; it += warps) {
    const int head = hk * a.NS + int(it / n), pos = P0 + int(it % n);
    int64_t srow;
    float div;
    if (!source<FWD>(a, b, head, pos, srow, div)) continue;  // warp-uniform
    int code, digit;
    prefix_code(a.sdig, srow, a.rw.K, a.rw.p, code, digit);
    add_row(tab, FWD ? cnt : nullptr, code, a.rw.K, a.D, static_cast<const VT*>(a.val) + srow * a.D, div);
  }
}

// The weight alpha^lcp of this lane's source j (of the chunk at P0, its NS heads x C positions)
// for the target at tpos whose digits prefix_code spread (digit l + 1 on lane l + 1), or -1 for a
// source the target does not see (later / earlier, removed, past the end): a sentinel, not 0, so
// that a visible weight that underflowed to 0 still meets its value (0 x inf = NaN, as the
// reference). Every lane must call it (it shuffles).
template <bool FWD>
__device__ __forceinline__ float pair_weight(const ScanParams& a, int b, int hk, int P0, int tpos, int j, int tdigit,
                                             int64_t& srow, float& div) {
  bool vis = false;
  srow = 0;
  div = 1.f;
  if (j < a.NS * a.C) {
    const int spos = P0 + j % a.C;
    vis = (FWD ? spos <= tpos : spos >= tpos) && source<FWD>(a, b, hk * a.NS + j / a.C, spos, srow, div);
  }
  int lcp = 0;
  bool alive = vis;
  for (int l = 0; l < a.rw.K; ++l) {
    const int td = __shfl_sync(kFull, tdigit, l + 1);
    if (alive) {
      alive = a.sdig.at(srow * a.rw.K + l, a.rw.p) == td;
      lcp += alive;
    }
  }
  return vis ? exp2f(float(lcp) * a.rw.log2a) : -1.f;
}

// One target (a warp) at position tpos of head thead: its table reads, with dense the chunk's own
// visible sources (chunk start P0), then the store: forward y = acc / max(den, 1e-9) and lse =
// log(den) (-inf where no key is seen), backward dv = acc (zero for a padded key).
template <typename VT, int VEC, bool FWD>
__device__ void target_row(const ScanParams& a, const float* tab, const int* cnt, int b, int hk, int thead, int tpos,
                           bool dense, int P0) {
  const int lane = threadIdx.x % 32;
  const int64_t trow = (int64_t(b) * a.HT + thead) * a.TT + (tpos - a.tgt_off);
  int code, digit;
  prefix_code(a.tdig, trow, a.rw.K, a.rw.p, code, digit);
  const int nsrc = dense ? a.NS * a.C : 0;
  float den = 0.f;
  bool keep_t = true;
  if constexpr (FWD) {
    den = read_den(a.rw, cnt, code, digit);
    bool seen = __ldcg(cnt) > 0;  // the root counts every source in the table
    float part = 0.f;
    for (int j0 = 0; j0 < nsrc; j0 += 32) {
      int64_t srow;
      float div;
      const float w = pair_weight<FWD>(a, b, hk, P0, tpos, j0 + lane, digit, srow, div);
      seen |= __any_sync(kFull, w >= 0.f);
      part += w >= 0.f ? w : 0.f;
    }
    for (int o = 16; o > 0; o /= 2) part += __shfl_xor_sync(kFull, part, o);
    den += part;
    if (lane == 0) a.lse[trow] = seen ? logf(den) : -INFINITY;
  } else {
    keep_t = !a.keep || a.keep[int64_t(b) * a.Tk + tpos];
  }
  const float clamped = fmaxf(den, 1e-9f);
  const VT* src = static_cast<const VT*>(a.val);
  VT* out = static_cast<VT*>(a.out) + trow * a.D;
  for (int c0 = 0; c0 < a.D; c0 += 32 * VEC) {  // warp-uniform bounds: the shuffles need every lane
    const int c = c0 + lane * VEC;
    float acc[VEC] = {};
    read_acc<VEC>(a.rw, tab, a.D, c, code, digit, acc);
    // the chunk's sources: weights recomputed per channel block (K compares each), not stored
    for (int j0 = 0; j0 < nsrc; j0 += 32) {
      int64_t srow;
      float div;
      const float w = pair_weight<FWD>(a, b, hk, P0, tpos, j0 + lane, digit, srow, div);
      for (int jj = 0; jj < min(32, nsrc - j0); ++jj) {
        const float wj = __shfl_sync(kFull, w, jj);
        const int64_t r = __shfl_sync(kFull, srow, jj);
        const float dj = __shfl_sync(kFull, div, jj);
        if (wj < 0.f || c >= a.D) continue;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += wj * (static_cast<float>(src[r * a.D + c + e]) / dj);
      }
    }
    if (c < a.D) {
#pragma unroll
      for (int e = 0; e < VEC; ++e)  // a division, as the Triton store and the reference
        out[c + e] = static_cast<VT>(FWD ? acc[e] / clamped : (keep_t ? acc[e] : 0.f));
    }
  }
}

// Grid (G, S): segment s of group g adds its sources to table (g, s).
template <typename VT, bool FWD>
__global__ void __launch_bounds__(kScanThreads) ultrametric_summary_kernel(const ScanParams a) {
  const int64_t g = blockIdx.x;
  const int s = blockIdx.y;
  float* tab = a.tab + (g * a.slots + s) * int64_t(a.N) * a.D;
  int* cnt = FWD ? a.cnt + (g * a.slots + s) * int64_t(a.N) : nullptr;
  const int c_hi = min((s + 1) * a.cps, a.nchunks);
  add_sources<VT, FWD>(a, tab, cnt, int(g / a.Hkv), int(g % a.Hkv), s * a.cps * a.C, c_hi * a.C);
}

// t [G, S + 1, width], one thread per (group, column): slot s becomes the sum of the slots
// before it (after it, reverse), slot S the total.
template <typename T>
__global__ void __launch_bounds__(kPrefixThreads) ultrametric_prefix_kernel(T* t, int S, int64_t width,
                                                                            int64_t total, bool reverse) {
  const int64_t i = int64_t(blockIdx.x) * kPrefixThreads + threadIdx.x;
  if (i >= total) return;
  T* base = t + (i / width) * (S + 1) * width + i % width;
  T run = 0;
  for (int k = 0; k < S; ++k) {
    const int64_t s = reverse ? S - 1 - k : k;
    const T x = base[s * width];
    base[s * width] = run;
    run += x;
  }
  base[S * width] = run;
}

// The causal scan, grid (G, S): segment s of group g, from its prefix table, walks its chunks
// in time order (reverse, backward): the chunk's targets (NT heads, a warp each) read the table
// and add the chunk's visible sources densely, then the chunk's sources enter the table.
template <typename VT, int VEC, bool FWD>
__global__ void __launch_bounds__(kScanThreads) ultrametric_scan_kernel(const ScanParams a) {
  const int64_t g = blockIdx.x;
  const int s = blockIdx.y, b = int(g / a.Hkv), hk = int(g % a.Hkv);
  float* tab = a.tab + (g * a.slots + s) * int64_t(a.N) * a.D;
  int* cnt = FWD ? a.cnt + (g * a.slots + s) * int64_t(a.N) : nullptr;
  const int c_lo = s * a.cps, c_hi = min((s + 1) * a.cps, a.nchunks);
  for (int i = 0; i < c_hi - c_lo; ++i) {
    const int P0 = (FWD ? c_lo + i : c_hi - 1 - i) * a.C;
    for (int64_t it = threadIdx.x / 32; it < int64_t(a.NT) * a.C; it += kScanWarps) {
      const int pos = P0 + int(it % a.C), r = pos - a.tgt_off;
      if (r >= 0 && r < a.TT)  // warp-uniform
        target_row<VT, VEC, FWD>(a, tab, cnt, b, hk, hk * a.NT + int(it / a.C), pos, true, P0);
    }
    // every read of this chunk is done before its sources change the table (block-wide
    // visibility of global memory; the reads bypass L1)
    __syncthreads();
    add_sources<VT, FWD>(a, tab, cnt, b, hk, P0, P0 + a.C);
    __syncthreads();
  }
}

// Non-causal: every target (a warp) reads its group's total, slot S.
template <typename VT, int VEC, bool FWD>
__global__ void __launch_bounds__(kReadThreads) ultrametric_read_kernel(const ScanParams a, int64_t rows) {
  const int64_t i = int64_t(blockIdx.x) * kReadWarps + threadIdx.x / 32;
  if (i >= rows) return;  // warp-uniform
  const int64_t bh = i / a.TT;
  const int b = int(bh / a.HT), thead = int(bh % a.HT), hk = thead / a.NT;
  const int64_t g = int64_t(b) * a.Hkv + hk;
  const float* tab = a.tab + (g * a.slots + a.slots - 1) * int64_t(a.N) * a.D;
  const int* cnt = FWD ? a.cnt + (g * a.slots + a.slots - 1) * int64_t(a.N) : nullptr;
  target_row<VT, VEC, FWD>(a, tab, cnt, b, hk, thead, int(i % a.TT) + a.tgt_off, false, 0);
}

struct Dims {
  int64_t B, H, Hkv, Tq, Tk, K, D;
};

// The checks both ops share; val is v (forward) or grad (backward), whose device runs the op.
Dims check(const char* op, const Tensor& qd, const Tensor& kd, const Tensor& val, const char* vname,
           const std::optional<Tensor>& keep, double alpha, int64_t p, bool causal, int64_t chunk,
           int64_t num_segments) {
  GK_CHECK(val.device().type() == torch::headeronly::DeviceType::CUDA, op, ": ", vname,
           " must be a CUDA tensor, got ", val.device());
  GK_CHECK(val.dim() == 4 && val.is_contiguous(), op, ": ", vname, " must be contiguous 4-D, got ", val.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"q_digits", &qd}, {"k_digits", &kd}}) {
    GK_CHECK(t->device() == val.device(), op, ": ", name, " is on ", t->device(), " but ", vname, " is on ",
             val.device());
    GK_CHECK(t->dim() == 4 && t->is_contiguous() && t->size(3) >= 1, op, ": ", name,
             " must be contiguous [B, heads, T, K] with K >= 1, got ", t->sizes());
  }
  digits_of(qd, op, "q_digits");  // refused whatever the size
  digits_of(kd, op, "k_digits");
  Dims d{qd.size(0), qd.size(1), kd.size(1), qd.size(2), kd.size(2), qd.size(3), val.size(3)};
  GK_CHECK(kd.size(0) == d.B && kd.size(3) == d.K, op, ": k_digits must be [", d.B, ", Hkv, Tk, ", d.K,
           "] like q_digits, got ", kd.sizes());
  GK_CHECK(d.Hkv >= 1 && d.H % d.Hkv == 0, op, ": the ", d.Hkv, " heads of k_digits must divide the ", d.H,
           " of q_digits");
  GK_CHECK(p >= 2 && p <= kMaxCodes && d.K <= kMaxK, op, ": p must be in [2, ", kMaxCodes, "] and K <= ", kMaxK,
           ", got p ", p, ", K ", d.K);
  GK_CHECK(num_codes(p, d.K) <= kMaxCodes, op, ": p = ", p, ", K = ", d.K, " need more than ", kMaxCodes,
           " codes (dense tables)");
  GK_CHECK(alpha > 0 && alpha < INFINITY, op, ": alpha must be a finite number > 0, got ", alpha);
  GK_CHECK(chunk >= 0 && num_segments >= 0, op, ": chunk and num_segments must be >= 0 (0: choose), got ", chunk,
           ", ", num_segments);
  GK_CHECK(!causal || d.Tq <= d.Tk || d.Tq == 1, op, ": causal attention needs Tk >= Tq (or Tq == 1), got Tq ",
           d.Tq, ", Tk ", d.Tk);
  GK_CHECK(d.Tk <= INT32_MAX / 2 && d.Tq <= INT32_MAX / 2, op, ": Tq = ", d.Tq, ", Tk = ", d.Tk,
           " past the kernels' int positions");
  if (keep.has_value())
    GK_CHECK(keep->device() == val.device() && keep->scalar_type() == dtype::b8 && keep->is_contiguous() &&
                 keep->dim() == 2 && keep->size(0) == d.B && keep->size(1) == d.Tk,
             op, ": keep must be contiguous bool [", d.B, ", ", d.Tk, "] on ", val.device(), ", got ",
             keep->scalar_type(), " ", keep->sizes());
  return d;
}

// The forward (fwd: sources keys, targets queries) or the backward (sources queries with dy /
// den, targets keys): tables, summaries, prefixes, then the causal scan or the read. The plan is
// kernels/ultrametric.plan's (chunks of C, S segments: two blocks per SM by default, tables within
// kScratchBytes), so the knobs mean the same on both backends.
template <typename VT>
void run(bool fwd, const char* op, const Dims& d, const Tensor& qd, const Tensor& kd, const Tensor& src,
         const float* slse, const std::optional<Tensor>& keep, Tensor out, float* out_lse, double alpha, int64_t p,
         bool causal, int64_t chunk, int64_t num_segments) {
  const int64_t G = d.B * d.Hkv, R = d.H / d.Hkv, N = num_codes(p, d.K);
  // positions: the key axis, where queries sit at Tk - Tq + i; without causality a position is only
  // a row, so the backward's sources (queries) take positions 0..Tq-1 (Tq may exceed Tk)
  const int64_t npos = fwd || causal ? d.Tk : d.Tq;
  const int64_t C = std::max<int64_t>(1, std::min(chunk ? chunk : kDefaultChunk, npos));  // > npos: one chunk
  GK_CHECK(R * C <= INT32_MAX, op, ": chunk ", C, " times ", R, " query heads per key head passes int32");
  const int64_t nchunks = (npos + C - 1) / C;
  int64_t S = num_segments;
  if (!S) {
    S = (2 * int64_t(num_sms()) + G - 1) / G;
    S = std::min(S, std::max<int64_t>(1, kScratchBytes / std::max<int64_t>(1, G * N * (d.D + 1) * 4)));
  }
  S = std::max<int64_t>(1, std::min({S, nchunks, int64_t(65535)}));  // 65535: the grid's y limit
  const int64_t cps = (nchunks + S - 1) / S;
  S = (nchunks + cps - 1) / cps;
  const int64_t slots = causal && S == 1 ? 1 : S + 1;  // one causal segment starts from empty tables
  const ops::Options f32 = ops::options(src).dtype(dtype::f32);
  Tensor tab = ops::zeros({G, slots, N, d.D}, f32);
  std::optional<Tensor> cnt;
  if (fwd) cnt = ops::zeros({G, slots, N}, f32.dtype(dtype::i32));
  ScanParams a{};
  a.tdig = digits_of(fwd ? qd : kd, op, fwd ? "q_digits" : "k_digits");
  a.sdig = digits_of(fwd ? kd : qd, op, fwd ? "k_digits" : "q_digits");
  a.val = src.const_data_ptr();
  a.slse = slse;
  a.keep = keep.has_value() ? static_cast<const bool*>(keep->const_data_ptr()) : nullptr;
  a.tab = tab.mutable_data_ptr<float>();
  a.cnt = fwd ? cnt->mutable_data_ptr<int>() : nullptr;
  a.out = out.mutable_data_ptr();
  a.lse = out_lse;
  a.HT = int(fwd ? d.H : d.Hkv), a.NT = int(fwd ? R : 1), a.TT = int(fwd ? d.Tq : d.Tk);
  a.tgt_off = int(fwd ? d.Tk - d.Tq : 0);
  a.HS = int(fwd ? d.Hkv : d.H), a.NS = int(fwd ? 1 : R), a.TS = int(fwd ? d.Tk : d.Tq);
  a.src_off = int(fwd || !causal ? 0 : d.Tk - d.Tq);
  a.Tk = int(d.Tk), a.Hkv = int(d.Hkv), a.N = int(N), a.D = int(d.D), a.slots = int(slots), a.cps = int(cps);
  a.nchunks = int(nchunks), a.C = int(C);
  a.rw = read_weights(alpha, d.K, p);
  const cudaStream_t stream = current_stream(src);
  const dim3 grid{unsigned(G), unsigned(S)};
  if (slots > 1) {
    if (fwd) ultrametric_summary_kernel<VT, true><<<grid, kScanThreads, 0, stream>>>(a);
    else ultrametric_summary_kernel<VT, false><<<grid, kScanThreads, 0, stream>>>(a);
    GK_LAUNCH_CHECK();
    const int64_t width = N * d.D, total = G * width;
    if (total) {
      ultrametric_prefix_kernel<float><<<blocks_for(total, kPrefixThreads, op), kPrefixThreads, 0, stream>>>(
          a.tab, int(S), width, total, !fwd);
      GK_LAUNCH_CHECK();
    }
    if (fwd) {
      ultrametric_prefix_kernel<int><<<blocks_for(G * N, kPrefixThreads, op), kPrefixThreads, 0, stream>>>(
          a.cnt, int(S), N, G * N, false);
      GK_LAUNCH_CHECK();
    }
  }
  const bool vec = d.D % 4 == 0;  // the tables are fresh allocations: 16-byte aligned rows then
  auto launch = [&](auto vec_c, auto fwd_c) {
    constexpr int V = decltype(vec_c)::value;
    constexpr bool F = decltype(fwd_c)::value;
    if (causal) {
      ultrametric_scan_kernel<VT, V, F><<<grid, kScanThreads, 0, stream>>>(a);
    } else {
      const int64_t rows = d.B * a.HT * a.TT;
      ultrametric_read_kernel<VT, V, F><<<blocks_for(rows, kReadWarps, op), kReadThreads, 0, stream>>>(a, rows);
    }
    GK_LAUNCH_CHECK();
  };
  using V1 = std::integral_constant<int, 1>;
  using V4 = std::integral_constant<int, 4>;
  using T = std::true_type;
  using F = std::false_type;
  if (vec) fwd ? launch(V4{}, T{}) : launch(V4{}, F{});
  else fwd ? launch(V1{}, T{}) : launch(V1{}, F{});
}

std::tuple<Tensor, Tensor> ultrametric_attention_cuda(const Tensor& q_digits, const Tensor& k_digits,
                                                      const Tensor& v, const std::optional<Tensor>& keep,
                                                      double alpha, int64_t p, bool causal, int64_t chunk,
                                                      int64_t num_segments) {
  const char* op = "ultrametric_attention_cuda";
  const Dims d = check(op, q_digits, k_digits, v, "v", keep, alpha, p, causal, chunk, num_segments);
  GK_CHECK(v.dim() == 4 && v.is_contiguous() && v.size(0) == d.B && v.size(1) == d.Hkv && v.size(2) == d.Tk, op,
           ": v must be contiguous [", d.B, ", ", d.Hkv, ", ", d.Tk, ", D], got ", v.sizes());
  const ops::Options o = ops::options(v);
  Tensor y = ops::empty({d.B, d.H, d.Tq, d.D}, o);
  Tensor lse = ops::empty({d.B, d.H, d.Tq}, o.dtype(dtype::f32));
  dispatch_kernel_dtype(v.scalar_type(), op, [&](auto vt) {  // refused whatever the size
    if (d.B * d.H * d.Tq == 0) return;
    const DeviceGuard guard(v.get_device_index());
    if (d.Tk == 0) {  // no key: y 0, lse -inf (the op layer takes this to the reference)
      ops::zero_(y);
      ops::fill_(lse, -INFINITY);
      return;
    }
    run<decltype(vt)>(true, op, d, q_digits, k_digits, v, nullptr, keep, y, lse.mutable_data_ptr<float>(), alpha, p,
                      causal, chunk, num_segments);
  });
  return {y, lse};
}

Tensor ultrametric_attention_backward_cuda(const Tensor& grad, const Tensor& q_digits, const Tensor& k_digits,
                                           const Tensor& lse, const std::optional<Tensor>& keep, double alpha,
                                           int64_t p, bool causal, int64_t chunk, int64_t num_segments) {
  const char* op = "ultrametric_attention_backward_cuda";
  const Dims d = check(op, q_digits, k_digits, grad, "grad", keep, alpha, p, causal, chunk, num_segments);
  GK_CHECK(grad.dim() == 4 && grad.is_contiguous() && grad.size(0) == d.B && grad.size(1) == d.H &&
               grad.size(2) == d.Tq,
           op, ": grad must be contiguous [", d.B, ", ", d.H, ", ", d.Tq, ", D], got ", grad.sizes());
  GK_CHECK(lse.device() == grad.device() && lse.scalar_type() == dtype::f32 && lse.is_contiguous() &&
               lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.H && lse.size(2) == d.Tq,
           op, ": lse must be contiguous float32 [", d.B, ", ", d.H, ", ", d.Tq, "], got ", lse.scalar_type(), " ",
           lse.sizes());
  Tensor dv = ops::empty({d.B, d.Hkv, d.Tk, d.D}, ops::options(grad));
  dispatch_kernel_dtype(grad.scalar_type(), op, [&](auto vt) {  // refused whatever the size
    if (d.B * d.Hkv * d.Tk == 0) return;
    const DeviceGuard guard(grad.get_device_index());
    if (d.H * d.Tq == 0) {  // no query: no gradient
      ops::zero_(dv);
      return;
    }
    run<decltype(vt)>(false, op, d, q_digits, k_digits, grad, lse.const_data_ptr<float>(), keep, dv, nullptr, alpha,
                      p, causal, chunk, num_segments);
  });
  return dv;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(geokern, CUDA, m) {
  m.impl("ultrametric_attention_cuda", TORCH_BOX(&ultrametric_attention_cuda));
  m.impl("ultrametric_attention_backward_cuda", TORCH_BOX(&ultrametric_attention_backward_cuda));
}

}  // namespace geokern
