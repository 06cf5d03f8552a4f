// Quaternion (n = 4) and octonion (n = 8) products, conjugates and the product's
// backward. Memory-bound: each output row reads one row of a and b once. Contiguous
// same-shape inputs take a vectorised path (16-byte loads, several rows per thread for
// 16-bit types); broadcast or strided inputs index through a RowLayout instead of
// being copied.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.cuh"

namespace geokern {
namespace {

template <typename A>
__device__ __forceinline__ void qmul(const A* a, const A* b, A* c) {
  c[0] = a[0] * b[0] - a[1] * b[1] - a[2] * b[2] - a[3] * b[3];
  c[1] = a[0] * b[1] + a[1] * b[0] + a[2] * b[3] - a[3] * b[2];
  c[2] = a[0] * b[2] - a[1] * b[3] + a[2] * b[0] + a[3] * b[1];
  c[3] = a[0] * b[3] + a[1] * b[2] - a[2] * b[1] + a[3] * b[0];
}

template <int N, typename A>
__device__ __forceinline__ void hconj(const A* a, A* c) {
  c[0] = a[0];
#pragma unroll
  for (int i = 1; i < N; ++i) c[i] = -a[i];
}

// Cayley-Dickson over quaternion halves: (a, b)(c, d) = (ac - conj(d) b, d a + b conj(c)).
template <int N, typename A>
__device__ __forceinline__ void hmul(const A* x, const A* y, A* z) {
  if constexpr (N == 4) {
    qmul(x, y, z);
  } else {
    A dc[4], cc[4], t0[4], t1[4];
    hconj<4>(y + 4, dc);
    hconj<4>(y, cc);
    qmul(x, y, t0);       // a c
    qmul(dc, x + 4, t1);  // conj(d) b
#pragma unroll
    for (int i = 0; i < 4; ++i) z[i] = t0[i] - t1[i];
    qmul(y + 4, x, t0);   // d a
    qmul(x + 4, cc, t1);  // b conj(c)
#pragma unroll
    for (int i = 0; i < 4; ++i) z[4 + i] = t0[i] + t1[i];
  }
}

// Rows per thread on the fast path so that each load is at least 16 bytes.
template <typename T, int N>
constexpr int rows_per_thread() {
  return (N * sizeof(T)) >= 16 ? 1 : int(16 / (N * sizeof(T)));
}

template <typename T, int M>
struct alignas(16) Pack {
  T v[M];
};

template <typename T, int N, int R>
__device__ __forceinline__ void load_rows(const T* p, int64_t first_row, at::opmath_type<T>* out) {
  using P = Pack<T, N * R>;
  const P pk = *reinterpret_cast<const P*>(p + first_row * N);
#pragma unroll
  for (int i = 0; i < N * R; ++i) out[i] = static_cast<at::opmath_type<T>>(pk.v[i]);
}

template <typename T, int N, int R>
__device__ __forceinline__ void store_rows(T* p, int64_t first_row, const at::opmath_type<T>* in) {
  using P = Pack<T, N * R>;
  P pk;
#pragma unroll
  for (int i = 0; i < N * R; ++i) pk.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<P*>(p + first_row * N) = pk;
}

template <typename T, int N>
__device__ __forceinline__ void load_row(const T* p, int64_t comp, at::opmath_type<T>* out) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<at::opmath_type<T>>(p[i * comp]);
}

// OP 0: c = a b.  OP 1: c = conj(a) (b unused).
template <typename T, int N, int OP>
__device__ __forceinline__ void apply(const at::opmath_type<T>* a, const at::opmath_type<T>* b,
                                      at::opmath_type<T>* c) {
  if constexpr (OP == 0) hmul<N>(a, b, c);
  else hconj<N>(a, c);
}

template <typename T, int N, int OP>
__global__ void hypercomplex_fwd_fast_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                             T* __restrict__ c, int64_t rows) {
  using A = at::opmath_type<T>;
  constexpr int R = rows_per_thread<T, N>();
  const int64_t packs = rows / R;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t p = tid; p < packs; p += stride) {
    A x[N * R], y[N * R], z[N * R];
    load_rows<T, N, R>(a, p * R, x);
    if constexpr (OP == 0) load_rows<T, N, R>(b, p * R, y);
#pragma unroll
    for (int r = 0; r < R; ++r) apply<T, N, OP>(x + r * N, y + r * N, z + r * N);
    store_rows<T, N, R>(c, p * R, z);
  }
  for (int64_t r = packs * R + tid; r < rows; r += stride) {  // tail of < R rows
    A x[N], y[N], z[N];
    load_row<T, N>(a + r * N, 1, x);
    if constexpr (OP == 0) load_row<T, N>(b + r * N, 1, y);
    apply<T, N, OP>(x, y, z);
#pragma unroll
    for (int i = 0; i < N; ++i) c[r * N + i] = static_cast<T>(z[i]);
  }
}

