// Training memory (issue 6, item 3): gradient checkpointing gives the gradients of the plain
// backward pass; a LoRA student that shares its teacher's weights trains without touching them;
// distillation of a tiny SDXL pipeline (two text encoders, pooled embeddings, size/crop time
// ids) on tar shards and on a cache, with checkpointing and a sharing LoRA student.
#include <filesystem>
#include <fstream>
#include <regex>

#include <ATen/autocast_mode.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/system.h"
#include "data/shards.h"
#include "dist/group.h"
#include "distill/memory.h"
#include "distill/recipe.h"
#include "distill/trainer.h"
#include "generate/pipeline.h"
#include "io/image_codecs.h"
#include "io/safetensors.h"
#include "models/discriminator.h"
#include "models/lora.h"
#include "models/model_loader.h"
#include "models/unet.h"
#include "nn/autocast.h"
#include "nn/layers.h"
#include "tests/test_util.h"
#include "train/cache.h"
#include "train/train_util.h"

namespace fs = std::filesystem;
using namespace lightning;
using ::testing::HasSubstr;

namespace {

models::UNetInputs sdxl_inputs(const models::UNetConfig& c) {
  models::UNetInputs in;
  in.sample = torch::randn({2, 4, 16, 24});
  in.timestep = torch::tensor({999, 500}, torch::kInt64);
  in.encoder_hidden_states = torch::randn({2, 7, c.cross_attention_dim[0]});
  in.text_embeds = torch::randn({2, 16});
  in.time_ids = torch::tensor(
      {{128.f, 192.f, 0.f, 0.f, 128.f, 192.f}, {150.f, 200.f, 11.f, 4.f, 128.f, 192.f}});
  return in;
}

// The gradients of a fixed loss with respect to `params` (copies).
std::vector<torch::Tensor> gradients(models::UNet2DConditionModel& unet,
                                     const models::UNetInputs& in,
                                     const std::vector<torch::Tensor>& params) {
  for (auto p : params)
    if (p.grad().defined()) p.mutable_grad().zero_();
  (unet->forward(in) - 0.5).square().mean().backward();
  std::vector<torch::Tensor> out;
  for (const auto& p : params)
    out.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return out;
}

void expect_same(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b,
                 double tolerance = 1e-5) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t k = 0; k < a.size(); ++k)
    EXPECT_LT(test::relative_error(a[k], b[k]), tolerance) << "parameter " << k;
}

std::vector<torch::Tensor> lora_tensors(torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (auto& [name, t] : models::lora_parameters(m))
    out.push_back(t);
  return out;
}

}  // namespace

TEST(GradientCheckpointing, SameGradientsAsThePlainBackwardPass) {
  torch::manual_seed(0);
  const auto config = models::UNetConfig::tiny_sdxl();
  models::UNet2DConditionModel unet(config);
  unet->train();
  const auto in = sdxl_inputs(config);
  const auto params = unet->parameters();
  const auto plain = gradients(unet, in, params);
  unet->gradient_checkpointing = true;
  expect_same(gradients(unet, in, params), plain);

  // LoRA on frozen base weights: nothing entering the first block requires grad (conv_in and
  // the time embeddings are frozen), and the adapters inside the blocks still get gradients.
  for (auto& p : unet->parameters())
    p.set_requires_grad(false);
  torch::manual_seed(1);
  models::attach_lora(*unet, {4, 4, models::LoRAConfig{}.exclude, std::nullopt});
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : models::lora_parameters(*unet))
      if (name.find("lora_up") != std::string::npos) t.normal_(0, 0.1);
  }
  const auto lora = lora_tensors(*unet);
  const auto recomputed = gradients(unet, in, lora);
  unet->gradient_checkpointing = false;
  expect_same(recomputed, gradients(unet, in, lora));
  double norm = 0;
  for (const auto& g : recomputed)
    norm += g.square().sum().item<double>();
  EXPECT_GT(norm, 0);

  // Under bf16 autocast, within one autocast region: the gradients agree to bf16's precision
  // (gradients shared by several blocks, such as the time embedding's, are summed in bf16 in
  // another order: single tensors up to 5 % apart, all of them together within 2 %). Autocast's
  // cache of weight casts is kept out of the checkpointed blocks: casts cached there without grad
  // mode made the plain pass that followed lose its graph.
  {
    const nn::AutocastScope autocast(nn::AutocastState::bf16());
    unet->gradient_checkpointing = true;
    const auto a = gradients(unet, in, lora);
    unet->gradient_checkpointing = false;
    const auto b = gradients(unet, in, lora);
    std::vector<torch::Tensor> fa, fb;
    for (size_t k = 0; k < a.size(); ++k) {
      fa.push_back(a[k].flatten());
      fb.push_back(b[k].flatten());
    }
    const auto all_a = torch::cat(fa), all_b = torch::cat(fb);
    EXPECT_LT((all_a - all_b).norm().item<double>() / all_b.norm().item<double>(), 2e-2);
  }

  // Under NoGradGuard (the frozen teacher) the flag changes nothing.
  unet->gradient_checkpointing = true;
  torch::NoGradGuard no_grad;
  const auto a = unet->forward(in);
  unet->gradient_checkpointing = false;
  EXPECT_TRUE(torch::equal(a, unet->forward(in)));
}

