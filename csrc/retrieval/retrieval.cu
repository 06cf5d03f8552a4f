// Retrieval cost and attention (spec retrieval_lior.md sections 1-2): the host code (input checks,
// key segments, split and grid choice, the backward's GEMMs and query chunks) and the op
// registrations; the kernels are in the headers beside it (one translation unit). Every metric
// arrives as a diagonal w [F] float32 (phi is linear: phi(k - q) = phi(k) - phi(q)). q [NB0, NB1, LQ, F];
// k [1|NB0, 1|NB1, M, F]; v [.., M, DV]; r float32 and mask bool broadcast to [NB0, NB1, LQ, M]
// (stride 0 on size-1 dims, never expanded). README.md has the design and what was measured.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "attention_bwd.cuh"
#include "attention_fwd.cuh"
#include "cost.cuh"

namespace geokern {
namespace {

// ---- checks ------------------------------------------------------------------------------

void check_4d(const char* op, const char* name, const Tensor& t, int64_t last, const char* what) {
  GK_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [NB0, NB1, L, ", what, "], got shape ", fmt(t.sizes()));
  if (last >= 0)
    GK_CHECK(t.size(3) == last, op, ": ", name, " must have last dim ", fmt(last), ", got shape ", fmt(t.sizes()));
}

void check_dev(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  GK_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of q");
}

// extent of a batch dim: 1 or the batch size
int64_t join(const char* op, const char* name, int64_t cur, int64_t s) {
  GK_CHECK(s == 1 || cur == 1 || s == cur, op, ": batch dims of ", name, " do not broadcast (", fmt(s), " vs ",
              fmt(cur), ")");
  return s == 1 ? cur : s;
}

void check_bcast(const char* op, const char* name, const Tensor& t, const std::vector<int64_t>& full) {
  check_4d(op, name, t, -1, "M");
  for (int d = 0; d < 4; ++d)
    GK_CHECK(t.size(d) == 1 || t.size(d) == full[d], op, ": ", name, " of shape ", fmt(t.sizes()),
                " must broadcast to ", fmt(full));
}

// the cost: q [NB0, NB1, LQ, F], k [.., M, F], w [F] float32, r float32 broadcasting to the cost
struct CostShape {
  int64_t NB0, NB1, LQ, M, F;
};

CostShape check_cost(const char* op, const Tensor& q, const Tensor& k, const Tensor& w,
                     const Tensor& r) {
  check_4d(op, "q", q, -1, "F");
  const int64_t F = q.size(3);
  check_4d(op, "k", k, F, "F");
  GK_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  check_dev(op, "k", k, q);
  check_dev(op, "w", w, q);
  check_dev(op, "r", r, q);
  GK_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype");
  GK_CHECK(w.dim() == 1 && w.size(0) == F && w.scalar_type() == dtype::f32 && w.is_contiguous(), op,
              ": w must be a contiguous float32 [", fmt(F), "], got shape ", fmt(w.sizes()));
  GK_CHECK(r.scalar_type() == dtype::f32, op, ": r must be float32");
  CostShape s{join(op, "k", q.size(0), k.size(0)), join(op, "k", q.size(1), k.size(1)), q.size(2), k.size(2), F};
  check_bcast(op, "r", r, {s.NB0, s.NB1, s.LQ, s.M});
  return s;
}

// work items, at most per_sm per SM
int64_t grid_x(int64_t work, int64_t per_sm = 16) {
  return std::max<int64_t>(1, std::min<int64_t>(work, int64_t(num_sms()) * per_sm));
}

// ---- the cost ----------------------------------------------------------------------------

Tensor retrieval_cost_cuda(const Tensor& q, const Tensor& k, const Tensor& w, const Tensor& r,
                               double eps) {
  const char* op = "retrieval_cost_cuda";
  const CostShape s = check_cost(op, q, k, w, r);
  Tensor out = ops::empty({s.NB0, s.NB1, s.LQ, s.M}, ops::options(q).dtype(dtype::f32));
  const int64_t rows = s.NB0 * s.NB1 * s.LQ;
  if (out.numel() == 0) return out;
  const DeviceGuard guard(q.get_device_index());
  const cudaStream_t stream = current_stream(q);
  dispatch_kernel_dtype(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const int threads = 256;
    const int64_t gy = std::min<int64_t>((s.M + threads - 1) / threads, 64);
    const int64_t gx = std::min<int64_t>(rows, std::max<int64_t>(1, int64_t(num_sms()) * 64 / gy));
    retrieval_cost_fwd_kernel<T><<<dim3(unsigned(gx), unsigned(gy)), threads, 2 * s.F * sizeof(float), stream>>>(
        q.const_data_ptr<T>(), broadcast_strides4(q), k.const_data_ptr<T>(), broadcast_strides4(k),
        w.const_data_ptr<float>(), r.const_data_ptr<float>(), broadcast_strides4(r), out.mutable_data_ptr<float>(),
        rows, s.NB1, s.LQ, s.M, int(s.F), float(eps));
    GK_LAUNCH_CHECK();
  });
  return out;
}

// R modes as in the Triton kernels (kernels/retrieval): per batch, per query, per key, per pair
int r_mode(const Tensor& r) { return int(r.size(2) != 1) + 2 * int(r.size(3) != 1); }

// Shapes of the gradients (geokern/ops/retrieval.py computes the same for the fake and CPU ops):
// dq at the full batch [NB0, NB1, LQ, F]; dk at [n0, n1, M, F] with n = max(k's, r's if R is per
// key); dR per batch / query at [NB0, NB1, LQ, 1], per key at [n0, n1, 1, M], per pair full.
std::vector<int64_t> dk_extent(const Tensor& k, const Tensor& r) {
  const bool key = r_mode(r) == 2;
  return {std::max(k.size(0), key ? r.size(0) : 1), std::max(k.size(1), key ? r.size(1) : 1)};
}

std::vector<int64_t> dr_shape(const Tensor& k, const Tensor& r, int64_t NB0, int64_t NB1, int64_t LQ,
                              int64_t M) {
  switch (r_mode(r)) {
    case 0:
    case 1: return {NB0, NB1, LQ, 1};
    case 2: {
      const auto e = dk_extent(k, r);
      return {e[0], e[1], 1, M};
    }
    default: return {NB0, NB1, LQ, M};
  }
}

template <typename T>
void launch_reduce(const XY& p, cudaStream_t stream) {
  const int64_t npts = p.nx0 * p.nx1 * p.LX;
  if (npts == 0) return;
  const size_t smem = (2 * p.F + 3 * kRedThreads) * sizeof(float);
  GK_CHECK(smem <= 48 * 1024, "retrieval: coordinate dim ", fmt(p.F), " too large for the CUDA backward");
  retrieval_cost_bwd_kernel<T><<<unsigned(grid_x(npts, 16)), kRedThreads, smem, stream>>>(p);
  GK_LAUNCH_CHECK();
}

// dq, dk, dr, dw of the cost from dcost g (strides sg over [b0, b1, LQ, M], float32). The query
// side (dq, dwp and drq: dR per batch / query / pair) is written; the key side (dk and drk: dR per
// key) is added to when acc_k (the backward runs over chunks of queries). mode is R's mode
// (r_mode of the whole R: a chunk of one query would look like R per key).
template <typename T>
void cost_backward_into(const Tensor& q, const Tensor& k, const Tensor& w, const Tensor& r,
                        const float* g, Strides4 sg, const CostShape& s, float eps, Tensor& dq, Tensor& dk,
                        Tensor& drq, Tensor& drk, Tensor& dwp, bool acc_k, cudaStream_t stream,
                        int mode) {
  const Strides4 sq = broadcast_strides4(q), sk = broadcast_strides4(k), sr = broadcast_strides4(r);
  XY a{};
  a.x = q.const_data_ptr<T>();
  a.sx = sq;
  a.y = k.const_data_ptr<T>();
  a.sy = sk;
  a.w = w.const_data_ptr<float>();
  a.g = g;
  a.sg = sg;
  a.r = r.const_data_ptr<float>();
  a.sr = sr;
  a.NB0 = s.NB0;
  a.NB1 = s.NB1;
  a.LX = s.LQ;
  a.LY = s.M;
  a.nx0 = s.NB0;
  a.nx1 = s.NB1;
  a.F = int(s.F);
  a.eps = eps;
  a.out = dq.mutable_data_ptr<float>();
  a.outw = dwp.mutable_data_ptr<float>();
  a.drx = mode < 2 ? drq.mutable_data_ptr<float>() : nullptr;
  if (mode == 3) {
    a.drp = drq.mutable_data_ptr<float>();
    a.sdp = broadcast_strides4(drq);
  }
  a.accumulate = 0;
  launch_reduce<T>(a, stream);
  // keys: the roles swap (x = key, y = query), the pair arrays are read transposed
  XY b = a;
  b.x = a.y;
  b.sx = sk;
  b.y = a.x;
  b.sy = sq;
  b.sg = Strides4{{sg.s[0], sg.s[1], sg.s[3], sg.s[2]}};
  b.sr = Strides4{{sr.s[0], sr.s[1], sr.s[3], sr.s[2]}};
  b.LX = s.M;
  b.LY = s.LQ;
  b.nx0 = dk.size(0);
  b.nx1 = dk.size(1);
  b.out = dk.mutable_data_ptr<float>();
  b.outw = nullptr;
  b.drx = mode == 2 ? drk.mutable_data_ptr<float>() : nullptr;
  b.drp = nullptr;
  b.accumulate = acc_k;
  launch_reduce<T>(b, stream);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> retrieval_cost_backward_cuda(
    const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& w, const Tensor& r,
    double eps) {
  const char* op = "retrieval_cost_backward_cuda";
  const CostShape s = check_cost(op, q, k, w, r);
  GK_CHECK(grad.dim() == 4 && grad.size(0) == s.NB0 && grad.size(1) == s.NB1 && grad.size(2) == s.LQ &&
                  grad.size(3) == s.M && grad.scalar_type() == dtype::f32,
              op, ": grad must be float32 of shape ", fmt(std::vector<int64_t>{s.NB0, s.NB1, s.LQ, s.M}), ", got ",
              fmt(grad.sizes()));
  check_dev(op, "grad", grad, q);
  const auto fopt = ops::options(q).dtype(dtype::f32);
  const auto dke = dk_extent(k, r);
  Tensor dq = ops::zeros({s.NB0, s.NB1, s.LQ, s.F}, fopt);
  Tensor dk = ops::zeros({dke[0], dke[1], s.M, s.F}, fopt);
  Tensor dr = ops::zeros(dr_shape(k, r, s.NB0, s.NB1, s.LQ, s.M), fopt);
  Tensor dwp = ops::zeros({s.NB0 * s.NB1 * s.LQ, s.F}, fopt);
  if (grad.numel() > 0) {
    const DeviceGuard guard(q.get_device_index());
    const cudaStream_t stream = current_stream(q);
    dispatch_kernel_dtype(q.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      cost_backward_into<T>(q, k, w, r, grad.const_data_ptr<float>(), broadcast_strides4(grad), s, float(eps), dq, dk,
                            dr, dr, dwp, false, stream, r_mode(r));
    });
  }
  return {dq, dk, dr, ops::sum_dim(dwp, 0)};
}

// ---- attention: host ---------------------------------------------------------------------

struct AttnShape {
  int64_t NB0, NB1, LQ, F, DV;
};

// The attention's key segments, merged by log-sum-exp: the row's keys, then the bank when one is
// given (the bank has no mask: the mask applies to the row's keys only).
struct Segments {
  std::vector<Tensor> k, v, r;
  std::vector<std::optional<Tensor>> mask;
  size_t size() const { return k.size(); }
};

// the op's argument names of segment s's k, v, r, for error messages
constexpr const char* kSegNames[2][3] = {{"k", "v", "r"}, {"bank_k", "bank_v", "bank_r"}};
static_assert(kMaxSeg >= 2, "the forward kernel takes the row's keys and the bank in one launch");

Segments make_segments(const char* op, const Tensor& k, const Tensor& v, const Tensor& r,
                       const std::optional<Tensor>& mask, const std::optional<Tensor>& bank_k,
                       const std::optional<Tensor>& bank_v, const std::optional<Tensor>& bank_r) {
  const int given = int(bank_k.has_value()) + int(bank_v.has_value()) + int(bank_r.has_value());
  GK_CHECK(given == 0 || given == 3, op, ": bank_k, bank_v and bank_r must be given together or not at all, got ",
              fmt(given), " of the 3");
  Segments s{{k}, {v}, {r}, {mask}};
  if (given == 3) {
    s.k.push_back(*bank_k);
    s.v.push_back(*bank_v);
    s.r.push_back(*bank_r);
    s.mask.push_back(std::nullopt);
  }
  return s;
}

AttnShape check_attn(const char* op, const Tensor& q, const Segments& sg, const Tensor& w) {
  check_4d(op, "q", q, -1, "F");
  GK_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  const int64_t F = q.size(3);
  const size_t n = sg.size();
  GK_CHECK(w.dim() == 1 && w.size(0) == F && w.scalar_type() == dtype::f32 && w.is_contiguous(), op,
              ": w must be a contiguous float32 [", fmt(F), "]");
  check_dev(op, "w", w, q);
  int64_t NB0 = q.size(0), NB1 = q.size(1);
  const int64_t DV = sg.v[0].dim() == 4 ? sg.v[0].size(3) : -1;
  for (size_t s = 0; s < n; ++s) {
    const char *kn = kSegNames[s][0], *vn = kSegNames[s][1], *rn = kSegNames[s][2];
    check_4d(op, kn, sg.k[s], F, "F");
    check_4d(op, vn, sg.v[s], DV, "DV");
    GK_CHECK(sg.v[s].size(2) == sg.k[s].size(2), op, ": ", vn, " must have as many rows as ", kn, ", got ",
                fmt(sg.v[s].sizes()), " and ", fmt(sg.k[s].sizes()));
    GK_CHECK(sg.k[s].scalar_type() == q.scalar_type() && sg.v[s].scalar_type() == q.scalar_type(), op, ": q, ",
                kn, " and ", vn, " must share one dtype");
    check_dev(op, kn, sg.k[s], q);
    check_dev(op, vn, sg.v[s], q);
    check_dev(op, rn, sg.r[s], q);
    GK_CHECK(sg.r[s].scalar_type() == dtype::f32, op, ": ", rn, " must be float32");
    NB0 = join(op, kn, NB0, sg.k[s].size(0));
    NB1 = join(op, kn, NB1, sg.k[s].size(1));
    NB0 = join(op, vn, NB0, sg.v[s].size(0));
    NB1 = join(op, vn, NB1, sg.v[s].size(1));
  }
  GK_CHECK(q.size(0) == 1 || q.size(0) == NB0, op, ": batch dims of q do not broadcast");
  GK_CHECK(q.size(1) == 1 || q.size(1) == NB1, op, ": batch dims of q do not broadcast");
  for (size_t s = 0; s < n; ++s) {
    const std::vector<int64_t> full{NB0, NB1, q.size(2), sg.k[s].size(2)};
    check_bcast(op, kSegNames[s][2], sg.r[s], full);
    const std::optional<Tensor>& m = sg.mask[s];
    if (m.has_value()) {
      GK_CHECK(m->scalar_type() == dtype::b8, op, ": mask must be bool");
      check_dev(op, "mask", *m, q);
      check_bcast(op, "mask", *m, full);
    }
  }
  return {NB0, NB1, q.size(2), F, DV};
}

// kv grouping of a segment: the batch dims where neither k nor v varies are shared
void group(SegDesc& d, const Tensor& k, const Tensor& v, int64_t NB0, int64_t NB1, int64_t LQ) {
  d.n0k = std::max(k.size(0), v.size(0));
  d.n1k = std::max(k.size(1), v.size(1));
  d.n0r = d.n0k == 1 ? NB0 : 1;
  d.n1r = d.n1k == 1 ? NB1 : 1;
  d.KB = d.n0k * d.n1k;
  d.rpk = d.n0r * d.n1r * LQ;
}

// num_ctas: the target number of blocks when choosing key splits (0: two per SM); bank_splits: at
// most this many splits of a key set shared by several rows (0: one per kCH keys). pipeline and
// norm_mma steer the Triton kernel (software pipelining, the norms on tensor cores); they are in the
// schema so that both backends take one argument list, and mean nothing to this kernel.
std::tuple<Tensor, Tensor> retrieval_attention_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w, const Tensor& r,
    const std::optional<Tensor>& mask, const std::optional<Tensor>& bank_k,
    const std::optional<Tensor>& bank_v, const std::optional<Tensor>& bank_r, double beta, double eps,
    int64_t num_ctas, int64_t bank_splits, int64_t /*pipeline*/, int64_t /*norm_mma*/) {
  const char* op = "retrieval_attention_cuda";
  GK_CHECK(num_ctas >= 0, op, ": num_ctas must be >= 0 (0: two blocks per SM), got ", fmt(num_ctas));
  GK_CHECK(bank_splits >= 0, op, ": bank_splits must be >= 0 (0: one split per ", fmt(kCH), " keys), got ",
              fmt(bank_splits));
  const Segments sgs = make_segments(op, k, v, r, mask, bank_k, bank_v, bank_r);
  const std::vector<Tensor>& ks = sgs.k;
  const std::vector<Tensor>& vs = sgs.v;
  const std::vector<Tensor>& rs = sgs.r;
  const std::vector<std::optional<Tensor>>& masks = sgs.mask;
  const AttnShape a = check_attn(op, q, sgs, w);
  const int64_t rows = a.NB0 * a.NB1 * a.LQ;
  Tensor out = ops::empty({a.NB0, a.NB1, a.LQ, a.DV}, ops::options(vs[0]));
  Tensor lse = ops::empty({a.NB0, a.NB1, a.LQ}, ops::options(q).dtype(dtype::f32));
  if (rows == 0) return {out, lse};
  if (a.DV == 0) {
    // no value columns: the kernels tile by columns, so none would run and the lse (an output) would
    // stay unwritten; run on one zero column instead and keep its lse
    auto pad = [](const Tensor& t) { return ops::zeros({t.size(0), t.size(1), t.size(2), 1}, ops::options(t)); };
    const std::optional<Tensor> bv = bank_v.has_value() ? std::optional<Tensor>(pad(*bank_v)) : std::nullopt;
    auto padded = retrieval_attention_cuda(q, k, pad(v), w, r, mask, bank_k, bv, bank_r, beta, eps, num_ctas,
                                           bank_splits, 0, 0);
    return {out, std::get<1>(padded)};
  }
  const int nseg = int(ks.size());
  int64_t Mtot = 0;
  for (int s = 0; s < nseg; ++s) Mtot += ks[s].size(2);
  if (Mtot == 0) return {ops::zero_(out), ops::fill_(lse, -INFINITY)};
  const DeviceGuard guard(q.get_device_index());
  const cudaStream_t stream = current_stream(q);

  FwdParams p{};
  p.nseg = 0;
  p.q = q.const_data_ptr();
  p.sq = broadcast_strides4(q);
  p.w = w.const_data_ptr<float>();
  p.NB1 = a.NB1;
  p.LQ = a.LQ;
  p.DV = a.DV;
  p.rows = rows;
  p.F = int(a.F);
  p.scale = float(beta) * kLog2e;
  p.eps = float(eps);

  int vec = a.DV % 4 == 0 ? 4 : 1;
  int64_t G = 1;
  std::vector<SegDesc> segs;
  std::vector<Tensor> keep;  // contiguous copies where a kernel needs them
  for (int s = 0; s < nseg; ++s) {
    if (ks[s].size(2) == 0) continue;
    SegDesc d{};
    Tensor vc = vs[s];
    if (vc.stride(3) != 1 && vc.size(3) > 1) {
      vc = ops::contiguous(vc);
      keep.push_back(vc);
    }
    d.k = ks[s].const_data_ptr();
    d.v = vc.const_data_ptr();
    d.r = rs[s].const_data_ptr<float>();
    const std::optional<Tensor> m = masks[s];
    d.mask = m.has_value() ? reinterpret_cast<const uint8_t*>(m->const_data_ptr()) : nullptr;
    d.sk = broadcast_strides4(ks[s]);
    d.sv = broadcast_strides4(vc);
    d.sr = broadcast_strides4(rs[s]);
    if (m.has_value()) d.sm = broadcast_strides4(*m);
    d.M = ks[s].size(2);
    group(d, ks[s], vc, a.NB0, a.NB1, a.LQ);
    if (d.rpk > 1) G = 16;
    if (!aligned16(d.v) || (d.sv.s[2] % 4) != 0 || (d.sv.s[0] % 4) != 0 || (d.sv.s[1] % 4) != 0) vec = 1;
    segs.push_back(d);
  }
  // threads own VEC consecutive columns; a CTA covers NT * VEC columns
  const int64_t vcols = (a.DV + vec - 1) / vec;
  const int NT = int(std::min<int64_t>(256, std::max<int64_t>(32, (vcols + 31) / 32 * 32)));
  p.CT = int(std::max<int64_t>(1, (vcols + NT - 1) / NT));
  const int64_t target = num_ctas > 0 ? num_ctas : 2 * int64_t(num_sms());
  // bank-like segments (many rows per kv batch, long CTAs) go first in the grid
  std::stable_sort(segs.begin(), segs.end(), [](const SegDesc& x, const SegDesc& y) { return x.rpk > y.rpk; });
  int64_t S_total = 0, ctas = 0;
  for (SegDesc& d : segs) {
    d.rg = (d.rpk + G - 1) / G;
    const int64_t base = d.rg * d.KB * p.CT;
    const int64_t max_splits = (d.M + kCH - 1) / kCH;
    int64_t want = std::max<int64_t>(1, std::min<int64_t>(max_splits, (target + base - 1) / base));
    // a kv batch of many rows (a shared bank): each split writes rows x DV floats of partials
    if (d.rpk > 1) want = std::min(want, std::max<int64_t>(1, bank_splits > 0 ? bank_splits : max_splits));
    // keep the split workspace (rows x DV floats per split) bounded
    const int64_t cap = std::max<int64_t>(1, (int64_t(256) << 20) / std::max<int64_t>(1, rows * a.DV * 4));
    want = std::min(want, cap);
    d.kps = (d.M + want - 1) / want;
    d.splits = (d.M + d.kps - 1) / d.kps;
    d.split_off = S_total;
    d.cta_off = ctas;
    S_total += d.splits;
    ctas += base * d.splits;
    p.seg[p.nseg++] = d;
  }
  p.S_total = S_total;
  p.direct = S_total == 1;
  Tensor part;
  if (!p.direct) {
    part = ops::empty({S_total * rows * (a.DV + 2)}, ops::options(q).dtype(dtype::f32));
    p.part_acc = part.mutable_data_ptr<float>();
    p.part_m = p.part_acc + S_total * rows * a.DV;
    p.part_l = p.part_m + S_total * rows;
  }
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  const size_t smem = (2 * kCH * G + 3 * G + a.F + G * a.F) * sizeof(float);
  GK_CHECK(smem <= 200 * 1024, op, ": coordinate dim ", fmt(a.F), " too large for the CUDA kernel");
  GK_CHECK(ctas < (int64_t(1) << 31), op, ": too many blocks");
  dispatch_kernel_dtype(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    auto go = [&](auto kern) {
      if (smem > 48 * 1024)
        GK_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kern<<<unsigned(ctas), NT, smem, stream>>>(p);
      GK_LAUNCH_CHECK();
    };
    if (G == 16) {
      if (vec == 4) go(retrieval_attention_fwd_kernel<T, 16, 4>);
      else go(retrieval_attention_fwd_kernel<T, 16, 1>);
    } else {
      if (vec == 4) go(retrieval_attention_fwd_kernel<T, 1, 4>);
      else go(retrieval_attention_fwd_kernel<T, 1, 1>);
    }
    if (!p.direct) {
      const size_t csm = (S_total + 1 + 4) * sizeof(float);  // + one 16-byte vector of slack
      GK_CHECK(csm + sizeof(float) * kCombineGroups * kCombineCols <= 48 * 1024, op, ": too many key splits");
      const int64_t blocks = rows * ((a.DV + kCombineCols - 1) / kCombineCols);
      const unsigned grid = unsigned(grid_x(blocks, 64));
      retrieval_attention_combine_kernel<T><<<grid, kCombineCols * kCombineGroups, csm, stream>>>(
          p.part_acc, p.part_m, p.part_l, out.mutable_data_ptr<T>(), p.lse, rows, S_total, a.DV, p.scale);
      GK_LAUNCH_CHECK();
    }
  });
  return {out, lse};
}

