// Generation: reproducibility by seed, PNG metadata, the shipped default model, bad input.
#include <filesystem>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "generate/pipeline.h"
#include "io/image.h"
#include "io/safetensors.h"
#include "models/lora.h"
#include "test_util.h"
#include "text/clip_tokenizer.h"
#include "text/utf8.h"

namespace fs = std::filesystem;
using namespace lightning;

namespace {

const generate::TextToImageModel& teacher() {
  static const auto model = generate::load_model(test::source_path("models/fmnist-teacher"), {});
  return model;
}

}  // namespace

TEST(Generate, SameSeedSamePixelsAndSeedsArePerImage) {
  generate::GenerateRequest req;
  req.prompts = {"a photo of a sneaker", "a photo of a sneaker", "a photo of a sneaker"};
  req.steps = 3;
  req.seed = 11;
  auto batch = generate::generate(teacher(), req);
  auto again = generate::generate(teacher(), req);
  EXPECT_TRUE(torch::equal(batch, again));
  // Image 1 of the batch is the image of seed 12 generated alone.
  req.prompts = {"a photo of a sneaker"};
  req.seed = 12;
  auto single = generate::generate(teacher(), req);
  EXPECT_LE(test::relative_error(single[0], batch[1]), 1e-5);
  EXPECT_FALSE(torch::allclose(batch[0], batch[1]));
}

TEST(Generate, ResolvesTheModelsRecommendationsAndRefusesBadSettings) {
  generate::GenerateRequest req;
  req.prompts = {"a bag"};
  auto r = generate::resolve_request(teacher(), req);
  EXPECT_EQ(r.steps, teacher().recommended.steps);
  EXPECT_EQ(*r.guidance_scale, teacher().recommended.guidance_scale);
  EXPECT_EQ(r.height, 32);
  auto bad = req;
  bad.steps = -1;
  EXPECT_THROW(generate::resolve_request(teacher(), bad), UsageError);
  bad = req;
  bad.steps = 1001;
  EXPECT_THROW(generate::resolve_request(teacher(), bad), UsageError);
  bad = req;
  bad.guidance_scale = -2;
  EXPECT_THROW(generate::resolve_request(teacher(), bad), UsageError);
  bad = req;
  bad.height = 30;  // not a multiple of 4
  EXPECT_THROW(generate::resolve_request(teacher(), bad), UsageError);
  bad = req;
  bad.prompts = {std::string("a \xff bag")};
  EXPECT_THROW(generate::resolve_request(teacher(), bad), UsageError);
}

TEST(Generate, ParametersTextReproducesTheImage) {
  generate::GenerateRequest req;
  req.prompts = {"an ankle boot"};
  req.negative_prompt = "a bag";
  req.steps = 4;
  req.guidance_scale = 2.5;
  req.sampler = diffusion::SamplerKind::kDDIM;
  req.seed = 5;
  auto text = generate::parameters_text(teacher(), generate::resolve_request(teacher(), req), 0);
  EXPECT_EQ(text,
            "an ankle boot\nNegative prompt: a bag\nSteps: 4, Sampler: DDIM, CFG scale: 2.5, "
            "Seed: 5, Size: 32x32, Model: fmnist-teacher, Timestep spacing: trailing, "
            "Prediction type: epsilon, Version: lightning.cpp");
}

TEST(Utf8, AcceptsWellFormedAndRejectsTheRest) {
  EXPECT_TRUE(text::is_valid_utf8("plain"));
  EXPECT_TRUE(text::is_valid_utf8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));
  size_t at = 0;
  EXPECT_FALSE(text::is_valid_utf8("ab\xff", &at));
  EXPECT_EQ(at, 2u);
  EXPECT_FALSE(text::is_valid_utf8("\xc0\xaf"));          // overlong
  EXPECT_FALSE(text::is_valid_utf8("\xed\xa0\x80"));      // surrogate
  EXPECT_FALSE(text::is_valid_utf8("\xe2\x82"));          // truncated
  EXPECT_FALSE(text::is_valid_utf8("\xf4\x90\x80\x80"));  // above U+10FFFF
}

