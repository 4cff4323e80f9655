// Text-to-image generation with a diffusers-style model directory: pixel-space models (the
// shipped models/fmnist-*), Stable Diffusion 1.x-style latent models (a VAE and one text
// encoder) and SDXL (a VAE and two text encoders).
//
// Directory layout (diffusers; the shipped models/fmnist-* use it too):
//   model_index.json                 component names -> [library, class], as diffusers writes it
//   unet/config.json, unet/diffusion_pytorch_model[.fp16].safetensors
//   text_encoder/config.json, text_encoder/model[.fp16].safetensors
//   tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
//   text_encoder_2/, tokenizer_2/    SDXL only (CLIPTextModelWithProjection, pads with "!")
//   vae/config.json, vae/diffusion_pytorch_model[.fp16].safetensors   latent models only
//   scheduler/scheduler_config.json
//   lightning.json                   recommended steps / guidance / sampler (optional)
// Conditioning: with one text encoder the UNet cross-attends to its last hidden state (SD 1.x);
// with two (SDXL) to both penultimate hidden states concatenated, with the second encoder's
// projected pooled output and the six size/crop time ids as added embeddings.
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
#include "models/controlnet.h"
#include "models/model_loader.h"
#include "models/unet.h"
#include "models/vae.h"
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
  // SDXL's second text encoder (with projection) and its tokenizer; null otherwise.
  models::CLIPTextModel text_encoder_2{nullptr};
  std::shared_ptr<const text::CLIPTokenizer> tokenizer_2;
  int64_t pad_id_2 = -1;
  models::AutoencoderKL vae{nullptr};  // latent-space models; null for pixel-space ones
  // SDXL (model_index.json): with no negative prompt, the unconditional embeddings are zeros.
  bool force_zeros_for_empty_prompt = false;
  diffusion::SchedulerConfig scheduler;
  Recommended recommended;
  std::string name;                // directory name, for metadata
  std::vector<std::string> loras;  // applied LoRA files as "file-name:scale", for metadata
  std::string unet_file;           // a --unet replacement, for metadata
  // A ControlNet applied to the UNet when a request has a control image (attach_controlnet).
  models::ControlNetModel controlnet{nullptr};
  std::string controlnet_name;  // for metadata

  bool is_sdxl() const { return !text_encoder_2.is_empty(); }
  bool is_latent() const { return !vae.is_empty(); }
  int64_t vae_scale() const { return is_latent() ? vae->config.downscale() : 1; }
  int64_t sample_size() const;    // default image height and width in pixels
  int64_t size_multiple() const;  // height and width must be multiples of this
  int64_t image_channels() const;
  int64_t latent_channels() const { return unet->config.in_channels; }
};

// What to load instead of the directory's own components.
struct ModelOverrides {
  // A UNet weights file in diffusers layout or an original (single-file) layout, e.g.
  // sdxl_lightning_4step_unet.safetensors; the directory's unet/config.json gives the shape.
  std::string unet_file;
};

// DIR if it is a directory, else a shipped model's name looked up in `models_root`
// (models/<name>). Throws UsageError naming the value and the known names otherwise.
std::string resolve_model_dir(const std::string& dir_or_name, const std::string& models_root);
// Names of the models under `models_root` (directories with a model_index.json).
std::vector<std::string> shipped_model_names(const std::string& models_root);

// Loads every component of `dir` (see the layout above); errors name the missing file or
// component. A VAE is loaded in f32 when `options.dtype` is f16 and its config says
// force_upcast (SDXL's VAE overflows in f16).
TextToImageModel load_model(const std::string& dir, const models::ModelLoadOptions& options,
                            const ModelOverrides& overrides = {});
// Writes the model directory atomically: into a temporary sibling, then renamed over `dir`
// (an existing directory is replaced only once the new one is complete, and only if it is a model
// directory: one that holds model_index.json, or is empty).
void save_model(const TextToImageModel& model, const std::string& dir,
                c10::optional<torch::ScalarType> weights_dtype = c10::nullopt);

// A single-file checkpoint (`generate --model FILE.safetensors`): the UNet, VAE and text
// encoders from their original-layout keys (models/checkpoint_formats.h). Configs, tokenizers
// and scheduler come from `config_dir` (a diffusers pipeline directory of the same
// architecture, e.g. for a fine-tune with other shapes) or, when it is empty, are the built-in
// SDXL base 1.0 / SD 1.5 ones with the CLIP vocabulary at `vocab_path`.
struct SingleFileOptions {
  std::string config_dir;
  std::string vocab_path;
};
TextToImageModel load_single_file(const std::string& file, const models::ModelLoadOptions& options,
                                  const SingleFileOptions& single_file);

// What a single file without --config gets: CLIP tokenizers from the vocabulary at
// `vocab_path` (the second, for SDXL, padding with "!") and the scheduler of
// stable-diffusion-xl-base-1.0 / stable-diffusion-v1-5 (the same scaled_linear schedule; SD 1.5's
// is a PNDM config, for which Euler is the usual choice).
void use_builtin_tokenizers_and_scheduler(TextToImageModel& model, const std::string& vocab_path,
                                          bool sdxl);

