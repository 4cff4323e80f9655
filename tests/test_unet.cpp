// UNet2DConditionModel: parity with diffusers 0.27.2 on random-weight tiny configs (fixtures in
// tests/fixtures/unet, see tests/fixtures/README.md), config handling and strict loading.
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "models/model_loader.h"
#include "nn/attention.h"
#include "test_util.h"

namespace lightning {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;
using test::ParityCase;
using test::relative_error;

models::UNetInputs read_inputs(const std::string& path) {
  return test::unet_inputs(io::load_safetensors(path));
}

class UNetParity : public ::testing::TestWithParam<ParityCase> {};

TEST_P(UNetParity, MatchesDiffusersF32) {
  const auto dir = test::source_path(std::string("tests/fixtures/unet/") + GetParam().model);
  auto unet = models::load_unet(dir, {});
  auto in = read_inputs(dir + "/inputs" + GetParam().suffix + ".safetensors");
  auto expected =
      io::load_safetensors(dir + "/expected" + GetParam().suffix + ".safetensors").at("out");
  torch::NoGradGuard no_grad;
  auto out = unet->forward(in);
  ASSERT_EQ(out.sizes(), expected.sizes());
  EXPECT_LT(relative_error(out, expected), 1e-4);
}

TEST_P(UNetParity, Bf16StaysClose) {
  const auto dir = test::source_path(std::string("tests/fixtures/unet/") + GetParam().model);
  auto unet = models::load_unet(dir, {torch::kBFloat16, torch::kCPU, "", {}});
  auto in = read_inputs(dir + "/inputs" + GetParam().suffix + ".safetensors");
  auto expected =
      io::load_safetensors(dir + "/expected" + GetParam().suffix + ".safetensors").at("out");
  torch::NoGradGuard no_grad;
  auto out = unet->forward(in);
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  // bf16 keeps 8 mantissa bits; errors compound over ~30 layers.
  EXPECT_LT(relative_error(out, expected), 0.1);
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, UNetParity,
    ::testing::Values(ParityCase{"tiny-sdxl", ""}, ParityCase{"tiny-sdxl", "-odd"},
                      ParityCase{"tiny-sdxl", "-controlnet"}, ParityCase{"tiny-sd15", ""},
                      ParityCase{"tiny-sd15", "-float-t"}, ParityCase{"tiny-misc", ""},
                      ParityCase{"tiny-misc", "-odd"}),
    [](const auto& info) {
      std::string name = std::string(info.param.model) + info.param.suffix;
      for (auto& c : name)
        if (c == '-') c = '_';
      return name;
    });

TEST(UNetParity, ChunkedAttentionMatchesDiffusers) {
  // Force many small chunks in the portable attention path.
  const auto dir = test::source_path("tests/fixtures/unet/tiny-sdxl");
  auto unet = models::load_unet(dir, {});
  auto in = read_inputs(dir + "/inputs.safetensors");
  auto expected = io::load_safetensors(dir + "/expected.safetensors").at("out");
  const auto saved = nn::attention_chunk_bytes();
  nn::set_attention_chunk_bytes(4096);
  torch::NoGradGuard no_grad;
  auto out = unet->forward(in);
  nn::set_attention_chunk_bytes(saved);
  EXPECT_LT(relative_error(out, expected), 1e-4);
}

TEST(UNetConfig, ParameterCountsOfRealArchitectures) {
  // Built without initialisation: parameters are virtual memory only.
  auto count = [](const models::UNetConfig& c) {
    auto unet = models::make_unet_uninitialised(c);
    int64_t n = 0;
    for (const auto& p : unet->parameters())
      n += p.numel();
    return n;
  };
  EXPECT_EQ(count(models::UNetConfig::sdxl()), 2567463684);  // SDXL base 1.0 UNet
  EXPECT_EQ(count(models::UNetConfig::sd15()), 859520964);   // SD 1.5 UNet
}

TEST(UNetConfig, JsonRoundTrip) {
  for (const char* name : {"sdxl", "sd15", "tiny-sdxl", "tiny-sd15"}) {
    const auto c = models::UNetConfig::preset(name);
    const auto j = c.to_json();
    const auto back = models::UNetConfig::from_json(j, name);
    EXPECT_EQ(back.to_json(), j) << name;
  }
}

TEST(UNetConfig, ReadsRealSdxlConfig) {
  // The key set and values of stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
  const auto j = nlohmann::json::parse(R"({
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": false,
    "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": null,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
    "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
    "time_embedding_act_fn": null, "time_embedding_dim": null, "time_embedding_type": "positional",
    "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": null, "use_linear_projection": true})");
  const auto c = models::UNetConfig::from_json(j, "sdxl/config.json");
  EXPECT_EQ(c.to_json(), models::UNetConfig::sdxl().to_json());
}

