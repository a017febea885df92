// The directions of a bidirectional layer side by side (the `cpu` backend): the ops
// cnnlstm_fast::recurrence_forward_directions, recurrence_backward_directions and
// recurrence_forward_from_input_directions run the one-direction recurrences of
// recurrence.cpp for D directions at once, each on its share of torch's intra-op threads.
// The from-input op (inference) also runs them one after the other where asked
// (side_by_side=False): either way each direction writes its Y straight into its column
// block of the layer's output, so nothing is concatenated afterwards.
//
// Why: the two directions of a layer are independent, but one direction's time loop
// uses extra cores badly (on a 2-core VM a direction gains 1.3-1.5x from the second
// core at batch 16-64: each step is a small GEMM and a pointwise pass with a fork/join
// or a barrier between them). Running direction 1 on its own thread while direction 0
// runs on the caller gives each direction's loop half the threads and no waiting on the
// other's steps.
//
// How: direction 0 runs on the calling thread, the others on worker threads of ours
// (Worker below), which take on the caller's thread-local state (grad mode, dispatch
// keys).
// Each runs with omp_set_num_threads(share) on its own thread (OpenMP's thread count is
// per thread, and at::parallel_for and our persistent path read it there; the caller's
// is restored afterwards. Where a direction calls BLAS (float64, float32 without
// AVX-512), MKL's count is not set here (torch's MKL exports only the Fortran form of
// its per-thread setter), and its results may differ in the last bits with the thread
// count it runs on. With our AVX-512 GEMM each direction's result is exactly the
// one-direction op's (the per-element order of the GEMMs and pointwise passes does not
// depend on the thread count, see recurrence.cpp).
// With one thread, inside a parallel region, or for one direction, the directions run
// one after the other on the caller.

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "alloc.h"
#include "recurrence.h"

#include <omp.h>

#include <unistd.h>

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <optional>
#include <tuple>
#include <vector>

namespace cnnlstm_fast::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensors6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The thread count a direction runs with, set on the thread that runs it for the
// guard's lifetime.
class ThreadShare {
 public:
  explicit ThreadShare(int threads) {
    at::internal::lazy_init_num_threads();  // else torch's first parallel_for resets it
    previous_ = omp_get_max_threads();
    omp_set_num_threads(threads);
  }
  ~ThreadShare() {
    omp_set_num_threads(previous_);
  }
  ThreadShare(const ThreadShare&) = delete;
  ThreadShare& operator=(const ThreadShare&) = delete;

 private:
  int previous_ = 1;
};

// A thread that runs one task at a time for for_each_direction, kept for reuse: a new
// thread per call would also start a new OpenMP pool per call where a direction gets
// more than one thread. torch's inter-op pool (at::launch) is not usable here: in a
// child forked after the parent used it (a DataLoader worker), its tasks never run.
class Worker {
 public:
  Worker() { std::thread([this] { loop(); }).detach(); }

  void start(std::function<void()> task) {
    std::lock_guard<std::mutex> lock(mutex_);
    task_ = std::move(task);
    busy_ = true;
    wake_.notify_one();
  }

  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return !busy_; });
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return busy_; });
      std::function<void()> task = std::move(task_);
      lock.unlock();
      task();  // catches its own exceptions
      lock.lock();
      busy_ = false;
      done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::function<void()> task_;
  bool busy_ = false;
};

// The idle workers of this process. Workers are never destroyed (their threads wait for
// the next task until the process ends); after a fork the parent's are left behind,
// since the child has none of their threads, and the child starts its own.
class Workers {
 public:
  static Worker* acquire() {
    std::lock_guard<std::mutex> lock(mutex());
    auto& idle = list();
    if (pid() != getpid()) {
      idle = new std::vector<Worker*>();  // the parent's workers: leaked, see above
      pid() = getpid();
    }
    if (idle->empty()) return new Worker();
    Worker* worker = idle->back();
    idle->pop_back();
    return worker;
  }

