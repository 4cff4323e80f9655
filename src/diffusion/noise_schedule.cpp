#include "diffusion/noise_schedule.h"

#include <algorithm>
#include <cmath>

#include <torch/torch.h>

#include "core/error.h"

namespace lightning::diffusion {
namespace {

// numpy's float arange(start, stop, step) (numpy 1.24, multiarray/ctors.c + arraytypes fill):
// length ceil((stop - start) / step); element i is start + i * d with d = (start + step) - start.
std::vector<double> numpy_arange(double start, double stop, double step) {
  const double len = std::ceil((stop - start) / step);
  std::vector<double> out;
  if (!(len > 0)) return out;
  const double delta = (start + step) - start;
  for (int64_t i = 0; i < static_cast<int64_t>(len); ++i)
    out.push_back(start + i * delta);
  return out;
}

// numpy.linspace(start, stop, num) in float64 (numpy 1.24): i * ((stop - start) / (num - 1))
// + start, the last element set to stop; num = 1 gives [start].
std::vector<double> numpy_linspace(double start, double stop, int64_t num) {
  std::vector<double> out(num);
  const int64_t div = num - 1;
  const double step = div > 0 ? (stop - start) / div : 0.0;
  for (int64_t i = 0; i < num; ++i)
    out[i] = static_cast<double>(i) * step + start;
  if (num > 1) out[num - 1] = stop;
  return out;
}

// np.round: half to even (std::nearbyint under the default FE_TONEAREST rounding mode).
double round_half_even(double x) {
  return std::nearbyint(x);
}

void check_steps(const SchedulerConfig& config, int64_t num_steps) {
  if (num_steps < 1 || num_steps > config.num_train_timesteps) {
    fail("number of inference steps {} must be in [1, num_train_timesteps = {}]", num_steps,
         config.num_train_timesteps);
  }
}

// The grid before the per-sampler casts, descending: integer-valued except for linspace.
std::vector<double> spaced_timesteps(const SchedulerConfig& config, int64_t num_steps) {
  check_steps(config, num_steps);
  const int64_t T = config.num_train_timesteps;
  std::vector<double> t;
  switch (config.timestep_spacing) {
    case TimestepSpacing::kLeading: {
      const int64_t step_ratio = T / num_steps;  // integer division, as diffusers' `//`
      for (int64_t i = num_steps - 1; i >= 0; --i)
        t.push_back(static_cast<double>(i * step_ratio));
      break;
    }
    case TimestepSpacing::kTrailing: {
      const double step_ratio = static_cast<double>(T) / static_cast<double>(num_steps);
      for (double v : numpy_arange(static_cast<double>(T), 0.0, -step_ratio)) {
        t.push_back(round_half_even(v) - 1.0);
      }
      break;
    }
    case TimestepSpacing::kLinspace: {
      t = numpy_linspace(0.0, static_cast<double>(T - 1), num_steps);
      std::reverse(t.begin(), t.end());
      break;
    }
  }
  return t;
}

}  // namespace

NoiseSchedule::NoiseSchedule(const SchedulerConfig& config) {
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  const int64_t T = config.num_train_timesteps;
  // EulerDiscreteScheduler / DDIMScheduler __init__: float32 linspace, squared for scaled_linear.
  if (config.beta_schedule == BetaSchedule::kLinear) {
    betas_ = torch::linspace(config.beta_start, config.beta_end, T, f32);
  } else {
    betas_ =
        torch::linspace(std::sqrt(config.beta_start), std::sqrt(config.beta_end), T, f32).pow(2);
  }
  alphas_cumprod_ = torch::cumprod(1.0 - betas_, 0);             // [T] float32
  sigmas_ = ((1 - alphas_cumprod_) / alphas_cumprod_).pow(0.5);  // [T] float32
  final_alpha_cumprod_ = config.set_alpha_to_one ? 1.0f : alphas_cumprod_[0].item<float>();
}

float NoiseSchedule::alpha_bar(int64_t t) const {
  if (t == -1) return final_alpha_cumprod_;
  if (t < -1 || t >= num_train_timesteps()) {
    fail("timestep {} is outside [-1, {}]", t, num_train_timesteps() - 1);
  }
  return alphas_cumprod_[t].item<float>();
}

torch::Tensor NoiseSchedule::alpha_bar(const torch::Tensor& t) const {
  if (t.scalar_type() != torch::kLong) {
    fail("timesteps must be an int64 tensor, got {}", std::string(c10::toString(t.scalar_type())));
  }
  if (t.numel() > 0) {
    const int64_t lo = t.min().item<int64_t>();
    const int64_t hi = t.max().item<int64_t>();
    if (lo < -1 || hi >= num_train_timesteps()) {
      fail("timesteps [{}, {}] are outside [-1, {}]", lo, hi, num_train_timesteps() - 1);
    }
  }
  // Index 0 of the extended table is t = -1.
  const auto table = torch::cat({torch::full({1}, final_alpha_cumprod_, alphas_cumprod_.options()),
                                 alphas_cumprod_})
                         .to(t.device());
  return table.index_select(0, (t + 1).reshape({-1})).reshape(t.sizes());
}

std::vector<float> euler_timesteps(const SchedulerConfig& config, int64_t num_steps) {
  std::vector<float> out;
  for (double t : spaced_timesteps(config, num_steps)) {
    float v = static_cast<float>(t);
    // Leading adds steps_offset after the float32 cast (EulerDiscreteScheduler.set_timesteps).
    if (config.timestep_spacing == TimestepSpacing::kLeading) {
      v += static_cast<float>(config.steps_offset);
    }
    out.push_back(v);
  }
  return out;
}

std::vector<int64_t> ddim_timesteps(const SchedulerConfig& config, int64_t num_steps) {
  std::vector<int64_t> out;
  for (double t : spaced_timesteps(config, num_steps)) {
    int64_t v = static_cast<int64_t>(round_half_even(t));
    if (config.timestep_spacing == TimestepSpacing::kLeading) v += config.steps_offset;
    out.push_back(v);
  }
  return out;
}

std::vector<int64_t> trailing_timesteps(int64_t num_train_timesteps, int64_t num_steps) {
  SchedulerConfig config;
  config.num_train_timesteps = num_train_timesteps;
  config.timestep_spacing = TimestepSpacing::kTrailing;
  return ddim_timesteps(config, num_steps);
}

std::vector<float> euler_sigmas(const NoiseSchedule& schedule,
                                const std::vector<float>& timesteps) {
  // np.interp(timesteps, arange(T), sigmas) in float64 (numpy's compiled arr_interp): clamped at
  // both ends, exact at grid points, else slope * (x - x_j) + y_j.
  const auto sigmas = schedule.sigmas().contiguous();
  const float* s = sigmas.data_ptr<float>();
  const int64_t n = sigmas.size(0);
  std::vector<float> out;
  for (float tf : timesteps) {
    const double x = tf;
    double y;
    if (x >= static_cast<double>(n - 1)) {
      y = s[n - 1];
    } else if (x <= 0.0) {
      y = s[0];
    } else {
      const auto j = static_cast<int64_t>(std::floor(x));
      if (x == static_cast<double>(j)) {
        y = s[j];
      } else {
        const double slope = static_cast<double>(s[j + 1]) - s[j];  // x_{j+1} - x_j = 1
        y = slope * (x - static_cast<double>(j)) + s[j];
      }
    }
    out.push_back(static_cast<float>(y));
  }
  out.push_back(0.0f);  // diffusers appends sigma = 0: the last step lands on x0
  return out;
}

float euler_init_noise_sigma(TimestepSpacing spacing, const std::vector<float>& sigmas) {
  const float max_sigma = *std::max_element(sigmas.begin(), sigmas.end());
  if (spacing == TimestepSpacing::kLinspace || spacing == TimestepSpacing::kTrailing) {
    return max_sigma;
  }
  return std::sqrt(max_sigma * max_sigma + 1.0f);
}

}  // namespace lightning::diffusion