TEST(UNetConfig, RefusesUnsupportedValuesByName) {
  auto base = models::UNetConfig::tiny_sd15().to_json();
  auto expect_error = [&](nlohmann::json j, const std::string& needle) {
    try {
      models::UNetConfig::from_json(j, "unet/config.json");
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("unet/config.json")) << e.what();
      EXPECT_THAT(e.what(), HasSubstr(needle)) << e.what();
    }
  };
  auto j = base;
  j.erase("down_block_types");
  expect_error(j, "'down_block_types': missing");
  j = base;
  j["class_embed_type"] = "timestep";
  expect_error(j, "'class_embed_type'");
  j = base;
  j["down_block_types"][0] = "AttnDownBlock2D";
  expect_error(j, "AttnDownBlock2D");
  j = base;
  j["resnet_time_scale_shift"] = "scale_shift";
  expect_error(j, "'resnet_time_scale_shift'");
  j = base;
  j["time_cond_proj_dim"] = 256;
  expect_error(j, "'time_cond_proj_dim'");
  j = base;
  j["frobnicate"] = 1;
  expect_error(j, "unsupported key 'frobnicate'");
  j = base;
  j["block_out_channels"] = {32, 64, 128};
  expect_error(j, "'down_block_types': has 2 entries");
  j = base;
  j["layers_per_block"] = "two";
  expect_error(j, "'layers_per_block'");
  j = base;
  j["attention_head_dim"] = 5;
  expect_error(j, "'attention_head_dim'");
}

TEST(UNetLoading, MismatchedWeightsListKeys) {
  const auto dir = test::temp_dir();
  const auto src = test::source_path("tests/fixtures/unet/tiny-sd15");
  fs::copy_file(src + "/config.json", dir + "/config.json");
  auto named = io::load_safetensors(src + "/diffusion_pytorch_model.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (auto& [k, v] : named) {
    if (k == "conv_in.weight") continue;              // missing
    if (k == "conv_out.bias") v = torch::zeros({7});  // mis-shaped
    tensors.emplace_back(k, v);
  }
  tensors.emplace_back("extra.weight", torch::zeros({1}));  // unexpected
  io::save_safetensors(dir + "/diffusion_pytorch_model.safetensors", tensors);
  try {
    models::load_unet(dir, {});
    FAIL() << "accepted mismatched weights";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_THAT(what, HasSubstr("1 missing: conv_in.weight"));
    EXPECT_THAT(what, HasSubstr("1 unexpected: extra.weight"));
    EXPECT_THAT(what, HasSubstr("conv_out.bias (file [7] vs model [4])"));
  }
}

TEST(UNetLoading, F32WeightsAreViewsOfTheMappedFile) {
  const auto dir = test::source_path("tests/fixtures/unet/tiny-sd15");  // stored as f32
  const auto config = models::UNetConfig::from_json(io::read_json_file(dir + "/config.json"), dir);
  auto unet = models::make_unet_uninitialised(config);
  io::WeightFiles weights({dir + "/diffusion_pytorch_model.safetensors"});
  io::load_weights(*unet, weights, {}, dir);
  // The same mapping hands out the same address: the parameter is the file's bytes, not a copy.
  EXPECT_EQ(unet->conv_in->weight.data_ptr(), weights.get("conv_in.weight").data_ptr());
  EXPECT_EQ(unet->named_parameters()["down_blocks.0.attentions.0.proj_in.weight"].data_ptr(),
            weights.get("down_blocks.0.attentions.0.proj_in.weight").data_ptr());
}

