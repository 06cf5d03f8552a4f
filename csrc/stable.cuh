// The part of torch geokern's host code uses, all of it on the LibTorch stable ABI
// (torch/csrc/stable, torch/headeronly, the C shim): one _C serves every torch from
// TORCH_TARGET_VERSION on. Nothing here may include an ATen or c10 header that is not
// header-only; tests/test_ext.py checks the built library for undefined at:: / c10:: symbols.
#pragma once

#include <cuda_runtime.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace geokern {

using Tensor = torch::stable::Tensor;
using OptTensor = std::optional<torch::stable::Tensor>;
using ScalarType = torch::headeronly::ScalarType;
using IntRef = torch::headeronly::IntHeaderOnlyArrayRef;
using Half = c10::Half;
using BFloat16 = c10::BFloat16;

namespace dtype {
constexpr ScalarType f32 = ScalarType::Float, f64 = ScalarType::Double, f16 = ScalarType::Half,
                     bf16 = ScalarType::BFloat16, i16 = ScalarType::Short, i32 = ScalarType::Int,
                     i64 = ScalarType::Long, u8 = ScalarType::Byte, b8 = ScalarType::Bool;
}  // namespace dtype

inline bool is_float(ScalarType t) {
  return t == dtype::f32 || t == dtype::f64 || t == dtype::f16 || t == dtype::bf16;
}

// The type a kernel accumulates T in: float for 16-bit floats, T otherwise.
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<Half> {
  using type = float;
};
template <>
struct OpMath<BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

inline ScalarType opmath_of(ScalarType t) { return t == dtype::f16 || t == dtype::bf16 ? dtype::f32 : t; }

// Error messages, built without iostreams: an integer streamed into a message from our .so
// can run ostream::_M_insert<long> with a locale facet that is not its own (libc10 exports
// its own ostringstream) and crash the process; std::to_string does not touch locales.
// (torch's own STD_TORCH_CHECK streams __LINE__, hence GK_CHECK.)
namespace msg {
inline std::string str(const char* s) { return s; }
inline std::string str(const std::string& s) { return s; }
inline std::string str(char c) { return std::string(1, c); }
inline std::string str(bool b) { return b ? "true" : "false"; }
inline std::string str(int v) { return std::to_string(v); }
inline std::string str(long v) { return std::to_string(v); }
inline std::string str(long long v) { return std::to_string(v); }
inline std::string str(unsigned v) { return std::to_string(v); }
inline std::string str(unsigned long v) { return std::to_string(v); }
inline std::string str(double v) { return std::to_string(v); }
inline std::string str(ScalarType t) { return c10::toString(t); }
inline std::string str(IntRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}
inline std::string str(const std::vector<int64_t>& shape) { return str(IntRef(shape)); }
inline std::string str(const torch::stable::Device& d) {
  if (d.type() == torch::headeronly::DeviceType::CPU) return "cpu";
  std::string s = d.type() == torch::headeronly::DeviceType::CUDA ? "cuda" : "device";
  return d.has_index() ? s + ":" + std::to_string(d.index()) : s;
}
template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  ((s += str(a)), ...);
  return s;
}
}  // namespace msg

// fmt(x): a number or shape as text for a message (kept as a name the kernels' checks use)
template <typename T>
std::string fmt(const T& v) {
  return msg::str(v);
}

}  // namespace geokern

// A failed check throws std::runtime_error (a RuntimeError in Python) with the message alone.
#define GK_CHECK(cond, ...)                                             \
  do {                                                                  \
    if (!(cond)) throw std::runtime_error(::geokern::msg::cat(__VA_ARGS__)); \
  } while (0)
#define GK_CUDA_CHECK(expr) STD_CUDA_CHECK(expr)
#define GK_LAUNCH_CHECK() STD_CUDA_CHECK(cudaGetLastError())

