// CLIPTextModel / CLIPTextModelWithProjection: parity with transformers 4.38.2 on random-weight
// tiny configs (fixtures in tests/fixtures/clip-text, see tests/fixtures/README.md), the pooling
// rule, config handling, strict loading and `lightning forward clip-text`.
#include <filesystem>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "models/model_loader.h"
#include "test_util.h"

namespace lightning {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;
using test::ParityCase;
using test::relative_error;

std::string fixture(const std::string& name) {
  return test::source_path("tests/fixtures/clip-text/" + name);
}

torch::Tensor output_by_name(const models::CLIPTextOutput& out, const std::string& name) {
  if (name == "last_hidden_state") return out.last_hidden_state;
  if (name == "penultimate_hidden_state") return out.penultimate_hidden_state;
  if (name == "pooler_output") return out.pooler_output;
  if (name == "text_embeds") return out.text_embeds;
  ADD_FAILURE() << "unknown output " << name;
  return {};
}

// Compares every tensor of expected<suffix>.safetensors; returns the largest relative error.
double max_error(const std::string& model, const std::string& suffix, torch::ScalarType dtype) {
  auto clip = models::load_clip_text(fixture(model), {dtype, torch::kCPU, "", {}});
  auto ids = io::load_safetensors(fixture(model + "/inputs" + suffix + ".safetensors"));
  auto expected = io::load_safetensors(fixture(model + "/expected" + suffix + ".safetensors"));
  torch::NoGradGuard no_grad;
  auto out = clip->forward(ids.at("input_ids"));
  double worst = 0;
  for (const auto& [name, want] : expected) {
    auto got = output_by_name(out, name);
    EXPECT_EQ(got.sizes(), want.sizes()) << name;
    EXPECT_EQ(got.scalar_type(), dtype) << name;
    const double err = relative_error(got, want);
    EXPECT_LT(err, dtype == torch::kFloat32 ? 1e-4 : 0.05) << model << suffix << " " << name;
    worst = std::max(worst, err);
  }
  return worst;
}

class CLIPTextParity : public ::testing::TestWithParam<ParityCase> {};

TEST_P(CLIPTextParity, MatchesTransformersF32) {
  max_error(GetParam().model, GetParam().suffix, torch::kFloat32);
}

TEST_P(CLIPTextParity, Bf16StaysClose) {
  max_error(GetParam().model, GetParam().suffix, torch::kBFloat16);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CLIPTextParity,
                         ::testing::Values(ParityCase{"tiny-clip-l", ""},
                                           ParityCase{"tiny-clip-l", "-pad-eos"},
                                           ParityCase{"tiny-clip-g", ""},
                                           ParityCase{"tiny-clip-g", "-pad-eos"}),
                         [](const auto& info) {
                           std::string name = std::string(info.param.model) + info.param.suffix;
                           for (auto& c : name)
                             if (c == '-') c = '_';
                           return name;
                         });

TEST(CLIPTextPooling, FirstEosPositionWhenTheConfigKnowsTheEosId) {
  models::CLIPTextConfig c;
  c.vocab_size = 1000;
  c.eos_token_id = 500;  // not the largest id: argmax(input_ids) would pick 900
  auto ids = torch::tensor({499, 900, 500, 0, 0,    // pad 0
                            499, 7, 500, 500, 500,  // pad = eos
                            499, 900, 3, 4, 5},     // no eos: last position
                           torch::kLong)
                 .view({3, 5});
  auto pos = models::pooled_positions(ids, c);
  EXPECT_TRUE(torch::equal(pos, torch::tensor({2, 2, 4}, torch::kLong))) << pos;
}

TEST(CLIPTextPooling, LegacyEosIdUsesTheTokenizerEosWithTheRealVocabulary) {
  const auto c = models::CLIPTextConfig::sdxl_clip_g();              // eos_token_id 2, vocab 49408
  auto ids = torch::tensor({49406, 320, 1125,  49407, 0,     0,      // pad 0
                            49406, 320, 49407, 49407, 49407, 49407,  // pad = eos
                            49406, 2,   2,     2,     49407, 0,      // id 2 is a token here
                            49406, 320, 1125,  539,   320,   1125},  // no eos: last position
                           torch::kLong)
                 .view({4, 6});
  auto pos = models::pooled_positions(ids, c);
  EXPECT_TRUE(torch::equal(pos, torch::tensor({3, 2, 4, 5}, torch::kLong))) << pos;
  // Same as transformers' argmax(input_ids) for tokenizer output (the first three rows).
  EXPECT_TRUE(torch::equal(pos.slice(0, 0, 3), ids.slice(0, 0, 3).argmax(-1)));
}

TEST(CLIPTextPooling, LegacyEosIdWithASmallVocabularyUsesArgmax) {
  models::CLIPTextConfig c;
  c.vocab_size = 1000;
  c.eos_token_id = 2;
  auto ids = torch::tensor({998, 5, 999, 0, 998, 999, 999, 999}, torch::kLong).view({2, 4});
  EXPECT_TRUE(torch::equal(models::pooled_positions(ids, c), torch::tensor({2, 1}, torch::kLong)));
}

TEST(CLIPTextConfig, ReadsRealSdxlTextEncoderConfigs) {
  // The key sets and values of stable-diffusion-xl-base-1.0 text_encoder/config.json and
  // text_encoder_2/config.json.
  const auto l = nlohmann::json::parse(R"({
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0", "vocab_size": 49408})");
  const auto g = nlohmann::json::parse(R"({
    "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu",
    "hidden_size": 1280, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 20, "num_hidden_layers": 32,
    "pad_token_id": 1, "projection_dim": 1280, "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0", "vocab_size": 49408})");
  const auto cl = models::CLIPTextConfig::from_json(l, "text_encoder/config.json");
  const auto cg = models::CLIPTextConfig::from_json(g, "text_encoder_2/config.json");
  EXPECT_EQ(cl.to_json(), models::CLIPTextConfig::sdxl_clip_l().to_json());
  EXPECT_EQ(cg.to_json(), models::CLIPTextConfig::sdxl_clip_g().to_json());
  EXPECT_EQ(cl.with_projection, false);
  EXPECT_EQ(cg.with_projection, true);
  EXPECT_EQ(cg.head_dim(), 64);
}

