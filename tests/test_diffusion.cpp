// Tests of src/diffusion against diffusers 0.27.2 (fixtures in tests/fixtures/diffusion, made
// as its README says) and against the closed forms of DDPM / DDIM / CFG.
//
// Tolerances: timesteps exact; alphas_cumprod, sigmas and init_noise_sigma relative 1e-6;
// sampler steps 1e-6 relative to max(1, |expected|); round trips through the parameterisations
// 5e-5 absolute (float32 divides by sqrt(alpha_bar_999) ~ 0.07 and sqrt(1 - alpha_bar_0) ~ 0.03).
#include <cmath>
#include <fstream>
#include <memory>

#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "diffusion/guidance.h"
#include "diffusion/noise_schedule.h"
#include "diffusion/parameterization.h"
#include "diffusion/samplers.h"
#include "diffusion/scheduler_config.h"
#include "tests/test_util.h"

namespace lightning::diffusion {
namespace {

using nlohmann::json;

const json& fixture(const std::string& name) {
  static std::map<std::string, json> cache;
  auto it = cache.find(name);
  if (it == cache.end()) {
    std::ifstream in(test::source_path("tests/fixtures/diffusion/" + name));
    EXPECT_TRUE(in.good()) << name;
    it = cache.emplace(name, json::parse(in)).first;
  }
  return it->second;
}

torch::Tensor tensor_of(const json& j) {
  const auto data = j.at("data").get<std::vector<double>>();
  const auto shape = j.at("shape").get<std::vector<int64_t>>();
  return torch::tensor(data, torch::kFloat64).to(torch::kFloat32).reshape(shape);
}

// The fixture's constructor kwargs, read through the production parser.
SchedulerConfig config_of(const json& kwargs, const std::string& class_name) {
  json j = kwargs;
  j["_class_name"] = class_name;
  return from_json(j, "fixture");
}

// max |a - b| / max(1, |b|) <= tol, elementwise.
void expect_close(const torch::Tensor& actual, const torch::Tensor& expected, double tol,
                  const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const auto a = actual.to(torch::kFloat64);
  const auto b = expected.to(torch::kFloat64);
  const double err = ((a - b).abs() / b.abs().clamp_min(1.0)).max().item<double>();
  EXPECT_LE(err, tol) << what;
}

void expect_rel(double actual, double expected, double tol, const std::string& what) {
  EXPECT_LE(std::abs(actual - expected), tol * std::max(std::abs(expected), 1e-30)) << what;
}

constexpr double kRelTol = 1e-6;
// float32 steps: a few ulp. libtorch 2.11 rounds the v-prediction Euler step 1.06e-6 off the
// fixtures (made with torch 1.13), hence 2e-6.
constexpr double kStepTol = 2e-6;
constexpr double kRoundTripTol = 5e-5;

TEST(NoiseScheduleTest, AlphasCumprodMatchesDiffusers) {
  for (const auto& [name, values] : fixture("schedules.json").at("alphas_cumprod").items()) {
    SchedulerConfig c;
    c.beta_schedule = parse_beta_schedule(name);
    c.beta_start = name == "linear" ? 0.0001 : 0.00085;
    c.beta_end = name == "linear" ? 0.02 : 0.012;
    const NoiseSchedule s(c);
    const auto expected = values.get<std::vector<double>>();
    ASSERT_EQ(s.num_train_timesteps(), static_cast<int64_t>(expected.size()));
    for (size_t t = 0; t < expected.size(); ++t) {
      expect_rel(s.alpha_bar(static_cast<int64_t>(t)), expected[t], kRelTol,
                 name + " t=" + std::to_string(t));
    }
  }
}

TEST(NoiseScheduleTest, SdxlFacts) {
  const NoiseSchedule s{SchedulerConfig{}};
  EXPECT_NEAR(s.alpha_bar(999), 0.0047, 1e-4);       // METHOD.md §1: never pure noise
  EXPECT_FLOAT_EQ(s.alpha_bar(-1), s.alpha_bar(0));  // set_alpha_to_one = false
  SchedulerConfig one;
  one.set_alpha_to_one = true;
  EXPECT_EQ(NoiseSchedule(one).alpha_bar(-1), 1.0f);
  EXPECT_THROW(s.alpha_bar(1000), Error);
  EXPECT_THROW(s.alpha_bar(-2), Error);
  const auto t = torch::tensor({999, -1, 0, 500}, torch::kLong);
  const auto ab = s.alpha_bar(t);
  ASSERT_EQ(ab.sizes(), t.sizes());
  EXPECT_EQ(ab[0].item<float>(), s.alpha_bar(999));
  EXPECT_EQ(ab[1].item<float>(), s.alpha_bar(-1));
  EXPECT_EQ(ab[3].item<float>(), s.alpha_bar(500));
  EXPECT_THROW(s.alpha_bar(torch::tensor({1000}, torch::kLong)), Error);
  EXPECT_THROW(s.alpha_bar(torch::tensor({1.0f})), Error);
}

TEST(TimestepsTest, EulerGridsMatchDiffusers) {
  int checked = 0;
  for (const auto& g : fixture("schedules.json").at("grids")) {
    if (g.at("class_name") != "EulerDiscreteScheduler") continue;
    const auto config = config_of(g.at("config"), "EulerDiscreteScheduler");
    const int64_t n = g.at("num_inference_steps");
    const std::string what = fmt::format("{} {} steps={}", to_string(config.beta_schedule),
                                         to_string(config.timestep_spacing), n);
    const EulerSampler sampler(config, n);
    EXPECT_EQ(sampler.timestep_values(), g.at("timesteps").get<std::vector<float>>()) << what;
    const auto sigmas = g.at("sigmas").get<std::vector<double>>();
    ASSERT_EQ(sampler.sigmas().size(), sigmas.size()) << what;
    for (size_t i = 0; i < sigmas.size(); ++i) {
      if (sigmas[i] == 0.0) {
        EXPECT_EQ(sampler.sigmas()[i], 0.0f) << what;
      } else {
        expect_rel(sampler.sigmas()[i], sigmas[i], kRelTol, what + " sigma " + std::to_string(i));
      }
    }
    expect_rel(sampler.init_noise_sigma(), g.at("init_noise_sigma").get<double>(), kRelTol,
               what + " init_noise_sigma");
    ++checked;
  }
  EXPECT_EQ(checked, 2 * 3 * 6);  // beta schedules x spacings x {1, 2, 3, 4, 8, 25}
}

TEST(TimestepsTest, DDIMGridsMatchDiffusers) {
  int checked = 0;
  for (const auto& g : fixture("schedules.json").at("grids")) {
    if (g.at("class_name") != "DDIMScheduler") continue;
    const auto config = config_of(g.at("config"), "DDIMScheduler");
    const int64_t n = g.at("num_inference_steps");
    const DDIMSampler sampler(config, n);
    EXPECT_EQ(sampler.timesteps(), g.at("timesteps").get<std::vector<int64_t>>())
        << to_string(config.timestep_spacing) << " steps=" << n;
    EXPECT_EQ(sampler.init_noise_sigma(), g.at("init_noise_sigma").get<float>());
    ++checked;
  }
  EXPECT_EQ(checked, 2 * 3 * 6);
}

TEST(TimestepsTest, TrailingGridsOfTheMethod) {
  using V = std::vector<int64_t>;
  EXPECT_EQ(trailing_timesteps(1000, 1), V({999}));
  EXPECT_EQ(trailing_timesteps(1000, 2), V({999, 499}));
  EXPECT_EQ(trailing_timesteps(1000, 4), V({999, 749, 499, 249}));
  EXPECT_EQ(trailing_timesteps(1000, 8), V({999, 874, 749, 624, 499, 374, 249, 124}));
  EXPECT_EQ(trailing_timesteps(1000, 3), V({999, 666, 332}));  // np.round half to even
  EXPECT_THROW(trailing_timesteps(1000, 0), Error);
  EXPECT_THROW(trailing_timesteps(1000, 1001), Error);
}

TEST(EulerSamplerTest, StepsMatchDiffusers) {
  int checked = 0;
  for (const auto& c : fixture("steps.json").at("euler")) {
    const auto config = config_of(c.at("config"), "EulerDiscreteScheduler");
    const EulerSampler sampler(config, c.at("num_inference_steps").get<int64_t>());
    const int64_t i = c.at("step_index");
    const std::string what = fmt::format("{} {} step {}", to_string(config.prediction_type),
                                         to_string(config.timestep_spacing), i);
    const auto x = tensor_of(c.at("sample"));
    const auto out = tensor_of(c.at("model_output"));
    expect_close(sampler.scale_model_input(x, i), tensor_of(c.at("scaled_model_input")), kStepTol,
                 what + " scale_model_input");
    const auto r = sampler.step(out, i, x);
    expect_close(r.prev_sample, tensor_of(c.at("prev_sample")), kStepTol, what + " prev_sample");
    expect_close(r.pred_original_sample, tensor_of(c.at("pred_original_sample")), kStepTol,
                 what + " pred_original_sample");
    ++checked;
  }
  EXPECT_EQ(checked, 3 * (4 + 4 + 3));
}

TEST(EulerSamplerTest, LastStepLandsOnX0) {
  torch::manual_seed(0);
  // sigma_N = 0: x + (x - x0) / sigma * (0 - sigma) = x0 for every prediction type.
  SchedulerConfig config;
  config.prediction_type = PredictionType::kSample;
  const EulerSampler sampler(config, 4);
  const auto x0 = torch::randn({2, 4, 3, 3});
  const auto x = torch::randn({2, 4, 3, 3}) * sampler.sigmas()[3];
  expect_close(sampler.step(x0, 3, x).prev_sample, x0, kStepTol, "last step");
  EXPECT_THROW(sampler.step(x0, 4, x), Error);
}

TEST(DDIMSamplerTest, StepsMatchDiffusers) {
  int checked = 0;
  for (const auto& c : fixture("steps.json").at("ddim")) {
    const auto config = config_of(c.at("config"), "DDIMScheduler");
    const DDIMSampler sampler(config, c.at("num_inference_steps").get<int64_t>());
    const int64_t i = c.at("step_index");
    ASSERT_EQ(sampler.timesteps()[i], c.at("timestep").get<int64_t>());
    const std::string what =
        fmt::format("{} set_alpha_to_one={} step {}", to_string(config.prediction_type),
                    config.set_alpha_to_one, i);
    const auto r = sampler.step(tensor_of(c.at("model_output")), i, tensor_of(c.at("sample")));
    expect_close(r.prev_sample, tensor_of(c.at("prev_sample")), kStepTol, what + " prev_sample");
    expect_close(r.pred_original_sample, tensor_of(c.at("pred_original_sample")), kStepTol,
                 what + " pred_original_sample");
    ++checked;
  }
  EXPECT_EQ(checked, 3 * 2 * 4);
}

TEST(DDIMStepTest, PerSampleMatchesClosedForm) {
  torch::manual_seed(0);
  // DDIM eq. 12 (eta = 0) in float64: x' = sqrt(a') (x - sqrt(1 - a) e) / sqrt(a) + sqrt(1 - a') e.
  const NoiseSchedule s{SchedulerConfig{}};
  const auto t = torch::tensor({999, 749, 499, 10}, torch::kLong);
  const auto t_prev = torch::tensor({749, 499, -1, 0}, torch::kLong);
  const auto x = torch::randn({4, 4, 2, 2});
  const auto eps = torch::randn({4, 4, 2, 2});
  Denoised d;
  const auto prev = ddim_step(s, PredictionType::kEpsilon, eps, x, t, t_prev, &d);
  for (int64_t b = 0; b < 4; ++b) {
    const double a = s.alpha_bar(t[b].item<int64_t>());
    const double ap = s.alpha_bar(t_prev[b].item<int64_t>());
    const auto xb = x[b].to(torch::kFloat64);
    const auto eb = eps[b].to(torch::kFloat64);
    const auto x0 = (xb - std::sqrt(1 - a) * eb) / std::sqrt(a);
    const auto expected = std::sqrt(ap) * x0 + std::sqrt(1 - ap) * eb;
    expect_close(prev[b], expected, kStepTol * 10, "sample " + std::to_string(b));
    expect_close(d.x0[b], x0, kStepTol * 10, "x0 of sample " + std::to_string(b));
  }
  // The same through each parameterisation: a model that outputs its exact target gives the
  // forward process at t' with the same (x0, eps).
  const auto x0 = torch::randn({4, 4, 2, 2});
  const auto x_t = add_noise(s, x0, eps, t);
  const auto expected = add_noise(s, x0, eps, t_prev);
  for (auto type :
       {PredictionType::kEpsilon, PredictionType::kVPrediction, PredictionType::kSample}) {
    const auto out = model_target(type, x0, eps, s.alpha_bar(t));
    const auto got = ddim_step(s, type, out, x_t, t, t_prev);
    expect_close(got, expected, kRoundTripTol, "DDIM via " + to_string(type));
  }
  EXPECT_THROW(ddim_step(s, PredictionType::kEpsilon, eps, x, t_prev, t), Error);
}

TEST(ParameterizationTest, AddNoiseAndVelocityMatchDiffusers) {
  for (const auto& c : fixture("steps.json").at("add_noise")) {
    const auto config = config_of(c.at("config"), "DDIMScheduler");
    const NoiseSchedule s(config);
    const auto t = torch::tensor(c.at("timesteps").get<std::vector<int64_t>>(), torch::kLong);
    const auto x0 = tensor_of(c.at("original_samples"));
    const auto eps = tensor_of(c.at("noise"));
    expect_close(add_noise(s, x0, eps, t), tensor_of(c.at("noisy_samples")), kStepTol, "add_noise");
    expect_close(velocity(x0, eps, s.alpha_bar(t)), tensor_of(c.at("velocity")), kStepTol,
                 "velocity");
  }
}

TEST(ParameterizationTest, RoundTripsAtEveryTrailingTimestep) {
  torch::manual_seed(0);
  const NoiseSchedule s{SchedulerConfig{}};
  std::vector<int64_t> ts = {999, 0};
  for (int64_t n : {1, 2, 4, 8}) {
    for (int64_t t : trailing_timesteps(1000, n))
      ts.push_back(t);
  }
  for (int64_t t : ts) {
    const auto x0 = torch::randn({2, 4, 3, 3});
    const auto eps = torch::randn({2, 4, 3, 3});
    const auto ab = s.alpha_bar(torch::full({2}, t, torch::kLong));
    const auto x_t = add_noise(x0, eps, ab);
    for (auto type :
         {PredictionType::kEpsilon, PredictionType::kVPrediction, PredictionType::kSample}) {
      const std::string what = fmt::format("{} t={}", to_string(type), t);
      const auto d = split_model_output(type, model_target(type, x0, eps, ab), x_t, ab);
      EXPECT_LE((d.x0 - x0).abs().max().item<double>(), kRoundTripTol) << what << " x0";
      EXPECT_LE((d.eps - eps).abs().max().item<double>(), kRoundTripTol) << what << " eps";
      // And back: the target recomputed from the recovered pair.
      const auto v = model_target(type, d.x0, d.eps, ab);
      EXPECT_LE((v - model_target(type, x0, eps, ab)).abs().max().item<double>(), kRoundTripTol)
          << what << " target";
    }
  }
}

TEST(ParameterizationTest, PerSampleTimestepsBroadcast) {
  torch::manual_seed(0);
  const NoiseSchedule s{SchedulerConfig{}};
  const auto t = torch::tensor({999, 0, 499}, torch::kLong);
  const auto x0 = torch::randn({3, 4, 2, 2});
  const auto eps = torch::randn({3, 4, 2, 2});
  const auto batched = add_noise(s, x0, eps, t);
  for (int64_t b = 0; b < 3; ++b) {
    const double a = s.alpha_bar(t[b].item<int64_t>());
    const auto expected = std::sqrt(a) * x0[b] + std::sqrt(1 - a) * eps[b];
    expect_close(batched[b], expected, kStepTol, "sample " + std::to_string(b));
  }
  EXPECT_THROW(add_noise(x0, eps, torch::rand({2})), Error);
}

TEST(GuidanceTest, ClassifierFreeGuidance) {
  torch::manual_seed(0);
  const auto uncond = torch::randn({2, 4, 2, 2});
  const auto cond = torch::randn({2, 4, 2, 2});
  expect_close(guide(uncond, cond, 6.0), uncond + 6.0 * (cond - uncond), 1e-6, "g=6");
  EXPECT_TRUE(torch::equal(guide(uncond, cond, 1.0), cond));  // g <= 1: no guidance
  EXPECT_TRUE(torch::equal(guide(uncond, cond, 0.0), cond));
  EXPECT_FALSE(uses_guidance(1.0));
  EXPECT_TRUE(uses_guidance(1.5));
  expect_close(guide_batched(torch::cat({uncond, cond}), 7.5), guide(uncond, cond, 7.5), 1e-6,
               "batched");
  EXPECT_THROW(guide(uncond, cond.narrow(0, 0, 1), 5.0), Error);
  EXPECT_THROW(guide_batched(torch::randn({3, 4}), 5.0), Error);
}

// SDXL base 1.0's scheduler/scheduler_config.json as published.
const char* kSdxlSchedulerConfig = R"({
  "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
  "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
  "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000,
  "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false,
  "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading",
  "trained_betas": null, "use_karras_sigmas": false})";