TEST(Tokenizer, RestrictedVocabularyKeepsTheCaptionsTokens) {
  auto full =
      text::CLIPTokenizer::load(test::source_path("data/clip/bpe_simple_vocab_16e6.txt.gz"));
  std::vector<std::string> corpus = {"a photo of a sneaker", "an ankle boot, product photo"};
  auto small = full.restricted_to(corpus);
  EXPECT_LT(small.vocab().size(), 700u);
  auto symbols = [](const text::CLIPTokenizer& t, const std::string& s) {
    std::vector<std::string> out;
    std::map<int64_t, std::string> inverse;
    for (const auto& [tok, id] : t.vocab())
      inverse[id] = tok;
    for (auto id : t.encode(s))
      out.push_back(inverse.at(id));
    return out;
  };
  for (const auto& s : corpus)
    EXPECT_EQ(symbols(small, s), symbols(full, s)) << s;
  // Other text still tokenizes, into smaller pieces.
  EXPECT_GT(small.encode("a red dress").size(), full.encode("a red dress").size());
  // Saved as a transformers directory, it reads back identically.
  auto dir = test::temp_dir();
  small.save(dir);
  auto loaded = text::CLIPTokenizer::load(dir);
  for (const auto& s : {"a photo of a sneaker", "a red dress", ""})
    EXPECT_EQ(loaded.encode(s), small.encode(s)) << s;
  EXPECT_EQ(loaded.eos_id(), static_cast<int64_t>(small.vocab().size()) - 1);
}

TEST(Cli, GenerateWritesReproduciblePngsWithParameters) {
  const auto dir = test::temp_dir();
  auto a = test::run_lightning("generate --prompt 'a photo of a bag' --steps 3 --seed 4 --out " +
                               dir + "/a.png --threads 1");
  ASSERT_EQ(a.exit_code, 0) << a.output;
  auto b = test::run_lightning(
      "generate --model fmnist-lightning-4step --prompt 'a photo of a bag' "
      "--steps 3 --seed 4 --out " +
      dir + "/b.png --threads 1");
  ASSERT_EQ(b.exit_code, 0) << b.output;
  auto pa = io::read_png(dir + "/a.png"), pb = io::read_png(dir + "/b.png");
  EXPECT_TRUE(torch::equal(pa.pixels, pb.pixels));
  EXPECT_EQ(pa.pixels.sizes(), (std::vector<int64_t>{1, 32, 32}));
  ASSERT_TRUE(pa.text.count("parameters"));
  EXPECT_NE(pa.text["parameters"].find("Steps: 3, Sampler: Euler"), std::string::npos);
  EXPECT_NE(pa.text["parameters"].find("Seed: 4"), std::string::npos);

  auto c = test::run_lightning("generate --prompt 'a bag' --steps 2 --seed 1 --batch 3 --out-dir " +
                               dir + "/many --sampler ddim");
  ASSERT_EQ(c.exit_code, 0) << c.output;
  EXPECT_TRUE(fs::exists(dir + "/many/002-seed3.png"));
  auto grid = test::run_lightning("generate --prompt '' --steps 2 --seed 1 --batch 4 --out " + dir +
                                  "/grid.png");
  ASSERT_EQ(grid.exit_code, 0) << grid.output;
  EXPECT_EQ(io::read_png(dir + "/grid.png").pixels.size(2), 2 * 32 + 3 * 2);
}

