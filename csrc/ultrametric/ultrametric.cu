// The ultrametric decode state (UltrametricCache; definition: geokern/reference/ultrametric.py,
// read_codes / read_buckets / _finish): dense bucket tables tab [G, N, D] float32 and cnt [G, N]
// int32, G = B * Hkv groups, one row per prefix code (breadth-first trie id, N = sum_{l<=K} p^l
// <= 2^16, so K <= 15). Append adds each kept key's v to its K + 1 prefix rows (float32 atomics:
// keys of one launch may share a row); query reads a query's rows with the weights of
// read_codes and writes y = num / max(den, 1e-9) and lse. Both are sized for decode: one warp
// per key or query, no allocation, no host synchronisation (capturable in a CUDA graph). Design
// and bytes per step: README.md beside this file; the Triton twins are kernels/ultrametric/scan.py
// (_add_rows, _read_rows, _store_rows), whose arithmetic order this follows.

#include <cmath>
#include <utility>

#include "common.cuh"

namespace geokern {
namespace {

constexpr int kThreads = 128, kWarps = kThreads / 32;
constexpr int kMaxK = 15;  // N = sum_{l<=K} p^l <= 2^16 (the Python side refuses more): K + 1 <= 16 lanes
constexpr unsigned kFull = 0xffffffffu;

// One digit row's prefix codes, spread over the warp: lane l <= K gets the code of level l and
// digit l (the level's own digit; lane 0: the root, code 0). Lanes past K keep the deepest
// code. Digits are clamped to [0, p - 1]: the ops check their range, except under CUDA-graph
// capture (a host read would synchronise), where the clamp keeps every table access in bounds.
template <typename DT>
__device__ __forceinline__ void prefix_code(const DT* dig, int K, int p, int& code, int& digit) {
  const int lane = threadIdx.x % 32;
  int mine = 0;
  if (lane < K) mine = int(min(max(static_cast<long long>(dig[lane]), 0LL), static_cast<long long>(p - 1)));
  int val = 0, base = 0, pw = 1;
  code = 0;
  digit = 0;
  for (int l = 1; l <= K; ++l) {
    const int d = __shfl_sync(kFull, mine, l - 1);
    base += pw;
    pw *= p;
    val = val * p + d;
    if (lane >= l) {
      code = base + val;
      digit = d;
    }
  }
}

struct AppendParams {
  const void* dig;   // [B, Hkv, T, K] integer, contiguous
  const void* v;     // [B, Hkv, T, D] contiguous
  const bool* keep;  // [B, T] or null
  float* tab;        // [G, N, D]
  int* cnt;          // [G, N]
  int64_t keys;      // G * T
  int T, Hkv, K, p, N, D;
};

// One warp per key (group g, position t); lanes stride over D, so the atomics of a level are
// one coalesced RED per 32 channels. A padded key adds nothing, whatever its v.
template <typename DT, typename VT>
__global__ void __launch_bounds__(kThreads) ultrametric_cache_append_kernel(const AppendParams a) {
  const int64_t key = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (key >= a.keys) return;  // warp-uniform: the shuffles below see every lane of the warp
  const int lane = threadIdx.x % 32;
  const int64_t g = key / a.T, t = key % a.T;
  if (a.keep && !a.keep[(g / a.Hkv) * a.T + t]) return;
  int code, digit;
  prefix_code(static_cast<const DT*>(a.dig) + key * a.K, a.K, a.p, code, digit);
  float* tab = a.tab + g * a.N * a.D;
  if (lane <= a.K) atomicAdd(a.cnt + g * a.N + code, 1);
  const VT* v = static_cast<const VT*>(a.v) + key * a.D;
  for (int c0 = 0; c0 < a.D; c0 += 32) {  // warp-uniform bounds: the shuffles need every lane
    const int c = c0 + lane;
    const float x = c < a.D ? static_cast<float>(v[c]) : 0.f;
    for (int l = 0; l <= a.K; ++l) {
      const int row = __shfl_sync(kFull, code, l);
      if (c < a.D) atomicAdd(tab + int64_t(row) * a.D + c, x);
    }
  }
}

struct QueryParams {
  const void* dig;  // [B, H, Tq, K] integer, contiguous
  const float* tab;
  const int* cnt;
  float* y;         // [B, H, Tq, D]
  float* lse;       // [B, H, Tq]
  int64_t queries;  // B * H * Tq
  int H, R, Tq, Hkv, K, p, N, D;
  float log2a, am1;  // log2 alpha and alpha - 1, as the Triton kernels take them
  bool excl;         // alpha <= 1: the disjoint sibling buckets
};

// Read m of a query (reference.ultrametric.read_codes: every weight >= 0, nothing cancels), for
// m < reads(q); the warp's codes are spread as prefix_code leaves them, and every lane must call
// this (it shuffles). alpha > 1: the K + 1 prefix rows, w_0 = 1, w_l = alpha^(l-1) (alpha - 1).
// alpha <= 1: for l = 1..K the p - 1 siblings of the level-l row with alpha^(l-1), then the
// level-K row with alpha^K. The order is the Triton read's (_read_rows), so are the sums.
__device__ __forceinline__ void read_pair(const QueryParams& q, int m, int code, int digit, int& row, float& w) {
  if (!q.excl) {
    row = __shfl_sync(kFull, code, min(m, q.K));
    w = m == 0 ? 1.f : q.am1 * exp2f(float(m - 1) * q.log2a);
    return;
  }
  const int l = min(m / (q.p - 1), q.K - 1) + 1;  // past the siblings: the level-K row
  const int cl = __shfl_sync(kFull, code, l), dl = __shfl_sync(kFull, digit, l);
  if (m >= (q.p - 1) * q.K) {
    row = cl;
    w = exp2f(float(q.K) * q.log2a);
  } else {
    const int j = m % (q.p - 1);  // the j-th digit other than dl
    row = cl - dl + (j < dl ? j : j + 1);
    w = exp2f(float(l - 1) * q.log2a);
  }
}

__device__ __forceinline__ int reads(const QueryParams& q) { return q.excl ? (q.p - 1) * q.K + 1 : q.K + 1; }

template <int VEC>
__device__ __forceinline__ void axpy(float (&acc)[VEC], float w, const float* row) {
  if constexpr (VEC == 4) {
    const float4 f = *reinterpret_cast<const float4*>(row);
    acc[0] += w * f.x;
    acc[1] += w * f.y;
    acc[2] += w * f.z;
    acc[3] += w * f.w;
  } else {
    acc[0] += w * row[0];
  }
}

// One warp per query (b, h, t), reading its group b * Hkv + h / R. Reads go 32 at a time: lane
// i forms read m0 + i (row and weight) and its count; the sums then take them in order through
// shuffles, lanes owning VEC consecutive channels (float4 loads and stores where D % 4 == 0 and
// the buffers are 16-byte aligned), so the rows' loads are independent and all in flight.
template <typename DT, int VEC>
__global__ void __launch_bounds__(kThreads) ultrametric_cache_query_kernel(const QueryParams q) {
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= q.queries) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const int64_t bh = i / q.Tq, b = bh / q.H, h = bh % q.H;
  const int64_t g = b * q.Hkv + h / q.R;
  const float* tab = q.tab + g * q.N * q.D;
  const int* cnt = q.cnt + g * q.N;
  int code, digit;
  prefix_code(static_cast<const DT*>(q.dig) + i * q.K, q.K, q.p, code, digit);
  const int M = reads(q);
  float den = 0.f;
  for (int m0 = 0; m0 < M; m0 += 32) {
    int row;
    float w;
    read_pair(q, m0 + lane, code, digit, row, w);
    const float c = m0 + lane < M ? float(cnt[row]) : 0.f;
    for (int j = 0; j < min(32, M - m0); ++j) den += __shfl_sync(kFull, w, j) * __shfl_sync(kFull, c, j);
  }
  const float clamped = fmaxf(den, 1e-9f);
  if (lane == 0) q.lse[i] = cnt[0] > 0 ? logf(den) : -INFINITY;  // the root counts every key
  float* y = q.y + i * q.D;
  for (int c0 = 0; c0 < q.D; c0 += 32 * VEC) {  // warp-uniform bounds: the shuffles need every lane
    const int c = c0 + lane * VEC;
    float acc[VEC] = {};
    for (int m0 = 0; m0 < M; m0 += 32) {
      int row;
      float w;
      read_pair(q, m0 + lane, code, digit, row, w);
#pragma unroll 8
      for (int j = 0; j < min(32, M - m0); ++j) {
        const int r = __shfl_sync(kFull, row, j);
        const float wj = __shfl_sync(kFull, w, j);
        if (c < q.D) axpy<VEC>(acc, wj, tab + int64_t(r) * q.D + c);
      }
    }
    if (c < q.D) {
      // a division, as the Triton store and the reference (not a product with 1 / den)
      if constexpr (VEC == 4)
        *reinterpret_cast<float4*>(y + c) = make_float4(acc[0] / clamped, acc[1] / clamped, acc[2] / clamped,
                                                        acc[3] / clamped);
      else
        y[c] = acc[0] / clamped;
    }
  }
}

// Calls f(DT{}) with DT the digits' element type (any integer dtype, as the ops accept).
template <typename F>
void dispatch_digits(ScalarType st, const char* op, const char* name, F&& f) {
  switch (st) {
    case dtype::u8: f(uint8_t{}); break;
    case ScalarType::Char: f(int8_t{}); break;
    case dtype::i16: f(int16_t{}); break;
    case dtype::i32: f(int32_t{}); break;
    case dtype::i64: f(int64_t{}); break;
    default: GK_CHECK(false, op, ": ", name, " must have an integer dtype, got ", st);
  }
}

constexpr int64_t kMaxCodes = int64_t(1) << 16;

// sum_{l<=K} p^l, or kMaxCodes + 1 once past kMaxCodes (p <= kMaxCodes: no product overflows)
int64_t num_codes(int64_t p, int64_t K) {
  int64_t n = 0, pw = 1;
  for (int64_t l = 0; l <= K; ++l, pw *= p) {
    n += pw;
    if (n > kMaxCodes) return kMaxCodes + 1;
  }
  return n;
}

// The shared checks: tables on one CUDA device, contiguous, of the shapes p and the digits give;
// the digits [B, heads, T, K] contiguous with heads a multiple of Hkv. Returns Hkv.
int64_t check_tables(const char* op, const Tensor& tab, const Tensor& cnt, const Tensor& dig, const char* dname,
                     int64_t p) {
  GK_CHECK(tab.device().type() == torch::headeronly::DeviceType::CUDA, op, ": tab must be a CUDA tensor, got ",
           tab.device());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"cnt", &cnt}, {dname, &dig}})
    GK_CHECK(t->device() == tab.device(), op, ": ", name, " is on ", t->device(), " but tab is on ", tab.device());
  GK_CHECK(dig.dim() == 4 && dig.is_contiguous() && dig.size(3) >= 1, op, ": ", dname,
           " must be contiguous [B, heads, T, K] with K >= 1, got ", dig.sizes());
  const int64_t K = dig.size(3);
  GK_CHECK(p >= 2 && p <= kMaxCodes && K <= kMaxK, op, ": p must be in [2, ", kMaxCodes, "] and K <= ", kMaxK,
           ", got p ", p, ", K ", K);
  const int64_t N = num_codes(p, K);
  GK_CHECK(N <= kMaxCodes, op, ": p = ", p, ", K = ", K, " need more than ", kMaxCodes, " codes (dense tables)");
  GK_CHECK(tab.scalar_type() == dtype::f32 && tab.dim() == 3 && tab.is_contiguous() && tab.size(1) == N, op,
           ": tab must be contiguous float32 [G, ", N, ", D] (N = sum p**l, l <= K), got ", tab.scalar_type(), " ",
           tab.sizes());
  GK_CHECK(cnt.scalar_type() == dtype::i32 && cnt.dim() == 2 && cnt.is_contiguous() && cnt.size(0) == tab.size(0) &&
               cnt.size(1) == N,
           op, ": cnt must be contiguous int32 [", tab.size(0), ", ", N, "], got ", cnt.scalar_type(), " ",
           cnt.sizes());
  const int64_t B = dig.size(0);
  GK_CHECK(B >= 1 && tab.size(0) % B == 0 && tab.size(0) >= B, op, ": tab's ", tab.size(0),
           " groups are no multiple of the batch ", B);
  const int64_t Hkv = tab.size(0) / B;
  GK_CHECK(dig.size(1) % Hkv == 0 && dig.size(1) >= Hkv, op, ": ", dname, " has ", dig.size(1),
           " heads, not a multiple of the ", Hkv, " key heads");
  return Hkv;
}

