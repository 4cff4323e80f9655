// The `lightning` program end to end: the forward contract, exit codes and one-line errors.
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "io/json_config.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace lightning {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

const std::string kTinySdxl = "tests/fixtures/unet/tiny-sdxl";

std::string fixture(const std::string& relative) {
  return test::source_path(relative);
}

// One line on stderr, naming what is at fault.
void expect_one_line_error(const test::CommandResult& r, int code, const std::string& needle) {
  EXPECT_EQ(r.exit_code, code) << r.output;
  EXPECT_THAT(r.output, HasSubstr(needle));
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
}

TEST(Cli, HelpExitsZero) {
  EXPECT_EQ(test::run_lightning("--help").exit_code, 0);
  EXPECT_EQ(test::run_lightning("forward --help").exit_code, 0);
  EXPECT_EQ(test::run_lightning("bench --help").exit_code, 0);
}

TEST(Cli, BenchPipelineTimesEveryPart) {
  // A random tiny SDXL-shaped pipeline, and the pipeline fixture directory.
  auto r = test::run_lightning(
      "bench --threads 1 --pipeline tiny-sdxl --image 32 --steps 2 --warmup 0 --repeat 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* row :
       {"| load random tiny-sdxl | f32 |", "| end to end random tiny-sdxl 32x32 2 steps",
        "|   text encoders ", "|   unet step ", "|   vae decode "})
    EXPECT_THAT(r.output, HasSubstr(row));
  r = test::run_lightning("bench --threads 1 --pipeline " +
                          fixture("tests/fixtures/sdxl/tiny-sdxl-pipeline") +
                          " --image 64 --steps 1 --guidance 5 --warmup 0 --repeat 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("64x64 1 steps cfg 5 | f32 |"));
  expect_one_line_error(test::run_lightning("bench --pipeline nonsense"), 2, "--pipeline nonsense");
  expect_one_line_error(test::run_lightning("bench --pipeline tiny-sdxl --vae tiny"), 2,
                        "choose one");
}

TEST(Cli, BenchDataReadsBatches) {
  auto r = test::run_lightning(
      "bench --threads 1 --data synthetic --image 64 --batch 2 --warmup 1 --repeat 3");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("| synthetic | 64 | 2 | 6 | "));
  EXPECT_THAT(r.output, HasSubstr("(0 skipped)"));
  expect_one_line_error(test::run_lightning("bench --data synthetic --distill tiny-sdxl"), 2,
                        "--distill and --data: choose one benchmark");
  r = test::run_lightning("bench --data /nonexistent/x-{0..1}.tar");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_THAT(r.output, HasSubstr("lightning: /nonexistent/x-0.tar: shard not found"));
}

