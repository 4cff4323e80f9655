// The discrete DDPM noise schedule and the timestep grids of diffusers' schedulers.
//
// Precision mirrors diffusers 0.27.2 exactly, because the numbers feed every sampler and the
// fixtures compare them bit-for-bit-ish: betas and alphas_cumprod are float32 torch ops
// (torch.linspace, torch.cumprod), sigmas are float32 torch ops on alphas_cumprod, timestep
// grids are numpy float64 arithmetic with round-half-to-even (np.round).
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

#include "diffusion/scheduler_config.h"

namespace lightning::diffusion {

// betas, alpha_bar = cumprod(1 - beta) and the k-diffusion sigmas over the T training timesteps
// (DDPM, Ho et al. 2020; diffusers' SchedulerMixin __init__). All tensors live on the CPU.
class NoiseSchedule {
 public:
  explicit NoiseSchedule(const SchedulerConfig& config);

  int64_t num_train_timesteps() const { return betas_.size(0); }
  const torch::Tensor& betas() const { return betas_; }                    // [T] float32
  const torch::Tensor& alphas_cumprod() const { return alphas_cumprod_; }  // [T] float32
  // sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), ascending in t (EulerDiscreteScheduler's
  // before its flip). [T] float32.
  const torch::Tensor& sigmas() const { return sigmas_; }
  // DDIMScheduler.final_alpha_cumprod: alpha_bar "at t = -1", 1.0 with set_alpha_to_one,
  // else alpha_bar_0.
  float final_alpha_cumprod() const { return final_alpha_cumprod_; }

  // alpha_bar_t for t in [-1, T-1]; t = -1 gives final_alpha_cumprod(). Error outside.
  float alpha_bar(int64_t t) const;
  // Per-sample alpha_bar: t [B] int64 (any device; -1 allowed) -> [B] float32 on t's device.
  torch::Tensor alpha_bar(const torch::Tensor& t) const;

 private:
  torch::Tensor betas_;
  torch::Tensor alphas_cumprod_;
  torch::Tensor sigmas_;
  float final_alpha_cumprod_ = 1.0f;
};

// EulerDiscreteScheduler.set_timesteps' timesteps, descending, float32 as diffusers keeps them:
// leading: round(i * (T // N)) + steps_offset; trailing: round(arange(T, 0, -T/N)) - 1;
// linspace: linspace(0, T-1, N) (fractional, and [0] for N = 1 as numpy gives).
std::vector<float> euler_timesteps(const SchedulerConfig& config, int64_t num_steps);

// DDIMScheduler.set_timesteps' timesteps, descending int64: as euler_timesteps but linspace is
// rounded half-to-even. num_steps must be in [1, T].
std::vector<int64_t> ddim_timesteps(const SchedulerConfig& config, int64_t num_steps);

// The trailing grid of the distillation stages (METHOD.md §1): N steps over T, e.g.
// trailing_timesteps(1000, 4) = [999, 749, 499, 249] and (1000, 1) = [999].
std::vector<int64_t> trailing_timesteps(int64_t num_train_timesteps, int64_t num_steps);

// EulerDiscreteScheduler's sigma at (possibly fractional) timesteps: numpy.interp over the
// integer grid of schedule.sigmas() in float64, cast to float32, with 0 appended: [N + 1].
std::vector<float> euler_sigmas(const NoiseSchedule& schedule, const std::vector<float>& timesteps);

// EulerDiscreteScheduler.init_noise_sigma: the std of the initial latent. For linspace and
// trailing spacing it is max(sigmas); for leading sqrt(max(sigmas)^2 + 1) (float32 ops).
float euler_init_noise_sigma(TimestepSpacing spacing, const std::vector<float>& sigmas);

}  // namespace lightning::diffusion
