// Process-level facts and settings: thread counts, resident memory.
#pragma once

#include <cstdint>

#include <c10/core/Device.h>

namespace lightning {

// Cores this process may run on (sched_getaffinity), at least 1.
int available_cores();

// Sets libtorch's intra-op threads (and inter-op threads once). n <= 0 means all cores.
// Debian's libtorch starts with one thread, so every compute entry point calls this.
void set_threads(int n);

// Whether the CPU advertises AVX512-BF16 (/proc/cpuinfo flag avx512_bf16). Without it,
// libtorch 1.13 runs bf16 matmul and convolution through slow reference kernels.
bool cpu_has_avx512_bf16();

// Makes glibc malloc keep freed memory for reuse instead of returning it to the kernel.
// glibc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap and
// unmaps it on free, so each large activation of a UNet forward page-faults anew (~0.3 GB/s).
// Serving everything from the never-trimmed heap removes those faults: the SDXL 64x64 f32 step
// went from 21.9 s to 18.6 s on the project machine with these settings given through
// GLIBC_TUNABLES (docs/benchmarks.md). Called once by the CLI.
void tune_allocator();
// Returns the free pages of the heap that tune_allocator keeps to the kernel (malloc_trim):
// after a large free that nothing will reuse soon.
void release_free_heap();
// The same for a device: on the CPU release_free_heap(); on CUDA the caching allocator's free
// blocks go back to the driver (emptyCache), so that other processes, nvidia-smi and the next
// stage's differently sized tensors see the memory.
void release_free_memory(const c10::Device& device);

// Resident set size now and its high-water mark, in bytes (/proc/self/status VmRSS, VmHWM).
int64_t current_rss_bytes();
// The machine's memory (/proc/meminfo MemTotal), in bytes; 0 where unknown.
int64_t total_memory_bytes();
// The machine's swap (/proc/meminfo SwapTotal), in bytes; 0 where there is none.
int64_t total_swap_bytes();
int64_t peak_rss_bytes();

// Resets the high-water mark to the current RSS (writes 5 to /proc/self/clear_refs).
// Returns false where the kernel does not allow it.
bool reset_peak_rss();

// Peak bytes held by libtorch's CUDA caching allocator on CUDA device `index` since the last
// reset_cuda_peak(index): allocated by tensors, and reserved from the driver. 0 in builds
// without CUDA (LIGHTNING_CUDA is defined when libtorch has c10_cuda).
int64_t cuda_peak_allocated_bytes(int index);
// The memory of CUDA device `index` (cudaMemGetInfo's total), in bytes; 0 in builds without CUDA
// or where it cannot be read.
int64_t cuda_total_memory_bytes(int index);
int64_t cuda_peak_reserved_bytes(int index);
void reset_cuda_peak(int index);

// The peak memory of a device since reset_peak_memory(device): on CUDA the caching allocator's
// tensor bytes (its state must exist: something was allocated there), on the CPU the process's
// RSS high-water mark. With `release_free`, the CPU's freed heap memory is returned to the
// kernel first, so that memory an earlier phase freed does not count (not between the
// iterations of a phase: the heap is kept so that the next iteration does not fault it anew).
int64_t peak_memory_bytes(const c10::Device& device);
void reset_peak_memory(const c10::Device& device, bool release_free = true);

}  // namespace lightning
