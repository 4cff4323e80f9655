#include "core/log.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>

namespace lightning {
namespace {

// "%*": nothing for info and debug messages, "warning: " / "error: " for the others, so that
// ordinary progress lines read plainly and problems stand out.
class LevelPrefix : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    const char* prefix = "";
    if (msg.level == spdlog::level::warn) prefix = "warning: ";
    if (msg.level >= spdlog::level::err) prefix = "error: ";
    dest.append(prefix, prefix + std::char_traits<char>::length(prefix));
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return spdlog::details::make_unique<LevelPrefix>();
  }
};

}  // namespace

void init_logging(bool verbose) {
  auto logger = spdlog::get("lightning");
  if (!logger) logger = spdlog::stderr_logger_mt("lightning");
  auto formatter = std::make_unique<spdlog::pattern_formatter>();
  formatter->add_flag<LevelPrefix>('*').set_pattern("%*%v");
  logger->set_formatter(std::move(formatter));
  logger->set_level(verbose ? spdlog::level::debug : spdlog::level::info);
  spdlog::set_default_logger(logger);
}

void set_log_rank(int rank) {
  auto logger = spdlog::default_logger();
  auto formatter = std::make_unique<spdlog::pattern_formatter>();
  formatter->add_flag<LevelPrefix>('*').set_pattern(fmt::format("[rank {}] %*%v", rank));
  logger->set_formatter(std::move(formatter));
  if (rank != 0 && logger->level() < spdlog::level::warn) logger->set_level(spdlog::level::warn);
}

}  // namespace lightning
