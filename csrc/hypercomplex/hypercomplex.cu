// Quaternion (n = 4) and octonion (n = 8) products, conjugates and the product's
// backward. Memory-bound: each output row reads one row of a and b once. Contiguous
// same-shape inputs take a vectorised path (16-byte loads, several rows per thread for
// 16-bit types); broadcast or strided inputs index through a RowLayout instead of
// being copied. Notes: README.md beside this file.

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

constexpr int kThreads = 256;

// Rows per thread on the dense path, so that a thread moves at least 16 bytes per operand.
template <typename T, int N>
constexpr int rows_per_thread() {
  return (N * sizeof(T)) >= 16 ? 1 : int(16 / (N * sizeof(T)));
}

template <typename T, int N>
__device__ __forceinline__ void load_row(const T* p, int64_t comp, opmath_t<T>* out) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<opmath_t<T>>(p[i * comp]);
}

// The elementwise maps, each from kIn rows to kOut rows.
template <int N>
struct MulOp {  // c = a b
  static constexpr int kIn = 2, kOut = 1, kDenseIn = 0;
  template <typename A>
  __device__ static void apply(const A (&x)[kIn][N], A (&y)[kOut][N]) { hmul<N>(x[0], x[1], y[0]); }
};

template <int N>
struct ConjOp {  // c = conj(a)
  static constexpr int kIn = 1, kOut = 1, kDenseIn = 0;
  template <typename A>
  __device__ static void apply(const A (&x)[kIn][N], A (&y)[kOut][N]) { hconj<N>(x[0], y[0]); }
};

template <int N>
struct MulBwdOp {  // (g, a, b) -> (g conj(b), conj(a) g): true in every composition algebra
  static constexpr int kIn = 3, kOut = 2, kDenseIn = 1;
  template <typename A>
  __device__ static void apply(const A (&x)[kIn][N], A (&y)[kOut][N]) {
    A cj[N];
    hconj<N>(x[2], cj);
    hmul<N>(x[0], cj, y[0]);
    hconj<N>(x[1], cj);
    hmul<N>(cj, x[0], y[1]);
  }
};

template <typename T>
struct Ptrs {
  const T* in[3];
  T* out[2];
};

// Inputs p.in[0..kIn) and outputs p.out[0..kOut): [rows, N] each, contiguous, same shape,
// 16-byte aligned. One CTA (kThreads): tiles of kThreads * R rows (grid-stride), staged
// through shared memory with coalesced 16-byte loads; each thread computes its R rows
// from a conflict-free 16-byte shared read and the outputs leave the same way. Rows past
// the last whole tile go row by row.
template <typename T, int N, typename Op>
__global__ void __launch_bounds__(kThreads) hypercomplex_dense_kernel(Ptrs<T> p, int64_t rows) {
  using A = opmath_t<T>;
  constexpr int kIn = Op::kIn, kOut = Op::kOut;
  constexpr int R = rows_per_thread<T, N>();
  constexpr int VPT = R * N * int(sizeof(T)) / 16;  // 16-byte vectors per thread per operand
  constexpr int64_t TILE = int64_t(kThreads) * R;
  static_assert(VPT >= 1 && VPT * 16 == R * N * int(sizeof(T)), "rows must pack into 16-byte vectors");
  __shared__ uint4 smem[kIn][kThreads * VPT];
  const int tid = threadIdx.x;
  const int64_t tiles = rows / TILE;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t base = t * kThreads * VPT;
#pragma unroll
    for (int k = 0; k < kIn; ++k)
#pragma unroll
      for (int v = 0; v < VPT; ++v)
        smem[k][tid + v * kThreads] = reinterpret_cast<const uint4*>(p.in[k])[base + tid + v * kThreads];
    __syncthreads();
    T in[kIn][R * N], out[kOut][R * N];
#pragma unroll
    for (int k = 0; k < kIn; ++k) {
      uint4 v[VPT];
#pragma unroll
      for (int j = 0; j < VPT; ++j) v[j] = smem[k][tid * VPT + j];
      memcpy(in[k], v, sizeof(v));
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      A x[kIn][N], y[kOut][N];
#pragma unroll
      for (int k = 0; k < kIn; ++k)
#pragma unroll
        for (int i = 0; i < N; ++i) x[k][i] = static_cast<A>(in[k][r * N + i]);
      Op::apply(x, y);
#pragma unroll
      for (int o = 0; o < kOut; ++o)
#pragma unroll
        for (int i = 0; i < N; ++i) out[o][r * N + i] = static_cast<T>(y[o][i]);
    }
    __syncthreads();  // every thread has read its inputs: reuse the buffers for outputs
#pragma unroll
    for (int o = 0; o < kOut; ++o) {
      uint4 v[VPT];
      memcpy(v, out[o], sizeof(v));
#pragma unroll
      for (int j = 0; j < VPT; ++j) smem[o][tid * VPT + j] = v[j];
    }
    __syncthreads();
#pragma unroll
    for (int o = 0; o < kOut; ++o)
#pragma unroll
      for (int v = 0; v < VPT; ++v)
        reinterpret_cast<uint4*>(p.out[o])[base + tid + v * kThreads] = smem[o][tid + v * kThreads];
    __syncthreads();  // before the next tile overwrites the buffers
  }
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = tiles * TILE + int64_t(blockIdx.x) * blockDim.x + tid; r < rows; r += stride) {
    A x[kIn][N], y[kOut][N];
#pragma unroll
    for (int k = 0; k < kIn; ++k) load_row<T, N>(p.in[k] + r * N, 1, x[k]);
    Op::apply(x, y);
#pragma unroll
    for (int o = 0; o < kOut; ++o)
#pragma unroll
      for (int i = 0; i < N; ++i) p.out[o][r * N + i] = static_cast<T>(y[o][i]);
  }
}