TEST(LoRAStudent, SharesTheTeachersWeightsAndLeavesThemUnchanged) {
  torch::manual_seed(0);
  const auto config = models::UNetConfig::tiny_sdxl();
  models::UNet2DConditionModel teacher(config);
  teacher->eval();
  for (auto& p : teacher->parameters())
    p.set_requires_grad(false);
  std::vector<torch::Tensor> before;
  for (const auto& p : teacher->parameters())
    before.push_back(p.clone());
  const auto in = sdxl_inputs(config);
  torch::Tensor want;
  {
    torch::NoGradGuard no_grad;
    want = teacher->forward(in);
  }

  auto student = train::unet_sharing_weights(teacher);
  const auto t_params = teacher->named_parameters(true);
  const auto s_params = student->named_parameters(true);
  ASSERT_EQ(t_params.size(), s_params.size());
  for (const auto& item : s_params) {
    EXPECT_EQ(item.value().data_ptr(), t_params[item.key()].data_ptr()) << item.key();
    EXPECT_FALSE(item.value().requires_grad()) << item.key();
  }
  {
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::equal(student->forward(in), want));
  }

  torch::manual_seed(1);
  models::attach_lora(*student, {4, 4, models::LoRAConfig{}.exclude, std::nullopt});
  EXPECT_EQ(models::count_lora(*teacher), 0u);
  const auto lora = lora_tensors(*student);
  torch::optim::Adam opt(lora, torch::optim::AdamOptions(1e-2));
  student->train();
  student->gradient_checkpointing = true;
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    (student->forward(in) - 1).square().mean().backward();
    opt.step();
  }
  {
    torch::NoGradGuard no_grad;
    EXPECT_FALSE(torch::equal(student->forward(in), want));  // the adapters trained
    EXPECT_TRUE(torch::equal(teacher->forward(in), want));   // the teacher did not move
  }
  models::merge_lora(*student);  // merging writes new tensors, not the shared ones
  auto params = teacher->parameters();
  for (size_t k = 0; k < params.size(); ++k)
    EXPECT_TRUE(torch::equal(params[k], before[k])) << k;

  // Before full training the student takes its own copy: updates no longer reach the teacher.
  train::own_weights(*student);
  for (const auto& item : student->named_parameters(true))
    EXPECT_NE(item.value().data_ptr(), t_params[item.key()].data_ptr()) << item.key();
  {
    torch::NoGradGuard no_grad;
    for (auto& p : student->parameters())
      p.add_(1.0);
  }
  for (size_t k = 0; k < params.size(); ++k)
    EXPECT_TRUE(torch::equal(params[k], before[k])) << k;
}

namespace {

// 2 shards of 6 random RGB images (128 x 128, 128 x 192 and 192 x 128 pixels) with captions.
std::string write_shards(const std::string& dir) {
  torch::manual_seed(5);
  const std::vector<std::pair<int64_t, int64_t>> sizes = {{128, 128}, {128, 192}, {192, 128}};
  const std::vector<std::string> captions = {"a red square", "a blue circle", "a green field"};
  int n = 0;
  for (int s = 0; s < 2; ++s) {
    data::TarShardWriter tar(fmt::format("{}/sdxl-{}.tar", dir, s));
    for (int i = 0; i < 6; ++i, ++n) {
      const auto [h, w] = sizes[static_cast<size_t>(n % 3)];
      const auto image = torch::randint(0, 256, {3, h, w}, torch::kInt64).to(torch::kUInt8);
      tar.add(fmt::format("{:04d}.png", n), io::encode_png(image));
      tar.add(fmt::format("{:04d}.txt", n), captions[static_cast<size_t>(n % 3)]);
    }
    tar.close();
  }
  return dir + "/sdxl-{0..1}.tar";
}

std::string sdxl_recipe(const std::string& data, const std::string& stages) {
  return fmt::format(R"(task = "distill"
[teacher]
model = "{}"
[data]
{}
[train]
seed = 1
batch_size = 2
gradient_checkpointing = true
[log]
log_every = 1
sample_every = 1000
checkpoint_every = 2
[sample]
per_class = 1
prompts = ["a red square"]
{})",
                     test::source_path("tests/fixtures/sdxl/tiny-sdxl-pipeline"), data, stages);
}

const char* kMseStage = R"([[stages]]
teacher_steps = 8
student_steps = 4
loss = "mse"
teacher_guidance = 3.0
mse_iterations = 2
learning_rate = 1e-4
)";

const char* kLoRAStage = R"([[stages]]
teacher_steps = 4
student_steps = 2
loss = "adversarial"
lora_rank = 4
lora_alpha = 4
conditional_iterations = 1
unconditional_iterations = 1
full_iterations = 1
learning_rate = 1e-4
head_channels = 16
head_blocks = 1
)";

void expect_finite_metrics(const std::string& path, int64_t lines) {
  std::ifstream in(path);
  int64_t n = 0;
  for (std::string line; std::getline(in, line); ++n) {
    const auto json = nlohmann::json::parse(line);
    for (const auto& [key, value] : json.items())
      if (value.is_number()) EXPECT_TRUE(std::isfinite(value.get<double>())) << key << ": " << line;
  }
  EXPECT_EQ(n, lines);
}

}  // namespace

