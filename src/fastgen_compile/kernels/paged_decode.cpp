// Paged decode attention on CPU: each row is one new token of its own sequence, attending to
// that sequence's pages of the decode pool, kept in the model's dtype (fp32 or bf16) beside
// the pool FlexAttention reads. Keys are stored transposed within each page, (kv_heads, dim,
// key_stride), so a query's scores for W keys at once are FMAs of broadcast query elements
// with no horizontal sums; values keep the slot layout (page_size, kv_heads, dim), which the
// P @ V update reads as rows. Per row and page: scores, online softmax, P @ V, with the
// accumulators in registers (the head dim is a template argument) and the next page
// prefetched (`Prefetcher`). Prompt chunks stay on FlexAttention (docs/architecture.md has the figures).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const c10::BFloat16* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}

// Pulls one page (keys, then values) into L2 a few cache lines at a time, spread over the
// score blocks of the page being computed: one burst at the page's start stalled the loads
// that page needs (0.66 -> 0.43 ms per layer here, the second half from also fetching the
// next row's first page).
struct Prefetcher {
  const char* keys = nullptr;
  const char* values = nullptr;
  int64_t key_lines = 0, lines = 0, per_step = 0, cursor = 0;

  template <typename kv_t>
  void start(const kv_t* k, int64_t k_elems, const kv_t* v, int64_t v_elems, int64_t steps) {
    keys = reinterpret_cast<const char*>(k), values = reinterpret_cast<const char*>(v);
    key_lines = k_elems * static_cast<int64_t>(sizeof(kv_t)) / 64, lines = key_lines + v_elems * static_cast<int64_t>(sizeof(kv_t)) / 64;
    per_step = (lines + steps - 1) / steps, cursor = 0;
  }
  void stop() { cursor = lines = 0; }
  void step() {
    for (const int64_t end = std::min(cursor + per_step, lines); cursor < end; ++cursor)
      __builtin_prefetch(cursor < key_lines ? keys + cursor * 64 : values + (cursor - key_lines) * 64, 0, 2);
  }
};

// q: (rows, heads, NV * W) fp32; k_pages: (pages, kv_heads, NV * W, key_stride); v_pages:
// (pages * page_size, kv_heads, NV * W); page_table: (rows, max_pages) int32; context_lens:
// (rows,) int32, the keys a row sees, its position + 1 (0: a padding row, left zero); with a
// window, only those in [len - window, len).
template <typename kv_t, int64_t NV>
void decode_rows(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& page_table,
                 const at::Tensor& context_lens, int64_t page_size, int64_t window, float scale, at::Tensor& out) {
  constexpr int64_t dim = NV * W;
  const int64_t rows = q.size(0), heads = q.size(1), kv_heads = k_pages.size(1), key_stride = k_pages.size(3);
  const int64_t group = heads / kv_heads, max_pages = page_table.size(1), slot_stride = kv_heads * dim;
  const int64_t k_page = kv_heads * dim * key_stride, v_page = page_size * slot_stride;
  const float* qp = q.data_ptr<float>();
  const kv_t* kp = k_pages.data_ptr<kv_t>();
  const kv_t* vp = v_pages.data_ptr<kv_t>();
  const int32_t* table = page_table.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const auto first_key = [&](int64_t len) { return window > 0 ? std::max<int64_t>(0, len - window) : 0; };
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(heads * dim), score(key_stride), acc(heads * dim), mx(heads), sum(heads);
    Prefetcher ahead;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t len = lens[row];
      if (len <= 0) continue;
      const int64_t lo = first_key(len);
      for (int64_t i = 0; i < heads * dim; ++i) qs[i] = qp[row * heads * dim + i] * scale;
      const int32_t* pages = table + row * max_pages;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mx.begin(), mx.end(), kNegInf);
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t pg = lo / page_size; pg * page_size < len; ++pg) {
        // the page after this one, the row's next or the next row's first, comes in while this one computes
        int64_t next = -1;
        if ((pg + 1) * page_size < len)
          next = pages[pg + 1];
        else if (row + 1 < end && lens[row + 1] > 0)
          next = table[(row + 1) * max_pages + first_key(lens[row + 1]) / page_size];
        if (next >= 0)
          ahead.start(kp + next * k_page, k_page, vp + next * v_page, v_page, heads * key_stride / W);
        else
          ahead.stop();
        const int64_t first = std::max(pg * page_size, lo) - pg * page_size, last = std::min((pg + 1) * page_size, len) - pg * page_size;
        const kv_t* kpage = kp + pages[pg] * k_page;
        const kv_t* vpage = vp + pages[pg] * v_page;
        for (int64_t hq = 0; hq < heads; ++hq) {
          const float* qh = qs.data() + hq * dim;
          const kv_t* keys = kpage + (hq / group) * dim * key_stride;
          for (int64_t t = 0; t < key_stride; t += W) {
            ahead.step();
            Vec s[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};  // four chains hide the FMA latency
            for (int64_t d = 0; d < dim; d += 4)
              for (int64_t u = 0; u < 4; ++u) s[u] = at::vec::fmadd(Vec(qh[d + u]), load(keys + (d + u) * key_stride + t), s[u]);
            ((s[0] + s[1]) + (s[2] + s[3])).store(score.data() + t);
          }
          std::fill(score.begin(), score.begin() + first, kNegInf);
          std::fill(score.begin() + last, score.end(), kNegInf);
          Vec vmax(kNegInf);
          for (int64_t t = 0; t < key_stride; t += W) vmax = at::vec::maximum(vmax, Vec::loadu(score.data() + t));
          const float m = std::max(mx[hq], vmax.reduce_max());
          const float alpha = std::exp(mx[hq] - m);
          Vec vsum(0.f);
          for (int64_t t = 0; t < key_stride; t += W) {
            const Vec e = (Vec::loadu(score.data() + t) - Vec(m)).exp_u20();
            e.store(score.data() + t);
            vsum = vsum + e;
          }
          sum[hq] = sum[hq] * alpha + vsum.reduce_add();
          mx[hq] = m;
          float* a = acc.data() + hq * dim;
          Vec o[NV];
          for (int64_t j = 0; j < NV; ++j) o[j] = Vec::loadu(a + j * W) * Vec(alpha);
          const kv_t* values = vpage + (hq / group) * dim;
          for (int64_t t = first; t < last; ++t) {
            const Vec p(score[t]);
            for (int64_t j = 0; j < NV; ++j) o[j] = at::vec::fmadd(p, load(values + t * slot_stride + j * W), o[j]);
          }
          for (int64_t j = 0; j < NV; ++j) o[j].store(a + j * W);
        }
      }
      float* orow = op + row * heads * dim;
      for (int64_t hq = 0; hq < heads; ++hq) {
        const Vec inv(1.f / sum[hq]);
        for (int64_t j = 0; j < NV; ++j) (Vec::loadu(acc.data() + hq * dim + j * W) * inv).store(orow + hq * dim + j * W);
      }
    }
  });
}

