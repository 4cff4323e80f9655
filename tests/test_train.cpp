// Teacher training: the quick recipe end to end (metrics, plots, samples, checkpoint, model),
// exact resumption, and recipe errors.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "generate/pipeline.h"
#include "io/image.h"
#include "io/safetensors.h"
#include "io/toml.h"
#include "test_util.h"
#include "train/teacher.h"
#include "train/train_util.h"

namespace fs = std::filesystem;
using namespace lightning;

namespace {

std::string quick_recipe() {
  return test::source_path("recipes/quick-teacher.toml");
}
std::string vocab() {
  return test::source_path("data/clip/bpe_simple_vocab_16e6.txt.gz");
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);)
    lines.push_back(nlohmann::json::parse(line));
  return lines;
}

}  // namespace

TEST(Train, QuickRecipeWritesEverythingAndResumesExactly) {
  auto recipe = train::TeacherRecipe::load(quick_recipe());
  recipe.sample_steps = 2;  // keep the grids cheap
  const auto dir = test::temp_dir();

  // Uninterrupted 20 steps.
  train::TrainOptions full{dir + "/full", vocab(), false, 20, std::nullopt};
  const auto model_dir = train::train_teacher(recipe, full);
  auto metrics = read_jsonl(dir + "/full/metrics.jsonl");
  ASSERT_EQ(metrics.size(), 4u);  // log_every = 5
  for (size_t i = 0; i < metrics.size(); ++i) {
    EXPECT_EQ(metrics[i]["step"], 5 * (i + 1));
    EXPECT_TRUE(std::isfinite(metrics[i]["loss"].get<double>()));
    EXPECT_GT(metrics[i]["images_per_s"].get<double>(), 0);
  }
  EXPECT_LT(metrics.back()["loss"].get<double>(), metrics.front()["loss"].get<double>());
  auto plot = io::read_png(dir + "/full/loss.png");
  EXPECT_EQ(plot.pixels.size(0), 3);
  EXPECT_LT(plot.pixels.to(torch::kFloat).mean().item<double>(), 254.5);  // something was drawn
  auto grid = io::read_png(dir + "/full/samples/step_000020.png");
  EXPECT_EQ(grid.pixels.size(1), 10 * 32 + 11 * 2);  // 10 classes x per_class 2, padding 2
  EXPECT_TRUE(fs::exists(dir + "/full/checkpoint/state.json"));
  EXPECT_TRUE(fs::exists(dir + "/full/recipe.toml"));

  // The saved model loads and generates.
  auto model = generate::load_model(model_dir, {});
  EXPECT_EQ(model.text_encoder->config.vocab_size,
            static_cast<int64_t>(model.tokenizer->vocab().size()));
  generate::GenerateRequest req;
  req.prompts = {"a photo of a sneaker"};
  req.steps = 2;
  auto image = generate::generate(model, req);
  EXPECT_EQ(image.sizes(), (std::vector<int64_t>{1, 1, 32, 32}));
  EXPECT_TRUE(torch::isfinite(image).all().item<bool>());

  // Stopped after 7 steps, then resumed to 20: the same weights as the uninterrupted run.
  train::TrainOptions half{dir + "/split", vocab(), false, 20, 7};
  EXPECT_EQ(train::train_teacher(recipe, half), "");
  EXPECT_FALSE(fs::exists(dir + "/split/model"));
  train::TrainOptions resume{dir + "/split", vocab(), true, 20, std::nullopt};
  train::train_teacher(recipe, resume);
  io::SafetensorsFile a(dir + "/full/checkpoint/ema_unet.safetensors");
  io::SafetensorsFile b(dir + "/split/checkpoint/ema_unet.safetensors");
  for (const auto& name : a.keys())
    EXPECT_TRUE(torch::equal(b.get(name), a.get(name))) << name;
  EXPECT_EQ(read_jsonl(dir + "/split/metrics.jsonl").size(), 4u);

  // A finished run is not overwritten without --resume.
  EXPECT_THROW(train::train_teacher(recipe, full), UsageError);
}

TEST(Ema, AveragesWithDiffusersWarmup) {
  EXPECT_DOUBLE_EQ(train::ema_decay_at(0.999, 0), 0.1);  // (1 + 0) / (10 + 0)
  EXPECT_DOUBLE_EQ(train::ema_decay_at(0.999, 10), 11.0 / 20.0);
  EXPECT_DOUBLE_EQ(train::ema_decay_at(0.9, 1000), 0.9);
  auto source = torch::tensor({1.0f, 3.0f}).requires_grad_(true);
  std::vector<torch::Tensor> ema = {torch::tensor({3.0f, 3.0f})};
  train::ema_update(ema, {source}, 0.75);
  EXPECT_TRUE(torch::allclose(ema[0], torch::tensor({2.5f, 3.0f})));
  EXPECT_FALSE(ema[0].requires_grad());
  EXPECT_THROW(train::ema_update(ema, {}, 0.5), Error);
}

TEST(Train, RecipeErrorsNameTheKey) {
  const auto base = io::read_toml_file(quick_recipe());
  auto bad = base;
  bad["train"]["learning_rat"] = 1e-3;
  try {
    train::TeacherRecipe::from_json(bad, "r.toml");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("learning_rat"), std::string::npos) << e.what();
  }
  bad = base;
  bad["text_encoder"]["vocab_size"] = 100;
  EXPECT_THROW(train::TeacherRecipe::from_json(bad, "r.toml"), Error);
  bad = base;
  bad["unet"]["cross_attention_dim"] = 48;
  EXPECT_THROW(train::TeacherRecipe::from_json(bad, "r.toml"), Error);
  bad = base;
  bad["train"]["lr_schedule"] = "linear";
  EXPECT_THROW(train::TeacherRecipe::from_json(bad, "r.toml"), Error);
}

TEST(Toml, ConvertsTypesAndNamesSyntaxErrors) {
  auto j = io::parse_toml("a = 1\nb = 2.5\nc = \"x\"\nd = [1, 2]\n[t]\ne = true\n", "x.toml");
  EXPECT_EQ(j["a"], 1);
  EXPECT_TRUE(j["a"].is_number_integer());
  EXPECT_DOUBLE_EQ(j["b"].get<double>(), 2.5);
  EXPECT_EQ(j["c"], "x");
  EXPECT_EQ(j["d"], nlohmann::json({1, 2}));
  EXPECT_EQ(j["t"]["e"], true);
  try {
    io::parse_toml("a = 1\nb = = 2\n", "bad.toml");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.toml:2:"), std::string::npos) << e.what();
  }
}

TEST(Cli, TrainRefusesToOverwriteARun) {
  const auto dir = test::temp_dir();
  fs::create_directories(dir + "/run/checkpoint");
  auto r = test::run_lightning("train --recipe " + quick_recipe() + " --out " + dir + "/run");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--resume"), std::string::npos) << r.output;
}
