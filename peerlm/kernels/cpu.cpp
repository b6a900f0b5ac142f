// CPU kernels of the fused PEER / PKM paths (peerlm/kernels/cpu.py builds and loads this file with
// cpu_optim.cpp).
//
// - pk_topk: exact product-key top-k, the whole of retrieval's discrete part in one pass per row:
//   top-k of each half's sub-key scores, the candidate grid's pairs (a, b) with (a + 1)(b + 1) <= k,
//   top-k of their sums. torch.topk pays a fixed cost per row that dominates at n = 256; here a row is
//   one scan that bounds the k-th largest, a compaction of the few scores above the bound, and their
//   order. With AVX-512 (float), the bound, the compaction and the order are vector code without
//   data-dependent branches; elsewhere nth_element and an insertion.
//   Ties keep the lower index (sub-key id, then grid position), so results are deterministic.
// - bag_dot: out[t, s] = table[ids[t, s]] . rows[t] (what aten's embedding-bag per-sample-weight
//   backward computes, without its per-pair overhead).
// - bag_scatter: out[target[t, s]] += w[t, s] * rows[t], into an (R, D) tensor (new, or a caller's
//   buffer reused across steps) as if zeroed first, without the sort aten's embedding-bag dense
//   backward runs first. Threads split the columns, so no two write the
//   same element and each element sums its pairs in (t, s) order: deterministic for any thread count.
// - row_adamw_, bag_update_: the tables' optimizer updates (cpu_optim.cpp; shared row helpers in
//   cpu_rows.h), bound in this file's module.
//
// All take contiguous CPU tensors of one floating type (float or double), int64 ids, and accumulate
// in that type.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "cpu_rows.h"

