// Checkpoint layouts: the full-size SDXL key/shape layouts written by diffusers 0.27.2 and
// transformers 4.38.2 (tests/fixtures/sdxl/sdxl-layouts.json, see tests/fixtures/README.md) must
// be exactly this project's modules (diffusers layout) and exactly what the original-layout key
// maps read (single-file layout); a tiny SDXL converted to one file by diffusers' own script must
// generate what the diffusers pipeline generates; --unet and presets.
#include <filesystem>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "generate/pipeline.h"
#include "io/json_config.h"
#include "io/key_map.h"
#include "io/safetensors.h"
#include "models/checkpoint_formats.h"
#include "models/model_loader.h"
#include "test_util.h"

namespace lightning {
namespace {

using test::relative_error;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

const nlohmann::json& layouts() {
  static const auto json =
      io::read_json_file(test::source_path("tests/fixtures/sdxl/sdxl-layouts.json"));
  return json;
}

// Shapes without data: a checkpoint described by a manifest.
class ManifestSource : public io::WeightSource {
 public:
  explicit ManifestSource(const nlohmann::json& manifest) : manifest_(manifest) {}
  std::vector<std::string> keys() const override {
    std::vector<std::string> out;
    for (const auto& item : manifest_.items())
      out.push_back(item.key());
    return out;
  }
  bool contains(const std::string& name) const override { return manifest_.contains(name); }
  std::vector<int64_t> shape(const std::string& name) const override {
    return manifest_.at(name).get<std::vector<int64_t>>();
  }
  torch::Tensor get(const std::string&) const override { throw std::logic_error("no data"); }
  void release(const std::string&) const override {}
  std::string describe() const override { return "manifest"; }

