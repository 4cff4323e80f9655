// TOML files (recipes) read with toml++ and handed on as JSON, so that one strict reader
// (io::ConfigReader) checks recipes and diffusers configs alike.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace lightning::io {

// Parses a TOML document into the equivalent JSON: tables -> objects, arrays -> arrays,
// integers -> integers, floats -> numbers, dates and times -> strings. Throws Error
// "<source>:<line>:<column>: <reason>" on a syntax error.
nlohmann::json parse_toml(const std::string& text, const std::string& source);
// Reads and parses a TOML file; Error naming the file when it cannot be read.
nlohmann::json read_toml_file(const std::string& path);

}  // namespace lightning::io