TEST(SchedulerConfigTest, ReadsSdxlConfig) {
  const auto c = from_json(json::parse(kSdxlSchedulerConfig), "scheduler_config.json");
  EXPECT_EQ(c.class_name, "EulerDiscreteScheduler");
  EXPECT_EQ(c.beta_schedule, BetaSchedule::kScaledLinear);
  EXPECT_EQ(c.timestep_spacing, TimestepSpacing::kLeading);
  EXPECT_EQ(c.steps_offset, 1);
  EXPECT_FALSE(c.set_alpha_to_one);
  EXPECT_FALSE(c.clip_sample);
  EXPECT_EQ(default_sampler_kind(c), SamplerKind::kEuler);
  const auto back = from_json(to_json(c), "round trip");
  EXPECT_EQ(to_json(back), to_json(c));
}

TEST(SchedulerConfigTest, MissingKeysTakeDiffusersDefaults) {
  const auto euler = from_json(json::parse(R"({"_class_name": "EulerDiscreteScheduler"})"), "f");
  EXPECT_EQ(euler.timestep_spacing, TimestepSpacing::kLinspace);
  EXPECT_EQ(euler.beta_schedule, BetaSchedule::kLinear);
  EXPECT_DOUBLE_EQ(euler.beta_start, 0.0001);
  const auto ddim = from_json(json::parse(R"({"_class_name": "DDIMScheduler"})"), "f");
  EXPECT_EQ(ddim.timestep_spacing, TimestepSpacing::kLeading);
  EXPECT_TRUE(ddim.set_alpha_to_one);
  EXPECT_TRUE(ddim.clip_sample);
  EXPECT_EQ(default_sampler_kind(ddim), SamplerKind::kDDIM);
}

