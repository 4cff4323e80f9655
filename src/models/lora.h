// LoRA (Hu et al. 2021) for the project's Linear and Conv2d layers: attach trainable low-rank
// adapters, merge them into the weights, save them in kohya's format, and read LoRA files as
// released (kohya `lora_unet_<path>.lora_down.weight / .lora_up.weight / .alpha`, conv layers
// included; diffusers/PEFT `<path>.lora_A.weight / .lora_B.weight`) to merge into a model.
//
// Conventions (kohya's and PEFT's): an adapter adds scale * up(down(x)) with
// scale = alpha / rank * multiplier; for a k x k convolution `down` is a k x k convolution with the
// layer's stride and padding to `rank` channels and `up` a 1 x 1 convolution; `down` starts
// kaiming-uniform and `up` at zero, so a fresh adapter leaves the model unchanged.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "nn/layers.h"

namespace lightning::models {

// One Linear or Conv2d of a module tree, by its dotted path (diffusers' module names).
struct LayerRef {
  std::string path;
  nn::Linear linear{nullptr};
  nn::Conv2d conv{nullptr};

  torch::Tensor& weight() { return linear ? linear->weight : conv->weight; }
  std::shared_ptr<nn::LowRankAdapter>& adapter() {
    return linear ? linear->adapter : conv->adapter;
  }
  int64_t in_features() const { return linear ? linear->in_features : conv->in_channels; }
  int64_t out_features() const { return linear ? linear->out_features : conv->out_channels; }
};

// Every Linear and Conv2d below `module`, in registration order.
std::vector<LayerRef> linear_and_conv_layers(torch::nn::Module& module);

// kohya's name for a module path: prefix + path with dots replaced by underscores, e.g.
// ("lora_unet_", "down_blocks.0.attentions.0.proj_in") ->
// "lora_unet_down_blocks_0_attentions_0_proj_in".
std::string kohya_name(const std::string& prefix, const std::string& path);

struct LoRAConfig {
  int64_t rank = 64;
  double alpha = 64;  // scale = alpha / rank
  // Module paths left without an adapter (a path matches an entry equal to it or below it).
  // The default is METHOD.md §4: the UNet's input and output convolutions and the
  // time-embedding linears (SDXL's add_embedding included).
  std::vector<std::string> exclude = {"conv_in", "conv_out", "time_embedding", "add_embedding"};
  // The adapters' dtype; unset: each layer weight's. Trained adapters on half-precision frozen
  // weights are float32.
  std::optional<torch::ScalarType> dtype;
};

// Whether `path` is `entry` or lies below it.
bool path_matches(const std::string& path, const std::string& entry);

// Attaches a fresh adapter (down kaiming-uniform from torch's global CPU generator whatever the
// device, up zero; in config.dtype or the layer weight's dtype, on its device, requires_grad) to
// every Linear and Conv2d not excluded. Replaces existing adapters. Returns the number attached.
// Throws Error for rank < 1.
size_t attach_lora(torch::nn::Module& module, const LoRAConfig& config);

// The attached adapters' tensors by name: "<path>.lora_down.weight" and "<path>.lora_up.weight"
// (the trainable parameters of a LoRA stage, in a stable order).
std::vector<std::pair<std::string, torch::Tensor>> lora_parameters(torch::nn::Module& module);

// Number of layers with an adapter.
size_t count_lora(torch::nn::Module& module);

// The number of parameters attach_lora(module, config) would add, without attaching.
int64_t count_lora_parameters(torch::nn::Module& module, const LoRAConfig& config);

// Folds every adapter into its layer's weight (W += scale * up @ down, computed in float32) and
// removes it. Afterwards the module computes what it computed with the adapters attached.
void merge_lora(torch::nn::Module& module);

// Removes every adapter without merging.
void remove_lora(torch::nn::Module& module);

// Writes the attached adapters as a kohya LoRA file (`prefix` = "lora_unet_" for a UNet):
// lora_down.weight, lora_up.weight (in `dtype` when given) and a float32 scalar alpha per layer.
void save_kohya_lora(torch::nn::Module& module, const std::string& path,
                     const std::string& prefix = "lora_unet_",
                     c10::optional<torch::ScalarType> dtype = c10::nullopt,
                     const std::map<std::string, std::string>& metadata = {});

// A LoRA file as read: one low-rank pair per target module.
struct LoRAModule {
  std::string key;  // the key stem in the file, e.g. "lora_unet_mid_block_resnets_0_conv1"
  torch::Tensor down, up;
  std::optional<double> alpha;  // absent: alpha = rank (scale 1)
  int64_t rank() const { return down.size(0); }
};

struct LoRAFile {
  std::string path;
  std::string format;  // "kohya" or "peft"
  std::vector<LoRAModule> modules;
};

// Reads a LoRA safetensors file in kohya or diffusers/PEFT format. Throws Error naming the file
// and key for a file that is neither, a pair with a missing half or shapes that do not chain.
LoRAFile read_lora_file(const std::string& path);

// A model the LoRA may touch: kohya names start with `kohya_prefix` (lora_unet_, lora_te1_, ...),
// PEFT names with `peft_prefix` ("unet.", "text_encoder.", or "" for a bare UNet file).
struct LoRATarget {
  torch::nn::Module* module = nullptr;
  std::string kohya_prefix;
  std::vector<std::string> peft_prefixes;
  // Other paths a kohya file may use for a layer (layer path -> alias): kohya's sd-scripts name
  // SDXL UNet layers by the original layout (lora_unet_input_blocks_4_1_proj_in), others by
  // diffusers' (lora_unet_down_blocks_1_attentions_0_proj_in); both are accepted.
  std::map<std::string, std::string> kohya_aliases;
};

struct LoRAApplyReport {
  size_t applied = 0;
  std::vector<std::string> unmatched;  // keys of the file that match no layer
};

// Merges `file` into the targets' weights with `multiplier` (the user's scale). A key that
// matches no layer is an error listing the first few unless `allow_partial`; a pair whose shapes
// do not fit the layer it names is always an error (a LoRA made for another architecture).
// Nothing is modified when an error is thrown.
LoRAApplyReport apply_lora(const LoRAFile& file, const std::vector<LoRATarget>& targets,
                           double multiplier, bool allow_partial);

}  // namespace lightning::models