TEST(CLIPTextConfig, ParameterCountsOfRealArchitectures) {
  auto count = [](const models::CLIPTextConfig& c) {
    auto model = models::make_clip_text_uninitialised(c);
    int64_t n = 0;
    for (const auto& p : model->parameters())
      n += p.numel();
    return n;
  };
  EXPECT_EQ(count(models::CLIPTextConfig::sdxl_clip_l()), 123060480);  // CLIP ViT-L/14 text
  EXPECT_EQ(count(models::CLIPTextConfig::sdxl_clip_g()), 694659840);  // OpenCLIP bigG text
}

TEST(CLIPTextConfig, RefusesUnsupportedValuesByName) {
  auto expect_error = [](nlohmann::json j, const std::string& what) {
    try {
      models::CLIPTextConfig::from_json(j, "te/config.json");
      ADD_FAILURE() << "accepted " << j.dump();
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("te/config.json")) << j.dump();
      EXPECT_THAT(e.what(), HasSubstr(what)) << j.dump();
    }
  };
  auto base = models::CLIPTextConfig::sdxl_clip_l().to_json();
  auto j = base;
  j["hidden_act"] = "relu";
  expect_error(j, "'hidden_act': 'relu' is not supported (supported: quick_gelu, gelu)");
  j = base;
  j["architectures"] = {"CLIPModel"};
  expect_error(j, "'CLIPModel' is not supported");
  j = base;
  j["model_type"] = "clip";
  expect_error(j, "model_type");
  j = base;
  j["num_attention_heads"] = 7;
  expect_error(j, "7 does not divide hidden_size 768");
  j = base;
  j["rope_theta"] = 10000;
  expect_error(j, "rope_theta");
  j = base;
  j["pruned_heads"] = {{"0", {1}}};
  expect_error(j, "pruned_heads");
}

// Copies a fixture model into the test's temporary directory (or its folder `sub`) with its
// weights and config edited.
std::string edited_copy(const std::string& model,
                        const std::function<void(std::map<std::string, torch::Tensor>&)>& edit,
                        const std::function<void(nlohmann::json&)>& edit_config = {},
                        const std::string& sub = "") {
  const auto dir = test::temp_dir() + sub;
  fs::create_directories(dir);
  auto config = io::read_json_file(fixture(model + "/config.json"));
  if (edit_config) edit_config(config);
  io::write_json_file(dir + "/config.json", config);
  auto named = io::load_safetensors(fixture(model + "/model.safetensors"));
  edit(named);
  std::vector<std::pair<std::string, torch::Tensor>> tensors(named.begin(), named.end());
  io::save_safetensors(dir + "/model.safetensors", tensors);
  return dir;
}

TEST(CLIPTextLoading, MismatchedWeightsListKeys) {
  const auto dir = edited_copy("tiny-clip-g", [](auto& named) {
    named.erase("text_model.final_layer_norm.weight");
    named["text_model.extra"] = torch::zeros({1});
  });
  try {
    models::load_clip_text(dir, {});
    FAIL() << "accepted mismatched weights";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("1 missing: text_model.final_layer_norm.weight"));
    EXPECT_THAT(e.what(), HasSubstr("1 unexpected: text_model.extra"));
  }
}

