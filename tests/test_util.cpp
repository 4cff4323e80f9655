#include "test_util.h"

#include "io/json_config.h"

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

models::UNetInputs unet_inputs(const std::map<std::string, torch::Tensor>& named) {
  models::UNetInputs in;
  in.sample = named.at("sample");
  in.timestep = named.at("timestep");
  in.encoder_hidden_states = named.at("encoder_hidden_states");
  if (named.count("text_embeds")) in.text_embeds = named.at("text_embeds");
  if (named.count("time_ids")) in.time_ids = named.at("time_ids");
  for (size_t i = 0; named.count("down_" + std::to_string(i)); ++i)
    in.down_residuals.push_back(named.at("down_" + std::to_string(i)));
  if (named.count("mid")) in.mid_residual = named.at("mid");
  return in;
}

generate::GenerateRequest request_from_case(const std::string& path) {
  const auto c = io::read_json_file(path);
  generate::GenerateRequest r;
  r.prompts = {c["prompt"].get<std::string>()};
  r.negative_prompt = c.value("negative_prompt", "");
  r.guidance_scale = c["guidance_scale"].get<double>();
  r.steps = c["num_inference_steps"].get<int64_t>();
  r.height = c["height"].get<int64_t>();
  r.width = c["width"].get<int64_t>();
  r.seed = c["seed"].get<uint64_t>();
  r.sampler = diffusion::SamplerKind::kEuler;
  return r;
}

void PrintTo(const ParityCase& c, std::ostream* os) {
  *os << c.model << c.suffix;
}

CommandResult run_command(const std::string& command_line) {
  CommandResult result;
  const std::string command = command_line + " 2>&1";
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

CommandResult run_lightning(const std::string& args) {
  return run_command(std::string(LIGHTNING_BIN) + " " + args);
}

}  // namespace lightning::test
