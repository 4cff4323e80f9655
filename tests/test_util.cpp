#include "test_util.h"

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace lightning::test {

std::string source_path(const std::string& relative) {
  return std::string(LIGHTNING_SOURCE_DIR) + "/" + relative;
}

std::string temp_dir() {
  const char* root = std::getenv("LIGHTNING_TEST_TMP");
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "test";
  for (auto& c : name)
    if (c == '/') c = '_';
  const auto dir = std::filesystem::path(root ? root : "/tmp/lightning-tests") / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

double relative_error(const torch::Tensor& actual, const torch::Tensor& expected) {
  const auto a = actual.to(torch::kFloat64), e = expected.to(torch::kFloat64);
  return (a - e).abs().max().item<double>() / e.abs().max().item<double>();
}

void PrintTo(const ParityCase& c, std::ostream* os) {
  *os << c.model << c.suffix;
}

CommandResult run_lightning(const std::string& args) {
  CommandResult result;
  const std::string command = std::string(LIGHTNING_BIN) + " " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return result;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0)
    result.output.append(buffer, n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

}  // namespace lightning::test
