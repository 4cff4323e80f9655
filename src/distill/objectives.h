// The pieces of one progressive-distillation training example (METHOD.md §2-§4), free of any
// training loop so that each can be tested on its own:
//   x_t from real data at the student's timesteps (pure noise at t = T - 1),
//   the teacher's target: n deterministic DDIM steps on its own grid (with CFG when asked),
//   the student's one-step DDIM jump to the same t',
//   re-noising of x0 for the 1-step student's multi-timestep discrimination,
//   the non-saturating GAN losses on logits.
//
// Timesteps follow diffusers' indices: the T-step schedule's last index is T - 1 (999) and "-1"
// is the clean end of the chain (DDIM's final_alpha_cumprod).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include <torch/types.h>

#include "diffusion/noise_schedule.h"
#include "diffusion/scheduler_config.h"

namespace lightning::distill {

// A denoiser: the model output for x at per-sample timesteps t [B] (conditioning bound inside).
using Denoiser = std::function<torch::Tensor(const torch::Tensor& x, const torch::Tensor& t)>;

// The timesteps a teacher with `teacher_steps` trailing steps visits from t in `n` steps, ending
// with -1 (the clean end) once the chain is finished. Returns n + 1 values starting with t. From
// a t on the teacher's trailing grid these are the grid's next entries (the grid is rounded per
// entry, so steps need not be equal: 32 steps over 1000); from a t off the grid (the 1- and
// 2-step students train on the 4-step grid) steps of T / teacher_steps, rounded half to even.
std::vector<int64_t> teacher_path(int64_t t, int64_t n, int64_t teacher_steps,
                                  int64_t num_train_timesteps);

// The student's input: sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, except pure noise (eps) where
// t == T - 1 ("fix the schedule": train on what inference feeds). t: [B] int64.
torch::Tensor student_input(const diffusion::NoiseSchedule& schedule, const torch::Tensor& x0,
                            const torch::Tensor& eps, const torch::Tensor& t);

// The teacher's target x_t' (METHOD.md §2 step 3): from x_t at per-sample t [B], n deterministic
// DDIM steps (eta = 0) along teacher_path. `t_prev` (when not null) receives t' [B].
// Runs under NoGradGuard.
torch::Tensor teacher_target(const Denoiser& teacher, diffusion::PredictionType teacher_type,
                             const diffusion::NoiseSchedule& schedule, const torch::Tensor& x_t,
                             const torch::Tensor& t, int64_t n, int64_t teacher_steps,
                             torch::Tensor* t_prev = nullptr);

// The UNet's conditioning of a batch: the text context [B, L, D]; for SDXL also the pooled text
// embeddings [B, P] and the size/crop time ids [B, 6] (undefined otherwise). A batch of one row
// stands for every sample.
struct Conditioning {
  torch::Tensor context, pooled, time_ids;
  int64_t batch() const { return context.size(0); }
  Conditioning expand_to(int64_t batch) const;  // one row broadcast to `batch` rows
  static Conditioning cat(const Conditioning& a, const Conditioning& b);
};

// A denoiser with classifier-free guidance: uncond + scale (cond - uncond), both halves in one
// batch of 2B. scale <= 1 runs the conditional model only (diffusers' rule). `forward` receives (x,
// t, conditioning).
using ConditionedModel = std::function<torch::Tensor(const torch::Tensor& x, const torch::Tensor& t,
                                                     const Conditioning& conditioning)>;
Denoiser guided(ConditionedModel model, Conditioning cond, Conditioning uncond, double scale);

// The student's one-step DDIM jump from x_t at t to t' (both [B]): the output becomes (x0, eps)
// by its prediction type, then x_t' = sqrt(ab_t') x0 + sqrt(1 - ab_t') eps. `x0` (when not null)
// receives the predicted clean sample.
torch::Tensor student_jump(diffusion::PredictionType student_type,
                           const diffusion::NoiseSchedule& schedule, const torch::Tensor& output,
                           const torch::Tensor& x_t, const torch::Tensor& t,
                           const torch::Tensor& t_prev, torch::Tensor* x0 = nullptr);

// Non-saturating GAN losses on logits (sigmoid folded in, numerically stable):
//   discriminator: -log D(real) - log(1 - D(fake)) = softplus(-real) + softplus(fake)
//   generator:     -log D(fake)                    = softplus(-fake)
// Means over the batch.
torch::Tensor discriminator_loss(const torch::Tensor& real_logits,
                                 const torch::Tensor& fake_logits);
torch::Tensor generator_loss(const torch::Tensor& fake_logits);

// Draws the re-noising timesteps t* of the 1-step student (METHOD.md §4) from `choices` with
// relative `weights` (e.g. {10, 250, 500, 750} with 1:1:1:1, later 5:1:1:1). Returns [B] int64.
torch::Tensor sample_timesteps(const std::vector<int64_t>& choices,
                               const std::vector<double>& weights, int64_t batch,
                               at::Generator generator);

}  // namespace lightning::distill
