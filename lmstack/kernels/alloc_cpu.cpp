// A caching CPU allocator for training (lmstack.kernels.use_caching_allocator).
//
// Why this exists: PyTorch's CPU tensors come from glibc malloc. A training step allocates and frees tens
// of gigabytes in blocks of every size, and glibc keeps what it frees inside its heap, cut into pieces the
// next sizes do not fit: on smollm2 with gradient checkpointing, 608 of the 817 MiB heap were free bytes
// after a step, and the process grew by ~100 MiB a step. Turning big allocations into fresh mmaps
// (M_MMAP_THRESHOLD) returns them on free but makes every step fault in and zero its pages again (+40% step
// time here). A step's allocations repeat step after step, so the fix is the one GPU allocators use: keep
// freed big blocks and hand them back to the next request of about the same size.
//
//   small            requests under `min_bytes` (16 KiB from Python): the default CPU allocator
//                    (c10::alloc_cpu), as before
//   the rest         a private mapping rounded up to 4 KiB pages (64 KiB from 1 MiB), MADV_HUGEPAGE where
//                    the kernel lets a process ask (2 MiB pages: 512x fewer faults and TLB entries); on
//                    free it is kept in a free list by size, and a request takes the smallest free block
//                    of at least its size and at most 1/8 larger. Mid-sized blocks matter as much as big
//                    ones: left to glibc, a step's 16 KiB - 1 MiB activations (smollm2's k and v) and the
//                    long-lived optimizer states share one heap, which fragments (158 of a 356 MiB heap
//                    free after three QLoRA steps)
//   misses           before mapping a new block of 1 MiB or more, free blocks of 1 MiB to twice its size
//                    are unmapped, oldest first, until as many bytes are given back or only `slack` bytes
//                    are left free: big blocks grow only when free ones are scarce. Freed blocks otherwise
//                    stay for the next step (as on a GPU, empty_cache() returns them: training calls it
//                    before its first step and when it ends)
//
// Every block's size is in a table keyed by its address, so the deleter is a plain function (raw_deleter:
// code that frees raw pointers, e.g. at::Allocator::raw_allocate users, works too). Thread-safe by one mutex.

#include <torch/extension.h>

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>

#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t kPage = size_t(1) << 12;       // the smallest rounding step: a page
constexpr size_t kRound = size_t(1) << 16;      // the step from kRoundFrom on: 64 KiB
constexpr size_t kRoundFrom = size_t(1) << 20;
constexpr size_t kHuge = size_t(2) << 20;   // blocks of at least one 2 MiB page ask for huge pages

struct Stats {
  int64_t mapped = 0;       // bytes mapped by this allocator now (live + free)
  int64_t free_bytes = 0;   // of which free, kept for reuse
  int64_t peak_mapped = 0;  // the most ever mapped at once
  int64_t hits = 0, misses = 0, unmapped = 0;
};

