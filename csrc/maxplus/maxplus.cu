// Max-plus / min-plus matrix product C[i, j] = max_k a[i, k] + b[k, j] (or min), with
// optional argmax (ties -> smallest k) and margin (winner minus runner-up), and its
// backward (dC scattered along the argmax route): the host code and the registration. The
// kernels are in the headers beside this file, included here (one translation unit);
// their derivation and measurements are in README.md.
//
//   params.cuh          tile sizes, the batch layout, the forward kernels' parameters
//   semiring.cuh        the arithmetic: integer sentinel and stand-in, one step, 16-bit pairs
//   tile.cuh            the 128 x 128 output tile both forward kernels share
//   pack.cuh            maxplus_pack_kernel: the padded k-major operand copies
//   forward.cuh         maxplus_fwd_kernel: 32-bit steps (float, int32, double), argmax, margin
//   forward_packed.cuh  maxplus_fwd_packed_kernel: value-only 16-bit pairs (half2, bf16x2, int16x2)
//   split_reduce.cuh    maxplus_split_reduce_kernel: split-K slices combined in k order
//   range.cuh           maxplus_mark_kernel: integer entries that read an out-of-range input
//   backward.cuh        maxplus_bwd_kernel
//
// Forward: a register-blocked GEMM-shaped kernel. There are no max-plus tensor cores, so
// the ceiling is the fp32 lanes: each k step is one add and one max per output. To feed the
// lanes from registers each thread owns an 8 x 8 tile of C (64 add+max pairs per 4 128-bit
// shared loads), the block a 128 x 128 tile (256 threads).
//
// The kernels stream operand copies made once per call by pack_operand
// (maxplus_pack_kernel): per matrix, rows of 32-bit words (k for the 32-bit kernel, k pairs
// for the packed one; 64-bit for double), k-major, M / N rounded up to 128, K up to kKQuant,
// the padding the semiring zero, each value already staged (integers clamped to the
// stand-in, 16-bit widened for the 32-bit kernel). So a k tile (16 rows) is plain 16-byte
// cp.async copies at fixed offsets from one pointer per operand, double-buffered in shared
// memory (As[k][m], Bs[k][n]): the k loop has no bounds, strides, conversions or clamps. A
// float input already in that layout (B row-major, or A k-major, with M, N multiples of 128
// and K of kKQuant) is streamed as it is. Out-of-range rows / columns are computed on the
// padding and never stored. With argmax or margin, 16-bit inputs take the 32-bit kernel
// widened to float (sums in float32, double for double); the value-only 16-bit path is
// maxplus_fwd_packed_kernel (half2 / bf16x2, two k per instruction). Either way the result
// equals the exact max rounded once (rounding is monotone).
//
// Argmax without margin costs one compare per k tile, not per k: each thread keeps the
// best sum of the current k tile (add + max per step, as value-only), and at the end
// of the tile a strict compare against the running best records the tile (earlier tiles
// keep ties). The epilogue then recomputes the sums of the winning tile from global
// memory and returns the first k whose sum equals the best: ties go to the smallest k.
//
// Integers (int32, int16; forward only). Each staged value is clamped to the stand-in
// S for the sentinel (-2**(bits-2) for max-plus, 2**(bits-2) - 1 for min-plus), so for
// inputs in [-INT_BOUND, INT_BOUND] (geokern.reference.maxplus) no sum wraps and every
// sum with S lies beyond +-2 INT_BOUND; the epilogue stores those as the sentinel
// (argmax 0). int32 steps are a plain add and max (min), which ptxas fuses into one
// VIADDMNMX on sm_90 (the PTX of __viaddmax_s32); int16 value-only runs the packed kernel
// with __viaddmax_s16x2 / __viaddmin_s16x2 (two k per instruction) on sm_90, int16 with
// argmax, or before sm_90 (where DPX is emulated by several SIMD instructions), the 32-bit
// kernel on int.
//
// Split-K: when the output has too few tiles to fill the GPU (skinny M or N, long K),
// blockIdx.z takes one slice of K; each slice writes its raw best (and argmax) to a
// workspace and maxplus_split_reduce_kernel combines the slices in k order (a later
// slice wins only if strictly better, so ties keep the smallest k; NaN sticks). The op's
// num_splits argument forces the number of slices (0: the heuristic below; 1: off).
//
// Integers out of range: the copies flag every row of A / column of B that holds a value
// outside [-INT_BOUND, INT_BOUND] other than the sentinel, and maxplus_mark_kernel writes the
// overflow marker (the extreme opposite the sentinel) into the entries that read one, after
// the product: no pass over the inputs beyond the copy, no host sync.
//
// NaN propagates through max.NaN / min.NaN (fmaxf would drop it). Out-of-range k are
// staged as the semiring zero (-inf for max-plus, S for integers), which can never win or
// tie a comparison against a real k (comparisons are strict), so tails need no branches.

