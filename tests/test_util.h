// Helpers shared by the tests: paths, temporary directories, running the CLI.
#pragma once

#include <string>

namespace lightning::test {

// Absolute path of a file in the source tree, e.g. source_path("tests/fixtures/x").
std::string source_path(const std::string& relative);

// A fresh, empty directory unique to the running test (under LIGHTNING_TEST_TMP or /tmp).
std::string temp_dir();

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs build/lightning with the given argument string (passed through /bin/sh).
CommandResult run_lightning(const std::string& args);

}  // namespace lightning::test
