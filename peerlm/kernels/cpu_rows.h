// Row helpers shared by the CPU kernels of cpu.cpp (retrieval, embedding bags) and cpu_optim.cpp (the
// tables' optimizer updates), and the latter's entry points, which cpu.cpp's module binds.

#pragma once

#include <torch/extension.h>

#include <optional>

namespace {

template <typename scalar_t>
inline scalar_t dot(const scalar_t* w, const scalar_t* x, int64_t D) {
  scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += w[d] * x[d];
  return acc;
}

// o[d0..d1) = 0 + w * x[d0..d1) (an add into zero: -0 products give +0, as after torch.zeros)
template <typename scalar_t>
inline void assign(scalar_t* o, scalar_t w, const scalar_t* x, int64_t d0, int64_t d1) {
#pragma omp simd
  for (int64_t d = d0; d < d1; ++d) o[d] = scalar_t(0) + w * x[d];
}

// o[d0..d1) += w * x[d0..d1)
template <typename scalar_t>
inline void axpy(scalar_t* o, scalar_t w, const scalar_t* x, int64_t d0, int64_t d1) {
#pragma omp simd
  for (int64_t d = d0; d < d1; ++d) o[d] += w * x[d];
}

// Rows are read (bag_dot) or added to (bag_scatter) in the order of the ids, a random row each time: a
// row is asked for kAhead pairs before its turn, so that its cache lines are on the way meanwhile.
constexpr int64_t kAhead = 8;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t len, bool write = false) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = len * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t b = 0; b < bytes; b += 64) {
    if (write) __builtin_prefetch(p + b, 1, 3);
    else __builtin_prefetch(p + b, 0, 3);
  }
}

void check_cpu_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

void row_adamw_(torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, torch::Tensor step,
                torch::Tensor rows, torch::Tensor grad, double lr, double beta1, double beta2, double eps,
                double weight_decay);

void bag_update_(torch::Tensor x, torch::Tensor target, torch::Tensor weights, torch::Tensor rows,
                 torch::Tensor param, std::optional<torch::Tensor> exp_avg, std::optional<torch::Tensor> exp_avg_sq,
                 std::optional<torch::Tensor> step, double lr, double beta1, double beta2, double eps,
                 double weight_decay);