template <typename T, int N, typename Op>
void launch_dense(Ptrs<T> p, int64_t rows, cudaStream_t stream) {
  const int64_t tiles = rows / (int64_t(kThreads) * rows_per_thread<T, N>());
  hypercomplex_dense_kernel<T, N, Op><<<grid_for(std::max<int64_t>(tiles, 1) * kThreads, kThreads), kThreads, 0, stream>>>(p, rows);
  GK_LAUNCH_CHECK();
}

// a, b: [..., N] broadcasting to [rows, N], any strides; out0, out1: [rows, N] contiguous.
// One thread per row (grid-stride), offsets through a RowLayout: inputs before
// Op::kDenseIn (the backward's grad) are contiguous in the broadcast shape, the others
// take layout slots 0 and 1. Outputs are of type O: T, or float when the caller then
// sums broadcast dims and wants that sum exact.
template <typename T, typename O, int N, typename Op>
__global__ void hypercomplex_strided_kernel(Ptrs<T> p, O* out0, O* out1, int64_t rows, RowLayout L) {
  using A = opmath_t<T>;
  O* out[2] = {out0, out1};
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
    int64_t off[3];
    L.offsets(r, off);
    A x[Op::kIn][N], y[Op::kOut][N];
#pragma unroll
    for (int k = 0; k < Op::kIn; ++k) {
      const int slot = k - Op::kDenseIn;
      if (slot < 0) load_row<T, N>(p.in[k] + r * N, 1, x[k]);
      else load_row<T, N>(p.in[k] + off[slot], L.comp[slot], x[k]);
    }
    Op::apply(x, y);
#pragma unroll
    for (int o = 0; o < Op::kOut; ++o)
#pragma unroll
      for (int i = 0; i < N; ++i) out[o][r * N + i] = static_cast<O>(y[o][i]);
  }
}