namespace {

// Candidates of a row: s[p] >= tau copied out in index order (value to cand, index to cidx), returning how
// many, and whether the row has a NaN. Scratch holds n + 16 of each (the vector path stores whole lanes).
template <typename scalar_t>
inline int64_t compact_ge_scalar(const scalar_t* s, int64_t n, scalar_t tau, scalar_t* cand, int32_t* cidx,
                                 bool* nan, int32_t offset = 0) {
  int64_t c = 0;
  bool bad = false;
  for (int64_t p = 0; p < n; ++p) {  // branch-free
    cand[c] = s[p];
    cidx[c] = offset + static_cast<int32_t>(p);
    c += (s[p] >= tau);
    bad |= (s[p] != s[p]);
  }
  *nan = bad;
  return c;
}

template <typename scalar_t>
inline int64_t compact_ge(const scalar_t* s, int64_t n, scalar_t tau, scalar_t* cand, int32_t* cidx, bool* nan) {
  return compact_ge_scalar(s, n, tau, cand, cidx, nan);
}

#if defined(__AVX512F__)
// float with AVX-512: 16 compares, one compress of values and one of indices per 16 scores
template <>
inline int64_t compact_ge<float>(const float* s, int64_t n, float tau, float* cand, int32_t* cidx, bool* nan) {
  int64_t c = 0, p = 0;
  const __m512 t = _mm512_set1_ps(tau);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sixteen = _mm512_set1_epi32(16);
  __mmask16 bad = 0;
  for (; p + 16 <= n; p += 16) {
    const __m512 x = _mm512_loadu_ps(s + p);
    const __mmask16 m = _mm512_cmp_ps_mask(x, t, _CMP_GE_OQ);
    bad |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    _mm512_storeu_ps(cand + c, _mm512_maskz_compress_ps(m, x));
    _mm512_storeu_si512(cidx + c, _mm512_maskz_compress_epi32(m, idx));
    c += __builtin_popcount(static_cast<unsigned>(m));
    idx = _mm512_add_epi32(idx, sixteen);
  }
  bool tail_bad = false;
  c += compact_ge_scalar(s + p, n - p, tau, cand + c, cidx + c, &tail_bad, static_cast<int32_t>(p));
  *nan = bad != 0 || tail_bad;
  return c;
}
#endif

// The k-th largest of x[0..G), k <= G (reorders x).
template <typename scalar_t>
inline scalar_t nth_largest(scalar_t* x, int64_t G, int64_t k) {
  std::nth_element(x, x + (k - 1), x + G, [](scalar_t a, scalar_t b) { return a > b; });
  return x[k - 1];
}

// The k largest of cand[0..c) (k <= c), sorted descending into v, with their cidx into ix; ties keep the
// earlier candidate. An insertion into the sorted top k: most candidates skip it after one compare.
template <typename scalar_t>
inline void insert_sorted(const scalar_t* cand, const int32_t* cidx, int64_t c, int64_t k, scalar_t* v,
                          int64_t* ix) {
  int64_t cnt = 0;  // strict >, so ties keep the earlier (lower) index
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
inline scalar_t kth_largest(scalar_t* x, int64_t G, int64_t k) {
  return nth_largest(x, G, k);
}

template <typename scalar_t>
inline void select_sorted(const scalar_t* cand, const int32_t* cidx, int64_t c, int64_t k, scalar_t* v,
                          int64_t* ix) {
  insert_sorted(cand, cidx, c, k, v, ix);
}

#if defined(__AVX512F__)
// Up to 16 * NV floats, NaN-free, in NV vectors. Counts are taken for 16 elements at once against each
// element in turn (a broadcast, a compare, a masked add): no branches to mispredict, which is what
// nth_element and the insertion pay on short random rows.
template <int NV>
struct Lanes {
  __m512 x[NV];
  __mmask16 valid[NV];
  Lanes(const float* v, int64_t c) {
    for (int w = 0; w < NV; ++w) {
      const int64_t left = c - 16 * w;
      valid[w] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
      x[w] = _mm512_maskz_loadu_ps(valid[w], v + 16 * w);
    }
  }
};

// the k-th largest is the least element with fewer than k others larger
template <int NV>
inline float kth_by_count(const float* x, int64_t G, int64_t k) {
  const Lanes<NV> lanes(x, G);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i greater[NV];
  for (int w = 0; w < NV; ++w) greater[w] = _mm512_setzero_si512();
  for (int64_t j = 0; j < G; ++j) {
    const __m512 b = _mm512_set1_ps(x[j]);
    for (int w = 0; w < NV; ++w)
      greater[w] = _mm512_mask_add_epi32(greater[w], _mm512_cmp_ps_mask(b, lanes.x[w], _CMP_GT_OQ), greater[w], one);
  }
  const __m512i kk = _mm512_set1_epi32(static_cast<int>(k));
  __m512 tau = _mm512_set1_ps(std::numeric_limits<float>::infinity());  // stays only for a NaN row
  for (int w = 0; w < NV; ++w)
    tau = _mm512_mask_min_ps(tau, lanes.valid[w] & _mm512_cmplt_epi32_mask(greater[w], kk), tau, lanes.x[w]);
  return _mm512_reduce_min_ps(tau);
}

// the k largest in order: each element's rank (how many are larger, or equal and earlier) is a
// permutation of 0..c-1; those under k are scattered to their place
template <int NV>
inline void select_by_rank(const float* cand, const int32_t* cidx, int64_t c, int64_t k, float* v, int64_t* ix) {
  const Lanes<NV> lanes(cand, c);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i rank[NV], pos[NV];
  for (int w = 0; w < NV; ++w) {
    rank[w] = _mm512_setzero_si512();
    pos[w] = _mm512_add_epi32(lane, _mm512_set1_epi32(16 * w));
  }
  for (int64_t j = 0; j < c; ++j) {
    const __m512 b = _mm512_set1_ps(cand[j]);
    const __m512i jj = _mm512_set1_epi32(static_cast<int>(j));
    for (int w = 0; w < NV; ++w) {
      const __mmask16 ahead = _mm512_cmp_ps_mask(b, lanes.x[w], _CMP_GT_OQ) |
                              (_mm512_cmp_ps_mask(b, lanes.x[w], _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(jj, pos[w]));
      rank[w] = _mm512_mask_add_epi32(rank[w], ahead, rank[w], one);
    }
  }
  const __m512i kk = _mm512_set1_epi32(static_cast<int>(k));
  for (int w = 0; w < NV; ++w) {
    const __mmask16 keep = lanes.valid[w] & _mm512_cmplt_epi32_mask(rank[w], kk);
    _mm512_mask_i32scatter_ps(v, keep, rank[w], lanes.x[w], 4);
    const __m512i id = _mm512_maskz_loadu_epi32(lanes.valid[w], cidx + 16 * w);
    _mm512_mask_i32scatter_epi64(ix, static_cast<__mmask8>(keep), _mm512_castsi512_si256(rank[w]),
                                 _mm512_cvtepi32_epi64(_mm512_castsi512_si256(id)), 8);
    _mm512_mask_i32scatter_epi64(ix, static_cast<__mmask8>(keep >> 8), _mm512_extracti64x4_epi64(rank[w], 1),
                                 _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(id, 1)), 8);
  }
}

template <>
inline float kth_largest<float>(float* x, int64_t G, int64_t k) {
  switch ((G + 15) / 16) {
    case 1: return kth_by_count<1>(x, G, k);
    case 2: return kth_by_count<2>(x, G, k);
    case 3: return kth_by_count<3>(x, G, k);
    case 4: return kth_by_count<4>(x, G, k);
    default: return nth_largest(x, G, k);
  }
}

template <>
inline void select_sorted<float>(const float* cand, const int32_t* cidx, int64_t c, int64_t k, float* v,
                                 int64_t* ix) {
  switch ((c + 15) / 16) {
    case 1: return select_by_rank<1>(cand, cidx, c, k, v, ix);
    case 2: return select_by_rank<2>(cand, cidx, c, k, v, ix);
    case 3: return select_by_rank<3>(cand, cidx, c, k, v, ix);
    case 4: return select_by_rank<4>(cand, cidx, c, k, v, ix);
    default: return insert_sorted(cand, cidx, c, k, v, ix);
  }
}
#endif

// the k largest of s[0..n) into v[0..k), ix[0..k), sorted descending, ties to the lower index.
// A first pass bounds the k-th largest from below: split s into G = min(n, 2k) strided groups (element
// p in group p % G, so the maxima are element-wise maxima of G-wide slices); the k-th largest group
// maximum tau has at least k elements (k maxima) at or above it, so nothing below tau is in the top k.
// Those at or above it (about 1.3k for normal scores) are copied out in index order (compact_ge) and
// the k largest of them taken in order (select_sorted).
// Scratch: cand/cidx hold n + 16 each, gmax 2k.
template <typename scalar_t>
inline void row_topk(const scalar_t* s, int64_t n, int64_t k, scalar_t* v, int64_t* ix, scalar_t* cand,
                     int32_t* cidx, scalar_t* gmax) {
  const int64_t G = std::min(n, 2 * k);
  for (int64_t g = 0; g < G; ++g) gmax[g] = s[g];
  for (int64_t p0 = G; p0 < n; p0 += G) {
    const int64_t m = std::min(G, n - p0);
    for (int64_t g = 0; g < m; ++g) gmax[g] = s[p0 + g] > gmax[g] ? s[p0 + g] : gmax[g];
  }
  const scalar_t tau = kth_largest(gmax, G, k);
  bool nan = false;
  const int64_t c = compact_ge(s, n, tau, cand, cidx, &nan);
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
  select_sorted(cand, cidx, c, k, v, ix);
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
  TORCH_CHECK(std::max(n, P) < (int64_t{1} << 31), "at most 2^31 - 1 scores per row");
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
      std::vector<scalar_t> va(k), vb(k), grid(P), cand(m + 16), gmax(m);
      std::vector<int64_t> ia(k), ib(k), pos(k);
      std::vector<int32_t> cidx(m + 16);
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
  for (int64_t p = 0; p < T * K; ++p) {
    TORCH_CHECK(0 <= ix[p] && ix[p] < N, "id ", ix[p], " out of range for a table of ", N, " rows");
  }
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "bag_dot", [&] {
    const scalar_t* X = rows.data_ptr<scalar_t>();
    const scalar_t* W = table.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      const int64_t last = end * K;
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* x = X + t * D;
        for (int64_t s = 0; s < K; ++s) {
          const int64_t p = t * K + s;
          if (p + kAhead < last) prefetch_row(W + ix[p + kAhead] * D, D);
          O[p] = dot(W + ix[p] * D, x, D);
        }
      }
    });
  });
  return out;
}

