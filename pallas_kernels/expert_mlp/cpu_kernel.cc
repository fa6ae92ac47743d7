// A mixture-of-experts layer's experts for XLA:CPU, reading the stacked expert weights in place.
//
// XLA:CPU writes out every slice of a weight stack before a dot reads it, so a decode step that
// gathers each (token, expert) pair's weights moves them three times (read, write, read). Here
// each expert some token chose streams its gate/up `[hidden, ffn]` and down `[ffn, hidden]`
// matrices straight from the `[layers, experts, ...]` stacks, for all of its rows at once: with
// few rows (decode) each weight row is streamed once and scaled into every row's accumulator,
// bound by the weight stream; with many (prefill) in register tiles of 4 rows x 32 columns (gate
// and up together), each column panel re-read from cache for each 4 rows.
//
// y[t] = sum over k of weight[t, k] * down(act(x[t] gate) * (x[t] up)) of expert[t, k]; experts
// outside [0, experts) contribute nothing (an expert-parallel shard's foreign experts). The sum
// runs in ascending expert order whatever the threads do, so results are deterministic. Work
// items (one chosen expert each) are shared over XLA's intra-op thread pool as in the attention
// kernel; the calling thread takes items too.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;       // [tokens, hidden]
  const float* gate;    // this layer's [experts, hidden, ffn]
  const float* up;      // [experts, hidden, ffn]
  const float* down;    // [experts, ffn, hidden]
  int64_t hidden, ffn;
};

struct Item {
  int64_t expert;
  std::vector<int64_t> rows;  // the tokens that chose it
  std::vector<float> scales;  // each row's routing weight
  std::vector<float> y;       // [rows, hidden], unweighted
};

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

constexpr int kRows = 4;   // rows of a register tile
constexpr int kCols = 32;  // columns of a register tile

// out[m][r][c0 + c] = sum_i x[r][i] * w[m][i][c0 + c] for the RN rows at x and the W columns at
// c0, each of NB matrices `[k, ldw]`: the tile's sums stay in registers over all of k, each
// matrix row segment is read once for the RN rows, and the x values are broadcast.
template <int NB, int RN, int W>
void tile(const float* x, int64_t k, const float* const* w, int64_t ldw, int64_t c0, float* const* out,
          int64_t ldo) {
  float acc[NB][RN][W] = {};
  for (int64_t i = 0; i < k; ++i) {
    for (int m = 0; m < NB; ++m) {
      const float* wi = w[m] + i * ldw + c0;
      for (int r = 0; r < RN; ++r) {
        const float xv = x[r * k + i];
#pragma omp simd
        for (int c = 0; c < W; ++c) acc[m][r][c] += xv * wi[c];
      }
    }
  }
  for (int m = 0; m < NB; ++m)
    for (int r = 0; r < RN; ++r)
      for (int c = 0; c < W; ++c) out[m][r * ldo + c0 + c] = acc[m][r][c];
}

template <int NB, int RN>
void rows_times(const float* x, int64_t k, const float* const* w, int64_t n, float* const* out) {
  int64_t c0 = 0;
  for (; c0 + kCols <= n; c0 += kCols) tile<NB, RN, kCols>(x, k, w, n, c0, out, n);
  for (; c0 < n; ++c0) tile<NB, RN, 1>(x, k, w, n, c0, out, n);
}

// out[m] = x @ w[m] for x `[rows, k]` and NB matrices `[k, n]`, outputs `[rows, n]`.
template <int NB>
void matmul(const float* x, int64_t rows, int64_t k, const float* const* w, int64_t n, float* const* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    float* o[NB];
    for (int m = 0; m < NB; ++m) o[m] = out[m] + r0 * n;
    const float* xr = x + r0 * k;
    switch (std::min<int64_t>(kRows, rows - r0)) {
      case 1: rows_times<NB, 1>(xr, k, w, n, o); break;
      case 2: rows_times<NB, 2>(xr, k, w, n, o); break;
      case 3: rows_times<NB, 3>(xr, k, w, n, o); break;
      default: rows_times<NB, 4>(xr, k, w, n, o); break;
    }
  }
}

// Few rows: out[m] = x @ w[m] with each matrix row scaled into every row's accumulator, so the
// weights stream row after row, contiguous, which the register tiles' column panels do not.
template <int NB>
void axpy_matmul(const float* x, int64_t rows, int64_t k, const float* const* w, int64_t n, float* const* out) {
  for (int m = 0; m < NB; ++m) std::fill(out[m], out[m] + rows * n, 0.f);
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t r = 0; r < rows; ++r) {
      const float xv = x[r * k + i];
      for (int m = 0; m < NB; ++m) {
        const float* wi = w[m] + i * n;
        float* o = out[m] + r * n;
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) o[c] += xv * wi[c];
      }
    }
  }
}

