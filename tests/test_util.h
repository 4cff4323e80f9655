// Helpers shared by the tests: paths, temporary directories, running the CLI.
#pragma once

#include <ostream>
#include <string>

#include <torch/types.h>

namespace lightning::test {

// Absolute path of a file in the source tree, e.g. source_path("tests/fixtures/x").
std::string source_path(const std::string& relative);

// A fresh, empty directory unique to the running test (under LIGHTNING_TEST_TMP or /tmp).
std::string temp_dir();

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// max |actual - expected| / max |expected|, in f64: the parity measure of the issues.
double relative_error(const torch::Tensor& actual, const torch::Tensor& expected);

// A parity fixture: tests/fixtures/<kind>/<model>/{inputs,expected}<suffix>.safetensors.
struct ParityCase {
  const char* model;
  const char* suffix;
};
void PrintTo(const ParityCase& c, std::ostream* os);

// Runs build/lightning with the given argument string (passed through /bin/sh).
CommandResult run_lightning(const std::string& args);

}  // namespace lightning::test
