#include "core/system.h"

#include <malloc.h>
#include <sched.h>

#include <fstream>
#include <limits>
#include <string>

#include <ATen/Parallel.h>
#ifdef LIGHTNING_CUDA
#include <dlfcn.h>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace lightning {

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return 1;
}

void set_threads(int n) {
  if (n <= 0) n = available_cores();
  at::set_num_threads(n);
  // Inter-op threads can be set only once per process, before any inter-op work.
  static bool interop_set = false;
  if (!interop_set) {
    interop_set = true;
    try {
      at::set_num_interop_threads(1);
    } catch (const std::exception&) {
    }
  }
}

bool cpu_has_avx512_bf16() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) == 0) return line.find(" avx512_bf16") != std::string::npos;
  }
  return false;
}

void tune_allocator() {
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
}

void release_free_heap() {
  malloc_trim(0);
}

namespace {
// A "Field:  123 kB" line of a /proc file, in KiB; 0 when absent.
int64_t proc_kib(const char* file, const char* field) {
  std::ifstream in(file);
  std::string line;
  const std::string prefix = std::string(field) + ":";
  while (std::getline(in, line)) {
    if (line.compare(0, prefix.size(), prefix) == 0) return std::stoll(line.substr(prefix.size()));
  }
  return 0;
}
int64_t status_kib(const char* field) {
  return proc_kib("/proc/self/status", field);
}
}  // namespace

int64_t current_rss_bytes() {
  return status_kib("VmRSS") * 1024;
}
int64_t peak_rss_bytes() {
  return status_kib("VmHWM") * 1024;
}
int64_t total_memory_bytes() {
  return proc_kib("/proc/meminfo", "MemTotal") * 1024;
}

int64_t total_swap_bytes() {
  return proc_kib("/proc/meminfo", "SwapTotal") * 1024;
}

bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  if (!out) return false;
  out << "5";
  return static_cast<bool>(out.flush());
}

#ifdef LIGHTNING_CUDA
// Index 0 of each stat array is the aggregate over pool types (StatType::AGGREGATE).
int64_t cuda_peak_allocated_bytes(int index) {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(index))
      .allocated_bytes[0]
      .peak;
}
int64_t cuda_peak_reserved_bytes(int index) {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(index))
      .reserved_bytes[0]
      .peak;
}
void reset_cuda_peak(int index) {
  c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(index));
}
static void release_cuda_cache() {
  c10::cuda::CUDACachingAllocator::emptyCache();
}
int64_t cuda_total_memory_bytes(int index) {
  // The CUDA runtime's, looked up where libc10_cuda loaded it: this program links libtorch's
  // CUDA libraries, not the runtime itself.
  using MemGetInfo = decltype(&cudaMemGetInfo);
  static const auto mem_get_info =
      reinterpret_cast<MemGetInfo>(dlsym(RTLD_DEFAULT, "cudaMemGetInfo"));
  if (!mem_get_info) return 0;
  try {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(index));
    size_t free = 0, total = 0;
    if (mem_get_info(&free, &total) != cudaSuccess) return 0;
    return static_cast<int64_t>(total);
  } catch (const std::exception&) {  // no such device
    return 0;
  }
}
#else
int64_t cuda_peak_allocated_bytes(int) {
  return 0;
}
int64_t cuda_peak_reserved_bytes(int) {
  return 0;
}
void reset_cuda_peak(int) {}
static void release_cuda_cache() {}
int64_t cuda_total_memory_bytes(int) {
  return 0;
}
#endif

int64_t peak_memory_bytes(const c10::Device& device) {
  return device.is_cuda() ? cuda_peak_allocated_bytes(device.has_index() ? device.index() : 0)
                          : peak_rss_bytes();
}

void release_free_memory(const c10::Device& device) {
  if (device.is_cuda())
    release_cuda_cache();
  else
    release_free_heap();
}

void reset_peak_memory(const c10::Device& device, bool release_free) {
  if (device.is_cuda()) {
    reset_cuda_peak(device.has_index() ? device.index() : 0);
  } else {
    if (release_free) release_free_heap();  // heap pages tune_allocator keeps stop counting
    reset_peak_rss();
  }
}

}  // namespace lightning
