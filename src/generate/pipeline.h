// Text-to-image generation with a pixel-space model directory: CLIP tokenizer + text encoder,
// UNet2DConditionModel, a scheduler config and the model's recommended settings.
//
// Directory layout (diffusers-style; the shipped models/fmnist-* use it):
//   model_index.json                 component names -> [library, class], as diffusers writes it
//   unet/config.json, unet/diffusion_pytorch_model.safetensors
//   text_encoder/config.json, text_encoder/model.safetensors
//   tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
//   scheduler/scheduler_config.json
//   lightning.json                   recommended steps / guidance / sampler (optional)
// The UNet is conditioned SD-1.x style: cross-attention to the text encoder's last hidden state.
// Models with a VAE (latent space) are the SDXL pipeline's job and are refused here by name.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>
#include <nlohmann/json.hpp>

#include "diffusion/samplers.h"
#include "diffusion/scheduler_config.h"
#include "models/clip_text.h"
#include "models/model_loader.h"
#include "models/unet.h"
#include "text/clip_tokenizer.h"

namespace lightning::generate {

// The settings a model recommends (lightning.json); `lightning generate` uses them when the
// flags are not given.
struct Recommended {
  int64_t steps = 20;
  double guidance_scale = 1.0;  // <= 1: no classifier-free guidance
  diffusion::SamplerKind sampler = diffusion::SamplerKind::kEuler;
  static Recommended from_json(const nlohmann::json& json, const std::string& file);
  nlohmann::json to_json() const;
};

struct TextToImageModel {
  models::UNet2DConditionModel unet{nullptr};
  models::CLIPTextModel text_encoder{nullptr};
  std::shared_ptr<const text::CLIPTokenizer> tokenizer;
  int64_t pad_id = -1;  // the tokenizer's pad token (its end-of-text id unless configured)
  diffusion::SchedulerConfig scheduler;
  Recommended recommended;
  std::string name;                // directory name, for metadata
  std::vector<std::string> loras;  // applied LoRA files as "file-name:scale", for metadata

  int64_t sample_size() const;    // the UNet's sample_size (image height and width)
  int64_t size_multiple() const;  // height and width must be multiples of this
  int64_t image_channels() const { return unet->config.in_channels; }
};

// DIR if it is a directory, else a shipped model's name looked up in `models_root`
// (models/<name>). Throws UsageError naming the value and the known names otherwise.
std::string resolve_model_dir(const std::string& dir_or_name, const std::string& models_root);
// Names of the models under `models_root` (directories with a model_index.json).
std::vector<std::string> shipped_model_names(const std::string& models_root);

// Loads every component of `dir` (see the layout above); errors name the missing file.
TextToImageModel load_model(const std::string& dir, const models::ModelLoadOptions& options);
// Writes the model directory atomically: into a temporary sibling, then renamed over `dir`
// (an existing directory is replaced only once the new one is complete).
void save_model(const TextToImageModel& model, const std::string& dir,
                c10::optional<torch::ScalarType> weights_dtype = c10::nullopt);

// A LoRA to merge into a loaded model: `--lora FILE[:SCALE]`.
struct LoRASpec {
  std::string path;
  double scale = 1.0;
  // "FILE" or "FILE:SCALE" (the text after the last ':' when it is a number). Throws UsageError
  // naming the value when the file does not exist.
  static LoRASpec parse(const std::string& value);
};

// Merges each LoRA (kohya or diffusers/PEFT keys; see models/lora.h) into the model's UNet and
// text encoder weights, in order. kohya prefixes: lora_unet_ (UNet), lora_te_ / lora_te1_ (text
// encoder); PEFT prefixes: unet., text_encoder. or none (a bare UNet file). Unmatched keys are an
// error unless `allow_partial` (then a warning with their count).
void apply_loras(TextToImageModel& model, const std::vector<LoRASpec>& loras, bool allow_partial);

// Token ids [B, T] of the prompts (T = the text encoder's max_position_embeddings), truncated
// with a warning when a prompt is longer.
torch::Tensor tokenize_prompts(const TextToImageModel& model,
                               const std::vector<std::string>& prompts,
                               bool warn_truncation = true);
// The UNet's encoder_hidden_states for the prompts: [B, T, hidden].
torch::Tensor encode_prompts(const TextToImageModel& model, const std::vector<std::string>& prompts,
                             bool warn_truncation = true);

struct GenerateRequest {
  std::vector<std::string> prompts;  // one per image
  std::string negative_prompt;       // the unconditional branch of CFG ("" = unconditional)
  int64_t steps = 0;                 // 0: the model's recommendation
  std::optional<double> guidance_scale;
  std::optional<diffusion::SamplerKind> sampler;
  std::optional<diffusion::TimestepSpacing> timestep_spacing;  // override of the scheduler's
  std::optional<diffusion::PredictionType> prediction_type;    // override of the scheduler's
  uint64_t seed = 0;              // image i starts from the noise of seed + i
  int64_t height = 0, width = 0;  // 0: the model's sample_size
  int64_t max_batch = 64;         // images per UNet call (CFG doubles it)
};

// The request with every default filled in from the model, checked: steps >= 1 and <= the
// schedule's length, guidance >= 0 and finite, height/width positive multiples of
// size_multiple(). Throws UsageError naming the flag.
GenerateRequest resolve_request(const TextToImageModel& model, GenerateRequest request);
// The scheduler config actually used (overrides applied).
diffusion::SchedulerConfig effective_scheduler(const TextToImageModel& model,
                                               const GenerateRequest& resolved);

// The initial noise of one image: randn [C, H, W] from a CPU generator seeded with `seed`, so
// an image depends only on its own seed (not on the batch it was generated in).
torch::Tensor initial_noise(uint64_t seed, int64_t channels, int64_t height, int64_t width);

// Generates one image per prompt: [B, C, H, W] float32 pixels, nominally in [-1, 1].
// `on_step(done, total)` is called after each model evaluation batch.
torch::Tensor generate(const TextToImageModel& model, const GenerateRequest& request,
                       const std::function<void(int64_t, int64_t)>& on_step = {});

// A1111-style "parameters" text of image i (prompt, negative prompt, then "Steps: .., Sampler:
// .., CFG scale: .., Seed: .., Size: WxH, Model: .., ..."), enough to reproduce it.
std::string parameters_text(const TextToImageModel& model, const GenerateRequest& resolved,
                            size_t index);

}  // namespace lightning::generate