torch::Tensor bag_scatter(torch::Tensor rows, torch::Tensor target, torch::Tensor weights, int64_t num_rows,
                          std::optional<torch::Tensor> out_buffer) {
  check_cpu_contiguous(rows, "rows");
  check_cpu_contiguous(target, "target");
  check_cpu_contiguous(weights, "weights");
  TORCH_CHECK(rows.dim() == 2 && target.dim() == 2 && target.sizes() == weights.sizes() &&
                  rows.size(0) == target.size(0) && rows.scalar_type() == weights.scalar_type(),
              "bag_scatter takes rows (T, D), target (T, K), weights (T, K)");
  const int64_t T = target.size(0), K = target.size(1), D = rows.size(1);
  const int64_t* tg = target.data_ptr<int64_t>();
  for (int64_t p = 0; p < T * K; ++p) {
    TORCH_CHECK(0 <= tg[p] && tg[p] < num_rows, "target ", tg[p], " out of range for ", num_rows, " rows");
  }
  torch::Tensor out;
  if (out_buffer.has_value()) {
    const torch::Tensor& buf = *out_buffer;
    check_cpu_contiguous(buf, "out");
    TORCH_CHECK(buf.dim() == 2 && buf.size(0) >= num_rows && buf.size(1) == D &&
                    buf.scalar_type() == rows.scalar_type(),
                "out must be a (>= num_rows, D) tensor of the rows' dtype");
    out = buf.narrow(0, 0, num_rows);
  } else {
    out = torch::empty({num_rows, D}, rows.options());
  }
  // A row's first pair writes it (0 + w x, the bits of an add into zero), the others add; rows no pair
  // targets are zeroed. No pass over the whole output first, so a reused buffer is touched once.
  std::vector<uint8_t> first(T * K, 0), seen(num_rows, 0);
  for (int64_t p = 0; p < T * K; ++p) {
    first[p] = !seen[tg[p]];
    seen[tg[p]] = 1;
  }
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "bag_scatter", [&] {
    const scalar_t* X = rows.data_ptr<scalar_t>();
    const scalar_t* Wt = weights.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_rows, 1024, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        if (!seen[r]) std::fill(O + r * D, O + (r + 1) * D, scalar_t(0));
    });
    at::parallel_for(0, D, 16, [&](int64_t d0, int64_t d1) {
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* x = X + t * D;
        for (int64_t s = 0; s < K; ++s) {
          const int64_t p = t * K + s;
          if (p + kAhead < T * K) prefetch_row(O + tg[p + kAhead] * D + d0, d1 - d0, true);
          if (first[p]) assign(O + tg[p] * D, Wt[p], x, d0, d1);
          else axpy(O + tg[p] * D, Wt[p], x, d0, d1);
        }
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pk_topk", &pk_topk, "exact product-key top-k: (values, indices i * n + j)");
  m.def("bag_dot", &bag_dot, "out[t * K + s] = table[ids[t, s]] . rows[t]");
  m.def("row_adamw_", &row_adamw_, "AdamW on rows of param/exp_avg/exp_avg_sq in place, per-row step counts");
  m.def("bag_scatter", &bag_scatter, "out[target[t, s]] += weights[t, s] * rows[t], out (num_rows, D)",
        py::arg("rows"), py::arg("target"), py::arg("weights"), py::arg("num_rows"), py::arg("out") = py::none());
  m.def("bag_update_", &bag_update_, "bag_scatter's rows applied at once: AdamW (row_adamw_) or SGD, in place",
        py::arg("x"), py::arg("target"), py::arg("weights"), py::arg("rows"), py::arg("param"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("step"), py::arg("lr"), py::arg("beta1") = 0.0, py::arg("beta2") = 0.0,
        py::arg("eps") = 0.0, py::arg("weight_decay") = 0.0);
}
