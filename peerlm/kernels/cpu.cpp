// CPU kernels of the fused PEER / PKM paths (peerlm/kernels/cpu.py builds and loads this file).
//
// - pk_topk: exact product-key top-k, the whole of retrieval's discrete part in one pass per row:
//   top-k of each half's sub-key scores, the candidate grid's pairs (a, b) with (a + 1)(b + 1) <= k,
//   top-k of their sums. torch.topk pays a fixed cost per row that dominates at n = 256; here a row is
//   one scan with an insertion into a sorted list of k, which most elements skip after one compare.
//   Ties keep the lower index (sub-key id, then grid position), so results are deterministic.
// - bag_dot: out[t, s] = table[ids[t, s]] . rows[t] (what aten's embedding-bag per-sample-weight
//   backward computes, without its per-pair overhead).
// - bag_scatter: out[target[t, s]] += w[t, s] * rows[t], into a zeroed (R, D) tensor, without the sort
//   aten's embedding-bag dense backward runs first. Threads split the columns, so no two write the
//   same element and each element sums its pairs in (t, s) order: deterministic for any thread count.
//
// All take contiguous CPU tensors of one floating type (float or double), int64 ids, and accumulate
// in that type.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace {

// the k largest of s[0..n) into v[0..k), ix[0..k), sorted descending, ties to the lower index.
// A first pass bounds the k-th largest from below: split s into G = min(n, 2k) strided groups (element
// p in group p % G, so the maxima are element-wise maxima of G-wide slices); the k-th largest group
// maximum tau has at least k elements (k maxima) at or above it, so nothing below tau is in the top k.
// Those at or above it (about 1.3k for normal scores) are copied out branch-free, in index order, and
// go through an insertion into the sorted top k.
// Scratch: cand/cidx hold n each, gmax 2k.
template <typename scalar_t>
inline void row_topk(const scalar_t* s, int64_t n, int64_t k, scalar_t* v, int64_t* ix, scalar_t* cand,
                     int64_t* cidx, scalar_t* gmax) {
  const int64_t G = std::min(n, 2 * k);
  for (int64_t g = 0; g < G; ++g) gmax[g] = s[g];
  for (int64_t p0 = G; p0 < n; p0 += G) {
    const int64_t m = std::min(G, n - p0);
    for (int64_t g = 0; g < m; ++g) gmax[g] = s[p0 + g] > gmax[g] ? s[p0 + g] : gmax[g];
  }
  // tau: the k-th largest group maximum (G >= k)
  std::nth_element(gmax, gmax + (k - 1), gmax + G, [](scalar_t a, scalar_t b) { return a > b; });
  const scalar_t tau = gmax[k - 1];
  int64_t c = 0;
  bool nan = false;
  for (int64_t p = 0; p < n; ++p) {  // branch-free compaction of the candidates, in index order
    cand[c] = s[p];
    cidx[c] = p;
    c += (s[p] >= tau);
    nan |= (s[p] != s[p]);
  }
  if (nan) {  // no order to take: the first NaN, then the first other ids, so the NaN reaches the loss
    int64_t first = 0;
    while (s[first] == s[first]) ++first;
    v[0] = s[first];
    ix[0] = first;
    for (int64_t q = 1, p = 0; q < k; ++p) {
      if (p == first) continue;
      v[q] = s[p];
      ix[q++] = p;
    }
    return;
  }
  int64_t cnt = 0;  // insertion into the sorted top k: strict >, so ties keep the earlier (lower) index
  for (int64_t q0 = 0; q0 < c; ++q0) {
    const scalar_t x = cand[q0];
    if (cnt == k) {
      if (!(x > v[k - 1])) continue;
      cnt = k - 1;
    }
    int64_t q = cnt;
    while (q > 0 && x > v[q - 1]) {
      v[q] = v[q - 1];
      ix[q] = ix[q - 1];
      --q;
    }
    v[q] = x;
    ix[q] = cidx[q0];
    ++cnt;
  }
}

template <typename scalar_t>
inline scalar_t dot(const scalar_t* w, const scalar_t* x, int64_t D) {
  scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += w[d] * x[d];
  return acc;
}

// o[d0..d1) += w * x[d0..d1)
template <typename scalar_t>
inline void axpy(scalar_t* o, scalar_t w, const scalar_t* x, int64_t d0, int64_t d1) {
#pragma omp simd
  for (int64_t d = d0; d < d1; ++d) o[d] += w * x[d];
}

void check_cpu_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