class CachingCPUAllocator final : public c10::Allocator {
 public:
  CachingCPUAllocator(size_t slack, size_t min_bytes) : slack_(slack), min_bytes_(min_bytes) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_) {
      void* p = c10::alloc_cpu(n);
      return {p, p, &Free, c10::Device(c10::DeviceType::CPU)};
    }
    void* p = Take(n);
    return {p, p, &Free, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &Free; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

  void set_slack(size_t slack) {
    std::lock_guard<std::mutex> lock(mutex_);
    slack_ = slack;
  }

  // Unmap every free block (the live ones stay); returns the bytes given back.
  int64_t empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t before = stats_.free_bytes;
    UnmapFree();
    return before - stats_.free_bytes;
  }

  static CachingCPUAllocator* instance;

 private:
  struct FreeBlock {
    void* ptr;
    size_t size;
  };
  using Age = std::list<FreeBlock>;  // free blocks, oldest first

  static void Free(void* p) {
    if (p != nullptr) instance->Release(p);
  }

  // Below 1 MiB a request rounds up to one of 8 steps per power of two (4 KiB pages at least), so the many
  // slightly different mid sizes of a step share blocks: a miss maps a block and, once more than the slack
  // is free, unmaps one, so misses must stay rare. From 1 MiB, 64 KiB steps (little waste on big blocks).
  static size_t RoundUp(size_t n) {
    size_t step = kRound;
    if (n < kRoundFrom) {
      step = kPage;
      while (step * 16 <= n) step *= 2;  // n in [8 step, 16 step): at most 1/8 of n's power of two
    }
    return (n + step - 1) / step * step;
  }

  void* Take(size_t n) {
    const size_t size = RoundUp(n);
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = by_size_.lower_bound(size);
    if (it != by_size_.end() && it->first <= size + size / 8) {  // reuse: at most 1/8 wasted
      FreeBlock block = *it->second;
      age_.erase(it->second);
      by_size_.erase(it);
      stats_.free_bytes -= static_cast<int64_t>(block.size);
      stats_.hits++;
      return block.ptr;
    }
    stats_.misses++;
    if (size >= kRoundFrom) MakeRoom(size);  // give back what sits unused before growing
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED && stats_.free_bytes > 0) {  // the kept blocks go before giving up
      UnmapFree();
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    TORCH_CHECK(p != MAP_FAILED, "lmstack caching allocator: out of memory mapping ", size, " bytes");
#ifdef MADV_HUGEPAGE
    if (size >= kHuge) madvise(p, size, MADV_HUGEPAGE);  // advice only: ignored where THP is off
#endif
    sizes_[p] = size;
    stats_.mapped += static_cast<int64_t>(size);
    if (stats_.mapped > stats_.peak_mapped) stats_.peak_mapped = stats_.mapped;
    return p;
  }

  void Release(void* p) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = sizes_.find(p);
      if (found != sizes_.end()) {
        const size_t size = found->second;
        age_.push_back({p, size});
        by_size_.emplace(size, std::prev(age_.end()));
        stats_.free_bytes += static_cast<int64_t>(size);
        return;
      }
    }
    c10::free_cpu(p);  // a small block (or one allocated before this allocator was installed)
  }

  // Before mapping `size` new bytes: unmap free blocks, oldest first, until `size` bytes are given back or
  // at most `slack_` free bytes remain. Mapped memory then grows only when free blocks are scarce, so it
  // stays within (live + slack + the free blocks below); and a miss gives back no more than it takes, so
  // one new size does not throw away the blocks the rest of the step would reuse. Only blocks of 1 MiB
  // to twice the request's size go this way. Mid-sized blocks (below 1 MiB, 48 size steps) stay until
  // empty_cache(): a step needs the same ones again, and evicting them made each miss cause the next
  // (560 misses a step on smollm2). And a mid-sized miss that unmapped a 100 MiB activation block would
  // make the next step miss that block. Caller holds the mutex.
  void MakeRoom(size_t size) {
    size_t given = 0;
    for (auto it = age_.begin(); it != age_.end() && given < size;) {
      if (static_cast<size_t>(stats_.free_bytes) <= slack_) break;
      if (it->size < kRoundFrom || it->size > 2 * size) {
        ++it;
        continue;
      }
      given += it->size;
      it = Unmap(it);
    }
  }

  // Unmap every free block. Caller holds the mutex.
  void UnmapFree() {
    while (!age_.empty()) Unmap(age_.begin());
  }

  Age::iterator Unmap(Age::iterator block) {
    auto range = by_size_.equal_range(block->size);
    for (auto it = range.first; it != range.second; ++it) {
      if (it->second == block) {
        by_size_.erase(it);
        break;
      }
    }
    munmap(block->ptr, block->size);
    sizes_.erase(block->ptr);
    stats_.free_bytes -= static_cast<int64_t>(block->size);
    stats_.mapped -= static_cast<int64_t>(block->size);
    stats_.unmapped++;
    return age_.erase(block);
  }

  std::mutex mutex_;
  size_t slack_;
  const size_t min_bytes_;  // smaller requests go to the default allocator
  Stats stats_;
  Age age_;
  std::multimap<size_t, Age::iterator> by_size_;
  std::unordered_map<void*, size_t> sizes_;  // every block this allocator mapped, live or free
};

CachingCPUAllocator* CachingCPUAllocator::instance = nullptr;

// Installs the allocator for every CPU tensor allocated from now on (once per process; later calls only set
// the slack). Tensors allocated before keep their own deleters. Priority 1 beats the default allocator's 0.
bool install(int64_t slack, int64_t min_bytes) {
  TORCH_CHECK(slack >= 0, "slack must be >= 0 bytes, got ", slack);
  TORCH_CHECK(min_bytes >= 1, "min_bytes must be >= 1, got ", min_bytes);
  if (CachingCPUAllocator::instance == nullptr) {
    CachingCPUAllocator::instance =
        new CachingCPUAllocator(static_cast<size_t>(slack), static_cast<size_t>(min_bytes));  // lives forever
    c10::SetCPUAllocator(CachingCPUAllocator::instance, /*priority=*/1);
    return true;
  }
  CachingCPUAllocator::instance->set_slack(static_cast<size_t>(slack));
  return false;
}

bool installed() {
  return CachingCPUAllocator::instance != nullptr && c10::GetCPUAllocator() == CachingCPUAllocator::instance;
}

std::map<std::string, int64_t> stats() {
  TORCH_CHECK(CachingCPUAllocator::instance != nullptr, "the caching allocator is not installed");
  const Stats s = CachingCPUAllocator::instance->stats();
  return {{"mapped", s.mapped},        {"free", s.free_bytes}, {"peak_mapped", s.peak_mapped},
          {"hits", s.hits},            {"misses", s.misses},   {"unmapped", s.unmapped}};
}

int64_t empty_cache() {
  return CachingCPUAllocator::instance == nullptr ? 0 : CachingCPUAllocator::instance->empty_cache();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("install", &install,
        "install the caching allocator for CPU tensors of min_bytes and more (slack: free bytes kept on a miss)");
  m.def("installed", &installed, "whether CPU tensors come from the caching allocator");
  m.def("stats", &stats, "bytes mapped / free / peak mapped, and hit, miss and unmap counts");
  m.def("empty_cache", &empty_cache, "unmap every free block; returns the bytes given back");
}
