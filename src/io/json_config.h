// Strict reading of JSON config files (diffusers/transformers config.json): typed getters that
// name the file and key in every error, and a check that refuses keys nobody read.
#pragma once

#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace lightning::io {

// Parses a JSON file; errors name the file (missing, unreadable, malformed at line:column).
nlohmann::json read_json_file(const std::string& path);

// Writes JSON (indented) atomically: temporary file in the same directory, then rename.
void write_json_file(const std::string& path, const nlohmann::json& value);

// Writes bytes atomically: temporary file in the same directory, fsync, rename.
void write_file_atomic(const std::string& path, const std::string& bytes);

class ConfigReader {
 public:
  // `file` names the config in error messages; `object` must be a JSON object.
  ConfigReader(nlohmann::json object, std::string file);

  const std::string& file() const { return file_; }
  bool has(const std::string& key) const;      // present (null counts as present)
  bool is_null(const std::string& key) const;  // absent or null

  // Typed getters. get(): absent or null -> default. require(): absent or null -> error.
  int64_t get_int(const std::string& key, int64_t default_value);
  int64_t require_int(const std::string& key);
  double get_double(const std::string& key, double default_value);
  bool get_bool(const std::string& key, bool default_value);
  std::string get_string(const std::string& key, const std::string& default_value);
  std::string require_string(const std::string& key);
  std::vector<int64_t> require_int_list(const std::string& key);
  std::vector<std::string> require_string_list(const std::string& key);
  // An int or a list of ints; an int is repeated `n` times; a list must have length n.
  std::vector<int64_t> get_int_or_list(const std::string& key, int64_t default_value, size_t n);
  // Raw access (marks the key as read); null json if absent.
  nlohmann::json get_raw(const std::string& key);

  // Errors "<file>: key '<key>' ..." for the caller's own checks.
  [[noreturn]] void fail_key(const std::string& key, const std::string& message) const;
  // Refuses a key whose value is neither absent/null nor equal to `supported`.
  void expect(const std::string& key, const nlohmann::json& supported);

  // Throws naming every key that was never read (keys starting with '_' are metadata and
  // allowed). Call after reading everything the model understands.
  void refuse_unknown_keys() const;

 private:
  const nlohmann::json& at(const std::string& key);
  nlohmann::json object_;
  std::string file_;
  std::set<std::string> read_;
};

}  // namespace lightning::io
