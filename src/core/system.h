// Process-level facts and settings: thread counts, resident memory.
#pragma once

#include <cstdint>

namespace lightning {

// Cores this process may run on (sched_getaffinity), at least 1.
int available_cores();

// Sets libtorch's intra-op threads (and inter-op threads once). n <= 0 means all cores.
// Debian's libtorch starts with one thread, so every compute entry point calls this.
void set_threads(int n);

// Resident set size now and its high-water mark, in bytes (/proc/self/status VmRSS, VmHWM).
int64_t current_rss_bytes();
int64_t peak_rss_bytes();

// Resets the high-water mark to the current RSS (writes 5 to /proc/self/clear_refs).
// Returns false where the kernel does not allow it.
bool reset_peak_rss();

}  // namespace lightning
