// The per-step floor of a persistent recurrence kernel that exchanges h through global
// memory (L2) with one grid barrier per step, measured on the device: floor.cu, a
// measurement for the benchmark (cnnlstm_fast/bench/floor.py), on no recurrence path.
// Same conventions as ../recurrence.h: no CUDA or torch headers, errors as int cudaError_t.
#pragma once

#include "../recurrence.h"

namespace cnnlstm_fast::cuda {

struct StepFloorArgs {
  DType dtype;
  int steps, batch, hidden;
  int blocks;              // the grid: at most the blocks that can be co-resident
  bool exchange;           // false: the barrier alone
  bool fence;              // the barrier with its __threadfence (as the persistent kernels)
  bool cluster;            // sm_90: one cluster of `blocks` (<= 16) blocks exchanging h
                           // through distributed shared memory (fails where it cannot run)
  long long slot_stride;   // elements from one h slot to the next, a multiple of 8
  void* h;                 // (2, slot_stride), T: slot 0 holds h0; the final h is [steps % 2]
  unsigned int* barrier;   // one zeroed counter
};

// Launches the floor kernel (cooperatively) on `stream`: per step, with `exchange`,
// every block reads all of h (batch x hidden, T) from L2 with 16-byte loads, reduces it
// over the block, writes its slice of the next h (mean + 1: h0 = 0 gives h = steps
// after `steps` steps, exactly, while steps <= 256) and meets the others at the grid
// barrier of the persistent kernels; without it, the barrier alone. `fence`: that
// barrier as the persistent kernels run it, or without its fence (barrier.cuh).
int step_floor(const StepFloorArgs& args, void* stream);

// The largest grid step_floor can launch on the current device.
int step_floor_max_blocks(DType dtype, int* blocks);

}  // namespace cnnlstm_fast::cuda