// A LoRA student of an f16 teacher (frozen_weights_dtype = "f16") computing in float32: the same
// outputs and adapter gradients as the student of the teacher's float32 copy, and its linear
// layers keep the f16 weights for the backward pass, not float32 copies of them.
TEST(LoRAStudent, OfAnF16TeacherTrainsAsOfItsFloat32Copy) {
  torch::manual_seed(0);
  const auto config = models::UNetConfig::tiny_sdxl();
  models::UNet2DConditionModel wide(config);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : wide->parameters())
      p.copy_(p.to(torch::kHalf));  // f16-exact values, as loaded from an f16 file
  }
  auto narrow = models::UNet2DConditionModel(
      std::dynamic_pointer_cast<models::UNet2DConditionModelImpl>(wide->clone()));
  narrow->to(torch::kHalf);
  narrow->compute_dtype = torch::kFloat32;
  const auto in = sdxl_inputs(config);
  std::vector<std::vector<torch::Tensor>> grads;
  std::vector<torch::Tensor> outputs;
  for (auto* teacher : {&wide, &narrow}) {
    for (auto& p : (*teacher)->parameters())
      p.set_requires_grad(false);
    auto student = train::unet_sharing_weights(*teacher);
    torch::manual_seed(1);
    models::attach_lora(*student, {4, 4, models::LoRAConfig{}.exclude, torch::kFloat32});
    student->train();
    auto lora = lora_tensors(*student);
    for (const auto& t : lora)
      ASSERT_EQ(t.scalar_type(), torch::kFloat32);
    {
      torch::NoGradGuard no_grad;
      for (auto& t : lora)
        t.normal_(0, 0.1, c10::nullopt);  // away from the zero-initialised up: gradients everywhere
    }
    auto y = student->forward(in);
    (y - 1).square().mean().backward();
    outputs.push_back(y.detach());
    grads.emplace_back();
    for (const auto& t : lora)
      grads.back().push_back(t.grad().clone());
  }
  EXPECT_TRUE(torch::equal(outputs[0], outputs[1]));
  ASSERT_EQ(grads[0].size(), grads[1].size());
  for (size_t k = 0; k < grads[0].size(); ++k)
    EXPECT_TRUE(torch::allclose(grads[0][k], grads[1][k], 1e-5, 1e-7)) << k;

  // One layer: which backward keeps what.
  nn::Linear linear(8, 4);
  linear->to(torch::kHalf);
  for (auto& p : linear->parameters())
    p.set_requires_grad(false);
  const auto x = torch::randn({2, 3, 8}, torch::requires_grad());
  const std::string kept = linear->forward(x).grad_fn()->name();
  EXPECT_NE(kept.find("NarrowFrozenLinear"), std::string::npos) << kept;
  {
    // Under autocast the kept copy is autocast's bf16 one, as for float32 weights.
    const nn::AutocastScope autocast(nn::AutocastState::bf16());
    const std::string autocast_kept = linear->forward(x).grad_fn()->name();
    EXPECT_EQ(autocast_kept.find("NarrowFrozenLinear"), std::string::npos) << autocast_kept;
  }
  const auto wide_x = x.detach().requires_grad_();
  torch::linear(wide_x, linear->weight.to(torch::kFloat32), linear->bias.to(torch::kFloat32))
      .sum()
      .backward();
  const auto narrow_x = x.detach().requires_grad_();
  linear->forward(narrow_x).sum().backward();
  EXPECT_TRUE(torch::equal(wide_x.grad(), narrow_x.grad()));
}

// Under autocast a linear or convolution layer hands its frozen f16 weight to autocast as it is
// (no float32 copy first): the outputs and input gradients are those of float32 weights of the
// same values, in the autocast dtype.
TEST(LoRAStudent, FrozenF16WeightsUnderAutocastActAsTheirFloat32Values) {
  torch::manual_seed(0);
  nn::Linear linear(16, 8);
  nn::Conv2d conv(4, 6, 3, 1, 1);
  auto check = [](torch::nn::Module& layer, const std::function<torch::Tensor(torch::Tensor)>& f,
                  const torch::Tensor& x) {
    std::vector<torch::Tensor> outputs, grads;
    for (auto dtype : {torch::kFloat32, torch::kHalf}) {
      layer.to(dtype);
      for (auto& p : layer.parameters())
        p.set_requires_grad(false);
      const auto in = x.detach().requires_grad_();
      const nn::AutocastScope autocast(nn::AutocastState::bf16());
      auto y = f(in);
      EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
      y.to(torch::kFloat32).square().sum().backward();
      outputs.push_back(y.detach());
      grads.push_back(in.grad());
    }
    EXPECT_TRUE(torch::equal(outputs[0], outputs[1]));
    EXPECT_TRUE(torch::equal(grads[0], grads[1]));
  };
  {
    torch::NoGradGuard no_grad;
    for (auto& p : linear->parameters())
      p.copy_(p.to(torch::kHalf));  // f16-exact values
    for (auto& p : conv->parameters())
      p.copy_(p.to(torch::kHalf));
  }
  check(
      *linear, [&](torch::Tensor x) { return linear->forward(x); }, torch::randn({2, 5, 16}));
  check(
      *conv, [&](torch::Tensor x) { return conv->forward(x); }, torch::randn({2, 4, 6, 6}));
}

