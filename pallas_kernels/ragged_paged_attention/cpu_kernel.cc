// Ragged paged attention for XLA:CPU, one query token at a time, reading the KV pages in place.
//
// The XLA path (xla.py) must gather a kv block's pages into a buffer before its dots can run,
// and XLA:CPU's gather fusions move that data at a fraction of copy bandwidth; for a decode
// token the dots are tiny (group rows x head_dim), so the gathers were most of the attention.
// Here each (token, kv head) walks its sequence's pages directly: per page, the scores of the
// head's query rows, an online softmax, and the weighted sum of V. Contract and layout are
// reference.py's, float32 queries over float32 or int8 pages (read as their integer values; the
// model applies the pages' scales to q and to the output); tokens of sequences with
// select[s] == 0 come out zero (the caller fills them from the blocked XLA path).
//
// Work items (token, kv head) are shared out over XLA's intra-op thread pool through an atomic
// counter; the calling thread takes items too, so the call finishes even if no helper runs.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <condition_variable>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRows = 16;       // query heads per kv head
constexpr int kMaxHeadDim = 256;
constexpr int kMaxKeys = 64;       // keys per online-softmax update (at most one page)

struct Problem {
  const float* q;            // [tokens, q_heads, head_dim]
  const void* k;             // [kv_heads, pages, page_size, head_dim], float32 or int8
  const void* v;
  bool int8_pages;
  const int32_t* kv_lens;    // [seqs]
  const int32_t* page_table; // [seqs, pages_per_seq]
  const int32_t* cu_q_lens;  // [seqs + 1]
  const int32_t* seq_of_token;
  float* out;                // [tokens, q_heads, head_dim]
  int64_t kv_heads, num_pages, page_size, head_dim, group, pages_per_seq;
  float sm_scale, soft_cap;
  int32_t sliding_window;
};

// exp(x) for x <= 0 (scores minus their running max), in plain arithmetic the compiler
// vectorizes: 2^k * 2^f with k = round(x log2 e), |f| <= 1/2, 2^f by its degree-6 Taylor series
// (relative error ~1.2e-7, float32's own rounding). libm's expf does not vectorize without
// -ffast-math, and the exponentials were a third of a decode token's time.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);  // 2^k stays a normal float
  const float t = x * 1.44269504088896341f;
  const int32_t k = static_cast<int32_t>(t - 0.5f);  // t <= 0: truncating t - 1/2 rounds t
  const float f = (t - static_cast<float>(k)) * 0.69314718055994531f;
  const float p =
      1.f + f * (1.f + f * (0.5f + f * (1.f / 6 + f * (1.f / 24 + f * (1.f / 120 + f * (1.f / 720))))));
  const int32_t bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Eight float lanes (one AVX register); head_dim is a multiple of 8 (the caller checks).
typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* x) {
  v8 r;
  std::memcpy(&r, x, sizeof r);
  return r;
}

// int8 pages widen as they load (their scales are applied outside: to q and to the output).
inline v8 load8(const int8_t* x) {
  typedef int8_t i8x8 __attribute__((vector_size(8)));
  i8x8 r;
  std::memcpy(&r, x, sizeof r);
  return __builtin_convertvector(r, v8);
}

inline float sum8(v8 x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

// Scores of one query row against n keys, four keys at a time: four independent FMA chains
// (one chain per key was bound by the FMA latency, not by the loads).
template <typename Page>
inline void scores(const float* q, const Page* k, int64_t n, int64_t d_n, float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    v8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t d = 0; d < d_n; d += 8) {
      const v8 qd = load8(q + d);
      a0 += qd * load8(k + (j + 0) * d_n + d);
      a1 += qd * load8(k + (j + 1) * d_n + d);
      a2 += qd * load8(k + (j + 2) * d_n + d);
      a3 += qd * load8(k + (j + 3) * d_n + d);
    }
    out[j] = sum8(a0), out[j + 1] = sum8(a1), out[j + 2] = sum8(a2), out[j + 3] = sum8(a3);
  }
  for (; j < n; ++j) {
    v8 a = {};
    for (int64_t d = 0; d < d_n; d += 8) a += load8(q + d) * load8(k + j * d_n + d);
    out[j] = sum8(a);
  }
}

