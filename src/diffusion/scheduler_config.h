// The scheduler settings of a diffusers `scheduler/scheduler_config.json`, read strictly.
//
// One struct serves both samplers (EulerDiscreteScheduler and DDIMScheduler, diffusers 0.27.2):
// the real SDXL config names EulerDiscreteScheduler yet carries DDIM's keys (clip_sample,
// set_alpha_to_one, ...), and `lightning generate` may run either sampler over it.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace lightning::diffusion {

// diffusers' `beta_schedule`. squaredcos_cap_v2 (Glide cosine) is not supported.
enum class BetaSchedule {
  kLinear,        // "linear": betas = linspace(beta_start, beta_end, T)
  kScaledLinear,  // "scaled_linear": betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2
};

// diffusers' `timestep_spacing`, Table 2 of Lin et al. 2023 "Common Diffusion Noise Schedules
// and Sample Steps are Flawed" (arXiv 2305.08891).
enum class TimestepSpacing {
  kLeading,   // "leading": i * (T / N) + steps_offset; never starts at T - 1 (wrong for students)
  kTrailing,  // "trailing": round(T - i * T / N) - 1; 4 steps give [999, 749, 499, 249]
  kLinspace,  // "linspace": linspace(0, T - 1, N) reversed; fractional for Euler
};

// diffusers' `prediction_type`: what the network outputs.
enum class PredictionType {
  kEpsilon,      // "epsilon": the added noise eps
  kVPrediction,  // "v_prediction": v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)
  kSample,       // "sample" (alias "original_sample"): x0 itself
};

// Parses "linear" / "scaled_linear" etc.; a value outside the enum throws Error naming `key`.
BetaSchedule parse_beta_schedule(const std::string& value,
                                 const std::string& key = "beta_schedule");
TimestepSpacing parse_timestep_spacing(const std::string& value,
                                       const std::string& key = "timestep_spacing");
PredictionType parse_prediction_type(const std::string& value,
                                     const std::string& key = "prediction_type");
// The diffusers spelling of each enum value ("scaled_linear", "trailing", "v_prediction").
std::string to_string(BetaSchedule value);
std::string to_string(TimestepSpacing value);
std::string to_string(PredictionType value);

// The supported subset of diffusers' scheduler configuration. The defaults are SDXL-Lightning's
// inference settings (SDXL base's scheduler_config.json with trailing spacing, METHOD.md §5);
// diffusers' own constructor defaults differ and are what from_json uses for missing keys.
struct SchedulerConfig {
  std::string class_name = "EulerDiscreteScheduler";         // `_class_name`: the default sampler
  int64_t num_train_timesteps = 1000;                        // T
  double beta_start = 0.00085;                               // diffusers default 0.0001
  double beta_end = 0.012;                                   // diffusers default 0.02
  BetaSchedule beta_schedule = BetaSchedule::kScaledLinear;  // diffusers default linear
  TimestepSpacing timestep_spacing = TimestepSpacing::kTrailing;  // SDXL's file says leading
  int64_t steps_offset = 1;  // added to "leading" timesteps only (SDXL: 1)
  PredictionType prediction_type = PredictionType::kEpsilon;  // "sample" for the 1-step model
  // DDIM only: alpha_bar "before" t = 0, used by the last step. true -> 1.0, false -> alpha_bar_0.
  bool set_alpha_to_one = false;  // SDXL: false; DDIMScheduler default true
  // DDIM only: clamp the predicted x0 to [-clip_sample_range, clip_sample_range] (pixel models).
  bool clip_sample = false;  // SDXL: false; DDIMScheduler default true
  double clip_sample_range = 1.0;
};

// diffusers' constructor defaults of `class_name` (EulerDiscreteScheduler, DDIMScheduler;
// other classes get DDIMScheduler's, which PNDM/DDPM share). These fill keys a file leaves out,
// exactly as diffusers' from_config would.
SchedulerConfig diffusers_defaults(const std::string& class_name);

// Reads a scheduler_config.json object. `file` names the source in messages. Unknown keys are
// warned about; values this code cannot reproduce are refused with an Error naming the key
// and value: use_karras_sigmas true, rescale_betas_zero_snr true, trained_betas non-null,
// interpolation_type other than "linear", timestep_type other than "discrete",
// thresholding true, beta_schedule squaredcos_cap_v2, and values of the wrong JSON type.
SchedulerConfig from_json(const nlohmann::json& json, const std::string& file);

// Reads and parses the file at `path` (Error if it cannot be read or is not JSON).
SchedulerConfig load_scheduler_config(const std::string& path);

// The config in diffusers' key names (round-trips through from_json).
nlohmann::json to_json(const SchedulerConfig& config);

}  // namespace lightning::diffusion
