// ControlNet: ControlNetModel forwards and the SDXL ControlNet pipeline against diffusers 0.27.2
// (tests/fixtures/controlnet, see tests/fixtures/README.md).
#include <filesystem>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "generate/pipeline.h"
#include "io/image.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "models/controlnet.h"
#include "models/model_loader.h"
#include "test_util.h"

namespace lightning {
namespace {

using test::relative_error;
using ::testing::HasSubstr;

std::string fixture(const std::string& relative) {
  return test::source_path("tests/fixtures/controlnet/" + relative);
}
std::string pipeline_dir() {
  return test::source_path("tests/fixtures/sdxl/tiny-sdxl-pipeline");
}

class ControlNetParity : public ::testing::TestWithParam<const char*> {};

TEST_P(ControlNetParity, MatchesDiffusers) {
  const std::string dir = fixture(GetParam());
  auto model = models::load_controlnet(dir, {});
  const auto named = io::load_safetensors(dir + "/inputs.safetensors");
  const auto expected = io::load_safetensors(dir + "/expected.safetensors");
  torch::NoGradGuard no_grad;
  const auto out = model->forward(test::unet_inputs(named), named.at("controlnet_cond"),
                                  named.at("conditioning_scale").item<double>());
  ASSERT_EQ(out.down.size() + 1, expected.size());
  for (size_t i = 0; i < out.down.size(); ++i) {
    const auto& want = expected.at("down_" + std::to_string(i));
    ASSERT_EQ(out.down[i].sizes(), want.sizes()) << i;
    EXPECT_LT(relative_error(out.down[i], want), 1e-4) << "down_" << i;
  }
  EXPECT_LT(relative_error(out.mid, expected.at("mid")), 1e-4);
}

// tiny-sdxl-controlnet: SDXL's added embeddings, f16 file, from_unet of the pipeline's UNet.
// tiny-controlnet-misc: SD-style, BGR channel order, pooled conditions, 2-level embedding.
INSTANTIATE_TEST_SUITE_P(Fixtures, ControlNetParity,
                         ::testing::Values("tiny-sdxl-controlnet", "tiny-controlnet-misc"),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (auto& ch : s)
                             if (ch == '-') ch = '_';
                           return s;
                         });

TEST(ControlNet, ForwardCommandWritesTheResiduals) {
  const auto dir = fixture("tiny-sdxl-controlnet");
  const auto out = test::temp_dir() + "/residuals.safetensors";
  auto r = test::run_lightning("forward controlnet --threads 1 --model " + dir + " --inputs " +
                               dir + "/inputs.safetensors --out " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto got = io::load_safetensors(out);
  const auto want = io::load_safetensors(dir + "/expected.safetensors");
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, tensor] : want)
    EXPECT_LT(relative_error(got.at(name), tensor), 1e-4) << name;
}

TEST(ControlNet, ConfigErrorsNameTheKey) {
  auto json = io::read_json_file(fixture("tiny-sdxl-controlnet/config.json"));
  json["controlnet_conditioning_channel_order"] = "grb";
  try {
    models::ControlNetConfig::from_json(json, "cfg.json");
    FAIL() << "accepted channel order grb";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("controlnet_conditioning_channel_order"));
  }
  json = io::read_json_file(fixture("tiny-sdxl-controlnet/config.json"));
  json["frobnicate"] = 1;
  EXPECT_THROW(models::ControlNetConfig::from_json(json, "cfg.json"), Error);
}

generate::GenerateRequest pipeline_request() {
  const auto path = fixture("tiny-sdxl-controlnet/pipeline-case.json");
  auto r = test::request_from_case(path);
  r.control_scale = io::read_json_file(path)["controlnet_conditioning_scale"].get<double>();
  r.control_image =
      io::read_png(fixture("tiny-sdxl-controlnet/control.png")).pixels.to(torch::kFloat32) / 255.0;
  return r;
}

TEST(ControlNetPipeline, MatchesDiffusers) {
  auto model = generate::load_model(pipeline_dir(), {});
  generate::attach_controlnet(model, models::load_controlnet(fixture("tiny-sdxl-controlnet"), {}),
                              "tiny-sdxl-controlnet");
  const auto r = pipeline_request();
  const auto noise =
      io::load_safetensors(fixture("tiny-sdxl-controlnet/pipeline-inputs.safetensors"));
  EXPECT_TRUE(torch::equal(generate::initial_noise(r.seed, 4, r.height / 8, r.width / 8),
                           noise.at("noise")));
  const auto expected =
      io::load_safetensors(fixture("tiny-sdxl-controlnet/pipeline-expected.safetensors"));
  torch::Tensor latents;
  const auto images = generate::generate(model, r, {}, &latents);
  EXPECT_LT(relative_error(latents, expected.at("latents")), 1e-4);
  EXPECT_LT(relative_error((images / 2 + 0.5).clamp(0, 1), expected.at("image")), 1e-4);
  // The control matters: without it (or at scale 0) the image differs (scale 0 = no ControlNet).
  auto plain = generate::load_model(pipeline_dir(), {});
  auto no_control = r;
  no_control.control_image = torch::Tensor();
  const auto without = generate::generate(plain, no_control);
  EXPECT_GT((without - images).abs().max().item<double>(), 1e-3);
  auto zero = r;
  zero.control_scale = 0;
  EXPECT_LT((generate::generate(model, zero) - without).abs().max().item<double>(), 1e-5);
}

TEST(ControlNetPipeline, RefusesAControlNetOfAnotherArchitecture) {
  auto model = generate::load_model(pipeline_dir(), {});
  try {
    generate::attach_controlnet(model, models::load_controlnet(fixture("tiny-controlnet-misc"), {}),
                                "misc");
    FAIL() << "attached an SD-style ControlNet to an SDXL UNet";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("misc:"));
  }
}

TEST(ControlNetPipeline, GenerateCommandAppliesTheControl) {
  const auto out = test::temp_dir() + "/controlled.png";
  auto r =
      test::run_lightning("generate --threads 1 --model " + pipeline_dir() +
                          " --prompt 'a photo of a sneaker' --steps 2 --guidance 5 --seed 11 "
                          "--control " +
                          fixture("tiny-sdxl-controlnet/control.png") + " --control-model " +
                          fixture("tiny-sdxl-controlnet") + " --control-scale 0.8 --out " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto png = io::read_png(out);
  EXPECT_EQ(png.pixels.size(1), 64);  // the control image's size
  EXPECT_EQ(png.pixels.size(2), 96);
  EXPECT_THAT(png.text.at("parameters"),
              HasSubstr("ControlNet: tiny-sdxl-controlnet, Control scale: 0.8"));
  // The same as the pipeline test's image (diffusers' within 1e-4), to 8 bits.
  const auto expected =
      io::load_safetensors(fixture("tiny-sdxl-controlnet/pipeline-expected.safetensors"));
  const auto want = (expected.at("image")[0] * 255).round();
  EXPECT_LE((png.pixels.to(torch::kFloat32) - want).abs().max().item<double>(), 1.0);
  // Bad input: one flag without the other, a missing image.
  r = test::run_lightning("generate --model " + pipeline_dir() + " --prompt x --control " +
                          fixture("tiny-sdxl-controlnet/control.png") + " --out " + out);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_THAT(r.output, HasSubstr("--control IMAGE and --control-model DIR go together"));
  r = test::run_lightning("generate --model " + pipeline_dir() +
                          " --prompt x --control nope.png "
                          "--control-model " +
                          fixture("tiny-sdxl-controlnet") + " --out " + out);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_THAT(r.output, HasSubstr("--control nope.png"));
}

}  // namespace
}  // namespace lightning
