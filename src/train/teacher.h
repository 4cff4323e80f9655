// Teacher training (`lightning train`): a text-conditioned UNet2DConditionModel trained from
// scratch on Fashion-MNIST with a CLIP text encoder trained jointly (SD-1.x-style conditioning:
// cross-attention to the encoder's last hidden state), epsilon (or v / sample) prediction on a
// DDPM schedule, AdamW, EMA, gradient clipping, caption dropout for classifier-free guidance and
// optional min-SNR loss weighting (Hang et al. 2023).
//
// A run directory holds: recipe.toml (a copy), metrics.jsonl (one JSON object per log
// interval), loss.png, samples/step_NNNNNN.png (a class x seed grid from the EMA weights),
// checkpoint/ (everything needed to resume, replaced atomically) and, at the end, model/ (a
// diffusers-style model directory with the EMA weights, loadable by `lightning generate`).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "diffusion/samplers.h"
#include "diffusion/scheduler_config.h"
#include "generate/pipeline.h"
#include "models/clip_text.h"
#include "models/unet_config.h"

namespace lightning::train {

struct TeacherRecipe {
  std::string file;  // where it was read from (messages, the run's copy)
  std::string name;  // [model] name: the saved model's name
  std::string data_dir;

  models::UNetConfig unet;               // [unet]: diffusers UNet2DConditionModel config keys
  models::CLIPTextConfig text;           // [text_encoder]: transformers CLIPTextConfig keys
  diffusion::SchedulerConfig scheduler;  // [scheduler]: diffusers scheduler config keys
  generate::Recommended recommended;     // [recommended]: stored with the model

  // [train]
  uint64_t seed = 0;
  int64_t steps = 1000;
  int64_t batch_size = 64;
  double learning_rate = 1e-3;
  int64_t lr_warmup_steps = 0;
  std::string lr_schedule = "constant";  // constant | cosine (to 0 at `steps`)
  double weight_decay = 0.01;
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;          // <= 0: no clipping
  double ema_decay = 0.999;            // 0: no EMA (the model is saved as trained)
  double caption_dropout = 0.1;        // probability of training on the empty caption
  double snr_gamma = 0;                // > 0: min-SNR-gamma loss weighting
  bool hflip = false;                  // random horizontal flips
  std::string save_dtype = "float32";  // float32 | float16 | bfloat16 (weights of model/)

  // [log]
  int64_t log_every = 25, sample_every = 500, checkpoint_every = 500;
  // [sample]: the grid written every sample_every steps
  int64_t sample_steps = 20, sample_per_class = 8;
  double sample_guidance = 4.0;
  diffusion::SamplerKind sample_sampler = diffusion::SamplerKind::kEuler;
  uint64_t sample_seed = 0;

  static TeacherRecipe from_json(const nlohmann::json& json, const std::string& file);
  static TeacherRecipe load(const std::string& toml_path);
};

struct TrainOptions {
  std::string out_dir;
  std::string vocab;             // the CLIP merges file the tokenizer is restricted from
  bool resume = false;           // continue from out_dir/checkpoint
  std::optional<int64_t> steps;  // overrides the recipe's total steps
  // Stops after this step with a checkpoint (the schedule still runs to the total): training in
  // sessions. The model directory is written only when the total is reached.
  std::optional<int64_t> until;
};

// Runs (or resumes) the recipe. Returns the path of the saved model directory (empty when
// stopped early by `until`).
std::string train_teacher(const TeacherRecipe& recipe, const TrainOptions& options);

}  // namespace lightning::train
