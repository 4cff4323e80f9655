// Loading diffusers-layout model directories: <dir>/config.json plus
// <dir>/diffusion_pytorch_model[.<variant>].safetensors, or a sharded checkpoint with its
// .safetensors.index.json. A pipeline root with a unet/ folder is accepted for the UNet.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>

#include "io/state_dict.h"
#include "models/clip_text.h"
#include "models/controlnet.h"
#include "models/unet.h"
#include "models/vae.h"

namespace lightning::models {

struct ModelLoadOptions {
  torch::ScalarType dtype = torch::kFloat32;  // compute dtype (f16 files are converted)
  torch::Device device = torch::kCPU;
  std::string variant;  // "" (prefer full precision, else the only file there) or e.g. "fp16"
  // The dtype the weights are held in; unset: `dtype`. A narrower one keeps e.g. an f16
  // checkpoint in f16 (a view of the memory-mapped file, no copy) while the model computes in
  // `dtype`: each layer converts its weights as it uses them (nn::as_input), which gives exactly
  // the numbers of converting at load with half the weight memory, for some conversion time.
  std::optional<torch::ScalarType> weights_dtype;

  io::LoadOptions weights() const { return {weights_dtype.value_or(dtype), device}; }
};

// The weight files of a diffusers component directory, e.g. ("unet", "diffusion_pytorch_model").
// Throws Error naming the directory when none is found (and mentions .bin files, which are
// not supported because they are pickles).
std::vector<std::string> find_weight_files(const std::string& dir, const std::string& basename,
                                           const std::string& variant);

// Resolves DIR to the UNet's component directory (DIR or DIR/unet).
std::string resolve_component_dir(const std::string& dir, const std::string& component);

// Builds the UNet from DIR/config.json and loads its weights strictly.
UNet2DConditionModel load_unet(const std::string& dir, const ModelLoadOptions& options);

// Builds the UNet from CONFIG_DIR/config.json (or CONFIG_DIR/unet/config.json) and loads its
// weights from one safetensors FILE instead of the directory's own (`generate --unet`): a
// diffusers UNet, an original-layout UNet or the UNet part of a single-file checkpoint.
UNet2DConditionModel load_unet_file(const std::string& config_dir, const std::string& file,
                                    const ModelLoadOptions& options);

// Builds a UNet without initialising its parameters, ready for load_weights.
UNet2DConditionModel make_unet_uninitialised(const UNetConfig& config);

// Writes a diffusers-layout UNet directory (config.json + diffusion_pytorch_model.safetensors).
void save_unet(const UNet2DConditionModel& unet, const std::string& dir,
               c10::optional<torch::ScalarType> dtype = c10::nullopt);

// Builds a CLIP text encoder from DIR/config.json (or DIR/text_encoder/config.json) and loads
// DIR/model[.<variant>].safetensors strictly (transformers' file names). Projection: as the
// config's `architectures` says (CLIPTextModelWithProjection or CLIPTextModel); a config
// without `architectures` gets one exactly when the weights hold text_projection.weight. A
// `text_model.embeddings.position_ids` buffer (older files) is accepted and ignored.
CLIPTextModel load_clip_text(const std::string& dir, const ModelLoadOptions& options);

// Writes a transformers-layout text encoder directory (config.json + model.safetensors).
void save_clip_text(const CLIPTextModel& model, const std::string& dir,
                    c10::optional<torch::ScalarType> dtype = c10::nullopt);
// Builds a CLIP text encoder without initialising its parameters, ready for load_weights.
CLIPTextModel make_clip_text_uninitialised(const CLIPTextConfig& config);

// Builds an AutoencoderKL from DIR/config.json (or DIR/vae/config.json) and loads
// DIR/diffusion_pytorch_model[.<variant>].safetensors strictly.
AutoencoderKL load_vae(const std::string& dir, const ModelLoadOptions& options);
// A diffusers ControlNetModel directory (config.json + diffusion_pytorch_model[.variant]
// .safetensors), or a pipeline root with a controlnet/ folder.
ControlNetModel load_controlnet(const std::string& dir, const ModelLoadOptions& options);
AutoencoderKL make_vae_uninitialised(const VAEConfig& config);
void save_vae(const AutoencoderKL& vae, const std::string& dir,
              c10::optional<torch::ScalarType> dtype = c10::nullopt);

}  // namespace lightning::models
