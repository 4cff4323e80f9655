// The distillation recipe (`lightning distill --recipe FILE.toml`): a teacher model, data, and a
// chain of stages, each distilling its teacher's K steps into K / n student steps (METHOD.md §2).
//
//   task = "distill"
//   [teacher]  model = "fmnist-teacher"        (a model directory or a shipped model's name)
//   [data]     dataset = "fashion-mnist", dir = ...
//   [train]    seed, batch_size, max_grad_norm, gradient_checkpointing, shard_optimizer,
//              mixed_precision, frozen_weights_dtype
//   [log]      log_every, sample_every, checkpoint_every
//   [sample]   per_class, seed                 (grids of every class as training goes)
//   [[stages]] one table per stage, in order; the student of a stage is the next one's teacher.
//
// A stage's phases, in order (each a number of iterations of one objective):
//   x0_warmup      MSE of the student's x0 output against the frozen epsilon teacher's one-step
//                  x0 (the 1-step switch to "sample" prediction, METHOD.md §4)
//   mse            MSE between the student's one-step x_t' and the teacher's n-step x_t'
//   conditional_d_warmup
//                  (discriminator_warmup_iterations) the discriminator alone against the frozen
//                  student, so that the student's first updates see a discriminator that separates
//                  real from fake; not in the paper, off by default
//   conditional    adversarial, conditional discriminator D(x_t', x_t)
//   unconditional_d_warmup
//                  the same for the unconditional head, which starts fresh
//   unconditional  adversarial, unconditional discriminator D'(x_t')
//   full           (LoRA stages) the LoRA is merged, then the full UNet trains further with the
//                  unconditional objective, as the paper does
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/ScalarType.h>
#include <nlohmann/json.hpp>

#include "data/stream.h"
#include "diffusion/scheduler_config.h"
#include "models/discriminator.h"
#include "models/lora.h"

namespace lightning::distill {

enum class Objective { kX0Warmup, kMse, kConditional, kUnconditional };
std::string to_string(Objective objective);

struct Phase {
  std::string name;  // x0_warmup, mse, conditional, unconditional, full
  Objective objective;
  int64_t iterations = 0;
  bool lora = false;            // trains the LoRA adapters (else the full UNet)
  bool train_generator = true;  // false: a discriminator warm-up (the student is frozen)
  bool adversarial() const {
    return objective == Objective::kConditional || objective == Objective::kUnconditional;
  }
};

struct StageRecipe {
  std::string name;  // default "<teacher_steps>-to-<student_steps>"
  int64_t teacher_steps = 0, student_steps = 0;
  std::string loss = "mse";       // mse | adversarial
  double teacher_guidance = 1.0;  // the teacher's CFG scale in this stage (<= 1: none)
  diffusion::PredictionType prediction_type = diffusion::PredictionType::kEpsilon;  // student's
  // The student's training timesteps (x_t is drawn at these): default its trailing grid.
  std::vector<int64_t> timesteps;

  // Iterations per phase (see the file comment).
  int64_t x0_warmup_iterations = 0;
  int64_t mse_iterations = 0;
  int64_t conditional_iterations = 0;
  int64_t unconditional_iterations = 0;
  int64_t full_iterations = 0;
  int64_t discriminator_warmup_iterations = 0;  // before each of the two adversarial phases

  // Student optimiser (Adam, no weight decay; the paper's betas are (0.9, 0.999) for MSE and
  // (0, 0.99) for adversarial stages).
  double learning_rate = 1e-5;
  double full_learning_rate = 0;       // the full phase of a LoRA stage; 0: learning_rate
  double x0_warmup_learning_rate = 0;  // the x0_warmup phase; 0: learning_rate
  double adam_beta1 = 0.9, adam_beta2 = 0.999;
  // An exponential moving average of the student's trained parameters (not in the paper; 0: off),
  // started from the parameters at each phase's start (no warm-up: phases are short) and copied
  // into the student at its end, so that a LoRA is merged and a stage's student saved from the
  // averages.
  double ema_decay = 0;
  // Discriminator optimiser.
  double discriminator_learning_rate = 1e-6;
  double discriminator_beta1 = 0.0, discriminator_beta2 = 0.99;
  int64_t discriminator_steps = 1;  // discriminator updates per iteration (on the same batch)
  models::DiscriminatorHeadConfig head;

