// The expert tables' optimizer updates, on the rows a batch touched (peerlm/kernels/cpu.py builds this
// file with cpu.cpp into one extension).
//
// - row_adamw_: RowSparseAdamW's update of the touched rows, in place, one pass per row.
// - bag_update_: bag_scatter's sums and row_adamw_'s update (or plain SGD's) in one pass, the table
//   update fused into the backward: each gradient row is summed in a row of scratch and applied at
//   once, so the batch's gradient rows are never stored.
//
// Both take contiguous CPU tensors of one floating type (float or double) and int64 ids and step counts.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <deque>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <optional>
#include <utility>
#include <vector>

#include "cpu_rows.h"

namespace {

// one row of row_adamw_ (a function of its own: a pragma cannot sit inside AT_DISPATCH's macro argument)
template <typename scalar_t>
inline void adamw_row(scalar_t* p, scalar_t* m, scalar_t* v, const scalar_t* g, int64_t D, scalar_t w1, scalar_t b2,
                      scalar_t c2, scalar_t eps, bool decays, scalar_t decay, scalar_t bc2_sqrt, scalar_t neg_step) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t gd = g[d];
    const scalar_t md = m[d] + w1 * (gd - m[d]);
    const scalar_t vd = v[d] * b2 + c2 * gd * gd;
    m[d] = md;
    v[d] = vd;
    const scalar_t denom = std::sqrt(vd) / bc2_sqrt + eps;
    p[d] = (decays ? p[d] * decay : p[d]) + (md * neg_step) / denom;
  }
}

// AdamW's bias corrections by step count t: 1 - beta1^t and sqrt(1 - beta2^t), the expressions
// adamw_step would otherwise evaluate (two std::pow) for every row of every update, tabulated once per t.
// A row's count grows by one per update, so a table that covers one past the largest count seen by
// the last update covers every row of the next; counts beyond it (a first update, a resumed run, a
// count past kMaxSteps) are computed on the spot. The same double expressions either way: the same
// bits. A kernel call reads a table under its shared lock (CorrectionsLease) and grows it afterwards
// under the exclusive one, so calls from several threads at once stay safe.
class BiasCorrections {
 public:
  static constexpr int64_t kMaxSteps = int64_t(1) << 20;  // 16 MiB of doubles at most per (beta1, beta2)
  static constexpr int64_t kGrowth = int64_t(1) << 16;    // entries added by one call at most

  BiasCorrections(double beta1, double beta2) : beta1_(beta1), beta2_(beta2) {}

  bool is(double beta1, double beta2) const { return beta1 == beta1_ && beta2 == beta2_; }

  // (1 - beta1^t, sqrt(1 - beta2^t))
  std::pair<double, double> at(int64_t t) const {
    if (0 <= t && t < static_cast<int64_t>(bc1_.size())) return {bc1_[t], bc2_sqrt_[t]};
    return compute(t);
  }

  // tabulate every t up to `last`, at most kGrowth more than now and not past kMaxSteps (a run resumed
  // at a high count catches up over a few calls); under the exclusive lock
  void grow(int64_t last) {
    const int64_t first = static_cast<int64_t>(bc1_.size());
    last = std::min({last, first + kGrowth, kMaxSteps});
    if (last < first) return;
    bc1_.reserve(last + 1);
    bc2_sqrt_.reserve(last + 1);
    for (int64_t t = first; t <= last; ++t) {
      const auto c = compute(t);
      bc1_.push_back(c.first);
      bc2_sqrt_.push_back(c.second);
    }
  }

  std::shared_mutex mutex;

 private:
  std::pair<double, double> compute(int64_t t) const {
    const double td = static_cast<double>(t);
    return {1 - std::pow(beta1_, td), std::sqrt(1 - std::pow(beta2_, td))};
  }

  double beta1_, beta2_;
  std::vector<double> bc1_, bc2_sqrt_;
};

// the tables of the four (beta1, beta2) pairs used last, kept across calls (a table dropped from the
// list lives on while a call still holds it)
std::mutex corrections_mutex;
std::deque<std::shared_ptr<BiasCorrections>> corrections_tables;

