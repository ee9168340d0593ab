// Work sharing for lmstack's CPU kernels (quant_cpu.cpp, ops_cpu.cpp).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ParallelFuture.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

namespace lmstack {

// Chunks of work (e.g. ~64 KiB of weights each) that threads claim from an
// atomic counter, so whichever thread is running does the work.
//
// Why not at::parallel_for: its OpenMP region ends in a barrier that spins
// until every thread has checked in. On a machine where other processes keep
// the cores busy (a shared box, a desktop), a helper thread that was not
// scheduled stalls all ~170 matmuls of a token: measured 6x slower decode at
// 2 threads. Here the caller claims chunks itself and waits only for chunks a
// helper actually started; helpers come from torch's inter-op pool
// (at::launch), which sleeps rather than spins, and at most
// at::get_num_threads() threads work, so torch.set_num_threads() is honoured.
// A helper that starts after the caller is done finds no chunk left and only
// touches the shared_ptr'd counters, never the caller's stack.

#ifndef LMSTACK_MIN_CHUNKS
#define LMSTACK_MIN_CHUNKS 4
#endif

template <class Body>
void share_chunks(int64_t nchunks, const Body& body) {
#ifdef LMSTACK_OPENMP_BARRIER  // the at::parallel_for variant, kept for A/B measurement
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), nchunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < nchunks; c = next++) body(c);
  });
#else
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  const auto counters = std::make_shared<Counters>();
  const auto work = [counters, &body, nchunks] {
    for (int64_t c = counters->next++; c < nchunks; c = counters->next++) {
      body(c);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  // A helper wakes in ~10-30 us, so it only pays off with a few chunks to share.
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), nchunks / LMSTACK_MIN_CHUNKS) - 1;
  for (int64_t h = 0; h < helpers; ++h) at::launch(work);
  work();
  while (counters->done.load(std::memory_order_acquire) < nchunks) std::this_thread::yield();
#endif
}

}  // namespace lmstack
