// Logging goes through spdlog to stderr, so that stdout stays machine-readable (tokenize prints
// JSON, bench prints its table). Library code calls spdlog::info / spdlog::warn directly.
#pragma once

#include <spdlog/spdlog.h>

namespace lightning {

// Installs the stderr logger: plain messages for info, "warning: ..." / "error: ..." prefixes.
void init_logging(bool verbose = false);

// In a job of several processes: prefixes every line with "[rank R] " and, on ranks other than
// 0, keeps only warnings and errors (rank 0 reports progress for all).
void set_log_rank(int rank);

}  // namespace lightning