// One kernel call's use of the table of (beta1, beta2): read-only while the lease lives; finish() grows
// it to one past the largest step count the call reached.
class CorrectionsLease {
 public:
  CorrectionsLease(double beta1, double beta2) : table_(find(beta1, beta2)), read_(table_->mutex) {}

  const BiasCorrections& table() const { return *table_; }

  void finish(int64_t largest) {
    read_.unlock();
    std::unique_lock<std::shared_mutex> write(table_->mutex);
    table_->grow(largest + 1);
  }

 private:
  static std::shared_ptr<BiasCorrections> find(double beta1, double beta2) {
    std::lock_guard<std::mutex> lock(corrections_mutex);
    // least recently used first: a table found moves to the back
    for (auto it = corrections_tables.begin(); it != corrections_tables.end(); ++it) {
      if ((*it)->is(beta1, beta2)) {
        auto found = *it;
        corrections_tables.erase(it);
        return corrections_tables.emplace_back(std::move(found));
      }
    }
    if (corrections_tables.size() >= 4) corrections_tables.pop_front();
    return corrections_tables.emplace_back(std::make_shared<BiasCorrections>(beta1, beta2));
  }

  std::shared_ptr<BiasCorrections> table_;
  std::shared_lock<std::shared_mutex> read_;
};

// the largest of the step counts a thread reached, across threads
inline void note_largest(std::atomic<int64_t>& largest, int64_t t) {
  int64_t seen = largest.load(std::memory_order_relaxed);
  while (t > seen && !largest.compare_exchange_weak(seen, t, std::memory_order_relaxed)) {
  }
}

// AdamW on row r of P / M / V with gradient row g, with the bias corrections of the row's own step count
// (step[r], incremented here and returned): the update of row_adamw_ and bag_update_ alike
template <typename scalar_t>
inline int64_t adamw_step(scalar_t* P, scalar_t* M, scalar_t* V, int64_t* step, int64_t r, const scalar_t* g,
                          int64_t D, double lr, const BiasCorrections& bc, scalar_t w1, scalar_t b2, scalar_t c2,
                          scalar_t eps, bool decays, scalar_t decay) {
  const int64_t t = ++step[r];
  const auto [bc1, bc2_sqrt] = bc.at(t);
  const scalar_t neg_step = static_cast<scalar_t>(-(lr / bc1));
  adamw_row(P + r * D, M + r * D, V + r * D, g, D, w1, b2, c2, eps, decays, decay,
            static_cast<scalar_t>(bc2_sqrt), neg_step);
  return t;
}

// one row of bag_update_'s SGD: p <- p + (-lr) g, as torch's add_(g, alpha=-lr)
template <typename scalar_t>
inline void sgd_row(scalar_t* p, const scalar_t* g, int64_t D, scalar_t neg_lr) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) p[d] += neg_lr * g[d];
}

}  // namespace

