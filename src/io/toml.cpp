#include "io/toml.h"

#include <fstream>
#include <sstream>

#include <toml++/toml.h>

#include "core/error.h"

namespace lightning::io {
namespace {

nlohmann::json to_json(const toml::node& node) {
  if (auto* table = node.as_table()) {
    nlohmann::json object = nlohmann::json::object();
    for (const auto& [key, value] : *table)
      object[std::string(key.str())] = to_json(value);
    return object;
  }
  if (auto* array = node.as_array()) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& value : *array)
      list.push_back(to_json(value));
    return list;
  }
  if (auto* v = node.as_string()) return v->get();
  if (auto* v = node.as_integer()) return v->get();
  if (auto* v = node.as_floating_point()) return v->get();
  if (auto* v = node.as_boolean()) return v->get();
  std::ostringstream text;  // dates and times
  node.visit([&](const auto& value) { text << value; });
  return text.str();
}

}  // namespace

nlohmann::json parse_toml(const std::string& text, const std::string& source) {
  try {
    auto table = toml::parse(text, source);
    return to_json(table);
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    fail("{}:{}:{}: {}", source, where.line, where.column, e.description());
  }
}

nlohmann::json read_toml_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open", path);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in.good() && !in.eof()) fail("{}: cannot read", path);
  return parse_toml(text.str(), path);
}

}  // namespace lightning::io