TEST(DistillSdxl, TinyPipelineOnShardsAndOnACache) {
  const auto dir = test::temp_dir();
  const auto shards = write_shards(dir);
  const auto data = fmt::format(
      "dataset = \"webdataset\"\nshards = \"{}\"\nshuffle_buffer = 4\nresolution = 128\n"
      "max_aspect = 1.5\n",
      shards);
  std::ofstream(dir + "/recipe.toml") << sdxl_recipe(data, std::string(kMseStage) + kLoRAStage);
  const auto recipe = distill::DistillRecipe::load(dir + "/recipe.toml");
  EXPECT_TRUE(recipe.gradient_checkpointing);
  distill::DistillOptions options;
  options.out_dir = dir + "/run";
  const auto result = distill::run_distillation(recipe, options);
  ASSERT_EQ(result.model_dirs.size(), 2u);
  expect_finite_metrics(dir + "/run/metrics.jsonl", 5);
  EXPECT_TRUE(fs::exists(dir + "/run/stage-2-4-to-2/lora.safetensors"));
  // The students are SDXL pipelines that generate at the trained size.
  const auto student = generate::load_model(result.model_dirs[1], {});
  ASSERT_TRUE(student.is_sdxl());
  generate::GenerateRequest request;
  request.prompts = {"a red square"};
  request.steps = 2;
  request.guidance_scale = 1.0;
  request.height = request.width = 128;
  const auto images = generate::generate(student, request);
  EXPECT_EQ(images.sizes(), (std::vector<int64_t>{1, 3, 128, 128}));
  EXPECT_TRUE(torch::isfinite(images).all().item<bool>());

  // The cache holds the pooled embeddings next to the context, and trains the same way.
  const auto teacher =
      generate::load_model(test::source_path("tests/fixtures/sdxl/tiny-sdxl-pipeline"), {});
  train::CacheOptions cache;
  cache.out_dir = dir + "/cache";
  cache.dtype = torch::kFloat32;
  cache.resolution = 128;
  cache.max_aspect = 1.5;
  const auto written = train::write_cache(teacher, "tiny-sdxl", recipe.source, cache);
  EXPECT_EQ(written.samples, 12);
  data::TarShardReader reader(dir + "/cache/cache-000000.tar");
  data::RawSample raw;
  ASSERT_TRUE(reader.next(raw, true));
  const auto sample = data::decode_sample(raw, "cache-000000.tar");
  ASSERT_TRUE(sample.cached.count("pooled"));
  {
    torch::NoGradGuard no_grad;
    const auto embeds = generate::encode_conditioning(teacher, {sample.caption});
    EXPECT_LT(test::relative_error(sample.cached.at("pooled"), embeds.pooled[0]), 1e-6);
    EXPECT_LT(test::relative_error(sample.cached.at("context"), embeds.context[0]), 1e-6);
  }
  const auto cache_data =
      fmt::format("dataset = \"cache\"\ndir = \"{}/cache\"\nshuffle_buffer = 4\n", dir);
  std::ofstream(dir + "/cached.toml") << sdxl_recipe(cache_data, kMseStage);
  options.out_dir = dir + "/cached-run";
  const auto cached =
      distill::run_distillation(distill::DistillRecipe::load(dir + "/cached.toml"), options);
  ASSERT_EQ(cached.model_dirs.size(), 1u);
  expect_finite_metrics(dir + "/cached-run/metrics.jsonl", 2);

  // The cache is checked against the encoders that read it (its probe): the same model with f16
  // weights passes; another VAE scaling, or another text encoder, is refused naming it.
  const auto fixture = test::source_path("tests/fixtures/sdxl/tiny-sdxl-pipeline");
  models::ModelLoadOptions half;
  half.weights_dtype = torch::kHalf;
  EXPECT_NO_THROW(train::read_cache_index(dir + "/cache", generate::load_model(fixture, half)));
  auto rescaled = generate::load_model(fixture, {});
  rescaled.vae->config.scaling_factor *= 4;
  try {
    train::read_cache_index(dir + "/cache", rescaled);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("cache.json: this model's VAE differs from the one the cache "
                                    "was made with (tiny-sdxl): its output on the probe ('x') "
                                    "differs by 300.0%"));
  }
  auto retrained = generate::load_model(fixture, {});
  {
    torch::NoGradGuard no_grad;
    for (auto& p : retrained.text_encoder_2->parameters())
      p.mul_(1.2);
  }
  try {
    train::read_cache_index(dir + "/cache", retrained);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("this model's text encoder differs"));
  }
}

