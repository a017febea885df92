// The Python module cnnlstm_fast._C: what this build is (build_info) and what the CUDA
// runtime finds at run time (cuda_runtime_info). Kernels register their ops with
// TORCH_LIBRARY in their own files; this one stays on light headers (no
// torch/extension.h) to keep the build fast.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#include "cpu/stats.h"
#include "cpu/gemm.h"
#ifdef CNNLSTM_FAST_WITH_CUDA
#include "cuda/device_query.h"
#endif

namespace py = pybind11;

namespace {

#define CNNLSTM_FAST_STRINGIFY_(...) #__VA_ARGS__
#define CNNLSTM_FAST_STRINGIFY(...) CNNLSTM_FAST_STRINGIFY_(__VA_ARGS__)

std::string compiler() {
#if defined(__clang__)
  return std::string("Clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("GCC ") + __VERSION__;
#else
  return "unknown";
#endif
}

py::list split_commas(const std::string& text) {
  py::list items;
  std::string::size_type start = 0;
  while (true) {
    auto end = text.find(',', start);
    items.append(text.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos) return items;
    start = end + 1;
  }
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = compiler();
  info["cxx_standard"] = static_cast<long>(__cplusplus);
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<long>(_OPENMP);
#else
  info["openmp"] = false;
  info["openmp_version"] = py::none();
#endif
#ifdef CNNLSTM_FAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = split_commas(CNNLSTM_FAST_STRINGIFY(CNNLSTM_FAST_CUDA_ARCHS));
  info["cuda_toolkit_version"] = cnnlstm_fast::cuda::toolkit_version();
#else
  info["cuda"] = false;
  info["cuda_archs"] = py::list();
  info["cuda_toolkit_version"] = py::none();
#endif
  return info;
}

#ifdef CNNLSTM_FAST_WITH_CUDA
py::dict as_dict(const cnnlstm_fast::cuda::QueryResult& result) {
  py::dict entry;
  entry["value"] = result.value;
  entry["error"] = result.error == 0 ? py::object(py::none())
                                     : py::object(py::str(std::string(result.error_name) +
                                                          ": " + result.error_string));
  return entry;
}
#endif

py::dict cuda_runtime_info() {
  py::dict info;
#ifdef CNNLSTM_FAST_WITH_CUDA
  info["compiled"] = true;
  info["runtime_version"] = as_dict(cnnlstm_fast::cuda::runtime_version());
  info["driver_version"] = as_dict(cnnlstm_fast::cuda::driver_version());
  info["device_count"] = as_dict(cnnlstm_fast::cuda::device_count());
#else
  info["compiled"] = false;
  info["reason"] = "cnnlstm_fast._C was built without CUDA (no nvcc or CNNLSTM_FAST_NO_CUDA=1)";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cnnlstm_fast C++/CUDA extension";
  m.def("build_info", &build_info,
        "How this extension was built: compiler, C++ standard, torch version, OpenMP, CUDA");
  m.def("cpu_gemm_info", [] {
    py::dict info;
    info["avx512_supported"] = cnnlstm_fast::cpu::packed_gemm_supported();
    info["setting"] = cnnlstm_fast::cpu::gemm_choice();
    info["in_use"] = cnnlstm_fast::cpu::use_packed_gemm() ? "avx512" : "blas";
    info["fma512_ratio"] = cnnlstm_fast::cpu::fma_rate_ratio();
    return info;
  }, "The float32 GEMM of the cpu backend: {'avx512_supported': bool, 'setting': 'auto', "
     "'avx512' or 'blas' (cpu_set_gemm), 'in_use': 'avx512' or 'blas', 'fma512_ratio': "
     "a core's float32 FMA rate in 512-bit vectors over 256-bit ones (~2 full-width "
     "512-bit units, ~1 double-pumped; 0 without AVX-512), timed once per process}");
  m.def("cpu_set_gemm", &cnnlstm_fast::cpu::set_gemm_choice, py::arg("name"),
        "Sets the cpu backend's float32 GEMM for the whole process: 'auto' (ours where the "
        "CPU has AVX-512F), 'avx512' or 'blas'; ValueError for another name or for 'avx512' "
        "where it cannot run. Use cnnlstm_fast.backends.cpu.set_gemm");
  m.def("cpu_set_cache_limit", &cnnlstm_fast::cpu::set_cache_limit, py::arg("bytes"),
        "Bounds the cpu backend's cache of freed buffers (0: off), unmapping cached blocks "
        "beyond it; ValueError below 0. Use cnnlstm_fast.backends.cpu.set_cache_limit");
  m.def("cpu_cache_info", [] {
    const auto stats = cnnlstm_fast::cpu::cache_stats();
    py::dict info;
    info["limit_bytes"] = stats.limit_bytes;
    info["cached_bytes"] = stats.cached_bytes;
    info["cached_blocks"] = stats.cached_blocks;
    info["in_use_bytes"] = stats.in_use_bytes;
    info["hits"] = stats.hits;
    info["misses"] = stats.misses;
    return info;
  }, "The cpu backend's cache of large buffers (csrc/cpu/alloc.h): limit, cached and in-use "
     "bytes, cached blocks, hits and misses since start");
  m.def("cpu_persistent_runs", [] {
    const auto runs = cnnlstm_fast::cpu::persistent_runs();
    py::dict info;
    info["forward"] = runs.forward;
    info["backward"] = runs.backward;
    return info;
  }, "How many layer-direction forwards and backwards the cpu backend's persistent path has "
     "run: {'forward': int, 'backward': int}");
  m.def("cpu_empty_cache", &cnnlstm_fast::cpu::empty_cache,
        "Unmaps every free block the cpu backend's buffer cache holds");
  m.def("cuda_runtime_info", &cuda_runtime_info,
        "CUDA runtime/driver versions and device count as the CUDA runtime reports them "
        "now; each entry is {'value': int, 'error': None or 'cudaErrorX: text'}");
}