// [NB0, NB1, L, C] (4-D, size-1 dims broadcast) as [KB, RPK, C] float32 in the segment's grouping
Tensor grouped_rows(const Tensor& t, const SegDesc& d, int64_t NB0, int64_t NB1) {
  Tensor e = ops::expand(ops::to(t, dtype::f32), {NB0, NB1, t.size(2), t.size(3)});
  // [n0k, n0r, n1k, n1r, L, C] -> [n0k, n1k, n0r, n1r, L, C]
  e = ops::permute(ops::reshape(e, {d.n0k, d.n0r, d.n1k, d.n1r, t.size(2), t.size(3)}), {0, 2, 1, 3, 4, 5});
  return ops::reshape(e, {d.KB, d.rpk, t.size(3)});
}

// One segment's backward for the queries [i0, i0 + n) (every tensor narrowed to them along dim 2):
// dq, dR per batch / query / pair and dw are added to the full outputs there; dk, dv and dR per
// key are accumulated over the chunks.
void segment_backward_chunk(const char* op, const AttnShape& a, int64_t i0, int64_t n, const Tensor& dout,
                            const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
                            const Tensor& r, const std::optional<Tensor>& m, const Tensor& lse,
                            const Tensor& delta, double beta, double eps, Tensor& dq, Tensor& dk,
                            Tensor& dv, Tensor& dr, Tensor& dw, cudaStream_t stream) {
  const int64_t M = k.size(2);
  const int mode = r_mode(r);
  auto rows_of = [&](const Tensor& t) { return t.size(2) == 1 ? t : ops::narrow(t, 2, i0, n); };
  const Tensor qc = ops::narrow(q, 2, i0, n), rc = rows_of(r);
  const std::optional<Tensor> mc = m.has_value() ? std::optional<Tensor>(rows_of(*m)) : std::nullopt;
  const Tensor lse_c = ops::contiguous(ops::narrow(lse, 2, i0, n)),
               delta_c = ops::contiguous(ops::narrow(delta, 2, i0, n));
  SegDesc d{};
  group(d, k, v, a.NB0, a.NB1, n);
  const Tensor dog = grouped_rows(ops::narrow(dout, 2, i0, n), d, a.NB0, a.NB1);  // [KB, RPK, DV]
  const Tensor vg = ops::reshape(ops::expand(ops::to(v, dtype::f32), {d.n0k, d.n1k, M, a.DV}), {d.KB, M, a.DV});
  Tensor dp = ops::contiguous(ops::bmm(dog, ops::transpose(vg, 1, 2)));  // [KB, RPK, M]
  Tensor P = ops::empty_like(dp);
  PairParams pp{};
  pp.q = qc.const_data_ptr();
  pp.sq = broadcast_strides4(qc);
  pp.k = k.const_data_ptr();
  pp.sk = broadcast_strides4(k);
  pp.r = rc.const_data_ptr<float>();
  pp.sr = broadcast_strides4(rc);
  pp.mask = mc.has_value() ? reinterpret_cast<const uint8_t*>(mc->const_data_ptr()) : nullptr;
  if (mc.has_value()) pp.sm = broadcast_strides4(*mc);
  pp.w = w.const_data_ptr<float>();
  pp.lse = lse_c.const_data_ptr<float>();
  pp.delta = delta_c.const_data_ptr<float>();
  pp.dp = dp.mutable_data_ptr<float>();
  pp.P = P.mutable_data_ptr<float>();
  pp.NB1 = a.NB1;
  pp.LQ = n;
  pp.M = M;
  pp.n1k = d.n1k;
  pp.n0r = d.n0r;
  pp.n1r = d.n1r;
  pp.n0k = d.n0k;
  pp.KB = d.KB;
  pp.rpk = d.rpk;
  pp.F = int(a.F);
  pp.beta = float(beta);
  pp.eps = float(eps);
  // dcost in the grouped layout, as strides over [b0, b1, n, M]
  Strides4 sg;
  sg.s[0] = a.NB0 == 1 ? 0 : (d.n0k == 1 ? d.n1r * n * M : d.n1k * d.rpk * M);
  sg.s[1] = a.NB1 == 1 ? 0 : (d.n1k == 1 ? n * M : d.rpk * M);
  sg.s[2] = M;
  sg.s[3] = 1;
  const auto fopt = ops::options(q).dtype(dtype::f32);
  Tensor dq_c = ops::empty({a.NB0, a.NB1, n, a.F}, fopt);
  Tensor dwp = ops::empty({a.NB0 * a.NB1 * n, a.F}, fopt);
  Tensor drq = mode == 2 ? dr : ops::empty({a.NB0, a.NB1, n, mode == 3 ? M : 1}, fopt);
  dispatch_kernel_dtype(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    retrieval_attention_bwd_kernel<T><<<unsigned(grid_x((dp.numel() + 255) / 256, 32)), 256, 0, stream>>>(pp);
    GK_LAUNCH_CHECK();
    cost_backward_into<T>(qc, k, w, rc, dp.const_data_ptr<float>(), sg, CostShape{a.NB0, a.NB1, n, M, a.F},
                          float(eps), dq_c, dk, drq, dr, dwp, i0 > 0, stream, mode);
  });
  ops::add_into(dv, ops::reshape(ops::bmm(ops::transpose(P, 1, 2), dog), {d.n0k, d.n1k, M, a.DV}));
  Tensor dq_rows = ops::narrow(dq, 2, i0, n);
  ops::add_into(dq_rows, dq_c);
  ops::add_into(dw, ops::sum_dim(dwp, 0));
  if (mode != 2) {
    Tensor dr_rows = ops::narrow(dr, 2, i0, n);
    ops::copy_into(dr_rows, drq);
  }
}