TEST(SchedulerConfigTest, RefusesUnsupportedValuesByName) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"use_karras_sigmas": true})", "use_karras_sigmas"},
      {R"({"rescale_betas_zero_snr": true})", "rescale_betas_zero_snr"},
      {R"({"trained_betas": [0.1, 0.2]})", "trained_betas"},
      {R"({"interpolation_type": "log_linear"})", "log_linear"},
      {R"({"timestep_type": "continuous"})", "continuous"},
      {R"({"thresholding": true})", "thresholding"},
      {R"({"beta_schedule": "squaredcos_cap_v2"})", "squaredcos_cap_v2"},
      {R"({"timestep_spacing": "karras"})", "karras"},
      {R"({"prediction_type": "flow"})", "flow"},
      {R"({"steps_offset": "1"})", "steps_offset"},
      {R"({"beta_start": 0.5, "beta_end": 0.1})", "beta_start"},
  };
  for (const auto& [text, name] : cases) {
    try {
      from_json(json::parse(text), "scheduler_config.json");
      ADD_FAILURE() << "accepted " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("scheduler_config.json"), std::string::npos) << e.what();
    }
  }
  // Accepted when set to their harmless values.
  EXPECT_NO_THROW(from_json(json::parse(R"({"use_karras_sigmas": false, "trained_betas": null,
      "rescale_betas_zero_snr": false, "timestep_type": "discrete"})"),
                            "f"));
}

