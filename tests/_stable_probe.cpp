// csrc/stable.cuh's ops:: on CPU tensors (they are device-agnostic), for tests/test_stable_ops.py:
// one op returning what each helper makes from x [2, 3] float32.
#include "stable.cuh"

using namespace geokern;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> probe(const Tensor& x) {
  Tensor e = ops::empty({2, 0, 5}, ops::options(x).dtype(dtype::i64));
  Tensor z = ops::zeros({4, 1, 3}, ops::options(x));
  Tensor ex = ops::expand(ops::reshape(x, {2, 1, 3}), {2, 4, 3});
  Tensor acc = ops::zeros({2, 3}, ops::options(x));
  ops::add_into(acc, x);
  ops::add_into(ops::narrow(acc, 1, 0, 1), ops::narrow(x, 1, 2, 1));
  Tensor h = ops::to(x, dtype::f16);
  return {e, z, ops::permute(ex, {2, 0, 1}), ops::sum_to_size(ex, {2, 1, 3}), acc,
          ops::sum_dim(ops::mul(x, x), -1), ops::bmm(ops::reshape(x, {1, 2, 3}), ops::reshape(x, {1, 3, 2})), h};
}

STABLE_TORCH_LIBRARY(geokern_probe, m) {
  m.def("probe(Tensor x) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
STABLE_TORCH_LIBRARY_IMPL(geokern_probe, CPU, m) { m.impl("probe", TORCH_BOX(&probe)); }
