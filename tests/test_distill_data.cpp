// Distillation on streamed data: WebDataset tar shards of Fashion-MNIST images of several aspect
// ratios (PNG, JPEG and WebP, with a corrupt record and a non-UTF-8 caption among them), through
// aspect-ratio buckets; a run stopped and resumed is bit-identical to the straight run; two ranks
// read their own shards and save both data positions.
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/fashion_mnist.h"
#include "data/shards.h"
#include "distill/recipe.h"
#include "distill/trainer.h"
#include "generate/pipeline.h"
#include "io/image_codecs.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "tests/test_util.h"
#include "train/cache.h"

namespace fs = std::filesystem;
using namespace lightning;
using ::testing::HasSubstr;

namespace {

// 4 shards of 10 samples from the test split: square, wide (black bars left and right) and tall
// images in turn, as PNG, JPEG and WebP; shard 2 also holds a corrupt image and a Latin-1 caption.
std::string write_fmnist_shards(const std::string& dir) {
  const auto fm = data::load_fashion_mnist(data::Split::kTest);
  int64_t n = 0;
  for (int s = 0; s < 4; ++s) {
    data::TarShardWriter tar(fmt::format("{}/fm-{:02d}.tar", dir, s));
    for (int i = 0; i < 10; ++i, ++n) {
      auto image = fm.images[n].unsqueeze(0);                               // [1, 28, 28]
      if (n % 3 == 1) image = torch::constant_pad_nd(image, {8, 8, 0, 0});  // 28 x 44
      if (n % 3 == 2) image = torch::constant_pad_nd(image, {0, 0, 8, 8});  // 44 x 28
      const std::string key = fmt::format("{:06d}", n);
      const std::string caption =
          data::caption(fm.labels[n].item<int64_t>(), static_cast<size_t>(n % 4));
      if (n % 3 == 0) tar.add(key + ".png", io::encode_png(image));
      if (n % 3 == 1) tar.add(key + ".jpg", io::encode_jpeg(image, 95));
      if (n % 3 == 2) tar.add(key + ".webp", io::encode_webp_lossless(image));
      tar.add(key + ".txt", caption);
    }
    if (s == 2) {
      tar.add("bad-image.png", "\x89PNG\r\n\x1a\nnot really");
      tar.add("bad-image.txt", "a broken file");
      tar.add("bad-caption.png", io::encode_png(fm.images[0].unsqueeze(0)));
      tar.add("bad-caption.txt", std::string("a caf\xe9 sneaker", 14));
    }
    tar.close();
  }
  return dir + "/fm-{00..03}.tar";
}

std::string webdataset_section(const std::string& shards) {
  return fmt::format(
      "dataset = \"webdataset\"\nshards = \"{}\"\nshuffle_buffer = 8\nmax_aspect = 2.0\n", shards);
}

std::string recipe_text(const std::string& shards, const std::string& data = "") {
  return fmt::format(R"(task = "distill"
[teacher]
model = "fmnist-teacher"
[data]
{}
[train]
seed = 3
batch_size = 4
[log]
log_every = 1
sample_every = 1000
checkpoint_every = 3
[sample]
per_class = 1
prompts = ["a photo of a sneaker", "a photo of a bag"]
[[stages]]
teacher_steps = 4
student_steps = 2
loss = "mse"
mse_iterations = 4
learning_rate = 1e-4
[[stages]]
teacher_steps = 2
student_steps = 1
loss = "adversarial"
conditional_iterations = 3
unconditional_iterations = 3
learning_rate = 1e-4
head_channels = 16
)",
                     data.empty() ? webdataset_section(shards) : data);
}

distill::DistillOptions options_for(const std::string& out) {
  distill::DistillOptions o;
  o.out_dir = out;
  o.models_root = test::source_path("models");
  return o;
}

void expect_same_unet(const std::string& a_dir, const std::string& b_dir) {
  const auto a = io::load_safetensors(a_dir + "/unet/diffusion_pytorch_model.safetensors");
  const auto b = io::load_safetensors(b_dir + "/unet/diffusion_pytorch_model.safetensors");
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : a)
    ASSERT_TRUE(torch::equal(t, b.at(name))) << name;
}

}  // namespace