namespace geokern {

// ---- tensors: ops::name(...), always called qualified so that argument-dependent lookup never
// picks a torch::stable function of the same name that a newer torch adds. What torch::stable
// lacks at the target version goes through the stable dispatcher call.
namespace ops {

namespace detail {
template <size_t N>
Tensor call(const char* op, const char* overload, std::array<StableIValue, N> stack) {
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}
using torch::stable::detail::from;
}  // namespace detail

using torch::stable::contiguous;
using torch::stable::fill_;
using torch::stable::reshape;
using torch::stable::subtract;
using torch::stable::transpose;

// What a new tensor is made with: a dtype and a device (ATen's TensorOptions, the part we use).
struct Options {
  ScalarType type;
  torch::headeronly::DeviceType device_type;
  int32_t device_index;
  Options dtype(ScalarType t) const { return {t, device_type, device_index}; }
};

inline Options options(const Tensor& t) { return {t.scalar_type(), t.device().type(), t.get_device_index()}; }

// Through the C shim's direct call, not the dispatcher: torch::stable::empty goes through
// torch_call_dispatcher, which looks the op up by name and boxes every argument on each call,
// several microseconds an allocation on a host-bound call (the decode-shape attention allocates
// three tensors a call).
inline Tensor empty(IntRef shape, const Options& o) {
  const size_t n = shape.size();
  std::vector<int64_t> strides(n);
  int64_t st = 1;
  for (size_t i = n; i-- > 0;) {
    strides[i] = st;
    st *= shape[i] > 1 ? shape[i] : 1;
  }
  using torch::stable::detail::from;
  using torch::stable::detail::to;
  AtenTensorHandle h = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(int64_t(n), shape.data(), strides.data(), to<int32_t>(from(o.type)),
                                                  to<int32_t>(from(o.device_type)), o.device_index, &h));
  return Tensor(h);
}

inline Tensor zero_(Tensor t) { return torch::stable::zero_(t); }

inline Tensor zeros(IntRef shape, const Options& o) { return zero_(empty(shape, o)); }

inline Tensor empty_like(const Tensor& t) { return torch::stable::empty_like(t); }

inline Tensor narrow(Tensor t, int64_t dim, int64_t start, int64_t length) {
  return torch::stable::narrow(t, dim, start, length);
}

inline Tensor to(const Tensor& t, ScalarType s) { return t.scalar_type() == s ? t : torch::stable::to(t, s); }

inline Tensor expand(const Tensor& t, IntRef shape) {
  return detail::call<3>("aten::expand", "", {detail::from(t), detail::from(shape), detail::from(false)});
}

inline Tensor permute(const Tensor& t, IntRef dims) {
  return detail::call<2>("aten::permute", "", {detail::from(t), detail::from(dims)});
}

inline Tensor sum_to_size(const Tensor& t, IntRef shape) {
  return detail::call<2>("aten::sum_to_size", "", {detail::from(t), detail::from(shape)});
}

inline Tensor mul(const Tensor& a, const Tensor& b) {
  return detail::call<2>("aten::mul", "Tensor", {detail::from(a), detail::from(b)});
}

inline Tensor bmm(const Tensor& a, const Tensor& b) {
  return detail::call<2>("aten::bmm", "", {detail::from(a), detail::from(b)});
}

// t summed over one dim (dropped)
inline Tensor sum_dim(const Tensor& t, int64_t dim) {
  const int64_t dims[1] = {dim};
  return torch::stable::sum(t, IntRef(dims, 1));
}

// dst += src, in place (dst may be a view)
inline void add_into(Tensor dst, const Tensor& src) { torch::stable::copy_(dst, torch::stable::subtract(dst, src, -1.0)); }

inline void copy_into(Tensor dst, const Tensor& src) { torch::stable::copy_(dst, src); }

}  // namespace ops

inline bool same_shape(IntRef a, IntRef b) { return a.equals(b); }

// ---- CUDA: the device guard and the current stream of a tensor's device

using DeviceGuard = torch::stable::accelerator::DeviceGuard;

inline cudaStream_t current_stream(const Tensor& t) {
  void* s = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &s));
  return static_cast<cudaStream_t>(s);
}

}  // namespace geokern