int blocks_for(int64_t warps, const char* op) {
  const int64_t n = (warps + kWarps - 1) / kWarps;
  GK_CHECK(n <= INT32_MAX, op, ": ", warps, " rows exceed one launch");
  return int(n);
}

void ultrametric_cache_append_cuda(Tensor tab, Tensor cnt, const Tensor& k_digits, const Tensor& v,
                                   const std::optional<Tensor>& keep, int64_t p) {
  const char* op = "ultrametric_cache_append_cuda";
  const int64_t Hkv = check_tables(op, tab, cnt, k_digits, "k_digits", p);
  const int64_t B = k_digits.size(0), T = k_digits.size(2), D = tab.size(2);
  GK_CHECK(k_digits.size(1) == Hkv, op, ": k_digits must have ", Hkv, " key heads, got ", k_digits.sizes());
  GK_CHECK(v.device() == tab.device() && v.is_contiguous() && v.dim() == 4 && v.size(0) == B && v.size(1) == Hkv &&
               v.size(2) == T && v.size(3) == D,
           op, ": v must be contiguous [", B, ", ", Hkv, ", ", T, ", ", D, "] on ", tab.device(), ", got ",
           v.sizes());
  if (keep.has_value())
    GK_CHECK(keep->device() == tab.device() && keep->scalar_type() == dtype::b8 && keep->is_contiguous() &&
                 keep->dim() == 2 && keep->size(0) == B && keep->size(1) == T,
             op, ": keep must be contiguous bool [", B, ", ", T, "], got ", keep->scalar_type(), " ", keep->sizes());
  const int64_t keys = B * Hkv * T;
  AppendParams a{k_digits.const_data_ptr(), v.const_data_ptr(),
                 keep.has_value() ? static_cast<const bool*>(keep->const_data_ptr()) : nullptr, tab.mutable_data_ptr<float>(),
                 cnt.mutable_data_ptr<int>(), keys, int(T), int(Hkv), int(k_digits.size(3)), int(p),
                 int(tab.size(1)), int(D)};
  // checked before the early return, so a refused dtype is refused whatever the size
  dispatch_kernel_dtype(v.scalar_type(), op, [&](auto vt) {
    dispatch_digits(k_digits.scalar_type(), op, "k_digits", [&](auto dt) {
      if (keys == 0) return;
      const DeviceGuard guard(tab.get_device_index());
      ultrametric_cache_append_kernel<decltype(dt), decltype(vt)>
          <<<blocks_for(keys, op), kThreads, 0, current_stream(tab)>>>(a);
      GK_LAUNCH_CHECK();
    });
  });
}