#include <cstdlib>
#include <limits>

#include "common.cuh"
#include "params.cuh"
#include "semiring.cuh"
#include "tile.cuh"
#include "pack.cuh"
#include "forward.cuh"
#include "forward_packed.cuh"
#include "split_reduce.cuh"
#include "backward.cuh"
#include "range.cuh"

namespace geokern {
namespace {

// The batch layout of (a, b) over `lead`; false if more than kMaxDims dims remain.
bool make_batch(const std::vector<int64_t>& lead, const Tensor& a, const Tensor& b, Batch* B) {
  RowLayout R;
  const int64_t comp[3] = {0, 0, 0};
  if (!make_row_layout(lead, {broadcast_strides(a, lead, 2), broadcast_strides(b, lead, 2)}, comp, &R)) return false;
  // RowLayout keeps dims 0..ndim-1 outermost first; pad in front with size-1 dims
  const int pad = kMaxDims - R.ndim;
  for (int d = 0; d < kMaxDims; ++d) {
    const bool real = d >= pad;
    B->size[d] = real ? R.size[d - pad] : 1;
    B->a[d] = real ? R.stride[0][d - pad] : 0;
    B->b[d] = real ? R.stride[1][d - pad] : 0;
  }
  return true;
}

void check_pair(const char* op, const Tensor& a, const Tensor& b) {
  GK_CHECK(a.is_cuda(), op, ": a must be a CUDA tensor, got device ", a.device());
  GK_CHECK(b.device() == a.device(), op, ": b is on ", b.device(), " but a is on ", a.device());
  const auto st = a.scalar_type();
  GK_CHECK(is_float(st) || st == dtype::i32 || st == dtype::i16, op,
              ": a must be floating point, int32 or int16, got ", st);
  GK_CHECK(b.scalar_type() == a.scalar_type(), op, ": b has dtype ", b.scalar_type(), " but a has ",
              a.scalar_type());
  GK_CHECK(a.dim() >= 2 && b.dim() >= 2, op, ": a and b need at least 2 dims, got ", fmt(a.sizes()), " and ",
              fmt(b.sizes()));
  GK_CHECK(a.size(-1) == b.size(-2), op, ": a (..., M, K) and b (..., K, N) disagree on K: ", fmt(a.sizes()),
              " and ", fmt(b.sizes()));
  const int64_t lim = std::numeric_limits<int>::max();
  const int64_t span_a = (a.size(-2) - 1) * std::abs(a.stride(-2)) + (a.size(-1) - 1) * std::abs(a.stride(-1));
  const int64_t span_b = (b.size(-2) - 1) * std::abs(b.stride(-2)) + (b.size(-1) - 1) * std::abs(b.stride(-1));
  GK_CHECK(span_a < lim && span_b < lim && a.size(-2) < lim && b.size(-1) < lim, op,
              ": one matrix of a or b spans 2**31 elements or more; the kernel uses 32-bit offsets within a matrix");
}

// Number of K slices for speed: num_splits > 0 forces that many (1: off; at most kMaxSplits
// and one per kKQuant of K); 0 chooses enough blocks for two per SM when the output tiles
// alone are too few, each slice at least 256 k.
int choose_splits_for_speed(int64_t tiles, int64_t K, int64_t num_splits) {
  if (num_splits > 0) return int(std::min<int64_t>({num_splits, kMaxSplits, (K + kKQuant - 1) / kKQuant}));
  const int64_t want = 2 * int64_t(num_sms());
  if (tiles >= want / 2) return 1;
  return int(std::max<int64_t>(1, std::min<int64_t>({(want + tiles - 1) / tiles, K / 256, kMaxSplits})));
}

// Number of K slices: 1 where splitting is not allowed (margin), else at least `least`.
int choose_splits(int64_t tiles, int64_t K, int64_t num_splits, bool allowed, int64_t least) {
  if (!allowed) return 1;
  return int(std::max<int64_t>(least, choose_splits_for_speed(tiles, K, num_splits)));
}

// Launches the packed kernel for 16-bit T (true), or does nothing (false).
template <typename T, typename Acc>
bool launch_packed(const Params<T, Acc>& p, bool minplus, dim3 grid, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16> || std::is_same_v<T, int16_t>) {
    if (minplus) maxplus_fwd_packed_kernel<T, Acc, true><<<grid, kThreads, 0, stream>>>(p);
    else maxplus_fwd_packed_kernel<T, Acc, false><<<grid, kThreads, 0, stream>>>(p);
    GK_LAUNCH_CHECK();
    return true;
  } else {
    return false;
  }
}


// The copy of one operand that the forward kernels stream: for a (..., M, K) (is_a) or
// b (..., K, N), a contiguous (..., R, C) tensor of words, C = M (N) rounded up to 128,
// R = K padded to kKQuant (halved for packed pairs), padding the semiring zero (see
// maxplus_pack_kernel). `word` is the words' dtype (Acc, or int32 for packed pairs).
// For integers, *flags (when given) becomes a zeroed [nb, cols] byte tensor that the copy
// marks where a row of A / column of B holds an out-of-range value (maxplus_mark_kernel).
template <typename T, typename W, int PER>
Tensor pack_operand(const Tensor& x, bool is_a, bool minplus, ScalarType word, cudaStream_t stream,
                        Tensor* flags = nullptr) {
  const int64_t rows = x.size(-2), cols_ = x.size(-1);
  const int64_t cols = is_a ? rows : cols_, klen = is_a ? cols_ : rows;
  const int64_t C = (cols + kBM - 1) / kBM * kBM, R = (klen + kKQuant - 1) / kKQuant * kKQuant / PER;
  if constexpr (PER == 1 && std::is_same_v<T, W> && !kIsInt<T>) {  // floats need no staging: x itself, if laid out so
    const Tensor v = is_a ? ops::transpose(x, -1, -2) : x;
    if (R == klen && C == cols && v.is_contiguous() && aligned16(v.const_data_ptr())) return v;
  }
  const Tensor x3 = ops::reshape(x, {-1, rows, cols_});
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(R);
  shape.push_back(C);
  Tensor out = ops::empty(shape, ops::options(x).dtype(word));
  const int64_t nb = x3.size(0), total = nb * (R / 8) * C;
  uint8_t* fl = nullptr;
  if (flags && kIsInt<T>) {
    *flags = ops::zeros({nb, cols}, ops::options(x).dtype(dtype::u8));
    fl = flags->mutable_data_ptr<uint8_t>();
  }
  if (total == 0) return out;
  const int64_t sbat = nb > 1 ? x3.stride(0) : 0;
  // strides of size-1 dims never multiply a nonzero index: 0 keeps them in 32 bits
  const int s_row = rows > 1 ? int(x3.stride(1)) : 0, s_col = cols_ > 1 ? int(x3.stride(2)) : 0;
  const int sc = is_a ? s_row : s_col, sk = is_a ? s_col : s_row;
  auto go = [&](auto min_c) {
    maxplus_pack_kernel<T, W, decltype(min_c)::value, PER><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
        x3.const_data_ptr<T>(), reinterpret_cast<W*>(out.mutable_data_ptr()), fl, sbat, sc, sk, int(cols), int(klen),
        int(C), int(R), total);
  };
  if (minplus) go(std::true_type{});
  else go(std::false_type{});
  GK_LAUNCH_CHECK();
  return out;
}

