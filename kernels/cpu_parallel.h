// Work splitting shared by the CPU kernels (cpu_dense.cc, cpu_quantized.cc): chunks claimed from an
// atomic counter by the calling thread and by tasks on XLA's intra-op thread pool.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace {  // internal linkage: each kernel library, built for its own instruction set, has its own copy

// A job: chunks [0, n) claimed one at a time from an atomic counter by the calling thread and by
// tasks on XLA's intra-op thread pool (no second pool competes with XLA's threads). The caller
// waits only for chunks that someone has claimed, so a task that starts late finds nothing to do
// and no call ever waits on a task that has not started.
struct Job {
  std::function<void(int64_t)> body;
  int64_t chunks = 0;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      body(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs body(chunk) for chunk in [0, chunks) on the calling thread and up to threads - 1 pool tasks.
template <typename F>
void parallel_chunks(xla::ffi::ThreadPool& pool, int64_t chunks, int64_t threads, F body) {
  auto job = std::make_shared<Job>();
  job->body = body;
  job->chunks = chunks;
  for (int64_t t = 1; t < std::min(chunks, threads); ++t) pool.Schedule([job] { job->run(); });
  job->run();
  while (job->done.load(std::memory_order_acquire) < chunks) _mm_pause();  // claimed chunks only
}

// Weight rows per claimed chunk: at most kChunkBytes, and at least 4 chunks per thread so that
// small matrices split evenly; a multiple of `align`.
constexpr int64_t kChunkBytes = 256 << 10;
inline int64_t chunk_rows(int64_t rows, int64_t row_bytes, int64_t threads, int64_t align) {
  int64_t n = std::min(kChunkBytes / std::max<int64_t>(1, row_bytes), (rows + 4 * threads - 1) / (4 * threads));
  return std::max(align, (n + align - 1) / align * align);
}

constexpr int64_t kMaxRows = 8;  // rows of x held against one weight vector; more rows loop

// Calls f(m0, std::integral_constant<int, MM>) for the row groups [m0, m0 + MM) of M rows, MM <= G <= kMaxRows:
// the kernels are compiled for each row count, so every row of a group stays in registers.
template <int64_t G, typename F>
void by_row_groups_of(int64_t M, F f) {
  static_assert(1 <= G && G <= kMaxRows, "row groups hold 1 to kMaxRows rows");
  for (int64_t m0 = 0; m0 < M; m0 += G) {
    switch (std::min(G, M - m0)) {
      case 1: f(m0, std::integral_constant<int, 1>{}); break;
      case 2: f(m0, std::integral_constant<int, 2>{}); break;
      case 3: f(m0, std::integral_constant<int, 3>{}); break;
      case 4: f(m0, std::integral_constant<int, 4>{}); break;
      case 5: f(m0, std::integral_constant<int, 5>{}); break;
      case 6: f(m0, std::integral_constant<int, 6>{}); break;
      case 7: f(m0, std::integral_constant<int, 7>{}); break;
      default: f(m0, std::integral_constant<int, G>{}); break;
    }
  }
}

template <typename F>
void by_row_groups(int64_t M, F f) {
  by_row_groups_of<kMaxRows>(M, f);
}

inline int64_t threads_of(xla::ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }  // XLA's parallelism

}  // namespace
