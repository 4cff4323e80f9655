// Logging goes through spdlog to stderr, so that stdout stays machine-readable (tokenize prints
// JSON, bench prints its table). Library code calls spdlog::info / spdlog::warn directly.
#pragma once

#include <spdlog/spdlog.h>

namespace lightning {

// Installs the stderr logger: plain messages for info, "warning: ..." / "error: ..." prefixes.
void init_logging(bool verbose = false);

}  // namespace lightning