  static void release(Worker* worker) {
    std::lock_guard<std::mutex> lock(mutex());
    if (pid() == getpid()) list()->push_back(worker);
  }

 private:
  static std::mutex& mutex() {
    static auto* m = new std::mutex();
    return *m;
  }
  static std::vector<Worker*>*& list() {
    static std::vector<Worker*>* idle = new std::vector<Worker*>();
    return idle;
  }
  static pid_t& pid() {
    static pid_t owner = getpid();
    return owner;
  }
};

// Runs run(d) for d in [0, D): side by side where asked and there are threads to share
// (see the file comment), else one after the other. Exceptions reach the caller (the
// first direction's first), after every direction has finished.
void for_each_direction(int64_t D, const std::function<void(int64_t)>& run,
                        bool side_by_side = true) {
  const int threads = at::get_num_threads();
  if (!side_by_side || D < 2 || threads < 2 || at::in_parallel_region()) {
    for (int64_t d = 0; d < D; ++d) run(d);
    return;
  }
  const int parts = static_cast<int>(std::min<int64_t>(D, threads));
  // direction d's share of the threads: threads / parts, the remainder to the first ones
  auto share = [&](int64_t d) {
    const int part = static_cast<int>(d % parts);
    return threads / parts + (part < threads % parts ? 1 : 0);
  };
  const at::ThreadLocalState state;  // grad mode, dispatch keys... for the workers
  std::vector<std::exception_ptr> errors(D);
  std::vector<Worker*> workers;
  for (int64_t d = 1; d < D; ++d) {
    Worker* worker = Workers::acquire();
    workers.push_back(worker);
    worker->start([&, d] {
      try {
        at::ThreadLocalStateGuard tls(state);
        ThreadShare guard(share(d));
        run(d);
      } catch (...) {
        errors[d] = std::current_exception();
      }
    });
  }
  try {
    ThreadShare guard(share(0));
    run(0);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (Worker* worker : workers) {
    worker->wait();
    Workers::release(worker);
  }
  for (const auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

void check_count(const char* name, size_t got, size_t want) {
  TORCH_CHECK(got == want, "cnnlstm_fast cpu backend: ", name, " must have one entry per ",
              "direction (", want, "), got ", got);
}

std::vector<char> flags(const c10::List<bool>& list) {
  std::vector<char> out;
  for (const bool flag : list) out.push_back(flag);
  return out;
}

const OptTensor& at_or_none(const std::vector<OptTensor>& list, size_t d) {
  static const OptTensor none;
  return list.empty() ? none : list[d];
}

template <typename Tuple, size_t... I>
auto transpose_impl(std::vector<Tuple>& per_direction, std::index_sequence<I...>) {
  std::tuple<decltype((void)I, std::vector<Tensor>())...> out;
  for (auto& t : per_direction) {
    ((std::get<I>(out).push_back(std::move(std::get<I>(t)))), ...);
  }
  return out;
}

// D tuples of N tensors as N lists of D tensors (the ops return lists).
template <typename Tuple>
auto transpose(std::vector<Tuple>& per_direction) {
  return transpose_impl(per_direction, std::make_index_sequence<std::tuple_size_v<Tuple>>());
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
           std::vector<Tensor>, std::vector<Tensor>>
recurrence_forward_directions(c10::string_view cell, const std::vector<Tensor>& gx,
                              const std::vector<Tensor>& h0, const std::vector<OptTensor>& c0,
                              const std::vector<Tensor>& w_hh,
                              const std::vector<OptTensor>& w_hr,
                              const std::vector<OptTensor>& b_hn, const OptTensor& batch_sizes,
                              const c10::List<bool>& reverse, bool need_saved,
                              c10::string_view kernel_name) {
  const size_t D = gx.size();
  check_count("h0", h0.size(), D);
  check_count("w_hh", w_hh.size(), D);
  check_count("reverse", reverse.size(), D);
  for (const auto* list : {&c0, &w_hr, &b_hn}) {
    TORCH_CHECK(list->empty() || list->size() == D, "cnnlstm_fast cpu backend: c0, w_hr and "
                "b_hn must be empty or have one entry per direction (", D, "), got ",
                list->size());
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cnnlstm_fast::recurrence_forward", "")
          .typed<Tensors6(c10::string_view, const Tensor&, const Tensor&, const OptTensor&,
                          const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                          bool, bool, c10::string_view, bool, bool)>();
  const std::vector<char> rev = flags(reverse);
  std::vector<Tensors6> out(D);
  for_each_direction(static_cast<int64_t>(D), [&](int64_t d) {
    out[d] = op.call(cell, gx[d], h0[d], at_or_none(c0, d), w_hh[d], at_or_none(w_hr, d),
                     at_or_none(b_hn, d), batch_sizes, rev[d] != 0, need_saved, kernel_name, false,
                     false);
  });
  return transpose(out);
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
           std::vector<Tensor>, std::vector<Tensor>>
recurrence_backward_directions(c10::string_view cell, const std::vector<Tensor>& act,
                               const std::vector<Tensor>& h_prev,
                               const std::vector<OptTensor>& extra,
                               const std::vector<Tensor>& w_hh,
                               const std::vector<OptTensor>& w_hr, const OptTensor& batch_sizes,
                               const c10::List<bool>& reverse, const std::vector<Tensor>& d_y,
                               const std::vector<Tensor>& d_hT,
                               const std::vector<OptTensor>& d_cT,
                               c10::string_view kernel_name) {
  const size_t D = act.size();
  check_count("h_prev", h_prev.size(), D);
  check_count("w_hh", w_hh.size(), D);
  check_count("reverse", reverse.size(), D);
  check_count("d_y", d_y.size(), D);
  check_count("d_hT", d_hT.size(), D);
  for (const auto* list : {&extra, &w_hr, &d_cT}) {
    TORCH_CHECK(list->empty() || list->size() == D, "cnnlstm_fast cpu backend: extra, w_hr "
                "and d_cT must be empty or have one entry per direction (", D, "), got ",
                list->size());
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cnnlstm_fast::recurrence_backward", "")
          .typed<Tensors6(c10::string_view, const Tensor&, const Tensor&, const OptTensor&,
                          const Tensor&, const OptTensor&, const OptTensor&, bool,
                          const Tensor&, const Tensor&, const OptTensor&, c10::string_view,
                          bool, bool)>();
  const std::vector<char> rev = flags(reverse);
  std::vector<Tensors6> out(D);
  for_each_direction(static_cast<int64_t>(D), [&](int64_t d) {
    out[d] = op.call(cell, act[d], h_prev[d], at_or_none(extra, d), w_hh[d],
                     at_or_none(w_hr, d), batch_sizes, rev[d] != 0, d_y[d], d_hT[d],
                     at_or_none(d_cT, d), kernel_name, false, false);
  });
  return transpose(out);
}

// Inference of a layer's directions straight from its input, each direction's Y written
// into its column block of the layer's output (T, B, D * Hout), or (N, D * Hout) for a
// PackedSequence's data with batch_sizes: no concatenation afterwards. Side by side, or
// one after the other on the caller.
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>
recurrence_forward_from_input_directions(
    c10::string_view cell, const Tensor& x, const std::vector<Tensor>& w_ih,
    const std::vector<OptTensor>& gx_bias, const std::vector<Tensor>& h0,
    const std::vector<OptTensor>& c0, const std::vector<Tensor>& w_hh,
    const std::vector<OptTensor>& w_hr, const std::vector<OptTensor>& b_hn,
    const c10::List<bool>& reverse, c10::string_view kernel_name, const OptTensor& batch_sizes,
    bool side_by_side) {
  const size_t D = w_ih.size();
  TORCH_CHECK(D > 0, "cnnlstm_fast cpu backend: w_ih must have an entry per direction, got none");
  check_count("h0", h0.size(), D);
  check_count("w_hh", w_hh.size(), D);
  check_count("reverse", reverse.size(), D);
  for (const auto* list : {&gx_bias, &c0, &w_hr, &b_hn}) {
    TORCH_CHECK(list->empty() || list->size() == D, "cnnlstm_fast cpu backend: gx_bias, c0, "
                "w_hr and b_hn must be empty or have one entry per direction (", D, "), got ",
                list->size());
  }
  const int64_t Hout = h0[0].dim() == 2 ? h0[0].size(1) : 0;
  for (size_t d = 1; d < D; ++d) {
    TORCH_CHECK(h0[d].dim() == 2 && h0[d].size(1) == Hout, "cnnlstm_fast cpu backend: h0 of "
                "every direction must have the width of direction 0's (", Hout, "), got ",
                h0[d].sizes(), " for direction ", d);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  TORCH_CHECK(!shape.empty(), "cnnlstm_fast cpu backend: x must be 2-D or 3-D, got 0-D");
  shape.back() = static_cast<int64_t>(D) * Hout;
  Tensor y = empty_large(shape, h0[0].options());
  const std::vector<char> rev = flags(reverse);
  std::vector<Tensor> h(D), c(D);
  for_each_direction(static_cast<int64_t>(D), [&](int64_t d) {
    Tensor block = y.narrow(-1, d * Hout, Hout);
    std::tie(h[d], c[d]) = forward_from_input_into(
        cell, x, w_ih[d], at_or_none(gx_bias, d), h0[d], at_or_none(c0, d), w_hh[d],
        at_or_none(w_hr, d), at_or_none(b_hn, d), rev[d] != 0, kernel_name, batch_sizes, block);
  }, side_by_side);
  return {y, h, c};
}

}  // namespace
}  // namespace cnnlstm_fast::cpu

TORCH_LIBRARY_FRAGMENT(cnnlstm_fast, m) {
  m.def(
      "recurrence_forward_directions(str cell, Tensor[] gx, Tensor[] h0, Tensor?[] c0, "
      "Tensor[] w_hh, Tensor?[] w_hr, Tensor?[] b_hn, Tensor? batch_sizes, bool[] reverse, "
      "bool need_saved, str kernel_name=\"auto\") -> (Tensor[] y, Tensor[] h_T, Tensor[] c_T, "
      "Tensor[] act, Tensor[] h_prev, Tensor[] extra)");
  m.def(
      "recurrence_backward_directions(str cell, Tensor[] act, Tensor[] h_prev, Tensor?[] extra, "
      "Tensor[] w_hh, Tensor?[] w_hr, Tensor? batch_sizes, bool[] reverse, Tensor[] d_y, "
      "Tensor[] d_hT, Tensor?[] d_cT, str kernel_name=\"auto\") -> (Tensor[] d_gx, "
      "Tensor[] dh0, Tensor[] dc0, Tensor[] d_w_hh, Tensor[] d_w_hr, Tensor[] d_b_hn)");
  m.def(
      "recurrence_forward_from_input_directions(str cell, Tensor x, Tensor[] w_ih, "
      "Tensor?[] gx_bias, Tensor[] h0, Tensor?[] c0, Tensor[] w_hh, Tensor?[] w_hr, "
      "Tensor?[] b_hn, bool[] reverse, str kernel_name=\"auto\", Tensor? batch_sizes=None, "
      "bool side_by_side=True) -> (Tensor y, Tensor[] h_T, Tensor[] c_T)");
}

TORCH_LIBRARY_IMPL(cnnlstm_fast, CPU, m) {
  m.impl("recurrence_forward_directions",
         &cnnlstm_fast::cpu::recurrence_forward_directions);
  m.impl("recurrence_backward_directions",
         &cnnlstm_fast::cpu::recurrence_backward_directions);
  m.impl("recurrence_forward_from_input_directions",
         &cnnlstm_fast::cpu::recurrence_forward_from_input_directions);
}
