// Helpers shared by the tests: paths, temporary directories, running the CLI.
#pragma once

#include <map>
#include <ostream>
#include <string>

#include <torch/types.h>

#include "generate/pipeline.h"
#include "models/unet.h"

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

// UNet inputs by diffusers' names (sample, timestep, encoder_hidden_states, text_embeds,
// time_ids, down_0..down_N, mid); other names are left alone.
models::UNetInputs unet_inputs(const std::map<std::string, torch::Tensor>& named);

// A pipeline case file written by the fixture scripts (prompt, negative_prompt, guidance_scale,
// num_inference_steps, height, width, seed) as a request with the Euler sampler.
generate::GenerateRequest request_from_case(const std::string& path);

// Runs a command line through /bin/sh, collecting stdout and stderr.
CommandResult run_command(const std::string& command);

// Runs build/lightning with the given argument string (passed through /bin/sh).
CommandResult run_lightning(const std::string& args);

}  // namespace lightning::test
