// The block cache behind empty_large (alloc.h).
#include "alloc.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/mman.h>

namespace cnnlstm_fast::cpu {
namespace {

// Smaller blocks come from glibc's heap (below its default mmap threshold). Larger ones
// are not reliably reused there: the persistent path's per-call slices (0.5-1 MB for an
// LSTM at H=256) were faulted in afresh at every call (glibc trims the heap's top when
// they are freed): the kernel's page-fault handling was ~14% of a profile's samples of
// LSTM inference at B=8 T=32 on the Zen 5 VM until they came from here.
constexpr size_t kMinBytes = size_t{128} << 10;
constexpr size_t kRound = size_t{64} << 10;

// The cache's bound (set_cache_limit; default 1024 MB). Set from Python, which reads
// CNNLSTM_FAST_CPU_CACHE_MB when it loads the extension: C++ reads no environment variable.
std::atomic<int64_t> limit_setting{int64_t{1024} << 20};

int64_t limit_bytes() { return limit_setting.load(std::memory_order_relaxed); }

class BlockCache;

struct Block {
  BlockCache* cache;
  void* data;
  size_t bytes;
};

void release_block(void* ctx);

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kRound - 1) / kRound * kRound;
    const int64_t limit = limit_bytes();
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(bytes);
      if (limit > 0 && it != free_.end() && it->first <= bytes + bytes / 8) {
        block = it->second;
        free_.erase(it);
        cached_ -= static_cast<int64_t>(block->bytes);
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (block == nullptr) {
      void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (data == MAP_FAILED) {
        TORCH_CHECK_WITH(OutOfMemoryError, false,
                         "cnnlstm_fast cpu backend: out of memory mapping ", bytes, " bytes");
      }
      try {
        block = new Block{this, data, bytes};
      } catch (...) {
        munmap(data, bytes);
        throw;
      }
    }
    int64_t in_use = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ += static_cast<int64_t>(block->bytes);
      in_use = in_use_;
      reserved = in_use_ + cached_;
    }
    report(block, static_cast<int64_t>(block->bytes), in_use, reserved);
    return {block->data, block, &release_block, c10::Device(c10::DeviceType::CPU)};
  }

  void release(Block* block) {
    const int64_t limit = limit_bytes();
    const auto bytes = static_cast<int64_t>(block->bytes);
    std::vector<Block*> evicted;
    int64_t in_use = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= bytes;
      in_use = in_use_;
      if (bytes <= limit) {
        // The block just freed is the likeliest to be asked for again: make room for it
        // by evicting cached blocks, smallest first.
        while (cached_ + bytes > limit && !free_.empty()) {
          evicted.push_back(free_.begin()->second);
          cached_ -= static_cast<int64_t>(free_.begin()->first);
          free_.erase(free_.begin());
        }
        free_.emplace(block->bytes, block);
        cached_ += bytes;
        report(block, -bytes, in_use, in_use + cached_);
        block = nullptr;
      } else {
        report(block, -bytes, in_use, in_use + cached_);
      }
    }
    for (Block* old : evicted) unmap(old);
    if (block != nullptr) unmap(block);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  CacheStats stats() {
    const int64_t limit = limit_bytes();
    std::lock_guard<std::mutex> lock(mutex_);
    return {limit, cached_, static_cast<int64_t>(free_.size()), in_use_, hits_, misses_};
  }

  // Unmaps cached blocks, smallest first, until at most `limit` bytes stay cached.
  void trim(int64_t limit) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (cached_ > limit && !free_.empty()) {
        evicted.push_back(free_.begin()->second);
        cached_ -= static_cast<int64_t>(free_.begin()->first);
        free_.erase(free_.begin());
      }
    }
    for (Block* old : evicted) unmap(old);
  }

  void clear() {
    std::multimap<size_t, Block*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& entry : blocks) unmap(entry.second);
  }

 private:
  // Tells torch.profiler's memory profiling (profile_memory=True) of a block handed out
  // (bytes > 0) or given back (< 0), as c10's CPU allocator does for its own: without
  // it the profiler's memory view misses the cpu backend's large buffers. The totals are
  // the cache's: bytes in use, and in use plus cached.
  static void report(Block* block, int64_t bytes, int64_t in_use, int64_t reserved) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(block->data, bytes, static_cast<size_t>(in_use),
                                       static_cast<size_t>(reserved),
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  static void unmap(Block* block) {
    munmap(block->data, block->bytes);
    delete block;
  }

  std::mutex mutex_;
  std::multimap<size_t, Block*> free_;  // by size, for the best fit
  int64_t cached_ = 0, in_use_ = 0, hits_ = 0, misses_ = 0;
};

void release_block(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  block->cache->release(block);
}

// Never destroyed: tensors may outlive static destruction at interpreter exit.
BlockCache& cache() {
  static auto* instance = new BlockCache();
  return *instance;
}

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "empty_large makes CPU tensors, got ", options.device());
  if (limit_bytes() == 0) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

CacheStats cache_stats() { return cache().stats(); }

void empty_cache() { cache().clear(); }

void set_cache_limit(int64_t bytes) {
  if (bytes < 0) {
    throw std::invalid_argument("cnnlstm_fast cpu backend: the cache limit must be >= 0 bytes, "
                                "got " + std::to_string(bytes));
  }
  limit_setting.store(bytes, std::memory_order_relaxed);
  cache().trim(bytes);
}

}  // namespace cnnlstm_fast::cpu