std::vector<torch::Tensor> pk_topk(torch::Tensor sa, torch::Tensor sb, int64_t k, torch::Tensor a_P,
                                   torch::Tensor b_P) {
  check_cpu_contiguous(sa, "scores_a");
  check_cpu_contiguous(sb, "scores_b");
  TORCH_CHECK(sa.dim() == 2 && sa.sizes() == sb.sizes(), "scores must be (R, n), the same for both halves");
  TORCH_CHECK(sa.scalar_type() == sb.scalar_type(), "both halves must have one dtype");
  const int64_t R = sa.size(0), n = sa.size(1), P = a_P.numel();
  TORCH_CHECK(1 <= k && k <= n, "k must be in [1, n]");
  auto values = torch::empty({R, k}, sa.options());
  auto indices = torch::empty({R, k}, sa.options().dtype(torch::kInt64));
  const int64_t* ap = a_P.data_ptr<int64_t>();
  const int64_t* bp = b_P.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(sa.scalar_type(), "pk_topk", [&] {
    const scalar_t* A = sa.data_ptr<scalar_t>();
    const scalar_t* B = sb.data_ptr<scalar_t>();
    scalar_t* V = values.data_ptr<scalar_t>();
    int64_t* I = indices.data_ptr<int64_t>();
    at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
      const int64_t m = std::max(n, P);
      std::vector<scalar_t> va(k), vb(k), grid(P), cand(m), gmax(m);
      std::vector<int64_t> ia(k), ib(k), pos(k), cidx(m);
      for (int64_t r = begin; r < end; ++r) {
        row_topk(A + r * n, n, k, va.data(), ia.data(), cand.data(), cidx.data(), gmax.data());
        row_topk(B + r * n, n, k, vb.data(), ib.data(), cand.data(), cidx.data(), gmax.data());
        for (int64_t p = 0; p < P; ++p) grid[p] = va[ap[p]] + vb[bp[p]];
        row_topk(grid.data(), P, k, V + r * k, pos.data(), cand.data(), cidx.data(), gmax.data());
        for (int64_t q = 0; q < k; ++q) I[r * k + q] = ia[ap[pos[q]]] * n + ib[bp[pos[q]]];
      }
    });
  });
  return {values, indices};
}

torch::Tensor bag_dot(torch::Tensor rows, torch::Tensor table, torch::Tensor ids) {
  check_cpu_contiguous(rows, "rows");
  check_cpu_contiguous(table, "table");
  check_cpu_contiguous(ids, "ids");
  TORCH_CHECK(rows.dim() == 2 && table.dim() == 2 && ids.dim() == 2 && rows.size(0) == ids.size(0) &&
                  rows.size(1) == table.size(1) && rows.scalar_type() == table.scalar_type(),
              "bag_dot takes rows (T, D), table (N, D), ids (T, K)");
  const int64_t T = ids.size(0), K = ids.size(1), D = rows.size(1), N = table.size(0);
  auto out = torch::empty({T * K}, rows.options());
  const int64_t* ix = ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "bag_dot", [&] {
    const scalar_t* X = rows.data_ptr<scalar_t>();
    const scalar_t* W = table.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* x = X + t * D;
        for (int64_t s = 0; s < K; ++s) {
          const int64_t e = ix[t * K + s];
          TORCH_CHECK(0 <= e && e < N, "id ", e, " out of range for a table of ", N, " rows");
          O[t * K + s] = dot(W + e * D, x, D);
        }
      }
    });
  });
  return out;
}

torch::Tensor bag_scatter(torch::Tensor rows, torch::Tensor target, torch::Tensor weights, int64_t num_rows) {
  check_cpu_contiguous(rows, "rows");
  check_cpu_contiguous(target, "target");
  check_cpu_contiguous(weights, "weights");
  TORCH_CHECK(rows.dim() == 2 && target.dim() == 2 && target.sizes() == weights.sizes() &&
                  rows.size(0) == target.size(0) && rows.scalar_type() == weights.scalar_type(),
              "bag_scatter takes rows (T, D), target (T, K), weights (T, K)");
  const int64_t T = target.size(0), K = target.size(1), D = rows.size(1);
  auto out = torch::zeros({num_rows, D}, rows.options());
  const int64_t* tg = target.data_ptr<int64_t>();
  for (int64_t p = 0; p < T * K; ++p) {
    TORCH_CHECK(0 <= tg[p] && tg[p] < num_rows, "target ", tg[p], " out of range for ", num_rows, " rows");
  }
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "bag_scatter", [&] {
    const scalar_t* X = rows.data_ptr<scalar_t>();
    const scalar_t* Wt = weights.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, D, 16, [&](int64_t d0, int64_t d1) {
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* x = X + t * D;
        for (int64_t s = 0; s < K; ++s) {
          axpy(O + tg[t * K + s] * D, Wt[t * K + s], x, d0, d1);
        }
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pk_topk", &pk_topk, "exact product-key top-k: (values, indices i * n + j)");
  m.def("bag_dot", &bag_dot, "out[t * K + s] = table[ids[t, s]] . rows[t]");
  m.def("bag_scatter", &bag_scatter, "out[target[t, s]] += weights[t, s] * rows[t], out (num_rows, D)");
}
