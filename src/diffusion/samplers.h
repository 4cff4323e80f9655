// Samplers for generation: diffusers' EulerDiscreteScheduler and DDIMScheduler (eta = 0),
// made stateless: the caller passes the step index instead of diffusers' internal counter.
//
// A generation loop (StableDiffusionXLPipeline.__call__):
//   auto sampler = make_sampler(SamplerKind::kEuler, config, steps);
//   x = noise * sampler->init_noise_sigma();                      // [B, 4, h, w]
//   for (int64_t i = 0; i < sampler->num_steps(); ++i) {
//     out = unet(sampler->scale_model_input(x, i), sampler->timestep(i), ...);
//     x = sampler->step(out, i, x).prev_sample;
//   }
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

#include "diffusion/noise_schedule.h"
#include "diffusion/scheduler_config.h"

namespace lightning::diffusion {

// The samplers `lightning generate --sampler` offers.
enum class SamplerKind {
  kEuler,  // "euler": EulerDiscreteScheduler (SDXL-Lightning's recommended sampler)
  kDDIM,   // "ddim": DDIMScheduler with eta = 0
};

// "euler" / "ddim"; anything else is a UsageError naming the value.
SamplerKind parse_sampler_kind(const std::string& name);
std::string to_string(SamplerKind kind);
// The sampler a config's _class_name stands for (DDIMScheduler -> ddim, anything else -> euler).
SamplerKind default_sampler_kind(const SchedulerConfig& config);

// diffusers' SchedulerOutput: the next sample and the x0 it was derived from (for previews).
struct SamplerStep {
  torch::Tensor prev_sample;           // [B, C, H, W]
  torch::Tensor pred_original_sample;  // [B, C, H, W]
};

class Sampler {
 public:
  virtual ~Sampler() = default;
  // The number of model evaluations.
  int64_t num_steps() const { return static_cast<int64_t>(timestep_values().size()); }
  // The timestep to feed the model at step i (float: Euler's linspace grid is fractional).
  float timestep(int64_t i) const;
  virtual std::vector<float> timestep_values() const = 0;
  // The std of the initial latent: latents = randn * init_noise_sigma().
  virtual float init_noise_sigma() const = 0;
  // The model input at step i (scheduler.scale_model_input).
  virtual torch::Tensor scale_model_input(const torch::Tensor& sample, int64_t i) const = 0;
  // One update from step i to step i + 1 (scheduler.step).
  virtual SamplerStep step(const torch::Tensor& model_output, int64_t i,
                           const torch::Tensor& sample) const = 0;

 protected:
  void check_index(int64_t i) const;
};

// EulerDiscreteScheduler, diffusers 0.27.2, default path (s_churn = 0, interpolation "linear",
// no Karras sigmas): Karras et al. 2022 Algorithm 2 without churn, i.e. one Euler step of the
// probability-flow ODE dx/dsigma = (x - x0) / sigma per timestep.
class EulerSampler : public Sampler {
 public:
  EulerSampler(const SchedulerConfig& config, int64_t num_steps);

  std::vector<float> timestep_values() const override { return timesteps_; }
  const std::vector<float>& sigmas() const { return sigmas_; }  // [N + 1], ends with 0
  float init_noise_sigma() const override { return init_noise_sigma_; }
  // x / sqrt(sigma_i^2 + 1): the VP-scaled input the UNet was trained on.
  torch::Tensor scale_model_input(const torch::Tensor& sample, int64_t i) const override;
  // x0 as EulerDiscreteScheduler.step derives it, then x + (x - x0) / sigma_i * (sigma_{i+1} -
  // sigma_i). The last step (sigma_{N} = 0) returns x0 exactly up to rounding.
  SamplerStep step(const torch::Tensor& model_output, int64_t i,
                   const torch::Tensor& sample) const override;

 private:
  PredictionType prediction_type_;
  std::vector<float> timesteps_;  // [N]
  std::vector<float> sigmas_;     // [N + 1]
  float init_noise_sigma_;
};

// DDIMScheduler, diffusers 0.27.2, eta = 0 (deterministic), no thresholding.
class DDIMSampler : public Sampler {
 public:
  DDIMSampler(const SchedulerConfig& config, int64_t num_steps);

  std::vector<float> timestep_values() const override;
  const std::vector<int64_t>& timesteps() const { return timesteps_; }  // [N] int64
  const NoiseSchedule& schedule() const { return schedule_; }
  float init_noise_sigma() const override { return 1.0f; }  // DDIM works in the VP form
  torch::Tensor scale_model_input(const torch::Tensor& sample, int64_t i) const override {
    return sample;
  }
  // Steps from t_i to t_i - T // N, as DDIMScheduler.step does for every spacing (so a
  // trailing grid whose ratio is not an integer does not land exactly on t_{i+1});
  // t < 0 uses final_alpha_cumprod.
  SamplerStep step(const torch::Tensor& model_output, int64_t i,
                   const torch::Tensor& sample) const override;

 private:
  NoiseSchedule schedule_;
  PredictionType prediction_type_;
  double clip_sample_range_;  // 0 when clip_sample is off
  int64_t step_ratio_;        // T // N
  std::vector<int64_t> timesteps_;
};

std::unique_ptr<Sampler> make_sampler(SamplerKind kind, const SchedulerConfig& config,
                                      int64_t num_steps);

}  // namespace lightning::diffusion
