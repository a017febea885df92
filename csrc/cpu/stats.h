// Counters of the cpu backend on light headers, for the Python bindings (and the tests
// that check which path ran): the buffer cache (alloc.h) and the persistent path.
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

// How many layer-direction forwards and backwards the persistent path (recurrence.cpp)
// has run.
struct PersistentRuns {
  int64_t forward;
  int64_t backward;
};
PersistentRuns persistent_runs();

}  // namespace cnnlstm_fast::cpu