// Attaches a ControlNet to the model. Throws Error naming `name` when its residuals or its
// conditioning do not fit the UNet (another architecture), or the model is not a latent one.
void attach_controlnet(TextToImageModel& model, models::ControlNetModel controlnet,
                       const std::string& name);

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
// The UNet's text conditioning for a batch of prompts.
struct PromptEmbeds {
  torch::Tensor context;  // encoder_hidden_states [B, T, cross_attention_dim]
  torch::Tensor pooled;   // SDXL: text_embeds [B, projection_dim]; undefined otherwise
};
PromptEmbeds encode_conditioning(const TextToImageModel& model,
                                 const std::vector<std::string>& prompts,
                                 bool warn_truncation = true);
// The unconditional branch of classifier-free guidance: the negative prompt's embeddings, or
// zeros for an SDXL model when the negative prompt is empty and force_zeros_for_empty_prompt.
PromptEmbeds encode_negative(const TextToImageModel& model, const std::string& negative_prompt);
// encode_conditioning(...).context.
torch::Tensor encode_prompts(const TextToImageModel& model, const std::vector<std::string>& prompts,
                             bool warn_truncation = true);

// Latents (the UNet's space) -> pixels [B, C, H, W] in float32, nominally in [-1, 1]: undoes the
// VAE's scaling and decodes, tile by tile when `tiling` is given. A non-finite f16 decode is
// retried in f32 with a warning (SDXL's VAE overflows in f16).
torch::Tensor decode_latents(const TextToImageModel& model, const torch::Tensor& latents,
                             const std::optional<models::VAETiling>& tiling = std::nullopt);

struct GenerateRequest {
  std::vector<std::string> prompts;  // one per image
  std::string negative_prompt;       // the unconditional branch of CFG ("" = unconditional)
  int64_t steps = 0;                 // 0: the model's recommendation
  std::optional<double> guidance_scale;
  std::optional<diffusion::SamplerKind> sampler;
  std::optional<diffusion::TimestepSpacing> timestep_spacing;  // override of the scheduler's
  std::optional<diffusion::PredictionType> prediction_type;    // override of the scheduler's
  uint64_t seed = 0;                            // image i starts from the noise of seed + i
  int64_t height = 0, width = 0;                // 0: the model's sample_size
  int64_t max_batch = 64;                       // images per UNet call (CFG doubles it)
  std::optional<models::VAETiling> vae_tiling;  // latent models: decode tile by tile
  // ControlNet conditioning (the model needs attach_controlnet): an image [C, H, W] in [0, 1]
  // (RGB, as diffusers' control image processor gives it), resized to the output size when it
  // differs (bilinear; diffusers resizes with Lanczos), and the residuals' scale.
  torch::Tensor control_image;
  double control_scale = 1.0;
};

// The request with every default filled in from the model, checked: steps >= 1 and <= the
// schedule's length, guidance >= 0 and finite, height/width positive multiples of
// size_multiple() (default: the control image's size, else the model's). Throws UsageError
// naming the flag.
GenerateRequest resolve_request(const TextToImageModel& model, GenerateRequest request);
// `--preset lightning-1step|2step|4step|8step`: SDXL-Lightning's sampling settings (Euler,
// trailing spacing, N steps, no CFG; sample (x0) prediction for the 1-step UNet), filled into the
// fields the request leaves unset. Throws UsageError naming an unknown preset.
void apply_preset(const std::string& preset, GenerateRequest& request);
extern const std::vector<std::string> kPresetNames;
// Warnings for settings that do not fit the checkpoints' names: "Nstep" in the model, --unet or
// LoRA file name but another step count; "x0" but not sample prediction.
std::vector<std::string> checkpoint_name_warnings(const TextToImageModel& model,
                                                  const std::vector<std::string>& file_names,
                                                  const GenerateRequest& resolved);

// The scheduler config actually used (overrides applied).
diffusion::SchedulerConfig effective_scheduler(const TextToImageModel& model,
                                               const GenerateRequest& resolved);

// The initial noise of one image: randn [C, H, W] from a CPU generator seeded with `seed`, so
// an image depends only on its own seed (not on the batch it was generated in).
torch::Tensor initial_noise(uint64_t seed, int64_t channels, int64_t height, int64_t width);

// Generates one image per prompt: [B, C, H, W] float32 pixels, nominally in [-1, 1].
// `on_step(done, total)` is called after each model evaluation batch. With `latents_out` the
// final latents (before VAE decoding) are stored there too.
torch::Tensor generate(const TextToImageModel& model, const GenerateRequest& request,
                       const std::function<void(int64_t, int64_t)>& on_step = {},
                       torch::Tensor* latents_out = nullptr);

// A1111-style "parameters" text of image i (prompt, negative prompt, then "Steps: .., Sampler:
// .., CFG scale: .., Seed: .., Size: WxH, Model: .., ..."), enough to reproduce it.
std::string parameters_text(const TextToImageModel& model, const GenerateRequest& resolved,
                            size_t index);

}  // namespace lightning::generate