TEST(Cli, ForwardUnetWritesDiffusersOutput) {
  const auto out = test::temp_dir() + "/out.safetensors";
  auto r =
      test::run_lightning("forward unet --threads 1 --model " + fixture(kTinySdxl) + " --inputs " +
                          fixture(kTinySdxl + "/inputs.safetensors") + " --out " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto actual = io::load_safetensors(out).at("out");
  auto expected = io::load_safetensors(fixture(kTinySdxl + "/expected.safetensors")).at("out");
  EXPECT_LT(((actual - expected).abs().max() / expected.abs().max()).item<double>(), 1e-4);
}

TEST(Cli, BadFlagIsUsageError) {
  auto r = test::run_lightning("forward unet --model x --inputs y --out z --frobnicate");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_THAT(r.output, HasSubstr("--frobnicate"));
  r = test::run_lightning("forward unet --inputs y --out z");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_THAT(r.output, HasSubstr("--model"));
  r = test::run_lightning("forward unet --model x --inputs y --out z --dtype f16");
  expect_one_line_error(r, 2, "--dtype f16");
  r = test::run_lightning("forward unet --model x --inputs y --out z --threads -1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  r = test::run_lightning("frobnicate");
  EXPECT_EQ(r.exit_code, 2) << r.output;
}

TEST(Cli, MissingModelDirectoryIsNamed) {
  const auto dir = test::temp_dir();
  auto r = test::run_lightning("forward unet --model " + dir + "/nope --inputs " +
                               fixture(kTinySdxl + "/inputs.safetensors") + " --out " + dir + "/o");
  expect_one_line_error(r, 1, dir + "/nope");
}

TEST(Cli, CorruptWeightsAreNamed) {
  const auto dir = test::temp_dir();
  fs::copy_file(fixture(kTinySdxl + "/config.json"), dir + "/config.json");
  // Truncate the weights: the header promises more data than the file holds.
  std::ifstream in(fixture(kTinySdxl + "/diffusion_pytorch_model.safetensors"), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  std::ofstream(dir + "/diffusion_pytorch_model.safetensors", std::ios::binary)
      .write(bytes.data(), bytes.size() / 2);
  auto r = test::run_lightning("forward unet --model " + dir + " --inputs " +
                               fixture(kTinySdxl + "/inputs.safetensors") + " --out " + dir + "/o");
  expect_one_line_error(r, 1, dir + "/diffusion_pytorch_model.safetensors");
}

TEST(Cli, BadConfigIsNamed) {
  const auto dir = test::temp_dir();
  fs::copy_file(fixture(kTinySdxl + "/diffusion_pytorch_model.safetensors"),
                dir + "/diffusion_pytorch_model.safetensors");
  auto config = io::read_json_file(fixture(kTinySdxl + "/config.json"));
  config.erase("block_out_channels");
  io::write_json_file(dir + "/config.json", config);
  auto r = test::run_lightning("forward unet --model " + dir + " --inputs " +
                               fixture(kTinySdxl + "/inputs.safetensors") + " --out " + dir + "/o");
  expect_one_line_error(r, 1, "config.json: key 'block_out_channels': missing");

  config = io::read_json_file(fixture(kTinySdxl + "/config.json"));
  config["block_out_channels"] = {32, 128};
  io::write_json_file(dir + "/config.json", config);
  r = test::run_lightning("forward unet --model " + dir + " --inputs " +
                          fixture(kTinySdxl + "/inputs.safetensors") + " --out " + dir + "/o");
  expect_one_line_error(r, 1, "do not fit the config");
  EXPECT_THAT(r.output, HasSubstr("mis-shaped"));

  std::ofstream(dir + "/config.json") << "{\"in_channels\": 4,";
  r = test::run_lightning("forward unet --model " + dir + " --inputs " +
                          fixture(kTinySdxl + "/inputs.safetensors") + " --out " + dir + "/o");
  expect_one_line_error(r, 1, "config.json: malformed JSON");
}

TEST(Cli, WrongInputsAreNamed) {
  const auto dir = test::temp_dir();
  auto inputs = io::load_safetensors(fixture(kTinySdxl + "/inputs.safetensors"));
  auto write = [&](const std::map<std::string, torch::Tensor>& named) {
    std::vector<std::pair<std::string, torch::Tensor>> list(named.begin(), named.end());
    io::save_safetensors(dir + "/in.safetensors", list);
  };
  auto run = [&] {
    return test::run_lightning("forward unet --model " + fixture(kTinySdxl) + " --inputs " + dir +
                               "/in.safetensors --out " + dir + "/o.safetensors");
  };
  auto named = inputs;
  named["noise"] = named.at("sample");
  write(named);
  expect_one_line_error(run(), 1, "unknown input 'noise'");

  named = inputs;
  named.erase("timestep");
  write(named);
  expect_one_line_error(run(), 1, "missing input 'timestep'");

  named = inputs;
  named["text_embeds"] = torch::zeros({2, 15});
  write(named);
  expect_one_line_error(run(), 1, "'text_embeds': expected [2, 16], got [2, 15]");

  named = inputs;
  named["sample"] = torch::zeros({2, 4, 16});
  write(named);
  expect_one_line_error(run(), 1, "'sample': expected [B, 4, H, W], got [2, 4, 16]");
  EXPECT_FALSE(fs::exists(dir + "/o.safetensors"));
}

TEST(Cli, OutputIsReplacedAtomically) {
  // A failing run leaves an existing output untouched.
  const auto dir = test::temp_dir();
  std::ofstream(dir + "/o.safetensors") << "previous";
  auto r = test::run_lightning("forward unet --model " + fixture(kTinySdxl) + " --inputs " + dir +
                               "/missing.safetensors --out " + dir + "/o.safetensors");
  EXPECT_EQ(r.exit_code, 1);
  std::ifstream in(dir + "/o.safetensors");
  std::string content((std::istreambuf_iterator<char>(in)), {});
  EXPECT_EQ(content, "previous");
}

}  // namespace
}  // namespace lightning
