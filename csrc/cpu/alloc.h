// Large buffers of the cpu backend (saved activations, gradients of G, the input
// projection, packed weights and per-call scratch) from a cache of blocks that earlier
// calls freed.
//
// Why: each training step allocates the same tens of MB again, and glibc serves blocks
// above 32 MB (and, until its threshold adapts, above 128 KB) with a fresh mmap that the
// kernel faults in one 4 KB page at a time when first written. On the 2-core Zen 5 VM
// writing 48 MB of fresh memory took 13 ms against 1.2 ms for memory in use; glibc
// tuned to keep such blocks (GLIBC_TUNABLES mmap_threshold) took the LSTM's
// forward+backward at B=64 T=128 H=256 from 116 to 79 ms. Transparent huge pages were
// tried instead and were 5x slower there (a 32 MB projection output 45 ms against 8 ms):
// the VM backs each fresh 2 MB page slowly.
//
// The cache works like PyTorch's CUDA caching allocator, for these buffers only: a freed
// block is kept (up to set_cache_limit's bound, default 1024 MB, in all; cached blocks are
// evicted, smallest first, to make room for the one just freed) and handed to the next
// request of its size (up to 1/8 larger). 0 turns it off. The bound is set from Python
// (CNNLSTM_FAST_CPU_CACHE_MB, read when the extension loads, or
// cnnlstm_fast.backends.cpu.set_cache_limit; stats.h). Memory it holds is given back by
// empty_cache() (cnnlstm_fast.backends.cpu.empty_cache()).
#pragma once

#include <ATen/core/Tensor.h>

#include "stats.h"

namespace cnnlstm_fast::cpu {

// at::empty(sizes, options) for a CPU tensor, its storage from the block cache when it
// is at least 128 KB. An ordinary resizable CPU tensor.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace cnnlstm_fast::cpu