// Held in f16 (weights_dtype), an f32 checkpoint's weights must fit f16's range: one that does
// not is named, never silently made inf.
TEST(UNetLoading, WeightsBeyondFloat16sRangeAreNamed) {
  const auto src = test::source_path("tests/fixtures/unet/tiny-sd15");  // stored as f32
  const auto tmp = test::temp_dir();
  const auto dir = tmp + "/big";
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(src + "/config.json", dir + "/config.json");
  auto tensors = io::load_safetensors(src + "/diffusion_pytorch_model.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> named(tensors.begin(), tensors.end());
  io::save_safetensors(dir + "/diffusion_pytorch_model.safetensors", named);
  const models::ModelLoadOptions half{torch::kFloat32, torch::kCPU, "", torch::kHalf};
  EXPECT_EQ(models::load_unet(dir, half)->conv_in->weight.scalar_type(), torch::kHalf);
  for (auto& [name, t] : named)
    if (name == "conv_out.bias") t = t.clone().fill_(1e5);
  io::save_safetensors(dir + "/diffusion_pytorch_model.safetensors", named);
  try {
    models::load_unet(dir, half);
    FAIL() << "accepted a weight beyond f16's range";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("weight 'conv_out.bias' in " + dir +
                                    "/diffusion_pytorch_model.safetensors holds values beyond "
                                    "float16's range (|x| up to 100000): load it in bf16 or f32"));
  }
  const auto big = models::load_unet(dir, {});
  EXPECT_EQ(big->conv_out->bias[0].item<float>(), 1e5f);
  // Nor is such a weight saved in f16 (a stage's model is): the directory is left as it was.
  const auto out = tmp + "/big-f16";
  try {
    models::save_unet(big, out, torch::kHalf);
    FAIL() << "saved a weight beyond f16's range";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("weight 'conv_out.bias' holds values beyond float16's range "
                                    "(|x| up to 100000)"));
  }
  EXPECT_FALSE(std::filesystem::exists(out + "/diffusion_pytorch_model.safetensors"));
}

TEST(UNetLoading, F16FileConvertsToComputeType) {
  const auto dir = test::source_path("tests/fixtures/unet/tiny-sdxl");  // stored as f16
  io::SafetensorsFile file(dir + "/diffusion_pytorch_model.safetensors");
  EXPECT_EQ(file.entry("conv_in.weight").dtype, io::DType::F16);
  auto unet = models::load_unet(dir, {torch::kFloat32, torch::kCPU, "", {}});
  EXPECT_EQ(unet->conv_in->weight.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::equal(unet->conv_in->weight, file.get("conv_in.weight").to(torch::kFloat32)));
}

TEST(UNetInputs, WrongShapesNameTheInput) {
  const auto dir = test::source_path("tests/fixtures/unet/tiny-sdxl");
  auto unet = models::load_unet(dir, {});
  auto in = read_inputs(dir + "/inputs.safetensors");
  torch::NoGradGuard no_grad;
  auto bad = in;
  bad.encoder_hidden_states = torch::zeros({2, 7, 31});
  try {
    unet->forward(bad);
    FAIL();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(),
                HasSubstr("'encoder_hidden_states': expected [2, tokens, 32], got [2, 7, 31]"));
  }
  bad = in;
  bad.time_ids = torch::zeros({2, 5});
  EXPECT_THROW(unet->forward(bad), Error);
  bad = in;
  bad.text_embeds = torch::Tensor();
  EXPECT_THROW(unet->forward(bad), Error);
  bad = in;
  bad.sample = torch::zeros({2, 3, 16, 16});
  EXPECT_THROW(unet->forward(bad), Error);
}

TEST(UNetTraining, GradientsReachEveryParameter) {
  auto config = models::UNetConfig::tiny_sdxl();
  models::UNet2DConditionModel unet(config);
  models::UNetInputs in;
  in.sample = torch::randn({1, 4, 8, 8});
  in.timestep = torch::tensor({500});
  in.encoder_hidden_states = torch::randn({1, 3, 32});
  in.text_embeds = torch::randn({1, 16});
  in.time_ids = torch::tensor({{64.f, 64.f, 0.f, 0.f, 64.f, 64.f}});
  unet->forward(in).square().mean().backward();
  for (const auto& item : unet->named_parameters()) {
    ASSERT_TRUE(item.value().grad().defined()) << item.key();
  }
}

}  // namespace
}  // namespace lightning
