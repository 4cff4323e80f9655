#include "app/device.h"

#include <ATen/Context.h>
#include <torch/cuda.h>

#include "core/error.h"
#include "core/log.h"
#include "core/system.h"

namespace lightning::app {

void add_dtype_device_options(CLI::App& command, std::string* dtype, std::string* device) {
  command
      .add_option("--dtype", *dtype,
                  "Compute type: f32, bf16 (fast on CPUs with AVX512-BF16), f16 (CUDA only)")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}))
      ->capture_default_str();
  command.add_option("--device", *device, "cpu or cuda[:N]")->capture_default_str();
}

torch::Device parse_device(const std::string& name) {
  if (name == "cpu") return torch::kCPU;
  if (name.rfind("cuda", 0) == 0) {
    if (!torch::cuda::is_available())
      fail_usage("--device {}: this build of libtorch has no CUDA device available", name);
    torch::Device device = torch::kCPU;
    try {
      device = torch::Device(name);
    } catch (const std::exception&) {
      fail_usage("--device {}: not a device (use cpu or cuda[:N])", name);
    }
    if (device.has_index() && device.index() >= static_cast<int>(torch::cuda::device_count()))
      fail_usage("--device {}: this machine has {} CUDA device(s)", name,
                 torch::cuda::device_count());
    // Fixed shapes through a whole generation: let cuDNN pick the fastest convolution algorithms.
    at::globalContext().setBenchmarkCuDNN(true);
    return device;
  }
  fail_usage("--device {}: not a device (use cpu or cuda[:N])", name);
}

namespace {
// f32 / bf16 / f16, else a UsageError naming `flag`.
torch::ScalarType dtype_named(const std::string& name, const char* flag) {
  if (name == "f32") return torch::kFloat32;
  if (name == "bf16") return torch::kBFloat16;
  if (name == "f16") return torch::kFloat16;
  fail_usage("{} {}: use f32, bf16 or f16", flag, name);
}
}  // namespace

torch::ScalarType parse_dtype(const std::string& name, const torch::Device& device) {
  const auto dtype = dtype_named(name, "--dtype");
  if (dtype == torch::kBFloat16) {
    if (device.is_cpu() && !cpu_has_avx512_bf16())
      spdlog::warn(
          "--dtype bf16: this CPU has no AVX512-BF16, so bf16 matmul/convolution run through slow "
          "reference kernels (~20x slower than f32 here, docs/benchmarks.md); f32 is faster");
  }
  if (dtype == torch::kFloat16 && device.is_cpu())
    fail_usage("--dtype f16: libtorch has no f16 convolution/matmul on CPU; use bf16 or f32");
  return dtype;
}

void add_weights_dtype_option(CLI::App& command, std::string* weights_dtype) {
  command
      .add_option("--weights-dtype", *weights_dtype,
                  "Hold the weights in f16 or bf16 while computing in f32: half the weight memory "
                  "(an f16 file stays memory-mapped), the same images, somewhat slower "
                  "(default: the --dtype)")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
}

std::optional<torch::ScalarType> parse_weights_dtype(const std::string& name,
                                                     torch::ScalarType compute) {
  if (name.empty()) return std::nullopt;
  const auto dtype = dtype_named(name, "--weights-dtype");
  if (dtype != compute && compute != torch::kFloat32)
    fail_usage("--weights-dtype {} with --dtype {}: narrower weights only help f32 compute", name,
               compute == torch::kFloat16 ? "f16" : "bf16");
  return dtype;
}

}  // namespace lightning::app
