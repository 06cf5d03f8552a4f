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
constexpr int kMaxLevels = 16;  // K + 1 <= 16: the Python side refuses N > 2^16 codes
constexpr unsigned kFull = 0xffffffffu;

// The warp's K + 1 prefix codes of one digit row (every lane gets all of them) and its digits
// (d[l - 1] is digit l). Digits are clamped to [0, p - 1]: the ops check their range, except
// under CUDA-graph capture (a host read would synchronise), where the clamp keeps every table
// access in bounds.
template <typename DT>
__device__ __forceinline__ void prefix_codes(const DT* dig, int K, int p, int (&code)[kMaxLevels],
                                             int (&d)[kMaxLevels]) {
  const int lane = threadIdx.x % 32;
  int mine = 0;
  if (lane < K) mine = int(min(max(static_cast<long long>(dig[lane]), 0LL), static_cast<long long>(p - 1)));
  int val = 0, base = 0, pw = 1;
  code[0] = 0;
#pragma unroll
  for (int l = 1; l < kMaxLevels; ++l) {
    d[l - 1] = __shfl_sync(kFull, mine, l - 1);
    if (l <= K) {
      base += pw;
      pw *= p;
      val = val * p + d[l - 1];
    }
    code[l] = base + val;
  }
}

struct AppendParams {
  const void* dig;      // [B, Hkv, T, K] integer, contiguous
  const void* v;        // [B, Hkv, T, D] contiguous
  const bool* keep;     // [B, T] or null
  float* tab;           // [G, N, D]
  int* cnt;             // [G, N]
  int64_t keys;         // G * T
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
  int code[kMaxLevels], d[kMaxLevels];
  prefix_codes(static_cast<const DT*>(a.dig) + key * a.K, a.K, a.p, code, d);
  float* tab = a.tab + g * a.N * a.D;
  int* cnt = a.cnt + g * a.N;
#pragma unroll
  for (int l = 0; l < kMaxLevels; ++l)
    if (l <= a.K && l == lane) atomicAdd(cnt + code[l], 1);
  const VT* v = static_cast<const VT*>(a.v) + key * a.D;
  for (int c = lane; c < a.D; c += 32) {
    const float x = static_cast<float>(v[c]);
#pragma unroll
    for (int l = 0; l < kMaxLevels; ++l)
      if (l <= a.K) atomicAdd(tab + int64_t(code[l]) * a.D + c, x);
  }
}

struct QueryParams {
  const void* dig;  // [B, H, Tq, K] integer, contiguous
  const float* tab;
  const int* cnt;
  float* y;    // [B, H, Tq, D]
  float* lse;  // [B, H, Tq]
  int64_t queries;  // B * H * Tq
  int H, R, Tq, Hkv, K, p, N, D;
  float log2a, am1;  // log2 alpha and alpha - 1, as the Triton kernels take them
  bool excl;         // alpha <= 1: the disjoint sibling buckets
};

template <int VEC>
struct Vec {
  float x[VEC];
};

template <int VEC>
__device__ __forceinline__ void axpy(Vec<VEC>& acc, float w, const float* row) {
  if constexpr (VEC == 4) {
    const float4 f = *reinterpret_cast<const float4*>(row);
    acc.x[0] += w * f.x;
    acc.x[1] += w * f.y;
    acc.x[2] += w * f.z;
    acc.x[3] += w * f.w;
  } else {
    acc.x[0] += w * row[0];
  }
}

// sum_m w_m * table[row_m] over the rows read_codes gives (every w_m >= 0), into acc (the VEC
// channels at c) or, with COUNT, the same sum over the counts; in the Triton read's order.
// alpha > 1: the K + 1 prefix rows, w_0 = 1, w_l = alpha^(l-1) (alpha - 1). alpha <= 1: the
// p - 1 siblings of the level-l row with alpha^(l-1), l = 1..K, then the level-K row with alpha^K.
template <int VEC, bool COUNT>
__device__ __forceinline__ void read_rows(const QueryParams& q, const float* tab, const int* cnt,
                                          const int (&code)[kMaxLevels], const int (&d)[kMaxLevels], int c,
                                          Vec<VEC>& acc, float& den) {
  auto add = [&](float w, int row) {
    if constexpr (COUNT) den += w * float(cnt[row]);
    else axpy<VEC>(acc, w, tab + int64_t(row) * q.D + c);
  };
  if (!q.excl) {
    if constexpr (COUNT) den = float(cnt[0]);
    else axpy<VEC>(acc, 1.f, tab + c);  // the root holds every key
  }
#pragma unroll
  for (int l = 1; l < kMaxLevels; ++l) {
    if (l > q.K) break;
    if (q.excl) {
      const float w = exp2f(float(l - 1) * q.log2a);
      const int first = code[l] - d[l - 1];  // the level-l sibling of digit 0
      for (int s = 0; s < q.p; ++s)
        if (s != d[l - 1]) add(w, first + s);
    } else {
      add(q.am1 * exp2f(float(l - 1) * q.log2a), code[l]);
    }
  }
  if (q.excl) {
#pragma unroll
    for (int l = 1; l < kMaxLevels; ++l)
      if (l == q.K) add(exp2f(float(q.K) * q.log2a), code[l]);  // keys equal in every digit
  }
}

// One warp per query (b, h, t), reading its group b * Hkv + h / R; lanes own VEC consecutive
// channels (float4 loads and stores where D % 4 == 0 and the buffers are 16-byte aligned).
template <typename DT, int VEC>
__global__ void __launch_bounds__(kThreads) ultrametric_cache_query_kernel(const QueryParams q) {
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= q.queries) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const int64_t bh = i / q.Tq, b = bh / q.H, h = bh % q.H;
  const int64_t g = b * q.Hkv + h / q.R;
  const float* tab = q.tab + g * q.N * q.D;
  const int* cnt = q.cnt + g * q.N;
  int code[kMaxLevels], d[kMaxLevels];
  prefix_codes(static_cast<const DT*>(q.dig) + i * q.K, q.K, q.p, code, d);
  Vec<VEC> none;
  float den = 0.f;
  read_rows<VEC, true>(q, tab, cnt, code, d, 0, none, den);
  const float clamped = fmaxf(den, 1e-9f);
  if (lane == 0) q.lse[i] = cnt[0] > 0 ? logf(den) : -INFINITY;  // the root counts every key
  float* y = q.y + i * q.D;
  for (int c = lane * VEC; c < q.D; c += 32 * VEC) {
    Vec<VEC> acc;
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc.x[j] = 0.f;
    float unused = 0.f;
    read_rows<VEC, false>(q, tab, cnt, code, d, c, acc, unused);
    // a division, as the Triton store and the reference (not a product with 1 / den)
    if constexpr (VEC == 4)
      *reinterpret_cast<float4*>(y + c) =
          make_float4(acc.x[0] / clamped, acc.x[1] / clamped, acc.x[2] / clamped, acc.x[3] / clamped);
    else
      y[c] = acc.x[0] / clamped;
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

int64_t num_codes(int64_t p, int64_t K) {
  int64_t n = 0, pw = 1;
  for (int64_t l = 0; l <= K && n <= (int64_t(1) << 16); ++l, pw *= p) n += pw;
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
  GK_CHECK(p >= 2 && K < kMaxLevels, op, ": p must be >= 2 and K <= ", kMaxLevels - 1, ", got p ", p, ", K ", K);
  const int64_t N = num_codes(p, K);
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
