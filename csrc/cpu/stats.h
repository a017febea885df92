// Counters of the cpu backend on light headers, for the Python bindings (and the tests
// that check which path ran): the buffer cache (alloc.h) and the persistent path.
#pragma once

#include <cstdint>

namespace cnnlstm_fast::cpu {

struct CacheStats {
  int64_t limit_bytes;   // set_cache_limit's bound, now
  int64_t cached_bytes;  // held by the cache, free for reuse
  int64_t cached_blocks;
  int64_t in_use_bytes;  // handed out and not yet freed
  int64_t hits;          // requests served from the cache
  int64_t misses;        // requests that mapped new memory
};

CacheStats cache_stats();

// Unmaps every block the cache holds; blocks in use are unaffected.
void empty_cache();

// Bounds what the cache keeps (default 1024 MB; 0 keeps nothing and empty_large then
// allocates as at::empty does), unmapping cached blocks, smallest first, beyond the new
// bound. Throws std::invalid_argument (Python's ValueError) for a negative bound. Python
// sets it from CNNLSTM_FAST_CPU_CACHE_MB when it loads the extension.
void set_cache_limit(int64_t bytes);

// How many layer-direction forwards and backwards the persistent path (recurrence.cpp)
// has run.
struct PersistentRuns {
  int64_t forward;
  int64_t backward;
};
PersistentRuns persistent_runs();

}  // namespace cnnlstm_fast::cpu
