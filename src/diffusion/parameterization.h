// Parameterisations of the diffusion model's output and the forward process, in the
// variance-preserving DDPM form x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (ab = alpha_bar_t).
//
// Every function takes alpha_bar per sample: a [B] float tensor broadcast over [B, ...]
// (or a 0-dim tensor for one timestep), so the distillation trainer can mix timesteps in a
// batch. Coefficients are computed in float32 as diffusers' DDIMScheduler does.
#pragma once

#include <torch/types.h>

#include "diffusion/noise_schedule.h"
#include "diffusion/scheduler_config.h"

namespace lightning::diffusion {

// The model output converted to both quantities of the forward process.
struct Denoised {
  torch::Tensor x0;   // predicted clean sample, [B, C, H, W]
  torch::Tensor eps;  // predicted noise, [B, C, H, W]
};

// Forward process (DDPM eq. 4; DDIMScheduler.add_noise): sqrt(ab) x0 + sqrt(1 - ab) eps.
// x0, eps: [B, ...]; alpha_bar: [B] or 0-dim.
torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& eps,
                        const torch::Tensor& alpha_bar);
// The same at per-sample integer timesteps t: [B] int64 (DDIMScheduler.add_noise).
torch::Tensor add_noise(const NoiseSchedule& schedule, const torch::Tensor& x0,
                        const torch::Tensor& eps, const torch::Tensor& t);

// Velocity target (Salimans & Ho 2022 §4; DDIMScheduler.get_velocity):
// v = sqrt(ab) eps - sqrt(1 - ab) x0.
torch::Tensor velocity(const torch::Tensor& x0, const torch::Tensor& eps,
                       const torch::Tensor& alpha_bar);

// Model output -> (x0, eps) at x_t = `sample` (DDIMScheduler.step, "3. compute predicted
// original sample", DDIM eq. 12):
//   epsilon:      eps = out,                      x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)
//   sample:       x0 = out,                       eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
//   v_prediction: x0 = sqrt(ab) x_t - sqrt(1 - ab) v,  eps = sqrt(ab) v + sqrt(1 - ab) x_t
// "sample" needs ab < 1 (true for every t >= 0 of a DDPM schedule).
Denoised split_model_output(PredictionType type, const torch::Tensor& model_output,
                            const torch::Tensor& sample, const torch::Tensor& alpha_bar);

// The inverse: what a model of `type` should output for (x0, eps) — the training target.
torch::Tensor model_target(PredictionType type, const torch::Tensor& x0, const torch::Tensor& eps,
                           const torch::Tensor& alpha_bar);

// Deterministic DDIM update (Song et al. 2021 eq. 12 with eta = 0, sigma_t = 0) from t to an
// arbitrary earlier t_prev, per sample: x_{t'} = sqrt(ab_{t'}) x0 + sqrt(1 - ab_{t'}) eps, with
// (x0, eps) from split_model_output at t. t, t_prev: [B] int64 with -1 <= t_prev < t;
// t_prev = -1 uses schedule.final_alpha_cumprod(). Returns x_{t'} [B, ...] (and x0 via `denoised`
// when not null). With clip_sample_range > 0 the predicted x0 is clamped to +-range before the
// update (DDIMScheduler's clip_sample) and eps is kept, as diffusers does.
torch::Tensor ddim_step(const NoiseSchedule& schedule, PredictionType type,
                        const torch::Tensor& model_output, const torch::Tensor& sample,
                        const torch::Tensor& t, const torch::Tensor& t_prev,
                        Denoised* denoised = nullptr, double clip_sample_range = 0.0);

// The same from precomputed alpha_bar values ([B] or 0-dim each).
torch::Tensor ddim_step(PredictionType type, const torch::Tensor& model_output,
                        const torch::Tensor& sample, const torch::Tensor& alpha_bar,
                        const torch::Tensor& alpha_bar_prev, Denoised* denoised = nullptr,
                        double clip_sample_range = 0.0);

}  // namespace lightning::diffusion
