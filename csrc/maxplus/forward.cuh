// maxplus_fwd_kernel: the 32-bit forward (float, int32, double; 16-bit inputs widened by the
// copy), value-only or with argmax and / or margin.
#pragma once

#include "tile.cuh"

namespace geokern {
namespace {

// The first k in [k0, min(k0 + BK, kend)) whose sum equals best; k0 if none (NaN). Fully
// unrolled without an early exit, so the 2 BK loads are in flight together (a loop that
// stops at the first match pays the memory latency once per k).
template <typename T, typename Acc, bool MIN, int BK>
__device__ __forceinline__ int resolve(const T* a, const T* b, const Params<T, Acc>& p, int m, int n, int k0,
                                    int kend, Acc best) {
  int found = k0;
  bool hit = false;
#pragma unroll
  for (int kk = 0; kk < BK; ++kk) {
    const int k = k0 + kk;
    if (k < kend) {
      const Acc s = stage_in<T, Acc, MIN>(a[m * p.sam + k * p.sak]) + stage_in<T, Acc, MIN>(b[k * p.sbk + n * p.sbn]);
      found = !hit && s == best ? k : found;
      hit = hit || s == best;
    }
  }
  return found;
}

// a: [batch, M, K], b: [batch, K, N], streamed as their packed copies pa: [.., Kp, lda], pb:
// [.., Kp, ldb] -> c, argmax, margin: [batch, M, N]. One CTA (256 threads): the 128 x 128 tile
// of C at blockIdx.x, over the K slice blockIdx.z, for batches blockIdx.y + i * gridDim.y; one
// thread: 8 x 8 entries. MODE: kArgmax | kMargin bits (0: value only).
template <typename T, typename Acc, bool MIN, int MODE>
__global__ void __launch_bounds__(kThreads, MODE == 0 ? 2 : 1)
maxplus_fwd_kernel(const Params<T, Acc> p) {
  constexpr bool kTile = MODE == kArgmax;  // argmax per k tile, resolved in the epilogue
  constexpr int BK = kTileRows * 4 / sizeof(Acc);  // k per tile: 16 (8 for double)
  static_assert(kKQuant % BK == 0, "tiles divide the K padding");
  __shared__ __align__(16) Acc As[2][BK][kBM + kPad];
  __shared__ __align__(16) Acc Bs[2][BK][kBN + kPad];
  const Acc zero = zero_of<T, Acc, MIN>();
  int m0, n0;
  tile_origin(p.M, p.N, m0, n0);

  const int t = threadIdx.x;
  const int tx = t % 16, ty = t / 16;  // compute: rows ty*4 (+64), cols tx*4 (+64)
  const int kbeg = blockIdx.z * p.ksplit, kend = min(p.K, kbeg + p.ksplit);
  const int ktiles = (min(p.K, kbeg + p.ksplit) - kbeg + kKQuant - 1) / kKQuant * (kKQuant / BK);

  for (int64_t bat = blockIdx.y; bat < p.batch; bat += gridDim.y) {
    int64_t oa, ob;
    p.L.offsets(bat, oa, ob);
    const T* a = p.a + oa;
    const T* b = p.b + ob;
    p.LP.offsets(bat, oa, ob);
    TileCopy<Acc, BK> ca(static_cast<const Acc*>(p.pa) + oa + int64_t(kbeg) * p.lda + m0, p.lda, t);
    TileCopy<Acc, BK> cb(static_cast<const Acc*>(p.pb) + ob + int64_t(kbeg) * p.ldb + n0, p.ldb, t);

    Acc top1[8][8], top2[8][8], tb[8][8];
    int idx[8][8];
    unsigned tix[8][4];  // kTile: the winning tile of entries (i, 2q) and (i, 2q + 1), 16 bits each
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        top1[i][j] = zero;
        if constexpr (MODE & kMargin) top2[i][j] = zero;
        if constexpr (MODE & kArgmax) idx[i][j] = 0;
        if constexpr (kTile) tix[i][j / 2] = 0;
      }

    __syncthreads();  // the previous batch's last reads are done
    ca.next(As[0]);
    cb.next(Bs[0]);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
      const int buf = kt & 1;
      if (kt + 1 < ktiles) {  // the next tile: buf ^ 1 was last read before the previous barrier
        ca.next(As[buf ^ 1]);
        cb.next(Bs[buf ^ 1]);
        __pipeline_commit();
      }
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        const Vec4<Acc> a0 = lds4(&As[buf][kk][ty * 4]), a1 = lds4(&As[buf][kk][64 + ty * 4]);
        const Vec4<Acc> b0 = lds4(&Bs[buf][kk][tx * 4]), b1 = lds4(&Bs[buf][kk][64 + tx * 4]);
        Acc av[8], bv[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          av[i] = a0.v[i]; av[4 + i] = a1.v[i];
          bv[i] = b0.v[i]; bv[4 + i] = b1.v[i];
        }
        const int k = kbeg + kt * BK + kk;
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if constexpr (MODE == 0) {
              top1[i][j] = addmax<MIN>(av[i], bv[j], top1[i][j]);
            } else if constexpr (kTile) {
              tb[i][j] = kk == 0 ? av[i] + bv[j] : addmax<MIN>(av[i], bv[j], tb[i][j]);
            } else {
              const Acc s = av[i] + bv[j];
              if constexpr (MODE & kMargin) {
                const Acc worse = MIN ? fmax(top1[i][j], s) : fmin(top1[i][j], s);
                top2[i][j] = MIN ? fmin(top2[i][j], worse) : fmax(top2[i][j], worse);
              }
              if constexpr (MODE & kArgmax) idx[i][j] = better<MIN>(s, top1[i][j]) ? k : idx[i][j];
              top1[i][j] = combine<MIN>(top1[i][j], s);
            }
          }
      }
      if constexpr (kTile) {  // record the tile where the best improves (two SEL + one LOP3 per pair)
        const unsigned ktd = unsigned(kt) * 0x10001u;
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const unsigned lo = improves<MIN>(tb[i][2 * q], top1[i][2 * q]) ? ktd : tix[i][q];
            const unsigned hi = improves<MIN>(tb[i][2 * q + 1], top1[i][2 * q + 1]) ? ktd : tix[i][q];
            tix[i][q] = (lo & 0xFFFFu) | (hi & 0xFFFF0000u);
            top1[i][2 * q] = combine<MIN>(top1[i][2 * q], tb[i][2 * q]);
            top1[i][2 * q + 1] = combine<MIN>(top1[i][2 * q + 1], tb[i][2 * q + 1]);
          }
      }
      __pipeline_wait_prior(0);  // this thread's copies of the next tile have landed
      __syncthreads();
    }

    const int64_t out0 = bat * int64_t(p.M) * p.N;
    for_outputs(p.M, p.N, m0, n0, ty, tx, [&](int i, int j, int m, int n) {
      const int64_t o = out0 + int64_t(m) * p.N + n;
      int k = 0;
      if constexpr (kTile) {
        const int tile = j % 2 ? int(tix[i][j / 2] >> 16) : int(tix[i][j / 2] & 0xFFFFu);
        k = resolve<T, Acc, MIN, BK>(a, b, p, m, n, kbeg + tile * BK, kend, top1[i][j]);
      } else if constexpr (MODE & kArgmax) {
        k = idx[i][j];
      }
      put<T, Acc, MIN>(p, o, top1[i][j], k, MODE & kArgmax);
      if constexpr (MODE & kMargin) {
        const Acc t1 = top1[i][j], t2 = top2[i][j];
        // a tie is 0, at the winning infinity too (where the difference is NaN)
        const Acc gap = t1 == t2 ? Acc(0) : MIN ? t2 - t1 : t1 - t2;
        p.margin[o] = static_cast<T>((t2 == zero && t1 == t1) ? Acc(INFINITY) : gap);
      }
    });
  }
}

}  // namespace
}  // namespace geokern
