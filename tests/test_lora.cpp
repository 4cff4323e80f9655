// LoRA: attach, merge, kohya and PEFT files, on random-weight tiny UNets.
//
// Tolerances: merged vs unmerged forwards 1e-5 relative (float32 sums in another order).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "io/safetensors.h"
#include "models/lora.h"
#include "models/unet.h"
#include "tests/test_util.h"

namespace lightning::models {
namespace {

UNetInputs inputs_for(const UNetConfig& c, int64_t batch = 2) {
  torch::manual_seed(7);
  UNetInputs in;
  in.sample = torch::randn({batch, c.in_channels, 16, 16});
  in.timestep = torch::tensor({999, 250}, torch::kInt64).slice(0, 0, batch);
  in.encoder_hidden_states = torch::randn({batch, 5, c.cross_attention_dim[0]});
  if (c.addition_embed_type == "text_time") {
    in.text_embeds = torch::randn(
        {batch, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim});
    in.time_ids = torch::tensor({32., 32., 0., 0., 32., 32.}).repeat({batch, 1});
  }
  return in;
}

// Fresh adapters are the identity: give the up matrices values so the tests can fail.
void randomize_adapters(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : lora_parameters(m))
    if (name.find("lora_up") != std::string::npos) t.normal_(0, 0.05);
}

class LoRA : public ::testing::TestWithParam<const char*> {};

TEST_P(LoRA, FreshAdaptersChangeNothingAndMergeEqualsUnmerged) {
  const auto config = UNetConfig::preset(GetParam());
  torch::manual_seed(0);
  UNet2DConditionModel unet(config);
  torch::NoGradGuard no_grad;
  const auto in = inputs_for(config);
  const auto base = unet->forward(in);

  LoRAConfig lora;
  lora.rank = 4;
  lora.alpha = 2;
  const size_t n = attach_lora(*unet, lora);
  EXPECT_GT(n, 10u);
  EXPECT_EQ(count_lora(*unet), n);
  for (auto& layer : linear_and_conv_layers(*unet)) {
    const bool excluded = layer.path == "conv_in" || layer.path == "conv_out" ||
                          layer.path.rfind("time_embedding.", 0) == 0 ||
                          layer.path.rfind("add_embedding.", 0) == 0;
    EXPECT_EQ(static_cast<bool>(layer.adapter()), !excluded) << layer.path;
  }
  EXPECT_TRUE(torch::equal(unet->forward(in), base));

  randomize_adapters(*unet);
  const auto adapted = unet->forward(in);
  EXPECT_GT(test::relative_error(adapted, base), 1e-3);
  merge_lora(*unet);
  EXPECT_EQ(count_lora(*unet), 0u);
  EXPECT_LT(test::relative_error(unet->forward(in), adapted), 1e-5);
}

TEST_P(LoRA, KohyaFileRoundTripsAndAppliesToTheBase) {
  const auto config = UNetConfig::preset(GetParam());
  torch::manual_seed(0);
  UNet2DConditionModel unet(config);
  auto base = std::dynamic_pointer_cast<UNet2DConditionModelImpl>(unet->clone());
  ASSERT_EQ(count_lora(*base), 0u);  // a clone never shares adapters
  {
    torch::NoGradGuard no_grad;
    const auto in = inputs_for(config);
    ASSERT_TRUE(torch::equal(base->forward(in), unet->forward(in)));
  }
  LoRAConfig lora;
  lora.rank = 3;
  lora.alpha = 1.5;
  attach_lora(*unet, lora);
  randomize_adapters(*unet);
  torch::NoGradGuard no_grad;
  const auto in = inputs_for(config);
  const auto adapted = unet->forward(in);

  const auto path = test::temp_dir() + "/lora.safetensors";
  save_kohya_lora(*unet, path);
  io::SafetensorsFile file(path);
  EXPECT_TRUE(file.contains("lora_unet_mid_block_resnets_0_conv1.lora_down.weight"));
  EXPECT_TRUE(file.contains("lora_unet_mid_block_resnets_0_conv1.lora_up.weight"));
  EXPECT_TRUE(file.contains("lora_unet_mid_block_resnets_0_conv1.alpha"));
  EXPECT_TRUE(file.contains(
      "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight"));
  EXPECT_FALSE(file.contains("lora_unet_conv_in.lora_down.weight"));
  EXPECT_EQ(file.get("lora_unet_mid_block_resnets_0_conv1.lora_down.weight").sizes(),
            (std::vector<int64_t>{3, config.block_out_channels.back(), 3, 3}));
  EXPECT_EQ(file.get("lora_unet_mid_block_resnets_0_conv1.lora_up.weight").sizes(),
            (std::vector<int64_t>{config.block_out_channels.back(), 3, 1, 1}));
  EXPECT_FLOAT_EQ(file.get("lora_unet_mid_block_resnets_0_conv1.alpha").item<float>(), 1.5f);

  const auto read = read_lora_file(path);
  EXPECT_EQ(read.format, "kohya");
  EXPECT_EQ(read.modules.size(), count_lora(*unet));
  UNet2DConditionModel target(base);
  auto report = apply_lora(read, {{target.get(), "lora_unet_", {""}}}, 1.0, false);
  EXPECT_EQ(report.applied, read.modules.size());
  EXPECT_TRUE(report.unmatched.empty());
  EXPECT_LT(test::relative_error(target->forward(in), adapted), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(TinyUNets, LoRA, ::testing::Values("tiny-sd15", "tiny-sdxl"));

TEST(LoRAFile, MultiplierScalesAndPeftKeysApply) {
  const auto config = UNetConfig::tiny_sd15();
  torch::manual_seed(0);
  UNet2DConditionModel unet(config);
  auto base = std::dynamic_pointer_cast<UNet2DConditionModelImpl>(unet->clone());
  attach_lora(*unet, {2, 2, {"conv_in", "conv_out", "time_embedding"}, std::nullopt});
  randomize_adapters(*unet);
  torch::NoGradGuard no_grad;
  const auto in = inputs_for(config);
  // Half the adapter's scale equals a multiplier of 0.5.
  for (auto& layer : linear_and_conv_layers(*unet))
    if (layer.adapter()) layer.adapter()->scale *= 0.5;
  const auto half = unet->forward(in);
  for (auto& layer : linear_and_conv_layers(*unet))
    if (layer.adapter()) layer.adapter()->scale *= 2;

  // The same adapters as a diffusers/PEFT file (alpha = rank: scale 1, as stored here).
  std::vector<std::pair<std::string, torch::Tensor>> peft;
  for (auto& layer : linear_and_conv_layers(*unet))
    if (layer.adapter()) {
      peft.emplace_back("unet." + layer.path + ".lora_A.weight", layer.adapter()->down);
      peft.emplace_back("unet." + layer.path + ".lora_B.weight", layer.adapter()->up);
    }
  const auto path = test::temp_dir() + "/peft.safetensors";
  io::save_safetensors(path, peft);
  const auto read = read_lora_file(path);
  EXPECT_EQ(read.format, "peft");
  UNet2DConditionModel target(std::dynamic_pointer_cast<UNet2DConditionModelImpl>(base->clone()));
  apply_lora(read, {{target.get(), "lora_unet_", {"unet."}}}, 0.5, false);
  EXPECT_LT(test::relative_error(target->forward(in), half), 1e-5);
}

TEST(LoRAFile, RefusesWhatDoesNotFitAndChangesNothing) {
  const auto config = UNetConfig::tiny_sd15();
  torch::manual_seed(0);
  UNet2DConditionModel unet(config);
  const auto dir = test::temp_dir();
  const auto before = unet->conv_in->weight.clone();
  const auto mid = unet->mid_block->named_parameters()["resnets.0.conv1.weight"].clone();
  auto down = torch::randn({2, 64, 3, 3}), up = torch::randn({64, 2, 1, 1});

  // A key that names no layer: refused unless partial application is allowed.
  io::save_safetensors(dir + "/partial.safetensors",
                       {{"lora_unet_mid_block_resnets_0_conv1.lora_down.weight", down},
                        {"lora_unet_mid_block_resnets_0_conv1.lora_up.weight", up},
                        {"lora_unet_no_such_layer.lora_down.weight", torch::randn({2, 8})},
                        {"lora_unet_no_such_layer.lora_up.weight", torch::randn({8, 2})}});
  const auto partial = read_lora_file(dir + "/partial.safetensors");
  try {
    apply_lora(partial, {{unet.get(), "lora_unet_", {""}}}, 1.0, false);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lora_unet_no_such_layer"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--lora-allow-partial"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(torch::equal(unet->mid_block->named_parameters()["resnets.0.conv1.weight"], mid));
  auto report = apply_lora(partial, {{unet.get(), "lora_unet_", {""}}}, 1.0, true);
  EXPECT_EQ(report.applied, 1u);
  ASSERT_EQ(report.unmatched.size(), 1u);
  EXPECT_FALSE(torch::equal(unet->mid_block->named_parameters()["resnets.0.conv1.weight"], mid));

  // Shapes of another architecture: always refused.
  io::save_safetensors(dir + "/other.safetensors",
                       {{"lora_unet_conv_in.lora_down.weight", torch::randn({2, 4, 3, 3})},
                        {"lora_unet_conv_in.lora_up.weight", torch::randn({320, 2, 1, 1})}});
  EXPECT_THROW(apply_lora(read_lora_file(dir + "/other.safetensors"),
                          {{unet.get(), "lora_unet_", {""}}}, 1.0, true),
               Error);
  EXPECT_TRUE(torch::equal(unet->conv_in->weight, before));

  // Not a LoRA at all, and half a pair.
  io::save_safetensors(dir + "/unet.safetensors", {{"conv_in.weight", before}});
  EXPECT_THROW(read_lora_file(dir + "/unet.safetensors"), Error);
  io::save_safetensors(dir + "/half.safetensors",
                       {{"lora_unet_conv_in.lora_down.weight", torch::randn({2, 4, 3, 3})}});
  EXPECT_THROW(read_lora_file(dir + "/half.safetensors"), Error);
  EXPECT_THROW(attach_lora(*unet, {0, 1, {}, std::nullopt}), Error);
}

TEST(LoRATraining, GradientsReachOnlyTheAdapters) {
  const auto config = UNetConfig::tiny_sd15();
  torch::manual_seed(0);
  UNet2DConditionModel unet(config);
  for (auto& p : unet->parameters())
    p.set_requires_grad(false);
  attach_lora(*unet, {4, 4, {"conv_in", "conv_out", "time_embedding"}, std::nullopt});
  const auto params = lora_parameters(*unet);
  unet->forward(inputs_for(config)).square().mean().backward();
  for (auto& p : unet->parameters())
    EXPECT_FALSE(p.grad().defined());
  size_t with_grad = 0;
  for (auto& [name, p] : params)
    with_grad += p.grad().defined() && p.grad().abs().sum().item<double>() > 0;
  // Up matrices start at zero, so only they receive gradient on the first step (d out / d down
  // is up^T ... = 0); every up matrix must get one.
  EXPECT_EQ(with_grad, params.size() / 2);
}

}  // namespace
}  // namespace lightning::models