 private:
  nlohmann::json manifest_;
};

TEST(CheckpointLayouts, SdxlModulesHaveDiffusersKeysAndShapes) {
  auto unet = models::make_unet_uninitialised(models::UNetConfig::sdxl());
  auto te1 = models::make_clip_text_uninitialised(models::CLIPTextConfig::sdxl_clip_l());
  auto te2 = models::make_clip_text_uninitialised(models::CLIPTextConfig::sdxl_clip_g());
  auto vae = models::make_vae_uninitialised(models::VAEConfig::sdxl());
  io::check_weights(*unet, ManifestSource(layouts()["unet"]), "unet");
  io::check_weights(*te1, ManifestSource(layouts()["text_encoder"]), "text_encoder");
  io::check_weights(*te2, ManifestSource(layouts()["text_encoder_2"]), "text_encoder_2");
  io::check_weights(*vae, ManifestSource(layouts()["vae"]), "vae");
}

TEST(CheckpointLayouts, OriginalKeyMapsReadTheWholeSdxlSingleFile) {
  auto original = std::make_shared<ManifestSource>(layouts()["original"]);
  EXPECT_EQ(models::detect_layout(*original), models::CheckpointLayout::kSdxlSingleFile);
  auto unet = models::make_unet_uninitialised(models::UNetConfig::sdxl());
  auto te1 = models::make_clip_text_uninitialised(models::CLIPTextConfig::sdxl_clip_l());
  auto te2 = models::make_clip_text_uninitialised(models::CLIPTextConfig::sdxl_clip_g());
  auto vae = models::make_vae_uninitialised(models::VAEConfig::sdxl());
  using namespace models;
  // Each check also refuses checkpoint keys under the component's prefix that nothing reads.
  io::check_weights(*unet,
                    io::MappedWeights(original, unet_original_key_map(*unet, kOriginalUNetPrefix),
                                      kOriginalUNetPrefix),
                    "unet");
  io::check_weights(*vae,
                    io::MappedWeights(original, vae_original_key_map(*vae, kOriginalVAEPrefix),
                                      kOriginalVAEPrefix),
                    "vae");
  io::check_weights(
      *te1,
      io::MappedWeights(original, clip_prefixed_key_map(*te1, kSdxlClipLPrefix), kSdxlClipLPrefix),
      "clip-l");
  io::check_weights(
      *te2,
      io::MappedWeights(original, open_clip_key_map(*te2, kSdxlClipGPrefix), kSdxlClipGPrefix),
      "clip-g");
  // Spot checks of the table against the names every converter uses.
  auto map = unet_original_key_map(*unet, "");
  EXPECT_EQ(map.at("down_blocks.1.attentions.0.proj_in.weight").key,
            "input_blocks.4.1.proj_in.weight");
  EXPECT_EQ(map.at("down_blocks.1.downsamplers.0.conv.weight").key, "input_blocks.6.0.op.weight");
  EXPECT_EQ(map.at("up_blocks.0.upsamplers.0.conv.weight").key, "output_blocks.2.2.conv.weight");
  EXPECT_EQ(map.at("up_blocks.2.resnets.0.conv_shortcut.weight").key,
            "output_blocks.6.0.skip_connection.weight");
  auto clip_g = open_clip_key_map(*te2, "");
  EXPECT_EQ(clip_g.at("text_model.encoder.layers.3.self_attn.k_proj.bias").key,
            "transformer.resblocks.3.attn.in_proj_bias");
  EXPECT_EQ(clip_g.at("text_model.encoder.layers.3.self_attn.k_proj.bias").part, 1);
}

TEST(CheckpointLayouts, UnreadKeysAreRefusedByName) {
  auto manifest = layouts()["original"];
  manifest["first_stage_model.encoder.extra.weight"] = {4};
  auto source = std::make_shared<ManifestSource>(manifest);
  auto vae = models::make_vae_uninitialised(models::VAEConfig::sdxl());
  try {
    io::check_weights(
        *vae,
        io::MappedWeights(source, models::vae_original_key_map(*vae, "first_stage_model."),
                          "first_stage_model."),
        "vae");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("1 unexpected: first_stage_model.encoder.extra.weight"));
  }
}

std::string pipeline_dir() {
  return test::source_path("tests/fixtures/sdxl/tiny-sdxl-pipeline");
}
std::string single_file() {
  return test::source_path("tests/fixtures/sdxl/tiny-sdxl-single-file.safetensors");
}

generate::GenerateRequest first_case() {
  generate::GenerateRequest r;
  r.prompts = {"a photo of a sneaker"};
  r.guidance_scale = 5.0;
  r.steps = 2;
  r.height = r.width = 64;
  r.seed = 42;
  r.sampler = diffusion::SamplerKind::kEuler;
  return r;
}

TEST(SingleFile, TinySdxlGeneratesWhatDiffusersGenerates) {
  auto model = generate::load_single_file(single_file(), {}, {pipeline_dir(), ""});
  EXPECT_TRUE(model.is_sdxl());
  auto expected = io::load_safetensors(pipeline_dir() + "/expected.safetensors");
  torch::Tensor latents;
  auto images = generate::generate(model, first_case(), {}, &latents);
  EXPECT_LT(relative_error(latents, expected.at("latents")), 1e-4);
  EXPECT_LT(relative_error((images / 2 + 0.5).clamp(0, 1), expected.at("image")), 1e-4);
  // Identical to the same weights loaded from the diffusers directory.
  auto from_dir = generate::load_model(pipeline_dir(), {});
  EXPECT_TRUE(torch::equal(generate::generate(from_dir, first_case()), images));
}

TEST(SingleFile, UnetOverrideReadsEveryLayout) {
  auto reference = generate::generate(generate::load_model(pipeline_dir(), {}), first_case());
  // The UNet part of the single file, through --unet.
  auto model = generate::load_model(pipeline_dir(), {}, {single_file()});
  EXPECT_EQ(model.unet_file, "tiny-sdxl-single-file.safetensors");
  EXPECT_TRUE(torch::equal(generate::generate(model, first_case()), reference));
  // A bare original-layout UNet (no prefix), as some tools save it.
  std::vector<std::pair<std::string, torch::Tensor>> bare;
  for (auto& [key, t] : io::load_safetensors(single_file()))
    if (key.rfind(models::kOriginalUNetPrefix, 0) == 0)
      bare.emplace_back(key.substr(std::string(models::kOriginalUNetPrefix).size()), t);
  const auto bare_file = test::temp_dir() + "/bare_unet.safetensors";
  io::save_safetensors(bare_file, bare);
  EXPECT_TRUE(torch::equal(
      generate::generate(generate::load_model(pipeline_dir(), {}, {bare_file}), first_case()),
      reference));
  // A diffusers UNet file (sdxl_lightning_Nstep_unet.safetensors is one).
  EXPECT_TRUE(torch::equal(
      generate::generate(
          generate::load_model(pipeline_dir(), {},
                               {pipeline_dir() + "/unet/diffusion_pytorch_model.safetensors"}),
          first_case()),
      reference));
  // Something else is refused by name.
  try {
    generate::load_model(pipeline_dir(), {},
                         {pipeline_dir() + "/vae/diffusion_pytorch_model.safetensors"});
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("not a UNet checkpoint"));
  }
}