TEST(DistillData, ShardsInBucketsResumeExactly) {
  const auto dir = test::temp_dir();
  const auto shards = write_fmnist_shards(dir);
  const auto path = dir + "/recipe.toml";
  std::ofstream(path) << recipe_text(shards);
  const auto recipe = distill::DistillRecipe::load(path);
  EXPECT_EQ(recipe.dataset, "webdataset");

  const auto straight = distill::run_distillation(recipe, options_for(dir + "/straight"));
  ASSERT_EQ(straight.model_dirs.size(), 2u);
  std::ifstream metrics(dir + "/straight/metrics.jsonl");
  int64_t skipped = 0, lines = 0;
  for (std::string line; std::getline(metrics, line); ++lines) {
    const auto m = nlohmann::json::parse(line);
    skipped = std::max<int64_t>(skipped, m.at("data_skipped").get<int64_t>());
    EXPECT_TRUE(std::isfinite(m.value("loss_mse", 0.0)));
    EXPECT_GE(m.at("data_wait_s").get<double>(), 0.0);  // waiting on the reader thread
  }
  EXPECT_EQ(lines, 10);
  EXPECT_GE(skipped, 2);  // the corrupt image and the Latin-1 caption (once per epoch)
  EXPECT_TRUE(fs::exists(dir + "/straight/checkpoint/data.json"));

  // Stopped inside the adversarial stage, between checkpoints' natural points, then resumed.
  auto first = options_for(dir + "/split");
  first.until = 6;
  EXPECT_EQ(distill::run_distillation(recipe, first).iterations, 6);
  const auto data_state = io::read_json_file(dir + "/split/checkpoint/data.json");
  ASSERT_EQ(data_state.at("ranks").size(), 1u);
  auto second = options_for(dir + "/split");
  second.resume = true;
  const auto rest = distill::run_distillation(recipe, second);
  ASSERT_EQ(rest.model_dirs.size(), 2u);
  expect_same_unet(straight.model_dirs[1], rest.model_dirs[1]);
}