template <typename T, int N, int OP>
__global__ void hypercomplex_fwd_strided_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                T* __restrict__ c, int64_t rows, RowLayout L) {
  using A = at::opmath_type<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
    int64_t off[3];
    L.offsets(r, off);
    A x[N], y[N], z[N];
    load_row<T, N>(a + off[0], L.comp[0], x);
    if constexpr (OP == 0) load_row<T, N>(b + off[1], L.comp[1], y);
    apply<T, N, OP>(x, y, z);
#pragma unroll
    for (int i = 0; i < N; ++i) c[off[2] + i] = static_cast<T>(z[i]);
  }
}

// da = g conj(b), db = conj(a) g (true in every composition algebra, octonions included).
// g, da, db are contiguous in the broadcast shape; O is T, or float when the caller
// reduces broadcast dims afterwards and wants the sum taken at full precision.
template <typename T, typename O, int N>
__global__ void hypercomplex_mul_bwd_kernel(const T* __restrict__ g, const T* __restrict__ a,
                                            const T* __restrict__ b, O* __restrict__ da,
                                            O* __restrict__ db, int64_t rows, RowLayout L) {
  using A = at::opmath_type<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
    int64_t off[3];
    L.offsets(r, off);
    A x[N], y[N], gr[N], cj[N], z[N];
    load_row<T, N>(a + off[0], L.comp[0], x);
    load_row<T, N>(b + off[1], L.comp[1], y);
    load_row<T, N>(g + r * N, 1, gr);
    hconj<N>(y, cj);
    hmul<N>(gr, cj, z);
#pragma unroll
    for (int i = 0; i < N; ++i) da[r * N + i] = static_cast<O>(z[i]);
    hconj<N>(x, cj);
    hmul<N>(cj, gr, z);
#pragma unroll
    for (int i = 0; i < N; ++i) db[r * N + i] = static_cast<O>(z[i]);
  }
}

constexpr int kThreads = 256;

void check_inputs(const char* op, const at::Tensor& a, const at::Tensor* b, int64_t n) {
  TORCH_CHECK(n == 4 || n == 8, op, ": n must be 4 (quaternion) or 8 (octonion), got ", n);
  TORCH_CHECK(a.is_cuda(), op, ": a must be a CUDA tensor, got device ", a.device());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": a must be floating point, got ",
              a.scalar_type());
  TORCH_CHECK(a.dim() >= 1 && a.size(-1) == n, op, ": a must have last dim ", n, ", got shape ",
              a.sizes());
  if (b) {
    TORCH_CHECK(b->device() == a.device(), op, ": b is on ", b->device(), " but a is on ",
                a.device());
    TORCH_CHECK(b->scalar_type() == a.scalar_type(), op, ": b has dtype ", b->scalar_type(),
                " but a has ", a.scalar_type());
    TORCH_CHECK(b->dim() >= 1 && b->size(-1) == n, op, ": b must have last dim ", n,
                ", got shape ", b->sizes());
  }
}

std::vector<int64_t> with_last(std::vector<int64_t> lead, int64_t n) {
  lead.push_back(n);
  return lead;
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& lead, int64_t n) {
  std::vector<int64_t> st(lead.size());
  int64_t s = n;
  for (int64_t i = int64_t(lead.size()) - 1; i >= 0; --i) {
    st[i] = s;
    s *= lead[i];
  }
  return st;
}

// The layout of (a, b, contiguous out) over the broadcast leading shape; copies a or b
// only in the rare case of more than kMaxDims non-mergeable dims.
RowLayout layout_for(at::Tensor& a, at::Tensor& b, const std::vector<int64_t>& lead, int64_t n) {
  RowLayout L;
  for (int attempt = 0; attempt < 2; ++attempt) {
    const int64_t comp[3] = {a.stride(-1), b.stride(-1), 1};
    if (make_row_layout(lead, {broadcast_strides(a, lead), broadcast_strides(b, lead),
                               contiguous_strides(lead, n)},
                        comp, &L))
      return L;
    a = a.expand(with_last(lead, n)).contiguous();
    b = b.expand(with_last(lead, n)).contiguous();
  }
  TORCH_CHECK(false, "geokern: could not build an element layout");
}