TEST(SdxlLightningRecipe, FollowsThePaper) {
  const auto r = distill::DistillRecipe::load(test::source_path("recipes/sdxl-lightning.toml"));
  ASSERT_EQ(r.stages.size(), 5u);
  const std::vector<std::pair<int64_t, int64_t>> steps = {
      {128, 32}, {32, 8}, {8, 4}, {4, 2}, {2, 1}};
  for (size_t i = 0; i < steps.size(); ++i) {
    const auto& s = r.stages[i];
    EXPECT_EQ(s.teacher_steps, steps[i].first);
    EXPECT_EQ(s.student_steps, steps[i].second);
    if (i == 0) {  // MSE with the guided teacher, full UNet
      EXPECT_EQ(s.loss, "mse");
      EXPECT_EQ(s.teacher_guidance, 6.0);
      EXPECT_EQ(s.learning_rate, 1e-5);
      EXPECT_EQ(s.adam_beta1, 0.9);
      EXPECT_EQ(s.lora_rank, 0);
      continue;
    }
    EXPECT_EQ(s.loss, "adversarial");
    EXPECT_LE(s.teacher_guidance, 1.0);
    EXPECT_EQ(s.lora_rank, 64);
    EXPECT_EQ(s.learning_rate, 1e-6);
    EXPECT_EQ(s.full_learning_rate, 5e-7);
    EXPECT_EQ(s.discriminator_learning_rate, 1e-6);
    EXPECT_EQ(s.adam_beta1, 0.0);
    EXPECT_EQ(s.adam_beta2, 0.99);
    EXPECT_EQ(s.discriminator_beta1, 0.0);
    EXPECT_EQ(s.discriminator_beta2, 0.99);
    EXPECT_GT(s.conditional_iterations, 0);
    EXPECT_GT(s.unconditional_iterations, 0);
    EXPECT_GT(s.full_iterations, 0);
    if (s.student_steps <= 2) EXPECT_EQ(s.timesteps, (std::vector<int64_t>{999, 749, 499, 249}));
  }
  const auto& one = r.stages.back();
  EXPECT_EQ(one.prediction_type, diffusion::PredictionType::kSample);
  EXPECT_GT(one.x0_warmup_iterations, 0);
  EXPECT_EQ(one.renoise_timesteps, (std::vector<int64_t>{10, 250, 500, 750}));
  EXPECT_EQ(one.renoise_weights, (std::vector<double>{1, 1, 1, 1}));
  EXPECT_EQ(one.renoise_weights_late, (std::vector<double>{5, 1, 1, 1}));
  EXPECT_TRUE(r.gradient_checkpointing);
  EXPECT_EQ(r.resolution, 1024);
}

// `lightning bench --distill` runs the paper's recipe, every stage and phase, on a random
// pipeline (full size on a big machine; the tiny preset here) and reports each phase.
TEST(SdxlLightningRecipe, BenchDryRunsEveryPhase) {
  const auto dir = test::temp_dir();
  const auto recipe_path = test::source_path("recipes/sdxl-lightning.toml");
  auto run = test::run_lightning("bench --distill tiny-sdxl --recipe " + recipe_path +
                                 " --image 32 --iterations 2 --threads 2 --work-dir " + dir);
  ASSERT_EQ(run.exit_code, 0) << run.output;
  // The table's rows: stage, phase, iterations, then five numbers.
  std::vector<std::string> rows;
  const std::regex row(
      R"(\| (\d+ [\w-]+) \| (\w+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|)");
  for (std::sregex_iterator it(run.output.begin(), run.output.end(), row), end; it != end; ++it) {
    rows.push_back((*it)[1].str() + " " + (*it)[2].str() + " " + (*it)[3].str());
    EXPECT_GT(std::stod((*it)[5].str()), 0.0) << it->str();
    EXPECT_GT(std::stod((*it)[7].str()), 0.0) << it->str();  // peak memory, later iterations
    EXPECT_GT(std::stod((*it)[8].str()), 0.0) << it->str();  // and the first
  }
  std::vector<std::string> expected;
  const auto recipe = distill::DistillRecipe::load(recipe_path);
  for (size_t s = 0; s < recipe.stages.size(); ++s)
    for (const auto& phase : recipe.stages[s].phases())
      if (phase.iterations > 0)
        expected.push_back(std::to_string(s + 1) + " " + recipe.stages[s].name + " " + phase.name +
                           " 2");
  EXPECT_EQ(rows, expected) << run.output;
  EXPECT_TRUE(fs::exists(dir + "/run/stage-5-2-to-1/model/model_index.json"));
  EXPECT_TRUE(fs::exists(dir + "/run/stage-4-4-to-2/lora.safetensors"));
  EXPECT_FALSE(fs::exists(dir + "/run/checkpoint"));
  // The pipelines the bench wrote went once loaded as teachers (7 GB each at SDXL size).
  EXPECT_FALSE(fs::exists(dir + "/teacher"));
  EXPECT_FALSE(fs::exists(dir + "/run/stage-4-4-to-2/model"));
  // A model directory of the user's is never deleted, even inside --work-dir.
  fs::copy(dir + "/run/stage-5-2-to-1/model", dir + "/mine", fs::copy_options::recursive);
  auto own = test::run_lightning("bench --distill " + dir + "/mine --recipe " + recipe_path +
                                 " --image 32 --iterations 1 --threads 2 --work-dir " + dir);
  EXPECT_EQ(own.exit_code, 0) << own.output;
  EXPECT_TRUE(fs::exists(dir + "/mine/model_index.json")) << own.output;

  auto bad = test::run_lightning("bench --distill sd3 --recipe " + recipe_path);
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_NE(bad.output.find("--distill sd3: not a preset (sdxl, tiny-sdxl) or a model directory"),
            std::string::npos)
      << bad.output;
}

