#include "io/json_config.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "core/error.h"

namespace lightning::io {

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("{}: cannot open: {}", path, std::strerror(errno));
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return nlohmann::json::parse(buffer.str());
  } catch (const nlohmann::json::parse_error& e) {
    // e.what() is "[json.exception.parse_error.101] parse error at line 3, column 5: ..."
    std::string what = e.what();
    const auto pos = what.find("] ");
    fail("{}: malformed JSON: {}", path, pos == std::string::npos ? what : what.substr(pos + 2));
  }
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("{}: cannot write: {}", path, std::strerror(errno));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      fail("{}: write failed: {}", path, std::strerror(err));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail("{}: write failed: {}", path, std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail("{}: cannot rename into place: {}", path, std::strerror(err));
  }
}

void write_json_file(const std::string& path, const nlohmann::json& value) {
  write_file_atomic(path, value.dump(2) + "\n");
}

ConfigReader::ConfigReader(nlohmann::json object, std::string file)
    : object_(std::move(object)), file_(std::move(file)) {
  if (!object_.is_object()) fail("{}: expected a JSON object at the top level", file_);
}

bool ConfigReader::has(const std::string& key) const {
  return object_.contains(key);
}

bool ConfigReader::is_null(const std::string& key) const {
  return !object_.contains(key) || object_.at(key).is_null();
}

void ConfigReader::fail_key(const std::string& key, const std::string& message) const {
  fail("{}: key '{}': {}", file_, key, message);
}

const nlohmann::json& ConfigReader::at(const std::string& key) {
  read_.insert(key);
  return object_.at(key);
}

nlohmann::json ConfigReader::get_raw(const std::string& key) {
  read_.insert(key);
  return object_.contains(key) ? object_.at(key) : nlohmann::json();
}

int64_t ConfigReader::get_int(const std::string& key, int64_t default_value) {
  read_.insert(key);
  if (is_null(key)) return default_value;
  const auto& v = at(key);
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float() &&
      v.get<double>() == static_cast<double>(static_cast<int64_t>(v.get<double>())))
    return static_cast<int64_t>(v.get<double>());
  fail_key(key, fmt::format("expected an integer, got {}", v.dump()));
}

int64_t ConfigReader::require_int(const std::string& key) {
  read_.insert(key);
  if (is_null(key)) fail_key(key, "missing (required)");
  return get_int(key, 0);
}

double ConfigReader::get_double(const std::string& key, double default_value) {
  read_.insert(key);
  if (is_null(key)) return default_value;
  const auto& v = at(key);
  if (!v.is_number()) fail_key(key, fmt::format("expected a number, got {}", v.dump()));
  return v.get<double>();
}

bool ConfigReader::get_bool(const std::string& key, bool default_value) {
  read_.insert(key);
  if (is_null(key)) return default_value;
  const auto& v = at(key);
  if (!v.is_boolean()) fail_key(key, fmt::format("expected true or false, got {}", v.dump()));
  return v.get<bool>();
}

std::string ConfigReader::get_string(const std::string& key, const std::string& default_value) {
  read_.insert(key);
  if (is_null(key)) return default_value;
  const auto& v = at(key);
  if (!v.is_string()) fail_key(key, fmt::format("expected a string, got {}", v.dump()));
  return v.get<std::string>();
}

std::string ConfigReader::require_string(const std::string& key) {
  read_.insert(key);
  if (is_null(key)) fail_key(key, "missing (required)");
  return get_string(key, "");
}

std::vector<int64_t> ConfigReader::require_int_list(const std::string& key) {
  read_.insert(key);
  if (is_null(key)) fail_key(key, "missing (required)");
  const auto& v = at(key);
  if (!v.is_array()) fail_key(key, fmt::format("expected a list of integers, got {}", v.dump()));
  std::vector<int64_t> out;
  for (const auto& item : v) {
    if (!item.is_number_integer())
      fail_key(key, fmt::format("expected a list of integers, got {}", v.dump()));
    out.push_back(item.get<int64_t>());
  }
  return out;
}

std::vector<std::string> ConfigReader::require_string_list(const std::string& key) {
  read_.insert(key);
  if (is_null(key)) fail_key(key, "missing (required)");
  const auto& v = at(key);
  if (!v.is_array()) fail_key(key, fmt::format("expected a list of strings, got {}", v.dump()));
  std::vector<std::string> out;
  for (const auto& item : v) {
    if (!item.is_string())
      fail_key(key, fmt::format("expected a list of strings, got {}", v.dump()));
    out.push_back(item.get<std::string>());
  }
  return out;
}

std::vector<int64_t> ConfigReader::get_int_or_list(const std::string& key, int64_t default_value,
                                                   size_t n) {
  read_.insert(key);
  if (is_null(key)) return std::vector<int64_t>(n, default_value);
  const auto& v = at(key);
  if (v.is_number_integer()) return std::vector<int64_t>(n, v.get<int64_t>());
  auto list = require_int_list(key);
  if (list.size() != n)
    fail_key(key, fmt::format("expected {} entries (one per block), got {}", n, list.size()));
  return list;
}

void ConfigReader::expect(const std::string& key, const nlohmann::json& supported) {
  read_.insert(key);
  if (is_null(key)) return;
  const auto& v = at(key);
  if (v != supported)
    fail_key(key,
             fmt::format("value {} is not supported (supported: {})", v.dump(), supported.dump()));
}

void ConfigReader::refuse_unknown_keys() const {
  std::vector<std::string> unknown;
  for (const auto& item : object_.items()) {
    if (!item.key().empty() && item.key()[0] == '_') continue;
    if (!read_.count(item.key())) unknown.push_back(item.key());
  }
  if (!unknown.empty()) {
    fail("{}: unsupported key{} {}", file_, unknown.size() > 1 ? "s" : "",
         fmt::format("'{}'", fmt::join(unknown, "', '")));
  }
}

}  // namespace lightning::io