TEST(CLIPTextLoading, ProjectionFollowsArchitecturesThenWeights) {
  // architectures says CLIPTextModel but the file has a projection: strict loading refuses it.
  auto dir = edited_copy(
      "tiny-clip-g", [](auto&) {}, [](auto& j) { j["architectures"] = {"CLIPTextModel"}; });
  try {
    models::load_clip_text(dir, {});
    FAIL() << "accepted an unexpected text_projection";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("1 unexpected: text_projection.weight"));
  }
  // Without architectures the weights decide.
  dir = edited_copy(
      "tiny-clip-g", [](auto&) {}, [](auto& j) { j.erase("architectures"); });
  EXPECT_TRUE(models::load_clip_text(dir, {})->has_projection());
  dir = edited_copy(
      "tiny-clip-l", [](auto&) {}, [](auto& j) { j.erase("architectures"); });
  EXPECT_FALSE(models::load_clip_text(dir, {})->has_projection());
}

TEST(CLIPTextLoading, AcceptsAndIgnoresPositionIds) {
  // Files written by older transformers carry the position_ids buffer; a pipeline root with a
  // text_encoder/ folder is accepted too.
  const auto dir = edited_copy(
      "tiny-clip-l",
      [](auto& named) {
        named["text_model.embeddings.position_ids"] = torch::arange(16, torch::kLong).view({1, 16});
      },
      {}, "/pipeline/text_encoder");
  auto clip = models::load_clip_text(fs::path(dir).parent_path().string(), {});
  auto ids = io::load_safetensors(fixture("tiny-clip-l/inputs.safetensors")).at("input_ids");
  auto want = io::load_safetensors(fixture("tiny-clip-l/expected.safetensors"));
  torch::NoGradGuard no_grad;
  auto out = clip->forward(ids);
  EXPECT_LT(relative_error(out.last_hidden_state, want.at("last_hidden_state")), 1e-4);
}

TEST(CLIPTextInputs, BadInputIdsAreNamed) {
  auto clip = models::load_clip_text(fixture("tiny-clip-l"), {});
  torch::NoGradGuard no_grad;
  auto expect_error = [&](const torch::Tensor& ids, const std::string& what) {
    try {
      clip->forward(ids);
      ADD_FAILURE() << "accepted " << ids.sizes();
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("'input_ids'"));
      EXPECT_THAT(e.what(), HasSubstr(what));
    }
  };
  expect_error(torch::zeros({2, 17}, torch::kLong), "max_position_embeddings");
  expect_error(torch::full({1, 4}, 1000, torch::kLong), "vocab_size");
  expect_error(torch::zeros({4}, torch::kLong), "[B, T]");
  expect_error(torch::zeros({1, 4}), "integer");
  // int32 ids are accepted.
  EXPECT_EQ(clip->forward(torch::zeros({1, 4}, torch::kInt)).last_hidden_state.size(1), 4);
}

TEST(CLIPTextCli, ForwardWritesTransformersOutputs) {
  const auto out = test::temp_dir() + "/out.safetensors";
  auto r = test::run_lightning("forward clip-text --threads 1 --model " + fixture("tiny-clip-g") +
                               " --inputs " + fixture("tiny-clip-g/inputs.safetensors") +
                               " --out " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto actual = io::load_safetensors(out);
  auto expected = io::load_safetensors(fixture("tiny-clip-g/expected.safetensors"));
  for (const char* name : {"last_hidden_state", "penultimate_hidden_state", "text_embeds"})
    EXPECT_LT(relative_error(actual.at(name), expected.at(name)), 1e-4) << name;
  EXPECT_EQ(actual.at("pooler_output").sizes(), (std::vector<int64_t>{2, 40}));
}

TEST(CLIPTextCli, BadInputNameExitsOneNamingIt) {
  const auto dir = test::temp_dir();
  io::save_safetensors(dir + "/in.safetensors",
                       {{"input_idz", torch::zeros({1, 4}, torch::kLong)}});
  auto r =
      test::run_lightning("forward clip-text --model " + fixture("tiny-clip-l") + " --inputs " +
                          dir + "/in.safetensors --out " + dir + "/out.safetensors");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_THAT(r.output, HasSubstr("unknown input 'input_idz'"));
  EXPECT_FALSE(fs::exists(dir + "/out.safetensors"));
}

}  // namespace
}  // namespace lightning