// One AdamW step on rows[u] of param / exp_avg / exp_avg_sq (rows distinct), with grad row u, each row
// with the bias corrections of its own step count (step[rows[u]], incremented here), in the order of
// RowSparseAdamW's PyTorch ops: m <- m + (1 - beta1)(g - m); v <- beta2 v + (1 - beta2) g^2;
// p <- p (1 - lr wd) + (-lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps). One pass over each row in place,
// where the PyTorch ops gather the rows, run eight passes and scatter them back.
void row_adamw_(torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, torch::Tensor step,
                torch::Tensor rows, torch::Tensor grad, double lr, double beta1, double beta2, double eps,
                double weight_decay) {
  check_cpu_contiguous(param, "param");
  check_cpu_contiguous(exp_avg, "exp_avg");
  check_cpu_contiguous(exp_avg_sq, "exp_avg_sq");
  check_cpu_contiguous(step, "step");
  check_cpu_contiguous(rows, "rows");
  check_cpu_contiguous(grad, "grad");
  TORCH_CHECK(param.dim() == 2 && exp_avg.sizes() == param.sizes() && exp_avg_sq.sizes() == param.sizes() &&
                  grad.dim() == 2 && grad.size(1) == param.size(1) && rows.numel() == grad.size(0) &&
                  step.numel() == param.size(0),
              "row_adamw_ takes param, exp_avg, exp_avg_sq (N, D), step (N), rows (U), grad (U, D)");
  TORCH_CHECK(exp_avg.scalar_type() == param.scalar_type() && exp_avg_sq.scalar_type() == param.scalar_type() &&
                  grad.scalar_type() == param.scalar_type() && step.scalar_type() == torch::kInt64 &&
                  rows.scalar_type() == torch::kInt64,
              "row_adamw_: param, state and grad of one floating type; step and rows int64");
  const int64_t N = param.size(0), D = param.size(1), U = rows.numel();
  const int64_t* R = rows.data_ptr<int64_t>();
  for (int64_t u = 0; u < U; ++u) TORCH_CHECK(0 <= R[u] && R[u] < N, "row ", R[u], " out of range for ", N);
  int64_t* S = step.data_ptr<int64_t>();
  CorrectionsLease lease(beta1, beta2);
  const BiasCorrections& bc = lease.table();
  std::atomic<int64_t> largest{0};
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "row_adamw_", [&] {
    scalar_t* P = param.data_ptr<scalar_t>();
    scalar_t* M = exp_avg.data_ptr<scalar_t>();
    scalar_t* V = exp_avg_sq.data_ptr<scalar_t>();
    const scalar_t* G = grad.data_ptr<scalar_t>();
    const scalar_t w1 = static_cast<scalar_t>(1 - beta1), b2 = static_cast<scalar_t>(beta2),
                   c2 = static_cast<scalar_t>(1 - beta2), e = static_cast<scalar_t>(eps),
                   decay = static_cast<scalar_t>(1 - lr * weight_decay);
    at::parallel_for(0, U, 64, [&](int64_t begin, int64_t end) {
      int64_t top = 0;
      for (int64_t u = begin; u < end; ++u) {
        if (u + kAhead < end) {
          const int64_t a = R[u + kAhead] * D;
          prefetch_row(P + a, D, true);
          prefetch_row(M + a, D, true);
          prefetch_row(V + a, D, true);
        }
        top = std::max(top, adamw_step(P, M, V, S, R[u], G + u * D, D, lr, bc, w1, b2, c2, e, weight_decay != 0,
                                       decay));
      }
      note_largest(largest, top);
    });
  });
  lease.finish(largest.load());
}