// The memory estimate per phase: exact against the models' own counts on the tiny pipeline, and
// the table of docs/benchmarks.md for SDXL's shapes (uninitialised: nothing becomes resident).
// `--stages` dry-runs part of a recipe (a stage's memory and speed without the ones before it),
// numbered as in the recipe; a stage the recipe lacks, or a list out of order, is named.
TEST(SdxlLightningRecipe, BenchRunsTheChosenStagesOnly) {
  const auto dir = test::temp_dir();
  const auto recipe_path = test::source_path("recipes/sdxl-lightning.toml");
  const auto bench = "bench --distill tiny-sdxl --recipe " + recipe_path +
                     " --image 32 --iterations 2 --threads 2 --work-dir " + dir + " --stages ";
  auto run = test::run_lightning(bench + "2,5");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  std::vector<std::string> rows;  // stage, phase, iterations: a row per phase
  const std::regex row(R"(\| (\d+ [\w-]+) \| (\w+) \| (\d+) \|)");
  for (std::sregex_iterator it(run.output.begin(), run.output.end(), row), end; it != end; ++it)
    rows.push_back((*it)[1].str() + " " + (*it)[2].str() + " " + (*it)[3].str());
  EXPECT_EQ(rows, (std::vector<std::string>{"2 32-to-8 conditional 2", "2 32-to-8 unconditional 2",
                                            "2 32-to-8 full 2", "5 2-to-1 x0_warmup 2",
                                            "5 2-to-1 conditional 2", "5 2-to-1 unconditional 2",
                                            "5 2-to-1 full 2"}))
      << run.output;

  const auto missing = test::run_lightning(bench + "6");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("--stages 6: " + recipe_path + " has stages 1 to 5"),
            std::string::npos)
      << missing.output;
  const auto backwards = test::run_lightning(bench + "3,2");
  EXPECT_NE(backwards.exit_code, 0);
  EXPECT_NE(backwards.output.find("in increasing order (2 after 3)"), std::string::npos)
      << backwards.output;
}

TEST(SdxlLightningRecipe, MemoryEstimateOfEachPhase) {
  const auto recipe =
      distill::DistillRecipe::load(test::source_path("recipes/sdxl-lightning.toml"));
  auto count = [](torch::nn::Module& m) {
    double n = 0;
    for (const auto& p : m.parameters())
      n += static_cast<double>(p.numel());
    return n;
  };
  {
    auto tiny =
        generate::load_model(test::source_path("tests/fixtures/sdxl/tiny-sdxl-pipeline"), {});
    const auto phases = distill::estimate_phase_memory(recipe, tiny);
    ASSERT_EQ(phases.size(), 14u);
    // The recipe holds frozen weights in f16: 2 bytes each.
    ASSERT_EQ(recipe.frozen_weights_dtype, "f16");
    const double frozen = 2 * (count(*tiny.unet) + count(*tiny.text_encoder) +
                               count(*tiny.text_encoder_2) + count(*tiny.vae));
    const auto& stage = recipe.stages[1];
    models::Discriminator disc(tiny.unet->config, stage.head);
    auto student = models::UNet2DConditionModel(
        std::dynamic_pointer_cast<models::UNet2DConditionModelImpl>(tiny.unet->clone()));
    models::attach_lora(
        *student, {stage.lora_rank, stage.lora_alpha, models::LoRAConfig{}.exclude, std::nullopt});
    double lora = 0;
    for (const auto& [name, t] : models::lora_parameters(*student))
      lora += static_cast<double>(t.numel());
    EXPECT_EQ(phases[0].phase, "mse");
    EXPECT_DOUBLE_EQ(phases[0].bytes, frozen + 16 * count(*tiny.unet));
    EXPECT_EQ(phases[1].phase, "conditional");
    EXPECT_DOUBLE_EQ(phases[1].bytes, frozen + 16 * lora + 16 * count(*disc));
    EXPECT_EQ(phases[3].phase, "full");
    EXPECT_DOUBLE_EQ(phases[3].bytes, frozen + 16 * count(*tiny.unet) + 16 * count(*disc));
    EXPECT_EQ(phases[10].phase, "x0_warmup");
    EXPECT_DOUBLE_EQ(phases[10].bytes, frozen + 16 * lora + 4 * count(*disc));
  }
  // SDXL: docs/benchmarks.md's table (GB, weights and optimiser state before activations).
  generate::TextToImageModel sdxl;
  sdxl.unet = models::make_unet_uninitialised(models::UNetConfig::sdxl());
  sdxl.text_encoder = models::make_clip_text_uninitialised(models::CLIPTextConfig::sdxl_clip_l());
  sdxl.text_encoder_2 = models::make_clip_text_uninitialised(models::CLIPTextConfig::sdxl_clip_g());
  sdxl.vae = models::make_vae_uninitialised(models::VAEConfig::sdxl());
  const auto phases = distill::estimate_phase_memory(recipe, sdxl);
  ASSERT_EQ(phases.size(), 14u);
  EXPECT_NEAR(phases[0].bytes / 1e9, 48.0, 0.1);   // stage 1 mse
  EXPECT_NEAR(phases[1].bytes / 1e9, 31.0, 0.1);   // stage 2 conditional (LoRA)
  EXPECT_NEAR(phases[3].bytes / 1e9, 69.0, 0.1);   // stage 2 full
  EXPECT_NEAR(phases[10].bytes / 1e9, 15.3, 0.1);  // stage 5 x0_warmup
  // The same recipe with float32 frozen weights.
  auto f32 = recipe;
  f32.frozen_weights_dtype = "f32";
  const auto wide = distill::estimate_phase_memory(f32, sdxl);
  EXPECT_NEAR(wide[0].bytes / 1e9, 55.0, 0.1);
  EXPECT_NEAR(wide[1].bytes / 1e9, 37.9, 0.1);
  EXPECT_NEAR(wide[3].bytes / 1e9, 75.9, 0.1);
  EXPECT_NEAR(wide[10].bytes / 1e9, 22.2, 0.1);
}