// acc[0:d_n] = acc * correction + sum_j w[j] * v[j]; 32 lanes of acc stay in registers across
// the keys (d_n is a multiple of 8; a tail of 8, 16 or 24 lanes takes the same path narrower).
template <int kVecs, typename Page>
inline void weighted_sum_lanes(const float* w, const Page* v, int64_t n, int64_t d_n, float correction,
                               float* acc) {
  v8 a[kVecs];
  for (int i = 0; i < kVecs; ++i) a[i] = load8(acc + 8 * i) * correction;
  for (int64_t j = 0; j < n; ++j) {
    for (int i = 0; i < kVecs; ++i) a[i] += w[j] * load8(v + j * d_n + 8 * i);
  }
  for (int i = 0; i < kVecs; ++i) std::memcpy(acc + 8 * i, &a[i], sizeof(v8));
}

template <typename Page>
inline void weighted_sum(const float* w, const Page* v, int64_t n, int64_t d_n, float correction, float* acc) {
  int64_t d = 0;
  for (; d + 32 <= d_n; d += 32) weighted_sum_lanes<4>(w, v + d, n, d_n, correction, acc + d);
  switch ((d_n - d) / 8) {
    case 3: weighted_sum_lanes<3>(w, v + d, n, d_n, correction, acc + d); break;
    case 2: weighted_sum_lanes<2>(w, v + d, n, d_n, correction, acc + d); break;
    case 1: weighted_sum_lanes<1>(w, v + d, n, d_n, correction, acc + d); break;
    default: break;
  }
}

// Asks for the next page's keys and values while this one is computed: each page is its own
// few KiB of the pool, where the hardware prefetcher does not follow.
inline void prefetch(const void* x, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(static_cast<const char*>(x) + i);
}

template <typename Page>
void attend_one(const Problem& p, int64_t t, int64_t h) {
  const Page* k_pages = static_cast<const Page*>(p.k);
  const Page* v_pages = static_cast<const Page*>(p.v);
  const int64_t s = p.seq_of_token[t];
  const int64_t q_heads = p.kv_heads * p.group;
  const int64_t d_n = p.head_dim, g_n = p.group;
  float* out = p.out + (t * q_heads + h * g_n) * d_n;
  const int64_t q_len = p.cu_q_lens[s + 1] - p.cu_q_lens[s];
  const int64_t pos = p.kv_lens[s] - q_len + (t - p.cu_q_lens[s]);
  const int64_t hi = std::min<int64_t>(pos + 1, p.kv_lens[s]);
  const int64_t lo = p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;

  alignas(32) float q[kMaxRows][kMaxHeadDim];
  alignas(32) float acc[kMaxRows][kMaxHeadDim];
  float m[kMaxRows], l[kMaxRows];
  for (int64_t r = 0; r < g_n; ++r) {
    const float* qr = p.q + (t * q_heads + h * g_n + r) * d_n;
    for (int64_t d = 0; d < d_n; ++d) q[r][d] = qr[d] * p.sm_scale;
    std::fill(acc[r], acc[r] + d_n, 0.f);
    m[r] = -std::numeric_limits<float>::max();
    l[r] = 0.f;
  }
  const int32_t* pages = p.page_table + s * p.pages_per_seq;
  float w[kMaxKeys];
  for (int64_t start = lo; start < hi;) {
    const int64_t page = pages[start / p.page_size];
    const int64_t off = start % p.page_size;
    const int64_t n = std::min<int64_t>({p.page_size - off, hi - start, kMaxKeys});
    const Page* kp = k_pages + ((h * p.num_pages + page) * p.page_size + off) * d_n;
    const Page* vp = v_pages + ((h * p.num_pages + page) * p.page_size + off) * d_n;
    if (start + n < hi) {
      const int64_t next = (h * p.num_pages + pages[(start + n) / p.page_size]) * p.page_size * d_n;
      prefetch(k_pages + next, p.page_size * d_n * sizeof(Page));
      prefetch(v_pages + next, p.page_size * d_n * sizeof(Page));
    }
    for (int64_t r = 0; r < g_n; ++r) {
      scores(q[r], kp, n, d_n, w);
      if (p.soft_cap > 0.f) {
        for (int64_t j = 0; j < n; ++j) w[j] = p.soft_cap * std::tanh(w[j] / p.soft_cap);
      }
      float m_new = m[r];
      for (int64_t j = 0; j < n; ++j) m_new = std::max(m_new, w[j]);
      float block_sum = 0.f;
#pragma omp simd reduction(+ : block_sum)
      for (int64_t j = 0; j < n; ++j) {
        w[j] = exp_nonpositive(w[j] - m_new);
        block_sum += w[j];
      }
      const float correction = exp_nonpositive(m[r] - m_new);
      l[r] = l[r] * correction + block_sum;
      weighted_sum(w, vp, n, d_n, correction, acc[r]);
      m[r] = m_new;
    }
    start += n;
  }
  for (int64_t r = 0; r < g_n; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    for (int64_t d = 0; d < d_n; ++d) out[r * d_n + d] = acc[r][d] * inv;
  }
}

