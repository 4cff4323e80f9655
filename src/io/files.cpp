#include "io/files.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace lightning::io {
namespace fs = std::filesystem;

void check_replaceable(const std::string& dir, const char* marker) {
  const fs::path target = fs::path(dir);
  std::error_code ec;
  if (fs::exists(target, ec) && (!fs::is_directory(target, ec) || !fs::is_empty(target, ec)) &&
      !fs::exists(target / marker, ec))
    fail(
        "{}: exists and is not an earlier output (it has no {}): not replaced; remove it or "
        "choose another directory",
        dir, marker);
}

void write_directory_atomic(const std::string& target_in,
                            const std::function<void(const std::string& tmp)>& fill) {
  fs::path target = fs::path(target_in).lexically_normal();
  if (target.filename().empty()) target = target.parent_path();
  if (!target.parent_path().empty()) {
    std::error_code ec;
    fs::create_directories(target.parent_path(), ec);
    if (ec) fail("{}: cannot create directory ({})", target.parent_path().string(), ec.message());
  }
  const std::string suffix = "-" + std::to_string(::getpid());
  fs::path tmp = target, old = target;
  tmp += ".tmp" + suffix;
  old += ".old" + suffix;
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) fail("{}: cannot create directory ({})", tmp.string(), ec.message());
  try {
    fill(tmp.string());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  const bool had_old = fs::exists(target);
  if (had_old) {
    fs::rename(target, old, ec);
    if (ec) fail("{}: cannot move aside ({})", target.string(), ec.message());
  }
  fs::rename(tmp, target, ec);
  if (ec) {
    if (had_old) fs::rename(old, target);
    fail("{}: cannot rename {} into place ({})", target.string(), tmp.string(), ec.message());
  }
  if (had_old) fs::remove_all(old, ec);
}

bool read_file_bytes(const std::string& path, std::string* bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream buffer;
  buffer << in.rdbuf();
  *bytes = buffer.str();
  return !in.bad();
}

}  // namespace lightning::io