// The start-up check names whose memory a phase exceeds: this machine's (with its swap), or the
// GPU's. Without a GPU build the GPU's memory is unknown and nothing is refused.
TEST(SdxlLightningRecipe, MemoryCheckNamesTheMemoryItExceeds) {
  distill::MemoryCheck check;
  check.largest = {1, "full", 75.9e9};
  check.stage_name = "32-to-8";
  check.available = 24e9;
  EXPECT_EQ(check.describe(),
            "stage 2 (32-to-8) full holds about 75.9 GB of weights and optimiser state before "
            "activations, more than this machine's 24.0 GB of memory");
  check.swap = 62e9;
  EXPECT_TRUE(check.exceeds());
  EXPECT_FALSE(check.exceeds_with_swap());
  check.memory_of = "cuda:1's";
  check.available = 42.9e9;
  check.swap = 0;
  EXPECT_TRUE(check.exceeds_with_swap());
  EXPECT_EQ(check.describe(),
            "stage 2 (32-to-8) full holds about 75.9 GB of weights and optimiser state before "
            "activations, more than cuda:1's 42.9 GB of memory");

  const auto recipe =
      distill::DistillRecipe::load(test::source_path("recipes/sdxl-lightning.toml"));
  const auto tiny =
      generate::load_model(test::source_path("tests/fixtures/sdxl/tiny-sdxl-pipeline"), {});
  const auto cpu = distill::check_phase_memory(recipe, tiny, torch::kCPU);
  EXPECT_EQ(cpu.memory_of, "this machine's");
  EXPECT_EQ(cpu.available, static_cast<double>(total_memory_bytes()));
  const auto gpu = distill::check_phase_memory(recipe, tiny, torch::Device("cuda:1"));
  EXPECT_EQ(gpu.memory_of, "cuda:1's");
  EXPECT_EQ(gpu.available, static_cast<double>(cuda_total_memory_bytes(1)));
  EXPECT_EQ(gpu.swap, 0);
}

TEST(SdxlLightningRecipe, BenchRefusesAFullSizeDryRunThatDoesNotFit) {
  if (total_memory_bytes() + total_swap_bytes() > 69e9)
    GTEST_SKIP() << "this machine could hold the dry run (in swap, perhaps)";
  const auto run = test::run_lightning("bench --distill sdxl --recipe " +
                                       test::source_path("recipes/sdxl-lightning.toml"));
  EXPECT_EQ(run.exit_code, 1) << run.output;
  EXPECT_NE(run.output.find("bench --distill sdxl: stage 2 (32-to-8) full holds about 69.0 GB of "
                            "weights and optimiser state before activations, more than this "
                            "machine's"),
            std::string::npos)
      << run.output;
}

// Each head block halves the encoder's features: SDXL's encoder quarters the latents, so 3
// blocks need 8x8 features, 29 latents, 232 pixels. Smaller images are refused before any work
// (a full-size dry run at 128² used to fail 12 minutes in, at its first adversarial phase).
TEST(SdxlLightningRecipe, ImagesTooSmallForTheDiscriminatorHeadAreRefusedAtOnce) {
  const auto sdxl = models::UNetConfig::sdxl();
  models::DiscriminatorHeadConfig head;
  head.blocks = 3;
  EXPECT_EQ(models::smallest_discriminator_input(sdxl, head), 29);
  head.blocks = 2;
  EXPECT_EQ(models::smallest_discriminator_input(sdxl, head), 13);
  head.blocks = 0;
  EXPECT_EQ(models::smallest_discriminator_input(sdxl, head), 1);
  // The rule against the head itself: 29 latents pass the encoder's halvings and 3 blocks,
  // 28 do not (the encoder rounds up: 29 -> 15 -> 8 features; 28 -> 7).
  head.blocks = 3;
  head.channels = 8;
  models::DiscriminatorHead net(4, head);
  EXPECT_NO_THROW(net->forward(torch::zeros({1, 4, 8, 8})));
  EXPECT_THROW(net->forward(torch::zeros({1, 4, 7, 7})), Error);

  const auto recipe = test::source_path("recipes/sdxl-lightning.toml");
  const auto run = test::run_lightning("bench --distill sdxl --image 128 --recipe " + recipe);
  EXPECT_EQ(run.exit_code, 2) << run.output;
  EXPECT_NE(run.output.find("sdxl-lightning.toml [[stages]] #2: 128-pixel image sides leave too "
                            "few features for head_blocks = 3 (each block halves them): use "
                            "images of at least 232 pixels a side"),
            std::string::npos)
      << run.output;
}