// Items shared between the caller and the pool helpers; helpers that start after the work is
// gone touch only this state (kept alive by their shared_ptr), never the call's buffers.
struct Shared {
  Problem problem;
  std::vector<int64_t> items;  // token * kv_heads + head
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void work() {
    constexpr int64_t kChunk = 4;
    const int64_t total = static_cast<int64_t>(items.size());
    for (;;) {
      const int64_t first = next.fetch_add(kChunk);
      if (first >= total) return;
      const int64_t last = std::min(first + kChunk, total);
      for (int64_t i = first; i < last; ++i) {
        const int64_t t = items[i] / problem.kv_heads, h = items[i] % problem.kv_heads;
        problem.int8_pages ? attend_one<int8_t>(problem, t, h) : attend_one<float>(problem, t, h);
      }
      if (done.fetch_add(last - first) + (last - first) == total) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                  ffi::AnyBuffer v, ffi::Buffer<ffi::S32> kv_lens,
                  ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> cu_q_lens,
                  ffi::Buffer<ffi::S32> num_seqs, ffi::Buffer<ffi::S32> select,
                  ffi::ResultBuffer<ffi::F32> out, float sm_scale, float soft_cap,
                  int32_t sliding_window) {
  const auto q_dims = q.dimensions();
  const auto k_dims = k.dimensions();
  const int64_t tokens = q_dims[0], q_heads = q_dims[1], head_dim = q_dims[2];
  const int64_t kv_heads = k_dims[0];
  const int64_t seqs = page_table.dimensions()[0];
  const bool int8_pages = k.element_type() == ffi::DataType::S8;
  if (k.element_type() != v.element_type() || !(int8_pages || k.element_type() == ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("ferrum cpu attention: pages must both be float32 or both int8");
  }
  if (q_heads / kv_heads > kMaxRows || head_dim > kMaxHeadDim || head_dim % 8) {
    return ffi::Error::InvalidArgument(
        "ferrum cpu attention: needs q_heads / kv_heads <= 16 and head_dim <= 256, a multiple of 8");
  }
  std::fill(out->typed_data(), out->typed_data() + tokens * q_heads * head_dim, 0.f);
  auto shared = std::make_shared<Shared>();
  std::vector<int32_t> seq_of_token(tokens, 0);
  const int32_t* cu = cu_q_lens.typed_data();
  const int64_t live_seqs = std::min<int64_t>(num_seqs.typed_data()[0], seqs);
  for (int64_t s = 0; s < live_seqs; ++s) {
    if (!select.typed_data()[s]) continue;
    for (int64_t t = cu[s]; t < std::min<int64_t>(cu[s + 1], tokens); ++t) {
      seq_of_token[t] = static_cast<int32_t>(s);
      for (int64_t h = 0; h < kv_heads; ++h) shared->items.push_back(t * kv_heads + h);
    }
  }
  shared->problem = Problem{q.typed_data(), k.untyped_data(), v.untyped_data(), int8_pages, kv_lens.typed_data(),
                            page_table.typed_data(), cu, seq_of_token.data(),
                            out->typed_data(), kv_heads, k_dims[1], k_dims[2], head_dim,
                            q_heads / kv_heads, page_table.dimensions()[1], sm_scale, soft_cap,
                            sliding_window};
  const int64_t total = static_cast<int64_t>(shared->items.size());
  // Below this many items a helper's wake-up costs more than it saves.
  constexpr int64_t kItemsPerHelper = 16;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total / kItemsPerHelper);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->work(); });
  shared->work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == total; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FerrumRaggedPagedAttentionCpu, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int32_t>("sliding_window"));