std::tuple<Tensor, Tensor, Tensor> maxplus_cuda(const Tensor& a_in, const Tensor& b_in,
                                                            bool minplus, bool want_argmax, bool want_margin,
                                                            int64_t num_splits) {
  const char* op = "maxplus_cuda";
  check_pair(op, a_in, b_in);
  GK_CHECK(num_splits >= 0, op, ": num_splits must be >= 0 (0: choose), got ", fmt(num_splits));
  const bool is_int = !is_float(a_in.scalar_type());
  GK_CHECK(!(is_int && want_margin), op, ": margin is float-only, got ", a_in.scalar_type(), " inputs");
  Tensor a = a_in, b = b_in;
  auto lead = broadcast_leading("maxplus_cuda", a, b, 2);
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  std::vector<int64_t> shape = lead;
  shape.push_back(M);
  shape.push_back(N);
  Tensor c = ops::empty(shape, ops::options(a));
  Tensor idx = ops::empty(want_argmax ? IntRef(shape) : IntRef({0}),
                             ops::options(a).dtype(dtype::i64));
  Tensor mg = ops::empty(want_margin ? IntRef(shape) : IntRef({0}), ops::options(a));
  if (c.numel() == 0) return {c, idx, mg};
  if (K == 0) {  // the semiring zero (the integer sentinel), no route
    if (a.scalar_type() == dtype::i32) ops::fill_(c, minplus ? INT32_MAX : INT32_MIN);
    else if (a.scalar_type() == dtype::i16) ops::fill_(c, minplus ? INT16_MAX : INT16_MIN);
    else ops::fill_(c, minplus ? INFINITY : -INFINITY);
    if (want_argmax) ops::fill_(idx, -1);
    if (want_margin) ops::fill_(mg, INFINITY);
    return {c, idx, mg};
  }
  Batch L;
  if (!make_batch(lead, a, b, &L)) {
    std::vector<int64_t> fa = lead, fb = lead;
    fa.insert(fa.end(), {M, K});
    fb.insert(fb.end(), {K, N});
    a = ops::contiguous(ops::expand(a, fa));
    b = ops::contiguous(ops::expand(b, fb));
    GK_CHECK(make_batch(lead, a, b, &L), op, ": could not build a batch layout");
  }
  const int64_t batch = c.numel() / (M * N);
  const DeviceGuard guard(a.get_device_index());
  const cudaStream_t stream = current_stream(a);
  const int tiles = int(((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN));
  // argmax alone records 16-bit tile numbers: at most 65535 tiles of kBK per slice
  const int64_t least = want_argmax && !want_margin ? (K + 65535 * kBK - 1) / (65535 * kBK) : 1;
  const int want_splits = choose_splits(int64_t(tiles) * batch, K, num_splits, !want_margin, least);
  // k per slice: a multiple of every kernel's k tile; the slice count follows from it
  const int64_t ksplit = ((K + want_splits - 1) / want_splits + kKQuant - 1) / kKQuant * kKQuant;
  const int splits = int((K + ksplit - 1) / ksplit);
  const dim3 grid(tiles, unsigned(std::min<int64_t>(batch, 65535)), unsigned(splits));
  // strides of size-1 dims never multiply a nonzero index: 0 keeps them in 32 bits
  const int sam = M > 1 ? int(a.stride(-2)) : 0, sak = K > 1 ? int(a.stride(-1)) : 0;
  const int sbk = K > 1 ? int(b.stride(-2)) : 0, sbn = N > 1 ? int(b.stride(-1)) : 0;
  // int16x2 DPX is one instruction from sm_90 on; before, it is emulated (several SIMD
  // instructions and 1 KB of spills in the packed kernel), so int16 takes the int32 kernel
  int major = 0;
  GK_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.get_device()));
  const bool packed_ok = a.scalar_type() != dtype::i16 || major >= 9;
  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double,
                                   std::conditional_t<std::is_integral_v<scalar_t>, int, float>>;
    const auto acc_type = std::is_same_v<Acc, double> ? dtype::f64 : std::is_same_v<Acc, int> ? dtype::i32 : dtype::f32;
    Tensor part, part_idx;
    if (splits > 1) {
      part = ops::empty({splits, c.numel()}, ops::options(a).dtype(acc_type));
      if (want_argmax) part_idx = ops::empty({splits, c.numel()}, ops::options(a).dtype(dtype::i32));
    }
    Params<scalar_t, Acc> p{a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                            c.mutable_data_ptr<scalar_t>(),
                            want_argmax ? idx.mutable_data_ptr<int64_t>() : nullptr,
                            want_margin ? mg.mutable_data_ptr<scalar_t>() : nullptr,
                            splits > 1 ? part.mutable_data_ptr<Acc>() : nullptr,
                            splits > 1 && want_argmax ? part_idx.mutable_data_ptr<int>() : nullptr,
                            int(M), int(N), int(K), sam, sak, sbk, sbn, int(ksplit), batch, L};
    const int mode = (want_argmax ? kArgmax : 0) | (want_margin ? kMargin : 0);
    constexpr bool k16 = std::is_same_v<scalar_t, Half> || std::is_same_v<scalar_t, BFloat16> ||
                         std::is_same_v<scalar_t, int16_t>;
    const bool packed = k16 && mode == 0 && packed_ok;
    Tensor pa, pb;  // the operands as the kernel streams them
    Tensor fa, fb;  // integers: out-of-range rows of A, columns of B (set by the copies)
    if constexpr (k16) {
      if (packed) {
        pa = pack_operand<scalar_t, unsigned, 2>(a, true, minplus, dtype::i32, stream, &fa);
        pb = pack_operand<scalar_t, unsigned, 2>(b, false, minplus, dtype::i32, stream, &fb);
      }
    }
    if (!packed) {
      pa = pack_operand<scalar_t, Acc, 1>(a, true, minplus, acc_type, stream, &fa);
      pb = pack_operand<scalar_t, Acc, 1>(b, false, minplus, acc_type, stream, &fb);
    }
    GK_CHECK(make_batch(lead, pa, pb, &p.LP), op, ": could not build a batch layout for the packed operands");
    p.pa = pa.const_data_ptr();
    p.pb = pb.const_data_ptr();
    p.lda = int(pa.size(-1));
    p.ldb = int(pb.size(-1));
    auto reduce = [&](auto min_c) {
      if (splits == 1) return;
      const int64_t total = c.numel();
      maxplus_split_reduce_kernel<scalar_t, Acc, decltype(min_c)::value>
          <<<grid_for(total, kThreads), kThreads, 0, stream>>>(p.part, p.part_idx, p.c, p.idx, splits, total);
      GK_LAUNCH_CHECK();
    };
    auto go = [&](auto min_c, auto mode_c) {
      constexpr int mode = decltype(mode_c)::value;
      if constexpr (std::is_integral_v<scalar_t> && (mode & kMargin)) {
        GK_CHECK(false, "maxplus_cuda: margin is float-only");
      } else {
        maxplus_fwd_kernel<scalar_t, Acc, decltype(min_c)::value, mode><<<grid, kThreads, 0, stream>>>(p);
        GK_LAUNCH_CHECK();
      }
    };
    auto by_mode = [&](auto min_c) {
      if (packed) launch_packed(p, decltype(min_c)::value, grid, stream);
      else if (mode == 0) go(min_c, std::integral_constant<int, 0>{});
      else if (mode == kArgmax) go(min_c, std::integral_constant<int, kArgmax>{});
      else if (mode == kMargin) go(min_c, std::integral_constant<int, kMargin>{});
      else go(min_c, std::integral_constant<int, kArgmax | kMargin>{});
      reduce(min_c);
      if constexpr (std::is_integral_v<scalar_t>) {  // after the result is final (split-K reduced)
        const int64_t rows = batch * M;
        maxplus_mark_kernel<scalar_t, decltype(min_c)::value>
            <<<unsigned(std::min<int64_t>(rows, int64_t(num_sms()) * 64)), kThreads, 0, stream>>>(
                p.c, p.idx, fa.const_data_ptr<uint8_t>(), fb.const_data_ptr<uint8_t>(), int(M), int(N), rows, p.LP,
                pa.size(-2) * pa.size(-1), pb.size(-2) * pb.size(-1));
        GK_LAUNCH_CHECK();
      }
    };
    if (minplus) by_mode(std::true_type{});
    else by_mode(std::false_type{});
  };
  switch (a.scalar_type()) {
    case dtype::i32: body(int32_t{}); break;
    case dtype::i16: body(int16_t{}); break;
    default: dispatch_float_dtype(a.scalar_type(), op, body);
  }
  return {c, idx, mg};
}

