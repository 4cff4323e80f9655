#include "core/log.h"

#include <spdlog/sinks/stdout_sinks.h>

namespace lightning {

void init_logging(bool verbose) {
  auto logger = spdlog::stderr_logger_mt("lightning");
  // "%^" / "%$" would add colour; keep plain text so logs read the same in files and CI.
  logger->set_pattern("%v");
  logger->set_level(verbose ? spdlog::level::debug : spdlog::level::info);
  spdlog::set_default_logger(logger);
}

}  // namespace lightning
