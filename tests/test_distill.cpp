// The pieces of progressive adversarial distillation (src/distill/objectives.*,
// src/models/discriminator.*) on tiny random models, against hand-rolled formulas.
//
// Tolerances: DDIM rollouts 1e-5 relative (float32, the same operations in another order);
// parameterisation round trips 5e-5 absolute (as tests/test_diffusion.cpp).
#include <cmath>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "diffusion/noise_schedule.h"
#include "diffusion/parameterization.h"
#include "distill/objectives.h"
#include "models/discriminator.h"
#include "models/unet.h"
#include "tests/test_util.h"

namespace lightning::distill {
namespace {

using diffusion::PredictionType;

diffusion::NoiseSchedule sd_schedule() {
  return diffusion::NoiseSchedule(diffusion::SchedulerConfig{});  // SDXL's scaled_linear
}

TEST(TeacherPath, FollowsTheTeachersTrailingGrid) {
  for (int64_t K : {2, 4, 8, 32, 64, 128}) {
    const auto grid = diffusion::trailing_timesteps(1000, K);
    for (int64_t n : {1, 2, 4}) {
      if (K % n) continue;
      for (int64_t j = 0; j < K / n; ++j) {
        const auto path = teacher_path(grid[static_cast<size_t>(j * n)], n, K, 1000);
        ASSERT_EQ(path.size(), static_cast<size_t>(n + 1));
        for (int64_t k = 0; k <= n; ++k) {
          const size_t i = static_cast<size_t>(j * n + k);
          EXPECT_EQ(path[static_cast<size_t>(k)], i < grid.size() ? grid[i] : -1)
              << "K " << K << " n " << n << " j " << j << " k " << k;
        }
      }
    }
  }
  // Off the grid (the 1- and 2-step students train on the 4-step grid): clamped at the clean end.
  EXPECT_EQ(teacher_path(749, 2, 2, 1000), (std::vector<int64_t>{749, 249, -1}));
  EXPECT_EQ(teacher_path(249, 2, 4, 1000), (std::vector<int64_t>{249, -1, -1}));
  EXPECT_THROW(teacher_path(1000, 1, 4, 1000), Error);
  EXPECT_THROW(teacher_path(10, 0, 4, 1000), Error);
}

TEST(StudentInput, IsPureNoiseAtTheLastTimestep) {
  const auto s = sd_schedule();
  torch::manual_seed(1);
  const auto x0 = torch::randn({3, 1, 4, 4}), eps = torch::randn({3, 1, 4, 4});
  const auto t = torch::tensor({999, 749, 0}, torch::kInt64);
  const auto x = student_input(s, x0, eps, t);
  EXPECT_TRUE(torch::equal(x[0], eps[0]));  // not sqrt(0.0047) x0 + ...
  EXPECT_TRUE(torch::allclose(x.slice(0, 1), diffusion::add_noise(s, x0, eps, t).slice(0, 1)));
  EXPECT_GT(s.alpha_bar(999), 0.004f);  // the schedule itself never reaches pure noise
}

// A hand-rolled DDIM rollout with CFG, in float64: x0 = (x - sqrt(1-a) e) / sqrt(a),
// x' = sqrt(a') x0 + sqrt(1-a') e.
TEST(TeacherTarget, EqualsAHandRolledGuidedDdimRollout) {
  const auto s = sd_schedule();
  auto config = models::UNetConfig::tiny_sd15();
  torch::manual_seed(0);
  models::UNet2DConditionModel unet(config);
  unet->eval();
  torch::NoGradGuard no_grad;
  const auto cond = torch::randn({1, 5, config.cross_attention_dim[0]});
  const auto uncond = torch::randn({1, 5, config.cross_attention_dim[0]});
  const double scale = 3.0;
  ConditionedModel model = [&](const torch::Tensor& x, const torch::Tensor& t,
                               const Conditioning& c) {
    models::UNetInputs in;
    in.sample = x;
    in.timestep = t;
    in.encoder_hidden_states = c.context;
    return unet->forward(in);
  };
  const auto teacher = guided(model, {cond}, {uncond}, scale);
  const auto x_t = torch::randn({3, 4, 16, 16});
  const auto t = torch::tensor({999, 499, 124}, torch::kInt64);  // on the 8-step trailing grid
  torch::Tensor t_prev;
  const auto target = teacher_target(teacher, PredictionType::kEpsilon, s, x_t, t, 2, 8, &t_prev);
  EXPECT_TRUE(torch::equal(t_prev, torch::tensor({749, 249, -1}, torch::kInt64)));

  for (int64_t b = 0; b < 3; ++b) {
    auto x = x_t.slice(0, b, b + 1).to(torch::kFloat64);
    const auto path = teacher_path(t[b].item<int64_t>(), 2, 8, 1000);
    for (size_t k = 0; k + 1 < path.size(); ++k) {
      if (path[k] < 0) break;
      const auto tt = torch::tensor({path[k]}, torch::kInt64);
      const auto xf = x.to(torch::kFloat32);
      const auto c = model(xf, tt, {cond}).to(torch::kFloat64);
      const auto u = model(xf, tt, {uncond}).to(torch::kFloat64);
      const auto e = u + scale * (c - u);
      const double a = s.alpha_bar(path[k]), ap = s.alpha_bar(path[k + 1]);
      const auto x0 = (x - std::sqrt(1 - a) * e) / std::sqrt(a);
      x = std::sqrt(ap) * x0 + std::sqrt(1 - ap) * e;
    }
    EXPECT_LT(test::relative_error(target.slice(0, b, b + 1), x), 1e-5) << "sample " << b;
  }
}

TEST(StudentJump, ConvertsEveryPredictionTypeAtEveryGridTimestep) {
  const auto s = sd_schedule();
  torch::manual_seed(2);
  for (int64_t steps : {1, 2, 4, 8}) {
    const auto grid = diffusion::trailing_timesteps(1000, steps);
    for (size_t i = 0; i < grid.size(); ++i) {
      const int64_t t = grid[i], t_prev = i + 1 < grid.size() ? grid[i + 1] : -1;
      const auto x0 = torch::randn({2, 1, 4, 4}), eps = torch::randn({2, 1, 4, 4});
      const auto tt = torch::full({2}, t, torch::kInt64),
                 tp = torch::full({2}, t_prev, torch::kInt64);
      const auto x_t = diffusion::add_noise(s, x0, eps, tt);
      const auto expected = diffusion::add_noise(
          x0, eps, torch::full({2}, t_prev < 0 ? s.final_alpha_cumprod() : s.alpha_bar(t_prev)));
      for (auto type :
           {PredictionType::kEpsilon, PredictionType::kSample, PredictionType::kVPrediction}) {
        const auto out = diffusion::model_target(type, x0, eps, s.alpha_bar(tt));
        torch::Tensor x0_hat;
        const auto got = student_jump(type, s, out, x_t, tt, tp, &x0_hat);
        EXPECT_LT((got - expected).abs().max().item<double>(), 5e-5)
            << diffusion::to_string(type) << " t " << t;
        EXPECT_LT((x0_hat - x0).abs().max().item<double>(), t == 999 ? 5e-4 : 5e-5)
            << diffusion::to_string(type) << " t " << t;
      }
    }
  }
}

TEST(GanLosses, MatchTheNonSaturatingClosedForms) {
  const auto zero = torch::zeros({4});
  EXPECT_NEAR(discriminator_loss(zero, zero).item<double>(), 2 * std::log(2.0), 1e-6);
  EXPECT_NEAR(generator_loss(zero).item<double>(), std::log(2.0), 1e-6);
  // -log sigmoid(3) - log(1 - sigmoid(-2)) and -log sigmoid(-2).
  const auto real = torch::full({2}, 3.0), fake = torch::full({2}, -2.0);
  const double sig3 = 1 / (1 + std::exp(-3.0)), sigm2 = 1 / (1 + std::exp(2.0));
  EXPECT_NEAR(discriminator_loss(real, fake).item<double>(), -std::log(sig3) - std::log(1 - sigm2),
              1e-6);
  EXPECT_NEAR(generator_loss(fake).item<double>(), -std::log(sigm2), 1e-6);
  // Extreme logits stay finite.
  EXPECT_TRUE(std::isfinite(
      discriminator_loss(torch::full({1}, -1e4), torch::full({1}, 1e4)).item<double>()));
}

TEST(RenoisingTimesteps, FollowTheirWeights) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto t = sample_timesteps({10, 250, 500, 750}, {5, 1, 1, 1}, 8000, gen);
  const double share10 = (t == 10).sum().item<double>() / 8000;
  EXPECT_NEAR(share10, 5.0 / 8, 0.03);
  EXPECT_NEAR((t == 750).sum().item<double>() / 8000, 1.0 / 8, 0.03);
  EXPECT_EQ(((t == 10) | (t == 250) | (t == 500) | (t == 750)).sum().item<int64_t>(), 8000);
  EXPECT_THROW(sample_timesteps({10, 250}, {1}, 4, gen), Error);
  EXPECT_THROW(sample_timesteps({10}, {-1}, 4, gen), Error);
}

TEST(Discriminator, CopiesTheTeachersEncoderAndRoutesGradients) {
  auto config = models::UNetConfig::tiny_sd15();
  torch::manual_seed(0);
  models::UNet2DConditionModel teacher(config);
  models::DiscriminatorHeadConfig head;
  head.channels = 32;
  head.blocks = 2;
  models::Discriminator disc(config, head);
  disc->init_backbone_from(teacher);
  for (auto& item : disc->backbone->named_parameters()) {
    EXPECT_EQ(item.key().rfind("up_blocks", 0), std::string::npos) << item.key();
    EXPECT_NE(item.key(), "conv_out.weight");
  }
  // The backbone computes the teacher's encoder.
  models::UNetInputs in;
  in.sample = torch::randn({2, 4, 16, 16});
  in.timestep = torch::tensor({999, 10}, torch::kInt64);
  in.encoder_hidden_states = torch::randn({2, 5, config.cross_attention_dim[0]});
  {
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::allclose(disc->features(in), teacher->encode(in)));
  }
  EXPECT_THROW(disc->backbone->forward(in), Error);