std::tuple<Tensor, Tensor> maxplus_backward_cuda(const Tensor& grad, const Tensor& argmax,
                                                         IntRef a_shape, IntRef b_shape) {
  const char* op = "maxplus_backward_cuda";
  GK_CHECK(grad.is_cuda() && argmax.device() == grad.device(), op,
              ": grad and argmax must be CUDA tensors on one device, got ", grad.device(), " and ",
              argmax.device());
  GK_CHECK(is_float(grad.scalar_type()), op, ": grad must be floating point, got ",
              grad.scalar_type());
  GK_CHECK(argmax.scalar_type() == dtype::i64 && same_shape(argmax.sizes(), grad.sizes()), op,
              ": argmax must be int64 with grad's shape ", fmt(grad.sizes()), ", got ", argmax.scalar_type(), " ",
              fmt(argmax.sizes()));
  GK_CHECK(grad.dim() >= 2 && a_shape.size() >= 2 && b_shape.size() >= 2, op,
              ": grad, a_shape and b_shape need at least 2 dims");
  const int64_t M = grad.size(-2), N = grad.size(-1), K = a_shape.back();
  GK_CHECK(a_shape[a_shape.size() - 2] == M && b_shape.back() == N && b_shape[b_shape.size() - 2] == K, op,
              ": a_shape ", fmt(a_shape), " and b_shape ", fmt(b_shape), " do not match grad ", fmt(grad.sizes()));
  // A float32 sum stops counting past 2^24 equal terms (x + 1 == x): where an entry of dA or dB can
  // gather more (the batch entries sharing one matrix of A times N, of B times M), both accumulate in
  // double (geokern/ops/maxplus.py's EXACT_FAN_IN, the Triton backward's rule, per buffer there)
  constexpr int64_t kExactFanIn = int64_t(1) << 24;
  auto batch_of = [](IntRef s) {
    int64_t n = 1;
    for (size_t d = 0; d + 2 < s.size(); ++d) n *= s[d];
    return n > 0 ? n : int64_t(1);
  };
  const int64_t rows = batch_of(grad.sizes());
  const bool wide = grad.scalar_type() == dtype::f64 || rows / batch_of(a_shape) * N > kExactFanIn ||
                    rows / batch_of(b_shape) * M > kExactFanIn;
  const auto acc = wide ? dtype::f64 : dtype::f32;
  Tensor da = ops::zeros(a_shape, ops::options(grad).dtype(acc));
  Tensor db = ops::zeros(b_shape, ops::options(grad).dtype(acc));
  std::vector<int64_t> lead(grad.sizes().begin(), grad.sizes().end() - 2);
  Batch L;
  bool full = false;
  if (!make_batch(lead, da, db, &L)) {  // rare: accumulate at the full batch shape, then reduce
    std::vector<int64_t> fa = lead, fb = lead;
    fa.insert(fa.end(), {M, K});
    fb.insert(fb.end(), {K, N});
    da = ops::zeros(fa, ops::options(da));
    db = ops::zeros(fb, ops::options(db));
    GK_CHECK(make_batch(lead, da, db, &L), op, ": could not build a batch layout");
    full = true;
  }
  const int64_t total = grad.numel();
  if (total > 0 && K > 0) {
    const DeviceGuard guard(grad.get_device_index());
    const cudaStream_t stream = current_stream(grad);
    const Tensor g = ops::contiguous(grad), ix = ops::contiguous(argmax);
    dispatch_float_dtype(grad.scalar_type(), op, [&](auto tag) {
      using scalar_t = decltype(tag);
      auto go = [&](auto acc_tag) {
        using Acc = decltype(acc_tag);
        maxplus_bwd_kernel<scalar_t, Acc><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), ix.const_data_ptr<int64_t>(), da.mutable_data_ptr<Acc>(),
            db.mutable_data_ptr<Acc>(), int(M), int(N), int(K), total, L);
        GK_LAUNCH_CHECK();
      };
      if (wide) go(double{});
      else if constexpr (!std::is_same_v<scalar_t, double>) go(float{});
    });
  }
  if (full) {
    da = ops::sum_to_size(da, a_shape);
    db = ops::sum_to_size(db, b_shape);
  }
  return {ops::to(da, grad.scalar_type()), ops::to(db, grad.scalar_type())};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(geokern, CUDA, m) {
  m.impl("maxplus_cuda", TORCH_BOX(&maxplus_cuda));
  m.impl("maxplus_backward_cuda", TORCH_BOX(&maxplus_backward_cuda));
}

}  // namespace geokern
