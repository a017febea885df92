// The state of the cpu backend's buffer cache (alloc.h) on light headers, for the
// Python bindings.
#pragma once

#include <cstdint>

namespace cnnlstm_fast::cpu {

struct CacheStats {
  int64_t limit_bytes;   // CNNLSTM_FAST_CPU_CACHE_MB, now
  int64_t cached_bytes;  // held by the cache, free for reuse
  int64_t cached_blocks;
  int64_t in_use_bytes;  // handed out and not yet freed
  int64_t hits;          // requests served from the cache
  int64_t misses;        // requests that mapped new memory
};

CacheStats cache_stats();

// Unmaps every block the cache holds; blocks in use are unaffected.
void empty_cache();

}  // namespace cnnlstm_fast::cpu