TEST(Cli, GenerateBadInputIsOneLineAndNonZero) {
  const auto dir = test::temp_dir();
  struct Case {
    std::string args;
    int code;
    std::string mentions;
  };
  const std::vector<Case> cases = {
      {"--model /nonexistent --prompt x --out " + dir + "/x.png", 2, "/nonexistent"},
      {"--prompt x --steps 0 --out " + dir + "/x.png", 2, "--steps"},
      {"--prompt x --height 30 --out " + dir + "/x.png", 2, "--height"},
      {"--prompt x --guidance -1 --out " + dir + "/x.png", 2, "--guidance"},
      {"--prompt x --out /nonexistent-dir/x.png", 2, "/nonexistent-dir"},
      {"--prompt x --out " + dir + "/x.jpg", 2, ".png"},
      {"--prompt $(printf 'a\\377b') --out " + dir + "/x.png", 2, "UTF-8"},
  };
  for (const auto& c : cases) {
    auto r = test::run_lightning("generate " + c.args);
    EXPECT_EQ(r.exit_code, c.code) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.mentions), std::string::npos) << c.args << "\n" << r.output;
  }
  EXPECT_FALSE(fs::exists(dir + "/x.png"));
  // A prompt longer than the context is truncated with a warning.
  std::string long_prompt;
  for (int i = 0; i < 80; ++i)
    long_prompt += "bag ";
  auto r = test::run_lightning("generate --prompt '" + long_prompt + "' --steps 1 --seed 0 --out " +
                               dir + "/long.png");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("truncated"), std::string::npos) << r.output;
}

TEST(Cli, GenerateAppliesKohyaLoRAsWithAScale) {
  const auto dir = test::temp_dir();
  {  // A random LoRA for the shipped teacher's UNet, in kohya format.
    auto model = generate::load_model(test::source_path("models/fmnist-teacher"), {});
    torch::manual_seed(5);
    models::attach_lora(*model.unet,
                        {4, 4, {"conv_in", "conv_out", "time_embedding"}, std::nullopt});
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : models::lora_parameters(*model.unet))
      if (name.find("lora_up") != std::string::npos) t.normal_(0, 0.2);
    models::save_kohya_lora(*model.unet, dir + "/style.safetensors");
    io::save_safetensors(dir + "/other.safetensors",
                         {{"lora_unet_nowhere.lora_down.weight", torch::zeros({2, 8})},
                          {"lora_unet_nowhere.lora_up.weight", torch::zeros({8, 2})}});
  }
  const std::string common = "generate --prompt 'a photo of a bag' --steps 2 --seed 3 --threads 1 ";
  auto plain = test::run_lightning(common + "--out " + dir + "/plain.png");
  auto zero = test::run_lightning(common + "--lora " + dir + "/style.safetensors:0 --out " + dir +
                                  "/zero.png");
  auto full = test::run_lightning(common + "--lora " + dir + "/style.safetensors --out " + dir +
                                  "/full.png");
  ASSERT_EQ(plain.exit_code, 0) << plain.output;
  ASSERT_EQ(zero.exit_code, 0) << zero.output;
  ASSERT_EQ(full.exit_code, 0) << full.output;
  const auto p = io::read_png(dir + "/plain.png"), z = io::read_png(dir + "/zero.png"),
             f = io::read_png(dir + "/full.png");
  EXPECT_TRUE(torch::equal(p.pixels, z.pixels));
  EXPECT_FALSE(torch::equal(p.pixels, f.pixels));
  EXPECT_NE(f.text.at("parameters").find("LoRA: style.safetensors:1"), std::string::npos)
      << f.text.at("parameters");

  auto missing =
      test::run_lightning(common + "--lora " + dir + "/nope.safetensors --out " + dir + "/x.png");
  EXPECT_EQ(missing.exit_code, 2) << missing.output;
  EXPECT_NE(missing.output.find("nope.safetensors"), std::string::npos) << missing.output;
  auto other =
      test::run_lightning(common + "--lora " + dir + "/other.safetensors --out " + dir + "/x.png");
  EXPECT_EQ(other.exit_code, 1) << other.output;
  EXPECT_NE(other.output.find("lora_unet_nowhere"), std::string::npos) << other.output;
  EXPECT_FALSE(fs::exists(dir + "/x.png"));
}