TEST(SchedulerConfigTest, WarnsAboutUnknownKeys) {
  auto sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(16);
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>("capture", sink));
  from_json(json::parse(R"({"mystery_knob": 3, "skip_prk_steps": true})"), "f.json");
  spdlog::set_default_logger(previous);
  const auto lines = sink->last_formatted();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("mystery_knob"), std::string::npos) << lines[0];
}

TEST(SamplerTest, FactoryAndNames) {
  EXPECT_EQ(parse_sampler_kind("euler"), SamplerKind::kEuler);
  EXPECT_EQ(parse_sampler_kind("ddim"), SamplerKind::kDDIM);
  EXPECT_THROW(parse_sampler_kind("heun"), UsageError);
  const auto s = make_sampler(SamplerKind::kDDIM, SchedulerConfig{}, 4);
  EXPECT_EQ(s->num_steps(), 4);
  EXPECT_EQ(s->timestep(1), 749.0f);
  EXPECT_EQ(s->init_noise_sigma(), 1.0f);
  const auto e = make_sampler(SamplerKind::kEuler, SchedulerConfig{}, 4);
  EXPECT_NEAR(e->init_noise_sigma(), 14.6146, 1e-3);  // trailing: sigma_max, not sqrt(s^2+1)
}

}  // namespace
}  // namespace lightning::diffusion