TEST(DistillData, RecipeRefusesBadDataKeys) {
  const auto dir = test::temp_dir();
  auto error_of = [&](const std::string& data_section) {
    const auto path = dir + "/r.toml";
    std::ofstream(path)
        << "task = \"distill\"\n[teacher]\nmodel = \"fmnist-teacher\"\n[data]\n"
        << data_section
        << "\n[[stages]]\nteacher_steps = 2\nstudent_steps = 1\nmse_iterations = 1\n";
    try {
      distill::DistillRecipe::load(path);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_THAT(error_of("dataset = \"laion\""),
              HasSubstr("[data]: key 'dataset': 'laion' is not one of"));
  EXPECT_THAT(error_of("dataset = \"webdataset\""), HasSubstr("shards"));
  EXPECT_THAT(error_of("dataset = \"webdataset\"\nshards = \"a.tar\"\nmax_aspect = 0.5"),
              HasSubstr("max_aspect"));
  EXPECT_THAT(error_of("dataset = \"webdataset\"\nshards = \"a.tar\"\nbucket_step = -8"),
              HasSubstr("[data]: key 'bucket_step': must be >= 0"));
  EXPECT_THAT(error_of("dataset = \"image-folder\"\ndir = \"x\"\nshard = \"a.tar\""),
              HasSubstr("shard"));
  EXPECT_THAT(error_of("dataset = \"webdataset\"\nshards = \"a.tar\"\nprefetch = -1"),
              HasSubstr("[data]: key 'prefetch': must be 0 (no read-ahead) to 64 batches"));
  EXPECT_THAT(error_of("dataset = \"fashion-mnist\"\nprefetch = 2"),  // in memory: no stream
              HasSubstr("prefetch"));
  // A missing shard is named when the run starts.
  const auto path = dir + "/missing.toml";
  std::ofstream(path) << recipe_text(dir + "/none-{0..1}.tar");
  try {
    distill::run_distillation(distill::DistillRecipe::load(path), options_for(dir + "/out"));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("none-0.tar: shard not found"));
  }
}

// Two ranks on one machine: each reads its own two shards; both positions are saved and the
// run resumes on two ranks (and refuses to resume on one).
TEST(DistillData, TwoRanksReadTheirOwnShards) {
  const auto dir = test::temp_dir();
  const auto shards = write_fmnist_shards(dir);
  const auto path = dir + "/recipe.toml";
  std::ofstream(path) << recipe_text(shards);
  const std::string base = "distill --threads 2 --recipe " + path + " --out " + dir + "/run";
  auto r = test::run_lightning(base + " --nproc 2 --until 4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto state = io::read_json_file(dir + "/run/checkpoint/data.json");
  ASSERT_EQ(state.at("ranks").size(), 2u);
  EXPECT_NE(state["ranks"][0], state["ranks"][1]);
  r = test::run_lightning(base + " --resume");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("saved by 2 rank(s); resume with 2"));
  r = test::run_lightning(base + " --nproc 2 --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir + "/run/stage-2-2-to-1/model/model_index.json"));
  // The metrics count every rank's skipped records and damaged shards, not rank 0's alone.
  std::ifstream metrics(dir + "/run/metrics.jsonl");
  std::string line, last;
  while (std::getline(metrics, line))
    last = line;
  const auto m = nlohmann::json::parse(last);
  const auto end = io::read_json_file(dir + "/run/checkpoint/data.json").at("ranks");
  EXPECT_EQ(m.at("data_skipped").get<int64_t>(),
            end[0].at("skipped").get<int64_t>() + end[1].at("skipped").get<int64_t>());
  EXPECT_EQ(m.at("data_damaged_shards").get<int64_t>(), 0);
  EXPECT_GE(m.at("data_skipped").get<int64_t>(), 2);
}

// The cache: one pass over the shards, encoded; training reads it (and resumes exactly) without
// the encoders; a cache made for another model is refused.
TEST(DistillData, CacheEncodesOnceAndTrainingReadsIt) {
  const auto dir = test::temp_dir();
  const auto shards = write_fmnist_shards(dir);
  std::ofstream(dir + "/images.toml") << recipe_text(shards);
  const auto image_recipe = distill::DistillRecipe::load(dir + "/images.toml");
  const auto model = generate::load_model(
      generate::resolve_model_dir("fmnist-teacher", test::source_path("models")), {});
  train::CacheOptions options;
  options.out_dir = dir + "/cache";
  options.shard_size = 16;
  options.dtype = torch::kFloat32;
  options.max_aspect = 2.0;
  const auto result = train::write_cache(model, "fmnist-teacher", image_recipe.source, options);
  EXPECT_EQ(result.samples, 40);
  EXPECT_EQ(result.skipped, 2);
  EXPECT_EQ(result.shards, 3);
  EXPECT_EQ(result.index.at("shards"), "cache-{000000..000002}.tar");
  EXPECT_TRUE(fs::exists(dir + "/cache/cache.json"));

  // Every cached sample: the input fitted to its bucket, the caption's encoding, the sizes.
  data::TarShardReader reader(dir + "/cache/cache-000000.tar");
  data::RawSample raw;
  int n = 0;
  while (reader.next(raw, true) && n < 6) {
    const auto s = data::decode_sample(raw, "cache-000000.tar");
    ASSERT_FALSE(s.cached.empty());
    const auto ids = s.cached.at("time_ids");
    const int64_t h = ids[0].item<int64_t>(), w = ids[1].item<int64_t>();
    EXPECT_TRUE((h == 28 && w == 28) || (h == 28 && w == 44) || (h == 44 && w == 28))
        << h << "x" << w;
    EXPECT_EQ(s.cached.at("x").size(1), ids[4].item<int64_t>());
    EXPECT_EQ(s.cached.at("x").size(2), ids[5].item<int64_t>());
    torch::NoGradGuard no_grad;
    const auto context = generate::encode_prompts(model, {s.caption});
    EXPECT_LT(test::relative_error(s.cached.at("context"), context[0]), 1e-6) << s.caption;
    ++n;
  }
  EXPECT_EQ(n, 6);

  // Training on the cache, straight and stopped + resumed: the same students.
  const auto cache_data = "dataset = \"cache\"\ndir = \"" + dir + "/cache\"\nshuffle_buffer = 8\n";
  std::ofstream(dir + "/cached.toml") << recipe_text("", cache_data);
  const auto recipe = distill::DistillRecipe::load(dir + "/cached.toml");
  const auto straight = distill::run_distillation(recipe, options_for(dir + "/straight"));
  ASSERT_EQ(straight.model_dirs.size(), 2u);
  auto first = options_for(dir + "/split");
  first.until = 5;
  distill::run_distillation(recipe, first);
  auto second = options_for(dir + "/split");
  second.resume = true;
  const auto rest = distill::run_distillation(recipe, second);
  expect_same_unet(straight.model_dirs[1], rest.model_dirs[1]);

  // A cache for a model with other inputs is refused, naming the file.
  auto index = io::read_json_file(dir + "/cache/cache.json");
  index["x_channels"] = 4;
  io::write_json_file(dir + "/cache/cache.json", index);
  try {
    distill::run_distillation(recipe, options_for(dir + "/other"));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("cache.json: the cache holds 4-channel inputs"));
  }
}

TEST(Cli, CacheCommand) {
  const auto dir = test::temp_dir();
  const auto shards = write_fmnist_shards(dir);
  std::ofstream(dir + "/r.toml") << recipe_text(shards);
  auto r =
      test::run_lightning("cache --recipe " + dir + "/r.toml --out " + dir + "/c --shard-size 50");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("cache: 40 samples in 1 shard(s)"));
  EXPECT_TRUE(fs::exists(dir + "/c/cache-000000.tar"));
  EXPECT_TRUE(fs::exists(dir + "/c/cache-probe.safetensors"));
  // Made again over itself: replaced. Over a directory of something else, or over the data it
  // is made from: refused, and nothing there is touched.
  r = test::run_lightning("cache --recipe " + dir + "/r.toml --out " + dir + "/c");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  fs::create_directories(dir + "/mine");
  std::ofstream(dir + "/mine/notes.md") << "mine";
  r = test::run_lightning("cache --recipe " + dir + "/r.toml --out " + dir + "/mine");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("mine: exists and is not an earlier output (it has no "
                                  "cache.json): not replaced"));
  EXPECT_TRUE(fs::exists(dir + "/mine/notes.md"));
  r = test::run_lightning("cache --recipe " + dir + "/r.toml --out " + dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("holds the data it would be made from"));
  r = test::run_lightning("cache --recipe " + test::source_path("recipes/quick-distill.toml") +
                          " --out " + dir + "/d");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.output, HasSubstr("the cache encodes webdataset or image-folder data"));
}
