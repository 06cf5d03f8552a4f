// Shared helpers for geokern's CUDA kernels: elementwise layouts with broadcasting,
// launch sizing, dtype dispatch. The torch surface they use is stable.cuh's.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "stable.cuh"

namespace geokern {

// Up to kMaxDims leading dims after coalescing; per-operand strides in elements,
// zero where the operand is broadcast. `comp` is the stride of the last (component) dim.
constexpr int kMaxDims = 4;

struct RowLayout {
  int ndim;
  int64_t size[kMaxDims];
  int64_t stride[3][kMaxDims];  // [operand][dim]
  int64_t comp[3];

  __device__ __forceinline__ void offsets(int64_t row, int64_t* off) const {
    off[0] = off[1] = off[2] = 0;
#pragma unroll
    for (int d = kMaxDims - 1; d >= 0; --d) {
      if (d < ndim) {
        int64_t i = row % size[d];
        row /= size[d];
        off[0] += i * stride[0][d];
        off[1] += i * stride[1][d];
        off[2] += i * stride[2][d];
      }
    }
  }
};

// The broadcast shape of the leading dims of a and b: all but their last `trailing`
// (1 for rows of components, 2 for matrices).
inline std::vector<int64_t> broadcast_leading(const char* op, const Tensor& a, const Tensor& b,
                                              int64_t trailing = 1) {
  const int64_t na = a.dim() - trailing, nb = b.dim() - trailing, n = std::max(na, nb);
  std::vector<int64_t> shape(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ia = i - (n - na), ib = i - (n - nb);
    const int64_t sa = ia >= 0 ? a.size(ia) : 1, sb = ib >= 0 ? b.size(ib) : 1;
    GK_CHECK(sa == sb || sa == 1 || sb == 1, op, ": leading dims of a ", fmt(a.sizes()),
                " and b ", fmt(b.sizes()), " do not broadcast (dim ", fmt(i), ": ", fmt(sa), " vs ",
                fmt(sb), ")");
    shape[i] = sa == 1 ? sb : sa;
  }
  return shape;
}

// Strides of t's leading dims (all but its last `trailing`) viewed as `shape`, zero on
// broadcast dims.
inline std::vector<int64_t> broadcast_strides(const Tensor& t, const std::vector<int64_t>& shape,
                                              int64_t trailing = 1) {
  const int64_t n = shape.size(), nt = t.dim() - trailing;
  std::vector<int64_t> st(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t it = i - (n - nt);
    if (it >= 0 && t.size(it) != 1) st[i] = t.stride(it);
  }
  return st;
}

// Merges adjacent leading dims where every operand is linear across them. Returns false
// when more than kMaxDims remain (the caller then makes the operands contiguous).
inline bool make_row_layout(const std::vector<int64_t>& shape,
                            const std::vector<std::vector<int64_t>>& strides,
                            const int64_t* comp, RowLayout* L) {
  std::vector<int64_t> sz;
  std::vector<std::vector<int64_t>> st(strides.size());
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    bool merge = !sz.empty();
    for (size_t o = 0; merge && o < strides.size(); ++o)
      merge = st[o].back() == strides[o][d] * shape[d];
    if (merge) {
      sz.back() *= shape[d];
      for (size_t o = 0; o < strides.size(); ++o) st[o].back() = strides[o][d];
    } else {
      sz.push_back(shape[d]);
      for (size_t o = 0; o < strides.size(); ++o) st[o].push_back(strides[o][d]);
    }
  }
  if (sz.size() > static_cast<size_t>(kMaxDims)) return false;
  L->ndim = static_cast<int>(sz.size());
  for (int d = 0; d < kMaxDims; ++d) {
    L->size[d] = d < L->ndim ? sz[d] : 1;
    for (size_t o = 0; o < 3; ++o)
      L->stride[o][d] = (d < L->ndim && o < strides.size()) ? st[o][d] : 0;
  }
  for (size_t o = 0; o < 3; ++o) L->comp[o] = o < strides.size() ? comp[o] : 0;
  return true;
}

// Streaming multiprocessors of the current device.
inline int num_sms() {
  int dev = 0, sms = 0;
  GK_CUDA_CHECK(cudaGetDevice(&dev));
  GK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

inline int grid_for(int64_t work, int threads) {
  const int64_t want = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(num_sms()) * 32)));
}

// Strides of a 4-D tensor with zero on its size-1 dims (broadcast reads, never expanded),
// passed to kernels by value.
struct Strides4 {
  int64_t s[4];
};

inline Strides4 broadcast_strides4(const Tensor& t) {
  Strides4 r;
  for (int d = 0; d < 4; ++d) r.s[d] = t.size(d) == 1 ? 0 : t.stride(d);
  return r;
}

// Calls f(T{}) with T the kernel element type of st: float, Half or BFloat16.
// Any other dtype is refused with op's name.
template <typename F>
void dispatch_kernel_dtype(ScalarType st, const char* op, F&& f) {
  switch (st) {
    case dtype::f32: f(float{}); break;
    case dtype::f16: f(Half{}); break;
    case dtype::bf16: f(BFloat16{}); break;
    default: GK_CHECK(false, op, ": dtype must be float32, float16 or bfloat16, got ", st);
  }
}

// As dispatch_kernel_dtype, float64 too.
template <typename F>
void dispatch_float_dtype(ScalarType st, const char* op, F&& f) {
  if (st == dtype::f64) f(double{});
  else dispatch_kernel_dtype(st, op, f);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace geokern
