#include "diffusion/scheduler_config.h"

#include <fstream>
#include <set>

#include "core/error.h"
#include "core/log.h"

namespace lightning::diffusion {
namespace {

constexpr const char* kEulerClass = "EulerDiscreteScheduler";
constexpr const char* kDDIMClass = "DDIMScheduler";

// Keys that diffusers scheduler configs carry and that need no action here: bookkeeping,
// options of other scheduler classes (SDXL's file is shared with PNDM/DDIM: skip_prk_steps,
// sample_max_value) and options whose only effect is behind a flag we refuse when set
// (sigma_min / sigma_max act only with use_karras_sigmas, dynamic_thresholding_ratio and
// sample_max_value only with thresholding).
const std::set<std::string>& ignored_keys() {
  static const std::set<std::string> keys = {
      "_class_name",    "_diffusers_version", "_use_default_values",
      "skip_prk_steps", "sample_max_value",   "dynamic_thresholding_ratio",
      "sigma_min",      "sigma_max",          "variance_type",
  };
  return keys;
}

std::string dump(const nlohmann::json& value) {
  return value.dump();
}

// Typed accessors: a wrong JSON type is an Error naming file, key and value.
bool get_bool(const nlohmann::json& json, const std::string& key, const std::string& file) {
  const auto& v = json.at(key);
  if (!v.is_boolean()) fail("{}: key '{}' must be true or false, got {}", file, key, dump(v));
  return v.get<bool>();
}

int64_t get_int(const nlohmann::json& json, const std::string& key, const std::string& file) {
  const auto& v = json.at(key);
  if (!v.is_number_integer()) fail("{}: key '{}' must be an integer, got {}", file, key, dump(v));
  return v.get<int64_t>();
}

double get_number(const nlohmann::json& json, const std::string& key, const std::string& file) {
  const auto& v = json.at(key);
  if (!v.is_number()) fail("{}: key '{}' must be a number, got {}", file, key, dump(v));
  return v.get<double>();
}

std::string get_string(const nlohmann::json& json, const std::string& key,
                       const std::string& file) {
  const auto& v = json.at(key);
  if (!v.is_string()) fail("{}: key '{}' must be a string, got {}", file, key, dump(v));
  return v.get<std::string>();
}

}  // namespace

BetaSchedule parse_beta_schedule(const std::string& value, const std::string& key) {
  if (value == "linear") return BetaSchedule::kLinear;
  if (value == "scaled_linear") return BetaSchedule::kScaledLinear;
  fail("unsupported {} '{}' (supported: linear, scaled_linear)", key, value);
}

TimestepSpacing parse_timestep_spacing(const std::string& value, const std::string& key) {
  if (value == "leading") return TimestepSpacing::kLeading;
  if (value == "trailing") return TimestepSpacing::kTrailing;
  if (value == "linspace") return TimestepSpacing::kLinspace;
  fail("unsupported {} '{}' (supported: leading, trailing, linspace)", key, value);
}

PredictionType parse_prediction_type(const std::string& value, const std::string& key) {
  if (value == "epsilon") return PredictionType::kEpsilon;
  if (value == "v_prediction") return PredictionType::kVPrediction;
  // "original_sample" is diffusers' backwards-compatible alias (EulerDiscreteScheduler.step).
  if (value == "sample" || value == "original_sample") return PredictionType::kSample;
  fail("unsupported {} '{}' (supported: epsilon, v_prediction, sample)", key, value);
}

std::string to_string(BetaSchedule value) {
  return value == BetaSchedule::kLinear ? "linear" : "scaled_linear";
}

std::string to_string(TimestepSpacing value) {
  switch (value) {
    case TimestepSpacing::kLeading:
      return "leading";
    case TimestepSpacing::kTrailing:
      return "trailing";
    case TimestepSpacing::kLinspace:
      return "linspace";
  }
  return "?";
}

std::string to_string(PredictionType value) {
  switch (value) {
    case PredictionType::kEpsilon:
      return "epsilon";
    case PredictionType::kVPrediction:
      return "v_prediction";
    case PredictionType::kSample:
      return "sample";
  }
  return "?";
}

SchedulerConfig diffusers_defaults(const std::string& class_name) {
  // The keyword defaults of EulerDiscreteScheduler.__init__ / DDIMScheduler.__init__ (0.27.2).
  SchedulerConfig c;
  c.class_name = class_name;
  c.num_train_timesteps = 1000;
  c.beta_start = 0.0001;
  c.beta_end = 0.02;
  c.beta_schedule = BetaSchedule::kLinear;
  c.steps_offset = 0;
  c.prediction_type = PredictionType::kEpsilon;
  c.clip_sample_range = 1.0;
  // Euler has neither DDIM option; DDIM's defaults make a DDIM sampler over an Euler config
  // behave as DDIMScheduler.from_config(euler.config) would.
  c.set_alpha_to_one = true;
  c.clip_sample = true;
  c.timestep_spacing =
      class_name == kEulerClass ? TimestepSpacing::kLinspace : TimestepSpacing::kLeading;
  return c;
}

SchedulerConfig from_json(const nlohmann::json& json, const std::string& file) {
  if (!json.is_object()) fail("{}: a scheduler config must be a JSON object", file);
  std::string class_name = kEulerClass;
  if (json.contains("_class_name")) class_name = get_string(json, "_class_name", file);
  if (class_name != kEulerClass && class_name != kDDIMClass) {
    spdlog::warn("{}: scheduler class '{}' is not implemented; reading its keys with {}'s defaults",
                 file, class_name, kDDIMClass);
  }
  SchedulerConfig c = diffusers_defaults(class_name);

  // Refused: options that change the schedule in ways this code does not reproduce.
  auto refuse_if = [&](const std::string& key, bool bad, const std::string& why) {
    if (bad) fail("{}: unsupported {} = {} ({})", file, key, dump(json.at(key)), why);
  };

  for (const auto& [key, value] : json.items()) {
    if (key == "num_train_timesteps") {
      c.num_train_timesteps = get_int(json, key, file);
      if (c.num_train_timesteps < 2) fail("{}: {} = {} must be >= 2", file, key, dump(value));
    } else if (key == "beta_start") {
      c.beta_start = get_number(json, key, file);
    } else if (key == "beta_end") {
      c.beta_end = get_number(json, key, file);
    } else if (key == "beta_schedule") {
      const std::string s = get_string(json, key, file);
      try {
        c.beta_schedule = parse_beta_schedule(s);
      } catch (const Error& e) {
        fail("{}: {}", file, e.what());
      }
    } else if (key == "timestep_spacing") {
      const std::string s = get_string(json, key, file);
      try {
        c.timestep_spacing = parse_timestep_spacing(s);
      } catch (const Error& e) {
        fail("{}: {}", file, e.what());
      }
    } else if (key == "prediction_type") {
      const std::string s = get_string(json, key, file);
      try {
        c.prediction_type = parse_prediction_type(s);
      } catch (const Error& e) {
        fail("{}: {}", file, e.what());
      }
    } else if (key == "steps_offset") {
      c.steps_offset = get_int(json, key, file);
    } else if (key == "set_alpha_to_one") {
      c.set_alpha_to_one = get_bool(json, key, file);
    } else if (key == "clip_sample") {
      c.clip_sample = get_bool(json, key, file);
    } else if (key == "clip_sample_range") {
      c.clip_sample_range = get_number(json, key, file);
    } else if (key == "trained_betas") {
      refuse_if(key, !value.is_null(), "only null is supported: betas come from beta_schedule");
    } else if (key == "use_karras_sigmas") {
      refuse_if(key, !value.is_boolean(), "must be true or false");
      refuse_if(key, value.get<bool>(), "Karras sigmas are not implemented");
    } else if (key == "rescale_betas_zero_snr") {
      refuse_if(key, !value.is_boolean(), "must be true or false");
      refuse_if(key, value.get<bool>(), "zero-terminal-SNR rescaling is not implemented");
    } else if (key == "thresholding") {
      refuse_if(key, !value.is_boolean(), "must be true or false");
      refuse_if(key, value.get<bool>(), "dynamic thresholding is not implemented");
    } else if (key == "interpolation_type") {
      refuse_if(key, !value.is_string() || value.get<std::string>() != "linear",
                "only \"linear\" is supported");
    } else if (key == "timestep_type") {
      refuse_if(key, !value.is_string() || value.get<std::string>() != "discrete",
                "only \"discrete\" is supported");
    } else if (ignored_keys().count(key) == 0) {
      spdlog::warn("{}: unknown scheduler config key '{}' ignored", file, key);
    }
  }
  if (!(c.beta_start > 0.0 && c.beta_end > c.beta_start && c.beta_end < 1.0)) {
    fail("{}: beta_start = {} and beta_end = {} must satisfy 0 < beta_start < beta_end < 1", file,
         c.beta_start, c.beta_end);
  }
  return c;
}

SchedulerConfig load_scheduler_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("{}: cannot open scheduler config", path);
  nlohmann::json json;
  try {
    in >> json;
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", path, e.what());
  }
  return from_json(json, path);
}

nlohmann::json to_json(const SchedulerConfig& c) {
  return {
      {"_class_name", c.class_name},
      {"num_train_timesteps", c.num_train_timesteps},
      {"beta_start", c.beta_start},
      {"beta_end", c.beta_end},
      {"beta_schedule", to_string(c.beta_schedule)},
      {"timestep_spacing", to_string(c.timestep_spacing)},
      {"steps_offset", c.steps_offset},
      {"prediction_type", to_string(c.prediction_type)},
      {"set_alpha_to_one", c.set_alpha_to_one},
      {"clip_sample", c.clip_sample},
      {"clip_sample_range", c.clip_sample_range},
      {"interpolation_type", "linear"},
      {"use_karras_sigmas", false},
      {"timestep_type", "discrete"},
      {"rescale_betas_zero_snr", false},
      {"trained_betas", nullptr},
  };
}

}  // namespace lightning::diffusion