TEST(MixedPrecision, Bf16AutocastTrainsCloseToFloat32) {
  const auto dir = test::temp_dir();
  auto run = [&](const std::string& name, const std::string& extra) {
    std::ofstream(dir + "/" + name + ".toml") << fmt::format(R"(task = "distill"
[teacher]
model = "fmnist-teacher"
[train]
seed = 2
batch_size = 4
{}
[log]
log_every = 1
sample_every = 1000
checkpoint_every = 1000
[[stages]]
teacher_steps = 4
student_steps = 2
loss = "mse"
mse_iterations = 3
learning_rate = 1e-4
)",
                                                             extra);
    distill::DistillOptions options;
    options.out_dir = dir + "/" + name;
    options.models_root = test::source_path("models");
    distill::run_distillation(distill::DistillRecipe::load(dir + "/" + name + ".toml"), options);
    std::vector<double> losses;
    std::ifstream in(dir + "/" + name + "/metrics.jsonl");
    for (std::string line; std::getline(in, line);)
      losses.push_back(nlohmann::json::parse(line).at("loss_mse").get<double>());
    return losses;
  };
  const auto f32 = run("f32", "");
  const auto bf16 = run("bf16", "mixed_precision = \"bf16\"\ngradient_checkpointing = true");
  ASSERT_EQ(f32.size(), 3u);
  ASSERT_EQ(bf16.size(), 3u);
  // The distance to the teacher's 2-step DDIM target: bf16 rounding of both networks' outputs,
  // amplified by DDIM at high noise (x0 = (x - sqrt(1 - ab) eps) / sqrt(ab)), adds about 40 % on
  // this small pixel-space model at its first steps (0.0133 against 0.0094).
  for (size_t i = 0; i < f32.size(); ++i) {
    EXPECT_TRUE(std::isfinite(bf16[i]));
    EXPECT_NE(bf16[i], f32[i]) << "bf16 autocast changed nothing at step " << i + 1;
    EXPECT_NEAR(bf16[i], f32[i], 0.6 * f32[i]) << "step " << i + 1;
  }
  // The student trained (float32 weights, updated from bf16 forward passes).
  const auto file = "/stage-1-4-to-2/model/unet/diffusion_pytorch_model.safetensors";
  const auto student = io::load_safetensors(dir + "/bf16" + file);
  const auto teacher = io::load_safetensors(
      test::source_path("models/fmnist-teacher/unet/diffusion_pytorch_model.safetensors"));
  double moved = 0;
  for (const auto& [name, t] : student)
    moved +=
        (t.to(torch::kFloat32) - teacher.at(name).to(torch::kFloat32)).abs().sum().item<double>();
  EXPECT_GT(moved, 0);
  EXPECT_FALSE(at::autocast::is_cpu_enabled());  // the trainer leaves autocast as it was

  std::ofstream(dir + "/bad.toml") << "task = \"distill\"\n[teacher]\nmodel = \"x\"\n[train]\n"
                                      "mixed_precision = \"fp16\"\n[[stages]]\nteacher_steps = 2\n"
                                      "student_steps = 1\nmse_iterations = 1\n";
  try {
    distill::DistillRecipe::load(dir + "/bad.toml");
    ADD_FAILURE() << "fp16 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("mixed_precision"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("'fp16' is not one of no, bf16"), std::string::npos)
        << e.what();
  }
}

TEST(Cli, DistillDeviceIsCheckedBeforeTraining) {
  const auto recipe = test::source_path("recipes/quick-distill.toml");
  const auto dir = test::temp_dir();
  // Several ranks on GPUs need CUDA, NCCL and a GPU each; refused before any rank starts.
  auto ranks = test::run_lightning("distill --recipe " + recipe + " --out " + dir +
                                   "/a --nproc 2 --device cuda");
  const char* expected =
      !torch::cuda::is_available()      ? "--device cuda: this build of libtorch has no CUDA device"
      : !dist::nccl_available()         ? "--device cuda with several ranks needs NCCL"
      : torch::cuda::device_count() < 2 ? "--nproc = 2: this machine has 1 CUDA device(s)"
                                        : nullptr;
  if (expected) {
    EXPECT_EQ(ranks.exit_code, 2) << ranks.output;
    EXPECT_NE(ranks.output.find(expected), std::string::npos) << ranks.output;
  }
  if (torch::cuda::is_available()) {  // an explicit GPU does not say which rank gets it
    auto indexed = test::run_lightning("distill --recipe " + recipe + " --out " + dir +
                                       "/c --nproc 2 --device cuda:0");
    EXPECT_EQ(indexed.exit_code, 2) << indexed.output;
    EXPECT_NE(indexed.output.find("each trains on cuda:LOCAL_RANK; pass --device cuda"),
              std::string::npos)
        << indexed.output;
  }
  EXPECT_FALSE(fs::exists(dir + "/a/metrics.jsonl")) << ranks.output;
  if (!torch::cuda::is_available()) {  // a CPU build or machine says so, naming the flag
    auto one =
        test::run_lightning("distill --recipe " + recipe + " --out " + dir + "/b --device cuda");
    EXPECT_NE(one.exit_code, 0) << one.output;
    EXPECT_NE(one.output.find("cuda"), std::string::npos) << one.output;
    EXPECT_FALSE(fs::exists(dir + "/b/metrics.jsonl")) << one.output;
  }
}