template <int OP>
at::Tensor fwd(const at::Tensor& a_in, const at::Tensor& b_in, int64_t n) {
  const char* name = OP == 0 ? "hypercomplex_mul_cuda" : "hypercomplex_conj_cuda";
  check_inputs(name, a_in, OP == 0 ? &b_in : nullptr, n);
  at::Tensor a = a_in, b = OP == 0 ? b_in : a_in;
  const auto lead = broadcast_leading(a, b);
  at::Tensor c = at::empty(with_last(lead, n), a.options());
  const int64_t rows = c.numel() / n;
  if (rows == 0) return c;
  c10::cuda::CUDAGuard guard(a.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool fast = a.is_contiguous() && b.is_contiguous() && a.sizes() == c.sizes() &&
                    b.sizes() == c.sizes() && aligned16(a.data_ptr()) &&
                    aligned16(b.data_ptr());
  RowLayout L{};
  if (!fast) L = layout_for(a, b, lead, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "hypercomplex_fwd_cuda", [&] {
    const auto* pa = a.const_data_ptr<scalar_t>();
    const auto* pb = b.const_data_ptr<scalar_t>();
    auto* pc = c.mutable_data_ptr<scalar_t>();
    auto launch = [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      if (fast) {
        const int64_t work = rows / rows_per_thread<scalar_t, N>() + 1;
        hypercomplex_fwd_fast_kernel<scalar_t, N, OP>
            <<<grid_for(work, kThreads), kThreads, 0, stream>>>(pa, pb, pc, rows);
      } else {
        hypercomplex_fwd_strided_kernel<scalar_t, N, OP>
            <<<grid_for(rows, kThreads), kThreads, 0, stream>>>(pa, pb, pc, rows, L);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (n == 4) launch(std::integral_constant<int, 4>{});
    else launch(std::integral_constant<int, 8>{});
  });
  return c;
}

at::Tensor hypercomplex_mul_cuda(const at::Tensor& a, const at::Tensor& b, int64_t n) {
  return fwd<0>(a, b, n);
}

at::Tensor hypercomplex_conj_cuda(const at::Tensor& a, int64_t n) { return fwd<1>(a, a, n); }

std::tuple<at::Tensor, at::Tensor> hypercomplex_mul_backward_cuda(const at::Tensor& grad,
                                                                  const at::Tensor& a_in,
                                                                  const at::Tensor& b_in,
                                                                  int64_t n) {
  const char* name = "hypercomplex_mul_backward_cuda";
  check_inputs(name, a_in, &b_in, n);
  at::Tensor a = a_in, b = b_in;
  const auto lead = broadcast_leading(a, b);
  const auto full = with_last(lead, n);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(full), name, ": grad must have shape ", full,
              ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == a.device() && grad.scalar_type() == a.scalar_type(), name,
              ": grad must match a in device and dtype, got ", grad.device(), " ",
              grad.scalar_type());
  const at::Tensor g = grad.contiguous();
  const bool reduce_a = a.sizes() != at::IntArrayRef(full);
  const bool reduce_b = b.sizes() != at::IntArrayRef(full);
  const auto acc = at::toOpMathType(a.scalar_type());
  const bool wide = (reduce_a || reduce_b) && acc != a.scalar_type();
  at::Tensor da = at::empty(full, a.options().dtype(wide ? acc : a.scalar_type()));
  at::Tensor db = at::empty(full, a.options().dtype(wide ? acc : a.scalar_type()));
  const int64_t rows = da.numel() / n;
  if (rows > 0) {
    c10::cuda::CUDAGuard guard(a.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    RowLayout L = layout_for(a, b, lead, n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "hypercomplex_mul_backward_cuda", [&] {
      auto launch = [&](auto nc, auto* out_tag) {
        constexpr int N = decltype(nc)::value;
        using O = std::remove_pointer_t<decltype(out_tag)>;
        hypercomplex_mul_bwd_kernel<scalar_t, O, N><<<grid_for(rows, kThreads), kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
            da.mutable_data_ptr<O>(), db.mutable_data_ptr<O>(), rows, L);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      using Acc = at::opmath_type<scalar_t>;
      if (n == 4) {
        if (wide) launch(std::integral_constant<int, 4>{}, static_cast<Acc*>(nullptr));
        else launch(std::integral_constant<int, 4>{}, static_cast<scalar_t*>(nullptr));
      } else {
        if (wide) launch(std::integral_constant<int, 8>{}, static_cast<Acc*>(nullptr));
        else launch(std::integral_constant<int, 8>{}, static_cast<scalar_t*>(nullptr));
      }
    });
  }
  if (reduce_a) da = da.sum_to_size(a_in.sizes()).to(a_in.scalar_type());
  if (reduce_b) db = db.sum_to_size(b_in.sizes()).to(b_in.scalar_type());
  return {da, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(geokern, CUDA, m) {
  m.impl("hypercomplex_mul_cuda", &hypercomplex_mul_cuda);
  m.impl("hypercomplex_mul_backward_cuda", &hypercomplex_mul_backward_cuda);
  m.impl("hypercomplex_conj_cuda", &hypercomplex_conj_cuda);
}

}  // namespace geokern