template <typename kv_t>
void dispatch_dim(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& page_table,
                  const at::Tensor& context_lens, int64_t page_size, int64_t window, float scale, at::Tensor& out) {
  switch (q.size(2) / W) {
    case 1: return decode_rows<kv_t, 1>(q, k_pages, v_pages, page_table, context_lens, page_size, window, scale, out);
    case 2: return decode_rows<kv_t, 2>(q, k_pages, v_pages, page_table, context_lens, page_size, window, scale, out);
    case 4: return decode_rows<kv_t, 4>(q, k_pages, v_pages, page_table, context_lens, page_size, window, scale, out);
    case 8: return decode_rows<kv_t, 8>(q, k_pages, v_pages, page_table, context_lens, page_size, window, scale, out);
    case 16: return decode_rows<kv_t, 16>(q, k_pages, v_pages, page_table, context_lens, page_size, window, scale, out);
  }
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& page_table,
                        const at::Tensor& context_lens, int64_t page_size, int64_t window, double scale) {
  const int64_t nv = q.size(2) / W;
  TORCH_CHECK(q.scalar_type() == at::kFloat, "paged_decode: queries must be fp32");
  TORCH_CHECK(k_pages.scalar_type() == v_pages.scalar_type() && (k_pages.scalar_type() == at::kFloat || k_pages.scalar_type() == at::kBFloat16),
              "paged_decode: the decode pool must be fp32 or bf16");
  TORCH_CHECK(q.size(2) % W == 0 && nv > 0 && nv <= 16 && (nv & (nv - 1)) == 0, "paged_decode: head_dim ", q.size(2), " is not ", W, " times a power of two up to 16");
  TORCH_CHECK(k_pages.size(2) == q.size(2) && k_pages.size(3) % W == 0 && k_pages.size(3) >= page_size, "paged_decode: keys must be (pages, kv_heads, head_dim, key_stride), key_stride a multiple of ", W, " >= page_size");
  TORCH_CHECK(q.is_contiguous() && k_pages.is_contiguous() && v_pages.is_contiguous() && page_table.is_contiguous() && context_lens.is_contiguous());
  auto out = at::zeros_like(q);
  const float s = static_cast<float>(scale);
  if (k_pages.scalar_type() == at::kFloat)
    dispatch_dim<float>(q, k_pages, v_pages, page_table, context_lens, page_size, window, s, out);
  else
    dispatch_dim<c10::BFloat16>(q, k_pages, v_pages, page_table, context_lens, page_size, window, s, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.def("paged_decode(Tensor q, Tensor k_pages, Tensor v_pages, Tensor page_table, Tensor context_lens, int page_size, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("paged_decode", &paged_decode); }