// The table update fused into the backward. For each u < U: g_u = sum over the pairs p with target[p] == u,
// in (t, s) order, of weights[p] * x[t] (bag_scatter's sums, bit for bit: the same first write, the same
// adds in the same order), then param row rows[u] is updated with g_u at once: AdamW exactly as
// row_adamw_ when exp_avg, exp_avg_sq and step are given, else SGD (p <- p - lr g). Pairs whose target is
// U or more are skipped (rows nobody updates). Threads split the distinct rows; each sums its row in one
// row of scratch, so no (U, D) gradient is ever stored and each parameter row is written once.
void bag_update_(torch::Tensor x, torch::Tensor target, torch::Tensor weights, torch::Tensor rows,
                 torch::Tensor param, std::optional<torch::Tensor> exp_avg, std::optional<torch::Tensor> exp_avg_sq,
                 std::optional<torch::Tensor> step, double lr, double beta1, double beta2, double eps,
                 double weight_decay) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(target, "target");
  check_cpu_contiguous(weights, "weights");
  check_cpu_contiguous(rows, "rows");
  check_cpu_contiguous(param, "param");
  TORCH_CHECK(x.dim() == 2 && target.dim() == 2 && target.sizes() == weights.sizes() && x.size(0) == target.size(0) &&
                  param.dim() == 2 && param.size(1) == x.size(1),
              "bag_update_ takes x (T, D), target (T, K), weights (T, K), rows (U), param (N, D)");
  TORCH_CHECK(x.scalar_type() == param.scalar_type() && weights.scalar_type() == param.scalar_type() &&
                  target.scalar_type() == torch::kInt64 && rows.scalar_type() == torch::kInt64,
              "bag_update_: x, weights and param of one floating type; target and rows int64");
  const bool adam = exp_avg.has_value();
  TORCH_CHECK(adam == exp_avg_sq.has_value() && adam == step.has_value(),
              "bag_update_: give exp_avg, exp_avg_sq and step together (AdamW) or none (SGD)");
  if (adam) {
    check_cpu_contiguous(*exp_avg, "exp_avg");
    check_cpu_contiguous(*exp_avg_sq, "exp_avg_sq");
    check_cpu_contiguous(*step, "step");
    TORCH_CHECK(exp_avg->sizes() == param.sizes() && exp_avg_sq->sizes() == param.sizes() &&
                    exp_avg->scalar_type() == param.scalar_type() && exp_avg_sq->scalar_type() == param.scalar_type() &&
                    step->numel() == param.size(0) && step->scalar_type() == torch::kInt64,
                "bag_update_: exp_avg and exp_avg_sq like param, step (N) int64");
  }
  const int64_t T = target.size(0), K = target.size(1), D = x.size(1), N = param.size(0), U = rows.numel();
  const int64_t* R = rows.data_ptr<int64_t>();
  for (int64_t u = 0; u < U; ++u) {
    TORCH_CHECK(0 <= R[u] && R[u] < N, "row ", R[u], " out of range for ", N);
    TORCH_CHECK(u == 0 || R[u] > R[u - 1], "rows must be ascending and distinct");
  }
  const int64_t* tg = target.data_ptr<int64_t>();
  // the pairs of each target in (t, s) order: a counting sort
  std::vector<int64_t> start(U + 1, 0), order;
  for (int64_t p = 0; p < T * K; ++p) {
    TORCH_CHECK(tg[p] >= 0, "target ", tg[p], " is negative");
    if (tg[p] < U) ++start[tg[p] + 1];
  }
  for (int64_t u = 0; u < U; ++u) start[u + 1] += start[u];
  order.resize(start[U]);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < T * K; ++p)
      if (tg[p] < U) order[fill[tg[p]]++] = p;
  }
  int64_t* S = adam ? step->data_ptr<int64_t>() : nullptr;
  std::optional<CorrectionsLease> lease;
  if (adam) lease.emplace(beta1, beta2);
  const BiasCorrections* bc = adam ? &lease->table() : nullptr;
  std::atomic<int64_t> largest{0};
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "bag_update_", [&] {
    const scalar_t* X = x.data_ptr<scalar_t>();
    const scalar_t* Wt = weights.data_ptr<scalar_t>();
    scalar_t* P = param.data_ptr<scalar_t>();
    scalar_t* M = adam ? exp_avg->data_ptr<scalar_t>() : nullptr;
    scalar_t* V = adam ? exp_avg_sq->data_ptr<scalar_t>() : nullptr;
    const scalar_t w1 = static_cast<scalar_t>(1 - beta1), b2 = static_cast<scalar_t>(beta2),
                   c2 = static_cast<scalar_t>(1 - beta2), e = static_cast<scalar_t>(eps),
                   decay = static_cast<scalar_t>(1 - lr * weight_decay), neg_lr = static_cast<scalar_t>(-lr);
    at::parallel_for(0, U, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> g(D);
      int64_t top = 0;
      for (int64_t u = begin; u < end; ++u) {
        if (u + kAhead < end) {
          const int64_t a = R[u + kAhead] * D;
          prefetch_row(P + a, D, true);
          if (adam) {
            prefetch_row(M + a, D, true);
            prefetch_row(V + a, D, true);
          }
        }
        if (start[u] == start[u + 1]) std::fill(g.begin(), g.end(), scalar_t(0));
        for (int64_t q = start[u]; q < start[u + 1]; ++q) {
          const int64_t p = order[q];
          if (q == start[u]) assign(g.data(), Wt[p], X + (p / K) * D, 0, D);
          else axpy(g.data(), Wt[p], X + (p / K) * D, 0, D);
        }
        const int64_t r = R[u];
        if (adam) {
          top = std::max(top, adamw_step(P, M, V, S, r, g.data(), D, lr, *bc, w1, b2, c2, e, weight_decay != 0,
                                         decay));
        } else {
          sgd_row(P + r * D, g.data(), D, neg_lr);
        }
      }
      note_largest(largest, top);
    });
  });
  if (adam) lease->finish(largest.load());
}
