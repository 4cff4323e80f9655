// Error types. Library code throws; the CLI catches once, prints one line and exits with
// 1 (Error: bad file, value or runtime failure) or 2 (UsageError: bad flag or combination).
#pragma once

#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace lightning {

// A runtime failure: a corrupt file, a config value we do not support, a shape mismatch.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A usage failure: a bad flag, a missing argument, an impossible combination of options.
class UsageError : public Error {
 public:
  using Error::Error;
};

// fail("{}: tensor '{}' ...", file, name) throws Error with a formatted message.
template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

template <typename... Args>
[[noreturn]] void fail_usage(fmt::format_string<Args...> format, Args&&... args) {
  throw UsageError(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace lightning
