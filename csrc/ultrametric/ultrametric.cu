// The ultrametric decode state (UltrametricCache; definition: geokern/reference/ultrametric.py,
// read_codes / read_buckets / _finish): dense bucket tables tab [G, N, D] float32 and cnt [G, N]
// int32, G = B * Hkv groups, one row per prefix code (breadth-first trie id, N = sum_{l<=K} p^l
// <= 2^16, so K <= 15). Append adds each kept key's v to its K + 1 prefix rows (float32 atomics:
// keys of one launch may share a row); query reads a query's rows with the weights of
// read_codes and writes y = num / max(den, 1e-9) and lse. Both are sized for decode: one warp
// per key or query, no allocation, no host synchronisation (capturable in a CUDA graph). Design
// and bytes per step: README.md beside this file; the Triton twins are kernels/ultrametric/scan.py
// (_add_rows, _read_rows, _store_rows), whose arithmetic order this follows.

#include <utility>

#include "tables.cuh"

namespace geokern {
namespace {

using namespace ultra;

constexpr int kThreads = 128, kWarps = kThreads / 32;

struct AppendParams {
  Digits dig;        // [B, Hkv, T, K], contiguous
  const void* v;     // [B, Hkv, T, D] contiguous
  const bool* keep;  // [B, T] or null
  float* tab;        // [G, N, D]
  int* cnt;          // [G, N]
  int64_t keys;      // G * T
  int T, Hkv, K, p, N, D;
};

// One warp per key (group g, position t); lanes stride over D, so the atomics of a level are
// one coalesced RED per 32 channels. A padded key adds nothing, whatever its v; a kept key with a
// digit outside [0, p - 1] adds NaN (v / NaN) to its clamped digits' buckets.
template <typename VT>
__global__ void __launch_bounds__(kThreads) ultrametric_cache_append_kernel(const AppendParams a) {
  const int64_t key = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (key >= a.keys) return;  // warp-uniform: the shuffles below see every lane of the warp
  const int64_t g = key / a.T, t = key % a.T;
  if (a.keep && !a.keep[(g / a.Hkv) * a.T + t]) return;
  int code, digit;
  prefix_code(a.dig, key, a.K, a.p, code, digit);
  const float div = bad_digits(a.dig, key, a.K, a.p) ? NAN : 1.f;
  add_row(a.tab + g * a.N * a.D, a.cnt + g * a.N, code, a.K, a.D, static_cast<const VT*>(a.v) + key * a.D, div);
}

struct QueryParams {
  Digits dig;       // [B, H, Tq, K], contiguous
  const float* tab;
  const int* cnt;
  float* y;         // [B, H, Tq, D]
  float* lse;       // [B, H, Tq]
  int64_t queries;  // B * H * Tq
  int H, R, Tq, Hkv, N, D;
  ReadWeights rw;
};

// One warp per query (b, h, t), reading its group b * Hkv + h / R: den through read_den, then
// lanes own VEC consecutive channels (float4 loads and stores where D % 4 == 0 and the buffers
// are 16-byte aligned) and sum the rows through read_acc. A query with a digit outside [0, p - 1]
// gets y and lse NaN (fmaxf would drop a NaN den, so the divisor is set NaN itself).
template <int VEC>
__global__ void __launch_bounds__(kThreads) ultrametric_cache_query_kernel(const QueryParams q) {
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= q.queries) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const int64_t bh = i / q.Tq, b = bh / q.H, h = bh % q.H;
  const int64_t g = b * q.Hkv + h / q.R;
  const float* tab = q.tab + g * q.N * q.D;
  const int* cnt = q.cnt + g * q.N;
  int code, digit;
  prefix_code(q.dig, i, q.rw.K, q.rw.p, code, digit);
  const bool bad = bad_digits(q.dig, i, q.rw.K, q.rw.p);
  const float den = read_den(q.rw, cnt, code, digit);
  const float clamped = bad ? NAN : fmaxf(den, 1e-9f);
  if (lane == 0) q.lse[i] = bad ? NAN : cnt[0] > 0 ? logf(den) : -INFINITY;  // the root counts every key
  float* y = q.y + i * q.D;
  for (int c0 = 0; c0 < q.D; c0 += 32 * VEC) {  // warp-uniform bounds: the shuffles need every lane
    const int c = c0 + lane * VEC;
    float acc[VEC] = {};
    read_acc<VEC>(q.rw, tab, q.D, c, code, digit, acc);
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
  const Digits dig = digits_of(k_digits, op, "k_digits");  // refused whatever the size
  AppendParams a{dig, v.const_data_ptr(),
                 keep.has_value() ? static_cast<const bool*>(keep->const_data_ptr()) : nullptr, tab.mutable_data_ptr<float>(),
                 cnt.mutable_data_ptr<int>(), keys, int(T), int(Hkv), int(k_digits.size(3)), int(p),
                 int(tab.size(1)), int(D)};
  // checked before the early return, so a refused dtype is refused whatever the size
  dispatch_kernel_dtype(v.scalar_type(), op, [&](auto vt) {
    if (keys == 0) return;
    const DeviceGuard guard(tab.get_device_index());
    ultrametric_cache_append_kernel<decltype(vt)><<<blocks_for(keys, kWarps, op), kThreads, 0, current_stream(tab)>>>(a);
    GK_LAUNCH_CHECK();
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
  const Digits dig = digits_of(q_digits, op, "q_digits");  // refused whatever the size
  QueryParams q{dig, tab.const_data_ptr<float>(), cnt.const_data_ptr<int>(), y.mutable_data_ptr<float>(),
                lse.mutable_data_ptr<float>(), queries, int(H), int(H / Hkv), int(Tq), int(Hkv), int(tab.size(1)),
                int(D), read_weights(alpha, q_digits.size(3), p)};
  if (queries == 0) return;
  const bool vec = D % 4 == 0 && aligned16(q.tab) && aligned16(q.y);
  const DeviceGuard guard(tab.get_device_index());
  const int blocks = blocks_for(queries, kWarps, op);
  if (vec) ultrametric_cache_query_kernel<4><<<blocks, kThreads, 0, current_stream(tab)>>>(q);
  else ultrametric_cache_query_kernel<1><<<blocks, kThreads, 0, current_stream(tab)>>>(q);
  GK_LAUNCH_CHECK();
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(geokern, CUDA, m) {
  m.impl("ultrametric_cache_append_cuda", TORCH_BOX(&ultrametric_cache_append_cuda));
  m.impl("ultrametric_cache_query_cuda", TORCH_BOX(&ultrametric_cache_query_cuda));
}

}  // namespace geokern
