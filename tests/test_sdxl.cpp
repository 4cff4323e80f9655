// The SDXL pipeline: a tiny random StableDiffusionXLPipeline saved by diffusers 0.27.2
// (tests/fixtures/sdxl, see tests/fixtures/README.md) must give diffusers' latents and images
// for the same initial noise: two text encoders, zeroed negative embeddings, time ids, CFG,
// Euler with trailing spacing and the VAE decode.
#include <algorithm>
#include <filesystem>
#include <map>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "generate/pipeline.h"
#include "io/image.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/checkpoint_formats.h"
#include "models/lora.h"
#include "test_util.h"

namespace lightning {
namespace {

using test::relative_error;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

std::string pipeline_dir() {
  return test::source_path("tests/fixtures/sdxl/tiny-sdxl-pipeline");
}

const generate::TextToImageModel& tiny_sdxl() {
  static const auto model = generate::load_model(pipeline_dir(), {});
  return model;
}

generate::GenerateRequest request_of(const std::string& suffix) {
  return test::request_from_case(pipeline_dir() + "/case" + suffix + ".json");
}

class SdxlPipelineParity : public ::testing::TestWithParam<const char*> {};

TEST_P(SdxlPipelineParity, MatchesDiffusers) {
  const std::string suffix = GetParam();
  const auto& model = tiny_sdxl();
  ASSERT_TRUE(model.is_sdxl());
  ASSERT_TRUE(model.is_latent());
  auto r = request_of(suffix);
  // Our per-seed noise is what diffusers was given as `latents`.
  auto noise =
      io::load_safetensors(pipeline_dir() + "/inputs" + suffix + ".safetensors").at("noise");
  EXPECT_TRUE(torch::equal(generate::initial_noise(r.seed, 4, r.height / 8, r.width / 8), noise));
  auto expected = io::load_safetensors(pipeline_dir() + "/expected" + suffix + ".safetensors");
  torch::Tensor latents;
  auto images = generate::generate(model, r, {}, &latents);
  ASSERT_EQ(latents.sizes(), expected.at("latents").sizes());
  EXPECT_LT(relative_error(latents, expected.at("latents")), 1e-4);
  auto pixels01 = (images / 2 + 0.5).clamp(0, 1);  // diffusers' postprocess to [0, 1]
  ASSERT_EQ(pixels01.sizes(), expected.at("image").sizes());
  EXPECT_LT(relative_error(pixels01, expected.at("image")), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, SdxlPipelineParity, ::testing::Values("", "-negative", "-nocfg"),
                         [](const auto& info) {
                           std::string s = info.param;
                           return s.empty() ? std::string("default") : s.substr(1);
                         });

TEST(SdxlPipeline, EmptyNegativePromptIsZeros) {
  const auto& model = tiny_sdxl();
  EXPECT_TRUE(model.force_zeros_for_empty_prompt);
  auto zeros = generate::encode_negative(model, "");
  EXPECT_EQ(zeros.context.abs().max().item<float>(), 0.f);
  EXPECT_EQ(zeros.pooled.abs().max().item<float>(), 0.f);
  auto bag = generate::encode_negative(model, "a bag");
  EXPECT_GT(bag.context.abs().max().item<float>(), 0.f);
  // Context = CLIP-L penultimate (32) + CLIP-G penultimate (40); pooled = projection (24).
  EXPECT_EQ(bag.context.sizes(), (std::vector<int64_t>{1, 77, 72}));
  EXPECT_EQ(bag.pooled.sizes(), (std::vector<int64_t>{1, 24}));
  // The second tokenizer pads with "!" (id 0), the first with end-of-text.
  EXPECT_EQ(model.pad_id_2, 0);
  EXPECT_EQ(model.pad_id, model.tokenizer->eos_id());
}

TEST(SdxlPipeline, Bf16StaysClose) {
  auto model = generate::load_model(pipeline_dir(), {torch::kBFloat16, torch::kCPU, "", {}});
  auto r = request_of("");
  auto expected = io::load_safetensors(pipeline_dir() + "/expected.safetensors");
  torch::Tensor latents;
  auto images = generate::generate(model, r, {}, &latents);
  // Random weights, CFG 5 (which multiplies the UNet's bf16 error by 5) and 2 steps.
  EXPECT_LT(relative_error(latents, expected.at("latents")), 0.1);
  EXPECT_LT(relative_error((images / 2 + 0.5).clamp(0, 1), expected.at("image")), 0.25);
}

TEST(SdxlPipeline, WeightsHeldInF16GiveTheF32Images) {
  // The fixture's files are f16: held as they are (views of the mapped files) and converted
  // layer by layer, the f32 computation is that of converting at load. Bit-identical with
  // libtorch 1.13; libtorch 2.11 (16 threads) differed in the last bits, hence 1e-6.
  models::ModelLoadOptions load;
  load.weights_dtype = torch::kFloat16;
  for (const char* suffix : {"", "-negative"}) {
    auto held = generate::load_model(pipeline_dir(), load);
    EXPECT_EQ(held.unet->conv_in->weight.scalar_type(), torch::kFloat16);
    EXPECT_EQ(held.text_encoder_2->text_model->final_layer_norm->weight.scalar_type(),
              torch::kFloat16);
    EXPECT_EQ(held.vae->decoder->conv_in->weight.scalar_type(), torch::kFloat16);
    EXPECT_EQ(held.unet->dtype(), torch::kFloat32);
    EXPECT_EQ(held.text_encoder->dtype(), torch::kFloat32);
    EXPECT_EQ(held.vae->dtype(), torch::kFloat32);
    const auto r = request_of(suffix);
    torch::Tensor want_latents, got_latents;
    const auto want = generate::generate(tiny_sdxl(), r, {}, &want_latents);
    const auto got = generate::generate(held, r, {}, &got_latents);
    EXPECT_LT(test::relative_error(got_latents, want_latents), 1e-6) << suffix;
    EXPECT_LT(test::relative_error(got, want), 1e-6) << suffix;
  }
  // The single-file path too.
  auto held = generate::load_single_file(
      test::source_path("tests/fixtures/sdxl/tiny-sdxl-single-file.safetensors"), load,
      {pipeline_dir(), ""});
  EXPECT_EQ(held.unet->conv_in->weight.scalar_type(), torch::kFloat16);
  EXPECT_LT(test::relative_error(generate::generate(held, request_of("")),
                                 generate::generate(tiny_sdxl(), request_of(""))),
            1e-6);
  // bf16 or f16 compute with narrower-or-other weights is refused by the CLI.
  auto cli = test::run_lightning("generate --model " + pipeline_dir() +
                                 " --prompt x --weights-dtype f16 --dtype bf16 --out " +
                                 test::temp_dir() + "/x.png");
  EXPECT_EQ(cli.exit_code, 2) << cli.output;
  EXPECT_THAT(cli.output, HasSubstr("--weights-dtype f16 with --dtype bf16"));
}

TEST(SdxlPipeline, SavedAndReloadedGivesTheSameImage) {
  const auto out = test::temp_dir() + "/copy";
  generate::save_model(tiny_sdxl(), out);
  auto index = io::read_json_file(out + "/model_index.json");
  EXPECT_EQ(index["_class_name"], "StableDiffusionXLPipeline");
  auto copy = generate::load_model(out, {});
  auto r = request_of("-negative");
  EXPECT_TRUE(torch::equal(generate::generate(copy, r), generate::generate(tiny_sdxl(), r)));
}

TEST(SdxlPipeline, TiledDecodeMatchesUntiledWhenTheTileCoversTheImage) {
  auto r = request_of("");
  auto plain = generate::generate(tiny_sdxl(), r);
  r.vae_tiling = models::VAETiling{64, 16};
  EXPECT_TRUE(torch::equal(generate::generate(tiny_sdxl(), r), plain));
  r.vae_tiling = models::VAETiling{48, 16};  // 2 x 2 tiles of 5x5 latents, overlapping by 2
  auto tiled = generate::generate(tiny_sdxl(), r);
  EXPECT_EQ(tiled.sizes(), plain.sizes());
  // Tiles this small see little context, and random weights make per-tile statistics differ.
  EXPECT_LT((tiled - plain).abs().mean().item<double>(), 0.35 * plain.abs().mean().item<double>());
}

// kohya's sd-scripts name SDXL UNet layers by the original layout
// (lora_unet_input_blocks_4_1_proj_in); a file in either naming must give the same weights.
TEST(SdxlPipeline, KohyaLoRAInEitherUNetNamingApplies) {
  auto donor = generate::load_model(pipeline_dir(), {});
  models::LoRAConfig config;
  config.rank = 2;
  models::attach_lora(*donor.unet, config);
  {
    torch::NoGradGuard no_grad;
    torch::manual_seed(3);
    for (auto& [name, t] : models::lora_parameters(*donor.unet))
      if (name.find("lora_up") != std::string::npos) t.normal_(0, 0.05);
  }
  const auto tmp = test::temp_dir();
  models::save_kohya_lora(*donor.unet, tmp + "/diffusers-names.safetensors");
  // The same tensors under original-layout names.
  std::map<std::string, std::string> rename;
  for (const auto& [name, source] : models::unet_original_key_map(*donor.unet, ""))
    if (name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0) {
      auto from = name.substr(0, name.size() - 7), to = source.key.substr(0, source.key.size() - 7);
      std::replace(from.begin(), from.end(), '.', '_');
      std::replace(to.begin(), to.end(), '.', '_');
      rename["lora_unet_" + from] = "lora_unet_" + to;
    }
  std::vector<std::pair<std::string, torch::Tensor>> renamed;
  size_t changed = 0;
  for (auto& [key, t] : io::load_safetensors(tmp + "/diffusers-names.safetensors")) {
    const auto dot = key.find('.');
    auto it = rename.find(key.substr(0, dot));
    ASSERT_NE(it, rename.end()) << key;
    changed += it->second != it->first;
    renamed.emplace_back(it->second + key.substr(dot), t);
  }
  EXPECT_GT(changed, 0u);
  io::save_safetensors(tmp + "/original-names.safetensors", renamed);

  auto a = generate::load_model(pipeline_dir(), {});
  generate::apply_loras(a, {{tmp + "/diffusers-names.safetensors", 0.8}}, false);
  auto b = generate::load_model(pipeline_dir(), {});
  generate::apply_loras(b, {{tmp + "/original-names.safetensors", 0.8}}, false);
  const auto wa = io::module_tensors(*a.unet), wb = io::module_tensors(*b.unet);
  for (const auto& [name, t] : wa)
    ASSERT_TRUE(torch::equal(t, wb.at(name))) << name;
  auto plain = generate::load_model(pipeline_dir(), {});
  EXPECT_FALSE(torch::equal(io::module_tensors(*plain.unet).at("mid_block.resnets.0.conv1.weight"),
                            wa.at("mid_block.resnets.0.conv1.weight")));
}

TEST(SdxlPipeline, MissingComponentIsNamed) {
  const auto dir = test::temp_dir() + "/broken";
  fs::copy(pipeline_dir(), dir, fs::copy_options::recursive);
  fs::remove_all(dir + "/vae");
  try {
    generate::load_model(dir, {});
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("missing component folder 'vae'"));
  }
  fs::remove_all(dir + "/tokenizer_2");
  auto index = io::read_json_file(dir + "/model_index.json");
  index.erase("vae");
  io::write_json_file(dir + "/model_index.json", index);
  try {
    generate::load_model(dir, {});
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("'tokenizer_2'"));
  }
}

TEST(SdxlPipeline, GenerateCommandWritesTheImage) {
  const auto tmp = test::temp_dir();
  auto r = test::run_lightning("generate --model " + pipeline_dir() +
                               " --prompt 'a photo of a sneaker' --steps 2 --guidance 5 --seed 42 "
                               "--height 64 --width 96 --out " +
                               tmp + "/a.png");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto image = io::read_png(tmp + "/a.png");
  EXPECT_EQ(image.pixels.sizes(), (std::vector<int64_t>{3, 64, 96}));
  EXPECT_THAT(image.text["parameters"], HasSubstr("Size: 96x64, Model: tiny-sdxl-pipeline"));
  r = test::run_lightning("generate --model " + pipeline_dir() +
                          " --prompt x --steps 1 --height 36 --out " + tmp + "/b.png");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.output, HasSubstr("--height 36: must be a positive multiple of 8"));
}

}  // namespace
}  // namespace lightning
