#include "diffusion/parameterization.h"

#include <torch/torch.h>

#include "core/error.h"

namespace lightning::diffusion {
namespace {

// [B] -> [B, 1, ..., 1] with x's rank, in float32 on x's device (diffusers' unsqueeze loop in
// add_noise); a 0-dim alpha_bar broadcasts as is.
torch::Tensor per_sample(const torch::Tensor& alpha_bar, const torch::Tensor& x) {
  auto a = alpha_bar.to(x.device(), torch::kFloat32);
  if (a.dim() == 0) return a;
  if (a.dim() != 1 || a.size(0) != x.size(0)) {
    fail("alpha_bar of shape {} does not match the batch of a sample of shape {}",
         fmt::join(a.sizes(), "x"), fmt::join(x.sizes(), "x"));
  }
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = a.size(0);
  return a.view(shape);
}

// The coefficient in the sample's dtype, so bf16 samples stay bf16 (computed in float32 first).
torch::Tensor as(const torch::Tensor& coeff, const torch::Tensor& x) {
  return coeff.to(x.scalar_type());
}

// "999,749" for messages.
std::string to_list(const torch::Tensor& t) {
  const auto c = t.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return fmt::format("{}", fmt::join(p, p + c.numel(), ","));
}

}  // namespace

torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& eps,
                        const torch::Tensor& alpha_bar) {
  const auto a = per_sample(alpha_bar, x0);
  return as(a.sqrt(), x0) * x0 + as((1 - a).sqrt(), x0) * eps;
}

torch::Tensor add_noise(const NoiseSchedule& schedule, const torch::Tensor& x0,
                        const torch::Tensor& eps, const torch::Tensor& t) {
  return add_noise(x0, eps, schedule.alpha_bar(t));
}

torch::Tensor velocity(const torch::Tensor& x0, const torch::Tensor& eps,
                       const torch::Tensor& alpha_bar) {
  const auto a = per_sample(alpha_bar, x0);
  return as(a.sqrt(), x0) * eps - as((1 - a).sqrt(), x0) * x0;
}

Denoised split_model_output(PredictionType type, const torch::Tensor& model_output,
                            const torch::Tensor& sample, const torch::Tensor& alpha_bar) {
  const auto a = per_sample(alpha_bar, sample);
  const auto sqrt_a = as(a.sqrt(), sample);        // alpha_prod_t ** 0.5
  const auto sqrt_b = as((1 - a).sqrt(), sample);  // beta_prod_t ** 0.5
  switch (type) {
    case PredictionType::kEpsilon:
      return {(sample - sqrt_b * model_output) / sqrt_a, model_output};
    case PredictionType::kSample:
      return {model_output, (sample - sqrt_a * model_output) / sqrt_b};
    case PredictionType::kVPrediction:
      return {sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample};
  }
  fail("unknown prediction type");
}

torch::Tensor model_target(PredictionType type, const torch::Tensor& x0, const torch::Tensor& eps,
                           const torch::Tensor& alpha_bar) {
  switch (type) {
    case PredictionType::kEpsilon:
      return eps;
    case PredictionType::kSample:
      return x0;
    case PredictionType::kVPrediction:
      return velocity(x0, eps, alpha_bar);
  }
  fail("unknown prediction type");
}

torch::Tensor ddim_step(PredictionType type, const torch::Tensor& model_output,
                        const torch::Tensor& sample, const torch::Tensor& alpha_bar,
                        const torch::Tensor& alpha_bar_prev, Denoised* denoised,
                        double clip_sample_range) {
  auto d = split_model_output(type, model_output, sample, alpha_bar);
  // DDIMScheduler.step "4. Clip": only x0 is clamped; eps stays the model's (no
  // use_clipped_model_output).
  if (clip_sample_range > 0) d.x0 = d.x0.clamp(-clip_sample_range, clip_sample_range);
  const auto a_prev = per_sample(alpha_bar_prev, sample);
  // DDIM eq. 12, eta = 0: x_{t'} = sqrt(ab') x0 + sqrt(1 - ab') eps.
  auto prev = as(a_prev.sqrt(), sample) * d.x0 + as((1 - a_prev).sqrt(), sample) * d.eps;
  if (denoised != nullptr) *denoised = d;
  return prev;
}

torch::Tensor ddim_step(const NoiseSchedule& schedule, PredictionType type,
                        const torch::Tensor& model_output, const torch::Tensor& sample,
                        const torch::Tensor& t, const torch::Tensor& t_prev, Denoised* denoised,
                        double clip_sample_range) {
  if (t.sizes() != t_prev.sizes()) {
    fail("ddim_step: t of shape {} and t_prev of shape {} differ", fmt::join(t.sizes(), "x"),
         fmt::join(t_prev.sizes(), "x"));
  }
  if (t.numel() > 0 && (t_prev >= t).any().item<bool>()) {
    fail("ddim_step: every t_prev must be earlier than its t (t = [{}], t_prev = [{}])", to_list(t),
         to_list(t_prev));
  }
  return ddim_step(type, model_output, sample, schedule.alpha_bar(t), schedule.alpha_bar(t_prev),
                   denoised, clip_sample_range);
}

}  // namespace lightning::diffusion