// From this many rows an expert takes the register tiles (`python -m ferrum_jax.bench moe-forms`).
constexpr int64_t kTiledMinRows = 24;

void run_expert(const Problem& p, Item& item) {
  const int64_t r = static_cast<int64_t>(item.rows.size()), d = p.hidden, f = p.ffn;
  const bool tiled = r >= kTiledMinRows;
  std::vector<float> xs(r * d);
  for (int64_t j = 0; j < r; ++j) std::copy_n(p.x + item.rows[j] * d, d, xs.data() + j * d);
  std::vector<float> hg(r * f), hu(r * f);
  const float* gate_up[2] = {p.gate + item.expert * d * f, p.up + item.expert * d * f};
  float* h[2] = {hg.data(), hu.data()};
  (tiled ? matmul<2> : axpy_matmul<2>)(xs.data(), r, d, gate_up, f, h);
  for (int64_t n = 0; n < r * f; ++n) hg[n] = silu(hg[n]) * hu[n];
  item.y.resize(r * d);
  const float* down[1] = {p.down + item.expert * f * d};
  float* y[1] = {item.y.data()};
  (tiled ? matmul<1> : axpy_matmul<1>)(hg.data(), r, f, down, d, y);
}

struct Shared {
  Problem problem;
  std::vector<Item> items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void work() {
    const int64_t total = static_cast<int64_t>(items.size());
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= total) return;
      run_expert(problem, items[i]);
      if (done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

ffi::Error ExpertMlp(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> experts,
                     ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> gate,
                     ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> down, ffi::ResultBuffer<ffi::F32> out) {
  const auto x_dims = x.dimensions(), e_dims = experts.dimensions(), g_dims = gate.dimensions();
  const int64_t tokens = x_dims[0], hidden = x_dims[1], k = e_dims[1];
  const int64_t layers = g_dims[0], num_experts = g_dims[1], ffn = g_dims[3];
  const int64_t l = layer.typed_data()[0];
  if (g_dims[2] != hidden || up.dimensions()[3] != ffn || down.dimensions()[2] != ffn ||
      down.dimensions()[3] != hidden || e_dims[0] != tokens) {
    return ffi::Error::InvalidArgument("ferrum cpu expert mlp: stacks must be [layers, experts, hidden, ffn] "
                                       "and [layers, experts, ffn, hidden], x [tokens, hidden], experts [tokens, k]");
  }
  if (l < 0 || l >= layers) return ffi::Error::InvalidArgument("ferrum cpu expert mlp: layer index out of range");
  const int32_t* chosen = experts.typed_data();
  const float* w = weights.typed_data();
  auto shared = std::make_shared<Shared>();
  const int64_t per_layer = num_experts * hidden * ffn;
  shared->problem = Problem{x.typed_data(), gate.typed_data() + l * per_layer, up.typed_data() + l * per_layer,
                            down.typed_data() + l * per_layer, hidden, ffn};
  std::vector<int64_t> item_of(num_experts, -1);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = chosen[t * k + j];
      if (e < 0 || e >= num_experts) continue;
      if (item_of[e] < 0) item_of[e] = 0;
    }
  }
  for (int64_t e = 0, n = 0; e < num_experts; ++e) {
    if (item_of[e] < 0) continue;
    item_of[e] = n++;
    shared->items.push_back(Item{e, {}, {}, {}});
  }
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = chosen[t * k + j];
      if (e < 0 || e >= num_experts) continue;
      shared->items[item_of[e]].rows.push_back(t);
      shared->items[item_of[e]].scales.push_back(w[t * k + j]);
    }
  }
  const int64_t total = static_cast<int64_t>(shared->items.size());
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->work(); });
  shared->work();
  {
    std::unique_lock<std::mutex> lock(shared->mu);
    shared->cv.wait(lock, [&] { return shared->done.load() == total; });
  }
  float* y = out->typed_data();
  std::fill(y, y + tokens * hidden, 0.f);
  for (auto& item : shared->items) {
    for (size_t j = 0; j < item.rows.size(); ++j) {
      const int64_t t = item.rows[j];
      const float scale = item.scales[j];
      const float* yj = item.y.data() + j * hidden;
      float* yt = y + t * hidden;
#pragma omp simd
      for (int64_t o = 0; o < hidden; ++o) yt[o] += scale * yj[o];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FerrumExpertMlpCpu, ExpertMlp,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