  // LoRA (absent: train the full UNet; given: >= 1).
  int64_t lora_rank = 0;
  double lora_alpha = 0;  // 0: = rank

  // Multi-timestep discrimination (the 1-step x0 student): both x0s re-noised to t* drawn from
  // `renoise_timesteps` with `renoise_weights`, switching to `renoise_weights_late` after
  // `renoise_switch` of the adversarial iterations (a fraction in [0, 1]). Empty: off.
  std::vector<int64_t> renoise_timesteps;
  std::vector<double> renoise_weights, renoise_weights_late;
  double renoise_switch = 0.5;

  int64_t n() const { return teacher_steps / student_steps; }
  std::vector<Phase> phases() const;
  // Whether a phase is adversarial (the stage then needs a discriminator).
  bool has_adversarial_phase() const;
  int64_t total_iterations() const;
};

struct DistillRecipe {
  std::string file;
  std::string teacher;  // model directory or shipped name, as written
  // [data]: dataset = "fashion-mnist" (in memory, from data_dir), "webdataset" (tar shards),
  // "image-folder" (images with caption files), streamed through `source` in aspect-ratio
  // buckets of about resolution^2 pixels (0: the model's sample size), or "cache" (data_dir made
  // by `lightning cache`: encoded inputs and captions, its own buckets).
  std::string dataset = "fashion-mnist";
  std::string data_dir;
  data::DataSource source;
  int64_t resolution = 0;
  double max_aspect = 1.0;  // 1: square crops only
  int64_t bucket_step = 0;  // the buckets' sides step (0: automatic, data::bucket_step)
  bool random_crop = true;
  // Streamed data: batches read ahead on a background thread (0: read in the training loop).
  int64_t prefetch = 2;
  uint64_t seed = 0;
  int64_t batch_size = 32;
  double max_grad_norm = 1.0;  // <= 0: no clipping
  // Recompute the UNet blocks' activations in the backward pass (student and discriminator):
  // less memory for about one more forward pass of compute (nn/checkpoint.h).
  bool gradient_checkpointing = false;
  // ZeRO stage 1: with several ranks, each keeps Adam's moments for its share of the parameters
  // only (1/N of the optimiser memory) and broadcasts its updated share after each step.
  bool shard_optimizer = false;
  // "bf16": the networks' forward passes in bf16 autocast (METHOD.md §4: the paper's bf16 mixed
  // precision), weights, gradients and Adam in float32; "no": float32 throughout.
  std::string mixed_precision = "no";
  // The dtype the frozen networks' weights are held in: the teacher UNet (and a LoRA student's
  // base, which shares it), the text encoders and the VAE. "f32" (default), "f16" or "bf16";
  // they still compute in float32 (or the bf16 autocast), each layer converting its weights as
  // it uses them, and everything trained stays float32. "f16" halves the frozen weights' memory
  // (the SDXL teacher's 10.3 GB), prefers a model's fp16 variant files, and gives exactly the
  // float32 numbers for f16 files (that variant, every stage's saved model).
  std::string frozen_weights_dtype = "f32";
  int64_t log_every = 10, sample_every = 200, checkpoint_every = 100;
  int64_t sample_per_class = 4;             // images per sample prompt
  std::vector<std::string> sample_prompts;  // [sample] prompts; empty: the ten class prompts
  uint64_t sample_seed = 0;
  std::vector<StageRecipe> stages;

  // Reads and checks everything; errors name the file, the stage and the key.
  static DistillRecipe from_json(const nlohmann::json& json, const std::string& file);
  static DistillRecipe load(const std::string& toml_path);
  int64_t total_iterations() const;
  // frozen_weights_dtype as a dtype (ModelLoadOptions::weights_dtype): unset for "f32".
  std::optional<c10::ScalarType> frozen_dtype() const;
};

}  // namespace lightning::distill