// Returns (dq, dk, dv, dr, dbank_k, dbank_v, dbank_r, dw), float32; without a bank the three bank
// gradients are empty [0]. dR comes out of the same reduction pass as dq and dk, so it is formed
// whatever need_dr says (the Triton kernel skips it). chunk: at most about this many elements in each
// of dP and P ([rows, M] float32 per chunk of queries; 0: 2^26).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
retrieval_attention_backward_cuda(const Tensor& dout, const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Tensor& w, const Tensor& r,
                                  const std::optional<Tensor>& mask, const std::optional<Tensor>& bank_k,
                                  const std::optional<Tensor>& bank_v, const std::optional<Tensor>& bank_r,
                                  const Tensor& out, const Tensor& lse, const std::optional<Tensor>& dlse,
                                  double beta, double eps, bool /*need_dr*/, int64_t chunk) {
  const char* op = "retrieval_attention_backward_cuda";
  GK_CHECK(chunk >= 0, op, ": chunk must be >= 0 (0: 2^26 elements), got ", fmt(chunk));
  const Segments sgs = make_segments(op, k, v, r, mask, bank_k, bank_v, bank_r);
  const AttnShape a = check_attn(op, q, sgs, w);
  const std::vector<int64_t> oshape{a.NB0, a.NB1, a.LQ, a.DV};
  GK_CHECK(same_shape(dout.sizes(), IntRef(oshape)) && same_shape(out.sizes(), IntRef(oshape)), op,
              ": dout and out must have shape ", fmt(oshape), ", got ", fmt(dout.sizes()), " and ", fmt(out.sizes()));
  GK_CHECK(lse.dim() == 3 && lse.size(0) == a.NB0 && lse.size(1) == a.NB1 && lse.size(2) == a.LQ &&
                  lse.scalar_type() == dtype::f32,
              op, ": lse must be float32 [NB0, NB1, LQ]");
  check_dev(op, "dout", dout, q);
  check_dev(op, "out", out, q);
  check_dev(op, "lse", lse, q);
  if (dlse.has_value()) check_dev(op, "dlse", *dlse, q);
  const auto fopt = ops::options(q).dtype(dtype::f32);
  Tensor dq = ops::zeros({a.NB0, a.NB1, a.LQ, a.F}, fopt);
  Tensor dw = ops::zeros({a.F}, fopt);
  std::vector<Tensor> dks, dvs, drs;
  const DeviceGuard guard(q.get_device_index());
  const cudaStream_t stream = current_stream(q);
  Tensor delta = ops::sum_dim(ops::mul(ops::to(dout, dtype::f32), ops::to(out, dtype::f32)), -1);
  if (dlse.has_value()) delta = ops::subtract(delta, ops::to(*dlse, dtype::f32));
  const int64_t chunk_elems = chunk > 0 ? chunk : int64_t(1) << 26;
  for (size_t s = 0; s < sgs.size(); ++s) {
    const Tensor &kseg = sgs.k[s], &vseg = sgs.v[s], &rseg = sgs.r[s];
    const int64_t M = kseg.size(2);
    const auto dke = dk_extent(kseg, rseg);
    Tensor dk = ops::zeros({dke[0], dke[1], M, a.F}, fopt);
    Tensor dr = ops::zeros(dr_shape(kseg, rseg, a.NB0, a.NB1, a.LQ, M), fopt);
    Tensor dv =
        ops::zeros({std::max(kseg.size(0), vseg.size(0)), std::max(kseg.size(1), vseg.size(1)), M, a.DV}, fopt);
    if (a.LQ > 0 && M > 0) {
      const int64_t step =
          std::max<int64_t>(1, std::min<int64_t>(a.LQ, chunk_elems / std::max<int64_t>(1, a.NB0 * a.NB1 * M)));
      for (int64_t i0 = 0; i0 < a.LQ; i0 += step)
        segment_backward_chunk(op, a, i0, std::min(step, a.LQ - i0), dout, q, kseg, vseg, w, rseg, sgs.mask[s], lse,
                               delta, beta, eps, dq, dk, dv, dr, dw, stream);
    }
    dks.push_back(dk);
    dvs.push_back(dv);
    drs.push_back(dr);
  }
  if (sgs.size() == 1)
    for (auto* g : {&dks, &dvs, &drs}) g->push_back(ops::empty({0}, fopt));
  return {dq, dks[0], dvs[0], drs[0], dks[1], dvs[1], drs[1], dw};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(geokern, CUDA, m) {
  m.impl("retrieval_cost_cuda", TORCH_BOX(&retrieval_cost_cuda));
  m.impl("retrieval_cost_backward_cuda", TORCH_BOX(&retrieval_cost_backward_cuda));
  m.impl("retrieval_attention_cuda", TORCH_BOX(&retrieval_attention_cuda));
  m.impl("retrieval_attention_backward_cuda", TORCH_BOX(&retrieval_attention_backward_cuda));
}

}  // namespace geokern