TEST(SingleFile, CommandLine) {
  const auto tmp = test::temp_dir();
  auto r = test::run_lightning("generate --model " + single_file() + " --config " + pipeline_dir() +
                               " --prompt 'a photo of a sneaker' --steps 2 --guidance 5 --seed 42 "
                               "--height 64 --width 64 --out " +
                               tmp + "/a.png");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = test::run_lightning("generate --model " + pipeline_dir() + " --unet " + tmp +
                          "/none.safetensors --prompt x --out " + tmp + "/b.png");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.output, HasSubstr("--unet " + tmp + "/none.safetensors: no such file"));
  r = test::run_lightning("generate --model " + pipeline_dir() +
                          "/unet/diffusion_pytorch_model.safetensors --prompt x --out " + tmp +
                          "/c.png");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.output, HasSubstr("holds only a UNet"));
}

TEST(Presets, FillWhatTheRequestLeavesUnset) {
  generate::GenerateRequest r;
  generate::apply_preset("lightning-4step", r);
  EXPECT_EQ(r.steps, 4);
  EXPECT_EQ(*r.guidance_scale, 0.0);
  EXPECT_EQ(*r.sampler, diffusion::SamplerKind::kEuler);
  EXPECT_EQ(*r.timestep_spacing, diffusion::TimestepSpacing::kTrailing);
  EXPECT_FALSE(r.prediction_type.has_value());
  generate::GenerateRequest one;
  one.steps = 2;  // an explicit flag wins
  generate::apply_preset("lightning-1step", one);
  EXPECT_EQ(one.steps, 2);
  EXPECT_EQ(*one.prediction_type, diffusion::PredictionType::kSample);
  EXPECT_THROW(generate::apply_preset("lightning-3step", one), UsageError);
}

TEST(Presets, WarnWhenStepsDoNotMatchTheCheckpointName) {
  const auto& model = generate::load_model(pipeline_dir(), {});
  generate::GenerateRequest r;
  r.steps = 2;
  r.prediction_type = diffusion::PredictionType::kEpsilon;
  auto w = generate::checkpoint_name_warnings(
      model, {"sdxl_lightning_4step_lora.safetensors", "sdxl_lightning_2step_unet.safetensors"}, r);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_THAT(w[0], HasSubstr("'sdxl_lightning_4step_lora.safetensors' is a 4-step checkpoint"));
  r.steps = 1;
  w = generate::checkpoint_name_warnings(model, {"sdxl_lightning_1step_unet_x0.safetensors"}, r);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_THAT(w[0], HasSubstr("--prediction-type sample"));
}

}  // namespace
}  // namespace lightning
