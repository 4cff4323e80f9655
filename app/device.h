// Shared --dtype / --device options of compute subcommands.
#pragma once

#include <optional>
#include <string>

#include <torch/types.h>
#include <CLI/CLI.hpp>

namespace lightning::app {

void add_dtype_device_options(CLI::App& command, std::string* dtype, std::string* device);
// "cpu" or "cuda[:N]"; refuses cuda when libtorch has no CUDA device.
torch::Device parse_device(const std::string& name);
// "f32" | "bf16" | "f16"; f16 compute is refused on CPU (no CPU kernels for f16 conv/matmul).
torch::ScalarType parse_dtype(const std::string& name, const torch::Device& device);

// --weights-dtype: the dtype weights are held in (models::ModelLoadOptions::weights_dtype).
void add_weights_dtype_option(CLI::App& command, std::string* weights_dtype);
// "" (the compute dtype), or f16 / bf16 under f32 compute, or the compute dtype itself.
// Throws UsageError for a combination that saves nothing (weights wider than the compute).
std::optional<torch::ScalarType> parse_weights_dtype(const std::string& name,
                                                     torch::ScalarType compute);

}  // namespace lightning::app
