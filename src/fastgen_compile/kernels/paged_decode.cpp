// Paged decode attention on CPU: each row is one new token of its own sequence, attending to
// that sequence's pages of the KV pool (fp32). FlexAttention's CPU kernel costs ~3 us per (row,
// kv head, page) here, mostly overhead on 3-row query blocks; this loop reads each page once for
// all heads of the row, prefetches the next page while computing, and runs ~1.4x faster on
// decode rows (docs/architecture.md). Prompt chunks stay on FlexAttention.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// q: (rows, heads, dim); caches: (slots, kv_heads, dim) with slot = page * page_size + offset;
// block_table: (rows, max_pages) int32; context_lens: (rows,) int32, the row's sequence length
// with its new token (0: a padding row, left zero); a row sees keys in [len - window, len).
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
                        const at::Tensor& context_lens, int64_t page_size, int64_t window, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat, "paged_decode: fp32 only");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && block_table.is_contiguous() && context_lens.is_contiguous());
  TORCH_CHECK(q.size(2) % Vec::size() == 0, "paged_decode: head_dim must be a multiple of ", Vec::size());
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), group = heads / kv_heads, max_pages = block_table.size(1), nv = dim / Vec::size();
  const int64_t padded_page = (page_size + Vec::size() - 1) / Vec::size() * Vec::size();
  const int64_t slot_stride = kv_heads * dim;
  auto out = at::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(padded_page), acc(heads * dim), mx(heads), sum(heads);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t len = lens[row];
      if (len <= 0) continue;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const float* qrow = qp + row * heads * dim;
      const int32_t* pages = table + row * max_pages;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mx.begin(), mx.end(), kNegInf);
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t pg = lo / page_size; pg * page_size < len; ++pg) {
        if ((pg + 1) * page_size < len) {  // pull the next page in while this one computes
          const int64_t next = static_cast<int64_t>(pages[pg + 1]) * page_size * slot_stride;
          for (int64_t off = 0; off < page_size * slot_stride; off += 16) {
            __builtin_prefetch(kp + next + off);
            __builtin_prefetch(vp + next + off);
          }
        }
        const int64_t first = std::max(pg * page_size, lo) - pg * page_size, last = std::min((pg + 1) * page_size, len) - pg * page_size;
        const int64_t base = static_cast<int64_t>(pages[pg]) * page_size * slot_stride;
        for (int64_t hq = 0; hq < heads; ++hq) {
          const int64_t h = hq / group;
          const float* qh = qrow + hq * dim;
          const float* kpage = kp + base + h * dim;
          const float* vpage = vp + base + h * dim;
          std::fill(score.begin(), score.end(), kNegInf);
          for (int64_t t = first; t < last; ++t) {
            const float* krow = kpage + t * slot_stride;
            Vec dot = Vec::loadu(qh) * Vec::loadu(krow);
            for (int64_t j = 1; j < nv; ++j) dot = at::vec::fmadd(Vec::loadu(qh + j * Vec::size()), Vec::loadu(krow + j * Vec::size()), dot);
            score[t] = dot.reduce_add() * s;
          }
          Vec vmax(kNegInf);
          for (int64_t t = 0; t < padded_page; t += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(score.data() + t));
          const float m = std::max(mx[hq], vmax.reduce_max());
          const float alpha = std::exp(mx[hq] - m);
          Vec vsum(0.f);
          const Vec vm(m);
          for (int64_t t = 0; t < padded_page; t += Vec::size()) {
            const Vec e = (Vec::loadu(score.data() + t) - vm).exp_u20();
            e.store(score.data() + t);
            vsum = vsum + e;
          }
          sum[hq] = sum[hq] * alpha + vsum.reduce_add();
          mx[hq] = m;
          float* a = acc.data() + hq * dim;
          for (int64_t j = 0; j < nv; ++j) {
            Vec x = Vec::loadu(a + j * Vec::size()) * Vec(alpha);
            for (int64_t t = first; t < last; ++t) x = at::vec::fmadd(Vec(score[t]), Vec::loadu(vpage + t * slot_stride + j * Vec::size()), x);
            x.store(a + j * Vec::size());
          }
        }
      }
      float* orow = op + row * heads * dim;
      for (int64_t hq = 0; hq < heads; ++hq) {
        const Vec inv(1.f / sum[hq]);
        for (int64_t j = 0; j < nv; ++j) (Vec::loadu(acc.data() + hq * dim + j * Vec::size()) * inv).store(orow + hq * dim + j * Vec::size());
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor context_lens, int page_size, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("paged_decode", &paged_decode); }