  auto f_t = disc->features(in);
  EXPECT_EQ(f_t.sizes(), (std::vector<int64_t>{2, 64, 8, 8}));
  auto in_prev = in;
  in_prev.sample = torch::randn({2, 4, 16, 16});
  auto f_prev = disc->features(in_prev);
  auto cond = disc->conditional(f_prev, f_t);
  EXPECT_EQ(cond.sizes(), (std::vector<int64_t>{2}));
  cond.sum().backward();
  EXPECT_TRUE(disc->conditional_head->out->weight.grad().defined());
  EXPECT_FALSE(disc->unconditional_head->out->weight.grad().defined());
  EXPECT_TRUE(disc->backbone->conv_in->weight.grad().defined());
  EXPECT_FALSE(teacher->conv_in->weight.grad().defined());  // a copy, not shared

  disc->zero_grad();
  disc->unconditional(disc->features(in_prev)).sum().backward();
  EXPECT_TRUE(disc->unconditional_head->out->weight.grad().defined());
  auto g = disc->conditional_head->out->weight.grad();
  EXPECT_TRUE(!g.defined() || g.abs().sum().item<double>() == 0);

  // A head too deep for the feature map is refused by name.
  head.blocks = 5;
  models::Discriminator deep(config, head);
  EXPECT_THROW(deep->unconditional(deep->features(in)), Error);
}

}  // namespace
}  // namespace lightning::distill