void ultrametric_cache_query_cuda(const Tensor& tab, const Tensor& cnt, const Tensor& q_digits, Tensor y, Tensor lse,
                                  double alpha, int64_t p) {
  const char* op = "ultrametric_cache_query_cuda";
  const int64_t Hkv = check_tables(op, tab, cnt, q_digits, "q_digits", p);
  const int64_t B = q_digits.size(0), H = q_digits.size(1), Tq = q_digits.size(2), D = tab.size(2);
  GK_CHECK(alpha > 0 && alpha < INFINITY, op, ": alpha must be a finite number > 0, got ", alpha);
  GK_CHECK(y.device() == tab.device() && y.scalar_type() == dtype::f32 && y.is_contiguous() && y.dim() == 4 &&
               y.size(0) == B && y.size(1) == H && y.size(2) == Tq && y.size(3) == D,
           op, ": y must be contiguous float32 [", B, ", ", H, ", ", Tq, ", ", D, "], got ", y.scalar_type(), " ",
           y.sizes());
  GK_CHECK(lse.device() == tab.device() && lse.scalar_type() == dtype::f32 && lse.is_contiguous() &&
               lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Tq,
           op, ": lse must be contiguous float32 [", B, ", ", H, ", ", Tq, "], got ", lse.scalar_type(), " ",
           lse.sizes());
  const int64_t queries = B * H * Tq;
  QueryParams q{q_digits.const_data_ptr(), tab.const_data_ptr<float>(), cnt.const_data_ptr<int>(),
                y.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(), queries, int(H), int(H / Hkv), int(Tq),
                int(Hkv), int(q_digits.size(3)), int(p), int(tab.size(1)), int(D),
                float(std::log2(alpha)), float(alpha - 1.0), alpha <= 1.0};
  const bool vec = D % 4 == 0 && aligned16(q.tab) && aligned16(q.y);
  dispatch_digits(q_digits.scalar_type(), op, "q_digits", [&](auto dt) {
    if (queries == 0) return;
    const DeviceGuard guard(tab.get_device_index());
    const int blocks = blocks_for(queries, op);
    if (vec) ultrametric_cache_query_kernel<decltype(dt), 4><<<blocks, kThreads, 0, current_stream(tab)>>>(q);
    else ultrametric_cache_query_kernel<decltype(dt), 1><<<blocks, kThreads, 0, current_stream(tab)>>>(q);
    GK_LAUNCH_CHECK();
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(geokern, CUDA, m) {
  m.impl("ultrametric_cache_append_cuda", TORCH_BOX(&ultrametric_cache_append_cuda));
  m.impl("ultrametric_cache_query_cuda", TORCH_BOX(&ultrametric_cache_query_cuda));
}

}  // namespace geokern
