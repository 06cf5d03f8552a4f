// geokern._C: every op schema is declared here, once; each family's .cu adds only
// its STABLE_TORCH_LIBRARY_IMPL. The ops are on the LibTorch stable ABI (one build serves
// every torch from TORCH_TARGET_VERSION on) and the module uses the limited Python API (no
// pybind11), so the wheel is abi3 too; its one function reports the facts it was built with.
#include <Python.h>
#include <torch/csrc/stable/library.h>
#include <torch/headeronly/version.h>

#ifndef GEOKERN_ARCHS
#define GEOKERN_ARCHS "unknown"
#endif
#ifndef GEOKERN_TORCH_VERSION
#define GEOKERN_TORCH_VERSION "unknown"
#endif
#ifndef GEOKERN_CUDA_VERSION
#define GEOKERN_CUDA_VERSION "unknown"
#endif

STABLE_TORCH_LIBRARY(geokern, m) {
  // Hypercomplex products; n is the algebra dimension (4: quaternions, 8: octonions).
  // Inputs are broadcast against each other in their leading dims.
  m.def("hypercomplex_mul_cuda(Tensor a, Tensor b, int n) -> Tensor");
  m.def("hypercomplex_mul_backward_cuda(Tensor grad, Tensor a, Tensor b, int n) -> (Tensor, Tensor)");
  m.def("hypercomplex_conj_cuda(Tensor a, int n) -> Tensor");

  // Max-plus / min-plus matrix product (csrc/maxplus): a (..., M, K), b (..., K, N), batch
  // dims broadcast. Returns (C, argmax, margin); outputs not asked for are empty.
  // num_splits: split-K slices of K (0: choose; n: n, capped by K; 1: off); margin never splits.
  m.def("maxplus_cuda(Tensor a, Tensor b, bool minplus, bool want_argmax, bool want_margin, int num_splits) -> (Tensor, Tensor, Tensor)");
  // dA, dB (shapes a_shape, b_shape) from dC routed along argmax.
  m.def("maxplus_backward_cuda(Tensor grad, Tensor argmax, int[] a_shape, int[] b_shape) -> (Tensor, Tensor)");

  // Fused tropical attention core (csrc/tropical): q (B, H, Tq, D), k and v
  // (B, Hkv, Tk, D). Returns (y, argmax int32 (B, H, Tq, D), rowarg int32 (B, H, Tq),
  // margin (B, H, Tq)); outputs not asked for are empty.
  m.def("tropical_attention_cuda(Tensor q, Tensor k, Tensor v, bool causal, bool center, bool want_argmax, bool want_margin) -> (Tensor, Tensor, Tensor, Tensor)");
  // (dq, dk, dv) from dy routed along argmax / rowarg (and the score argmax over D).
  m.def("tropical_attention_backward_cuda(Tensor grad, Tensor q, Tensor k, Tensor argmax, Tensor rowarg, bool center) -> (Tensor, Tensor, Tensor)");

  // Retrieval cost and attention (csrc/retrieval) on a diagonal metric w [F] over features:
  // q [NB0, NB1, LQ, F]; k [1|NB0, 1|NB1, M, F]; v likewise [.., M, DV]; r float32 and mask bool
  // broadcasting to [NB0, NB1, LQ, M]. cost: [NB0, NB1, LQ, M] float32. The attention merges the
  // row's keys (k, v, r, mask) and the optional bank (bank_k, bank_v, bank_r, all or none; no mask)
  // by log-sum-exp; returns (out, lse). Knobs, 0 = choose: num_ctas (target grid), bank_splits (most
  // key splits of the bank), chunk (most elements per dP chunk in the backward); pipeline and
  // norm_mma steer the Triton kernel only. The backward returns float32 (dq, dk, dv, dr, dbank_k,
  // dbank_v, dbank_r, dw), the bank's three empty [0] without a bank.
  m.def("retrieval_cost_cuda(Tensor q, Tensor k, Tensor w, Tensor r, float eps) -> Tensor");
  m.def("retrieval_cost_backward_cuda(Tensor grad, Tensor q, Tensor k, Tensor w, Tensor r, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("retrieval_attention_cuda(Tensor q, Tensor k, Tensor v, Tensor w, Tensor r, Tensor? mask, Tensor? bank_k, Tensor? bank_v, Tensor? bank_r, float beta, float eps, int num_ctas, int bank_splits, int pipeline, int norm_mma) -> (Tensor, Tensor)");
  m.def("retrieval_attention_backward_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor w, Tensor r, Tensor? mask, Tensor? bank_k, Tensor? bank_v, Tensor? bank_r, Tensor out, Tensor lse, Tensor? dlse, float beta, float eps, bool need_dr, int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The ultrametric decode state (csrc/ultrametric), in place: tab [B * Hkv, N, D] float32 and cnt
  // [B * Hkv, N] int32 bucket tables, N = sum_{l<=K} p^l. Append adds each kept key (k_digits
  // [B, Hkv, T, K], v [B, Hkv, T, D], keep [B, T] bool) to its K + 1 prefix rows; query writes y
  // [B, H, Tq, D] and lse [B, H, Tq] (float32) of q_digits [B, H, Tq, K] against every key in them.
  m.def("ultrametric_cache_append_cuda(Tensor(a0!) tab, Tensor(a1!) cnt, Tensor k_digits, Tensor v, Tensor? keep, int p) -> ()");
  // Hard-mode ultrametric attention (csrc/ultrametric/attention.cu): q_digits [B, H, Tq, K], k_digits
  // [B, Hkv, Tk, K] integer digits, v [B, Hkv, Tk, D], keep [B, Tk] bool; returns (y [B, H, Tq, D] in v's
  // dtype, lse [B, H, Tq] float32). The backward returns dv [B, Hkv, Tk, D] from grad [B, H, Tq, D] and the
  // forward's lse. Knobs, 0 = choose: chunk (positions per scan chunk), num_segments (segments per group).
  m.def("ultrametric_attention_cuda(Tensor q_digits, Tensor k_digits, Tensor v, Tensor? keep, float alpha, int p, bool causal, int chunk, int num_segments) -> (Tensor, Tensor)");
  m.def("ultrametric_attention_backward_cuda(Tensor grad, Tensor q_digits, Tensor k_digits, Tensor lse, Tensor? keep, float alpha, int p, bool causal, int chunk, int num_segments) -> Tensor");
  // Soft-mode ultrametric attention (csrc/ultrametric/soft.cu): q [B, H, Tq, K], k [B, Hkv, Tk, K] float
  // digits and v [B, Hkv, Tk, D] of one dtype, keep [B, Tk] bool; returns (y [B, H, Tq, D], lse [B, H, Tq]
  // float32). The backward returns (dq, dk, dv) from grad and the forward's y and lse.
  m.def("ultrametric_soft_attention_cuda(Tensor q, Tensor k, Tensor v, Tensor? keep, float alpha, float lcp_beta, bool causal) -> (Tensor, Tensor)");
  m.def("ultrametric_soft_attention_backward_cuda(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? keep, Tensor y, Tensor lse, float alpha, float lcp_beta, bool causal) -> (Tensor, Tensor, Tensor)");
  m.def("ultrametric_cache_query_cuda(Tensor tab, Tensor cnt, Tensor q_digits, Tensor(a3!) y, Tensor(a4!) lse, float alpha, int p) -> ()");
}


// The oldest torch this build serves: TORCH_TARGET_VERSION (0xMMmmpp...) as "M.m".
static PyObject* build_info(PyObject*, PyObject*) {
  const unsigned long long target = TORCH_TARGET_VERSION;
  const int major = int((target >> 56) & 0xff), minor = int((target >> 48) & 0xff);
  char min_torch[16];
  snprintf(min_torch, sizeof min_torch, "%d.%d", major, minor);
  return Py_BuildValue("{s:s,s:s,s:s,s:s,s:s}", "archs", GEOKERN_ARCHS, "torch", GEOKERN_TORCH_VERSION,
                       "cuda", GEOKERN_CUDA_VERSION, "abi", "stable", "min_torch", min_torch);
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "Archs, torch and CUDA versions _C was built with."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module); }