void check_inputs(const char* op, const Tensor& a, const Tensor* b, int64_t n) {
  GK_CHECK(n == 4 || n == 8, op, ": n must be 4 (quaternion) or 8 (octonion), got ", fmt(n));
  GK_CHECK(a.is_cuda(), op, ": a must be a CUDA tensor, got device ", a.device());
  GK_CHECK(is_float(a.scalar_type()), op, ": a must be floating point, got ",
              a.scalar_type());
  GK_CHECK(a.dim() >= 1 && a.size(-1) == n, op, ": a must have last dim ", fmt(n), ", got shape ",
              fmt(a.sizes()));
  if (b) {
    GK_CHECK(b->device() == a.device(), op, ": b is on ", b->device(), " but a is on ",
                a.device());
    GK_CHECK(b->scalar_type() == a.scalar_type(), op, ": b has dtype ", b->scalar_type(),
                " but a has ", a.scalar_type());
    GK_CHECK(b->dim() >= 1 && b->size(-1) == n, op, ": b must have last dim ", fmt(n),
                ", got shape ", fmt(b->sizes()));
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
RowLayout layout_for(Tensor& a, Tensor& b, const std::vector<int64_t>& lead, int64_t n) {
  RowLayout L;
  for (int attempt = 0; attempt < 2; ++attempt) {
    const int64_t comp[3] = {a.stride(-1), b.stride(-1), 1};
    if (make_row_layout(lead, {broadcast_strides(a, lead), broadcast_strides(b, lead),
                               contiguous_strides(lead, n)},
                        comp, &L))
      return L;
    a = ops::contiguous(ops::expand(a, with_last(lead, n)));
    b = ops::contiguous(ops::expand(b, with_last(lead, n)));
  }
  GK_CHECK(false, "geokern: could not build an element layout");
}

bool dense_for(const Tensor& t, const std::vector<int64_t>& full) {
  return t.is_contiguous() && same_shape(t.sizes(), IntRef(full)) && aligned16(t.const_data_ptr());
}

// Runs Op over the broadcast shape `full`: the dense kernel when every operand is
// contiguous in that shape, the strided one otherwise. `dense_in` are the inputs that
// are contiguous in `full` by construction (the grad), a and b are laid out.
// O: the output type, void for the input's own.
template <template <int> class Op, typename O>
void run(const std::vector<Tensor>& dense_in, Tensor a, Tensor b,
         const std::vector<int64_t>& lead, int64_t n, std::vector<Tensor>& out) {
  const auto full = with_last(lead, n);
  const int64_t rows = out[0].numel() / n;
  if (rows == 0) return;
  const DeviceGuard guard(a.get_device_index());
  const cudaStream_t stream = current_stream(a);
  bool dense = dense_for(a, full) && dense_for(b, full) && out[0].scalar_type() == a.scalar_type();
  for (const auto& t : dense_in) dense = dense && dense_for(t, full);
  for (const auto& t : out) dense = dense && aligned16(t.const_data_ptr());
  RowLayout L{};
  if (!dense) L = layout_for(a, b, lead, n);
  dispatch_float_dtype(a.scalar_type(), "geokern_hypercomplex", [&](auto tag) {
    using T = decltype(tag);
    Ptrs<T> p{};
    int k = 0;
    for (const auto& t : dense_in) p.in[k++] = t.const_data_ptr<T>();
    p.in[k++] = a.const_data_ptr<T>();
    p.in[k++] = b.const_data_ptr<T>();
    auto go = [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      using OpN = Op<N>;
      using Out = std::conditional_t<std::is_same_v<O, void>, T, O>;
      Out* o0 = out[0].mutable_data_ptr<Out>();
      Out* o1 = out.size() > 1 ? out[1].mutable_data_ptr<Out>() : nullptr;
      if (dense) {
        if constexpr (std::is_same_v<Out, T>) {
          p.out[0] = o0;
          p.out[1] = o1;
          launch_dense<T, N, OpN>(p, rows, stream);
        }
      } else {
        hypercomplex_strided_kernel<T, Out, N, OpN>
            <<<grid_for(rows, kThreads), kThreads, 0, stream>>>(p, o0, o1, rows, L);
        GK_LAUNCH_CHECK();
      }
    };
    if (n == 4) go(std::integral_constant<int, 4>{});
    else go(std::integral_constant<int, 8>{});
  });
}

Tensor hypercomplex_mul_cuda(const Tensor& a, const Tensor& b, int64_t n) {
  check_inputs("hypercomplex_mul_cuda", a, &b, n);
  const auto lead = broadcast_leading("hypercomplex_mul_cuda", a, b);
  std::vector<Tensor> out{ops::empty(with_last(lead, n), ops::options(a))};
  run<MulOp, void>({}, a, b, lead, n, out);
  return out[0];
}

Tensor hypercomplex_conj_cuda(const Tensor& a, int64_t n) {
  check_inputs("hypercomplex_conj_cuda", a, nullptr, n);
  const std::vector<int64_t> lead(a.sizes().begin(), a.sizes().end() - 1);
  std::vector<Tensor> out{ops::empty(a.sizes(), ops::options(a))};
  run<ConjOp, void>({}, a, a, lead, n, out);
  return out[0];
}

std::tuple<Tensor, Tensor> hypercomplex_mul_backward_cuda(const Tensor& grad,
                                                                  const Tensor& a,
                                                                  const Tensor& b, int64_t n) {
  const char* name = "hypercomplex_mul_backward_cuda";
  check_inputs(name, a, &b, n);
  const auto lead = broadcast_leading(name, a, b);
  const auto full = with_last(lead, n);
  GK_CHECK(same_shape(grad.sizes(), IntRef(full)), name, ": grad must have shape ", fmt(full),
              ", got ", fmt(grad.sizes()));
  GK_CHECK(grad.device() == a.device() && grad.scalar_type() == a.scalar_type(), name,
              ": grad must match a in device and dtype, got ", grad.device(), " ",
              grad.scalar_type());
  const bool reduce = !same_shape(a.sizes(), IntRef(full)) || !same_shape(b.sizes(), IntRef(full));
  const auto acc = opmath_of(a.scalar_type());
  // broadcast dims are summed afterwards: keep the full-shape grads in float32 then
  const auto out_type = reduce ? acc : a.scalar_type();
  std::vector<Tensor> out{ops::empty(full, ops::options(a).dtype(out_type)),
                              ops::empty(full, ops::options(a).dtype(out_type))};
  const Tensor g = ops::contiguous(grad);
  if (out_type == a.scalar_type()) run<MulBwdOp, void>({g}, a, b, lead, n, out);
  else run<MulBwdOp, float>({g}, a, b, lead, n, out);
  Tensor da = out[0], db = out[1];
  if (reduce) {
    da = ops::to(ops::sum_to_size(da, a.sizes()), a.scalar_type());
    db = ops::to(ops::sum_to_size(db, b.sizes()), b.scalar_type());
  }
  return {da, db};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(geokern, CUDA, m) {
  m.impl("hypercomplex_mul_cuda", TORCH_BOX(&hypercomplex_mul_cuda));
  m.impl("hypercomplex_mul_backward_cuda", TORCH_BOX(&hypercomplex_mul_backward_cuda));
  m.impl("hypercomplex_conj_cuda", TORCH_BOX(&hypercomplex_conj_cuda));
}

}  // namespace geokern
