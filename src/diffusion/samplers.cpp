#include "diffusion/samplers.h"

#include <torch/torch.h>

#include "core/error.h"
#include "diffusion/parameterization.h"

namespace lightning::diffusion {
namespace {

// A float32 0-dim CPU tensor: diffusers keeps sigma and alpha_bar as such, so scalar
// arithmetic on them (sigma**2 + 1, its sqrt) rounds in float32 exactly as it does there.
torch::Tensor scalar(float v) {
  return torch::tensor(v, torch::kFloat32);
}

}  // namespace

SamplerKind parse_sampler_kind(const std::string& name) {
  if (name == "euler") return SamplerKind::kEuler;
  if (name == "ddim") return SamplerKind::kDDIM;
  fail_usage("unknown sampler '{}' (supported: euler, ddim)", name);
}

std::string to_string(SamplerKind kind) {
  return kind == SamplerKind::kEuler ? "euler" : "ddim";
}

SamplerKind default_sampler_kind(const SchedulerConfig& config) {
  return config.class_name == "DDIMScheduler" ? SamplerKind::kDDIM : SamplerKind::kEuler;
}

float Sampler::timestep(int64_t i) const {
  check_index(i);
  return timestep_values()[i];
}

void Sampler::check_index(int64_t i) const {
  if (i < 0 || i >= num_steps()) fail("step index {} is outside [0, {})", i, num_steps());
}

EulerSampler::EulerSampler(const SchedulerConfig& config, int64_t num_steps)
    : prediction_type_(config.prediction_type),
      timesteps_(euler_timesteps(config, num_steps)),
      sigmas_(euler_sigmas(NoiseSchedule(config), timesteps_)),
      init_noise_sigma_(euler_init_noise_sigma(config.timestep_spacing, sigmas_)) {}

torch::Tensor EulerSampler::scale_model_input(const torch::Tensor& sample, int64_t i) const {
  check_index(i);
  const auto sigma = scalar(sigmas_[i]);
  return sample / (sigma.pow(2) + 1).pow(0.5);
}

SamplerStep EulerSampler::step(const torch::Tensor& model_output, int64_t i,
                               const torch::Tensor& sample_in) const {
  check_index(i);
  // EulerDiscreteScheduler.step upcasts to float32 and casts the result back.
  const auto sample = sample_in.to(torch::kFloat32);
  const auto sigma = scalar(sigmas_[i]);  // sigma_hat = sigma: s_churn = 0 gives gamma = 0
  torch::Tensor x0;
  switch (prediction_type_) {
    case PredictionType::kSample:
      x0 = model_output;
      break;
    case PredictionType::kEpsilon:
      x0 = sample - sigma * model_output;
      break;
    case PredictionType::kVPrediction:
      // denoised = model_output * c_out + input * c_skip (Karras et al. 2022, Table 1, VP).
      x0 = model_output * (-sigma / (sigma.pow(2) + 1).pow(0.5)) + (sample / (sigma.pow(2) + 1));
      break;
  }
  const auto derivative = (sample - x0) / sigma;  // dx/dsigma of the probability-flow ODE
  const auto dt = scalar(sigmas_[i + 1]) - sigma;
  auto prev = sample + derivative * dt;
  return {prev.to(model_output.scalar_type()), x0};
}

DDIMSampler::DDIMSampler(const SchedulerConfig& config, int64_t num_steps)
    : schedule_(config),
      prediction_type_(config.prediction_type),
      clip_sample_range_(config.clip_sample ? config.clip_sample_range : 0.0),
      step_ratio_(config.num_train_timesteps / num_steps),
      timesteps_(ddim_timesteps(config, num_steps)) {
  for (int64_t t : timesteps_) {
    // Leading spacing with a large steps_offset can leave the table; diffusers would fail
    // with an index error at the first step.
    if (t < 0 || t >= config.num_train_timesteps) {
      fail("DDIM timestep {} (spacing {}, steps_offset {}) is outside [0, {}]", t,
           to_string(config.timestep_spacing), config.steps_offset, config.num_train_timesteps - 1);
    }
  }
}

std::vector<float> DDIMSampler::timestep_values() const {
  return std::vector<float>(timesteps_.begin(), timesteps_.end());
}

SamplerStep DDIMSampler::step(const torch::Tensor& model_output, int64_t i,
                              const torch::Tensor& sample) const {
  check_index(i);
  const int64_t t = timesteps_[i];
  const int64_t t_prev = std::max<int64_t>(t - step_ratio_, -1);  // < 0: final_alpha_cumprod
  Denoised d;
  auto prev = ddim_step(prediction_type_, model_output, sample, scalar(schedule_.alpha_bar(t)),
                        scalar(schedule_.alpha_bar(t_prev)), &d, clip_sample_range_);
  return {prev, d.x0};
}

std::unique_ptr<Sampler> make_sampler(SamplerKind kind, const SchedulerConfig& config,
                                      int64_t num_steps) {
  if (kind == SamplerKind::kDDIM) return std::make_unique<DDIMSampler>(config, num_steps);
  return std::make_unique<EulerSampler>(config, num_steps);
}

}  // namespace lightning::diffusion
