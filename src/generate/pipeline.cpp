#include "generate/pipeline.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <regex>

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "core/error.h"
#include "diffusion/guidance.h"
#include "io/files.h"
#include "io/json_config.h"
#include "models/checkpoint_formats.h"
#include "models/lora.h"
#include "text/utf8.h"

namespace lightning::generate {
namespace fs = std::filesystem;

namespace {

constexpr const char* kSettingsFile = "lightning.json";

std::string sampler_title(diffusion::SamplerKind kind) {
  return kind == diffusion::SamplerKind::kEuler ? "Euler" : "DDIM";
}

// The pad token of a transformers tokenizer directory: tokenizer_config.json's or
// special_tokens_map.json's pad_token (a string or {"content": ...}); end-of-text otherwise.
int64_t read_pad_id(const text::CLIPTokenizer& tokenizer, const std::string& dir) {
  for (const char* name : {"special_tokens_map.json", "tokenizer_config.json"}) {
    auto path = fs::path(dir) / name;
    if (!fs::exists(path)) continue;
    auto json = io::read_json_file(path.string());
    if (!json.is_object() || !json.contains("pad_token") || json["pad_token"].is_null()) continue;
    auto pad = json["pad_token"];
    std::string token = pad.is_string() ? pad.get<std::string>()
                        : pad.is_object() && pad.contains("content") && pad["content"].is_string()
                            ? pad["content"].get<std::string>()
                            : "";
    if (token.empty())
      fail("{}: pad_token is neither a string nor {{\"content\": ...}}", path.string());
    int64_t id = tokenizer.token_to_id(token);
    if (id < 0) fail("{}: pad_token '{}' is not in the vocabulary", path.string(), token);
    return id;
  }
  return tokenizer.eos_id();
}

}  // namespace

Recommended Recommended::from_json(const nlohmann::json& json, const std::string& file) {
  io::ConfigReader reader(json, file);
  Recommended r;
  r.steps = reader.get_int("steps", r.steps);
  r.guidance_scale = reader.get_double("guidance_scale", r.guidance_scale);
  r.sampler =
      diffusion::parse_sampler_kind(reader.get_string("sampler", diffusion::to_string(r.sampler)));
  reader.refuse_unknown_keys();
  if (r.steps < 1) reader.fail_key("steps", fmt::format("must be >= 1, got {}", r.steps));
  if (!(r.guidance_scale >= 0) || !std::isfinite(r.guidance_scale))
    reader.fail_key("guidance_scale", fmt::format("must be >= 0, got {}", r.guidance_scale));
  return r;
}

nlohmann::json Recommended::to_json() const {
  return {{"steps", steps},
          {"guidance_scale", guidance_scale},
          {"sampler", diffusion::to_string(sampler)}};
}

int64_t TextToImageModel::sample_size() const {
  return (unet->config.sample_size > 0 ? unet->config.sample_size : 32) * vae_scale();
}

int64_t TextToImageModel::size_multiple() const {
  // The UNet handles any latent size (diffusers' upsample_size path); a pixel-space model keeps
  // its own down-sampling factor.
  return is_latent() ? vae_scale() : int64_t{1} << (unet->config.num_blocks() - 1);
}

int64_t TextToImageModel::image_channels() const {
  return is_latent() ? vae->config.out_channels : unet->config.in_channels;
}

std::vector<std::string> shipped_model_names(const std::string& models_root) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(models_root, ec))
    if (fs::exists(entry.path() / "model_index.json"))
      names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::string resolve_model_dir(const std::string& dir_or_name, const std::string& models_root) {
  if (fs::is_directory(dir_or_name)) return dir_or_name;
  bool plain_name = dir_or_name.find('/') == std::string::npos && !dir_or_name.empty() &&
                    dir_or_name != "." && dir_or_name != "..";
  if (plain_name && fs::is_directory(fs::path(models_root) / dir_or_name))
    return (fs::path(models_root) / dir_or_name).string();
  auto names = shipped_model_names(models_root);
  fail_usage(
      "--model '{}': no such directory, and not a shipped model (shipped: {})", dir_or_name,
      names.empty() ? "none found in " + models_root : fmt::format("{}", fmt::join(names, ", ")));
}

namespace {

// A component of model_index.json: absent or [null, null] -> false.
bool has_component(const nlohmann::json& index, const std::string& name) {
  if (!index.contains(name)) return false;
  const auto& v = index[name];
  return !(v.is_null() || (v.is_array() && !v.empty() && v[0].is_null()));
}

std::shared_ptr<const text::CLIPTokenizer> load_tokenizer(const std::string& dir, int64_t* pad_id) {
  auto tokenizer = std::make_shared<text::CLIPTokenizer>(text::CLIPTokenizer::from_directory(dir));
  *pad_id = read_pad_id(*tokenizer, dir);
  return tokenizer;
}

void check_vocab(const text::CLIPTokenizer& tokenizer, const models::CLIPTextModel& encoder,
                 const std::string& what) {
  for (const auto& [token, id] : tokenizer.vocab())
    if (id >= encoder->config.vocab_size)
      fail("{}: tokenizer id {} ('{}') is outside the text encoder's vocab_size {}", what, id,
           token, encoder->config.vocab_size);
}

// Checks that the components fit together; errors name the directory and the mismatch.
void check_components(const TextToImageModel& m, const std::string& dir) {
  const auto& u = m.unet->config;
  const auto& t = m.text_encoder->config;
  const int64_t cross = u.cross_attention_dim.empty() ? 0 : u.cross_attention_dim[0];
  if (m.is_sdxl()) {
    const auto& t2 = m.text_encoder_2->config;
    if (cross != t.hidden_size + t2.hidden_size)
      fail(
          "{}: unet cross_attention_dim {} is not text_encoder hidden_size {} + text_encoder_2 "
          "hidden_size {}",
          dir, cross, t.hidden_size, t2.hidden_size);
    if (u.addition_embed_type != "text_time")
      fail("{}: an SDXL pipeline needs a unet with addition_embed_type 'text_time'", dir);
    if (!t2.with_projection)
      fail("{}: text_encoder_2 must be a CLIPTextModelWithProjection (no text_projection)", dir);
    const int64_t expected = t2.projection_dim + 6 * u.addition_time_embed_dim;
    if (u.projection_class_embeddings_input_dim != expected)
      fail(
          "{}: unet projection_class_embeddings_input_dim {} is not text_encoder_2 projection_dim "
          "{} + 6 time ids x {} (a refiner-style unet with aesthetic scores is not supported)",
          dir, u.projection_class_embeddings_input_dim, t2.projection_dim,
          u.addition_time_embed_dim);
  } else {
    if (cross != t.hidden_size)
      fail("{}: unet cross_attention_dim {} does not match text_encoder hidden_size {}", dir, cross,
           t.hidden_size);
    if (!u.addition_embed_type.empty())
      fail("{}: unet addition_embed_type '{}' (SDXL-style) needs text_encoder_2", dir,
           u.addition_embed_type);
  }
  if (m.is_latent()) {
    if (u.in_channels != m.vae->config.latent_channels || u.out_channels != u.in_channels)
      fail("{}: unet in/out channels {}/{} do not match the vae's latent_channels {}", dir,
           u.in_channels, u.out_channels, m.vae->config.latent_channels);
  } else if (u.in_channels != u.out_channels) {
    fail("{}: unet in_channels {} != out_channels {}", dir, u.in_channels, u.out_channels);
  }
  check_vocab(*m.tokenizer, m.text_encoder, dir + "/tokenizer");
  if (m.is_sdxl()) check_vocab(*m.tokenizer_2, m.text_encoder_2, dir + "/tokenizer_2");
}

}  // namespace

TextToImageModel load_model(const std::string& dir, const models::ModelLoadOptions& options,
                            const ModelOverrides& overrides) {
  if (!fs::is_directory(dir)) fail("{}: not a directory", dir);
  auto index_path = fs::path(dir) / "model_index.json";
  if (!fs::exists(index_path))
    fail("{}: missing (not a diffusers-style model directory)", index_path.string());
  auto index = io::read_json_file(index_path.string());
  if (!index.is_object()) fail("{}: expected a JSON object", index_path.string());
  if (has_component(index, "text_encoder_2") && !has_component(index, "text_encoder"))
    fail("{}: a pipeline with only text_encoder_2 (an SDXL refiner) is not supported",
         index_path.string());
  std::vector<std::string> components = {"unet", "text_encoder", "tokenizer", "scheduler"};
  for (const char* optional : {"vae", "text_encoder_2", "tokenizer_2"})
    if (has_component(index, optional)) components.push_back(optional);
  if (has_component(index, "text_encoder_2") != has_component(index, "tokenizer_2"))
    fail("{}: text_encoder_2 and tokenizer_2 must both be listed", index_path.string());
  for (const auto& component : components)
    if (!fs::is_directory(fs::path(dir) / component))
      fail("{}: missing component folder '{}' (listed in model_index.json)", dir, component);

  TextToImageModel model;
  model.name = fs::path(dir).lexically_normal().filename().string();
  if (model.name.empty())
    model.name = fs::path(dir).lexically_normal().parent_path().filename().string();
  const auto path = [&](const std::string& component) {
    return (fs::path(dir) / component).string();
  };
  if (overrides.unet_file.empty()) {
    model.unet = models::load_unet(path("unet"), options);
  } else {
    model.unet = models::load_unet_file(path("unet"), overrides.unet_file, options);
    model.unet_file = fs::path(overrides.unet_file).filename().string();
  }
  model.text_encoder = models::load_clip_text(path("text_encoder"), options);
  model.tokenizer = load_tokenizer(path("tokenizer"), &model.pad_id);
  if (has_component(index, "text_encoder_2")) {
    model.text_encoder_2 = models::load_clip_text(path("text_encoder_2"), options);
    model.tokenizer_2 = load_tokenizer(path("tokenizer_2"), &model.pad_id_2);
    model.force_zeros_for_empty_prompt = index.value("force_zeros_for_empty_prompt", true);
  }
  if (has_component(index, "vae")) {
    auto vae_options = options;
    const auto vae_dir = path("vae");
    const auto config_path = (fs::path(vae_dir) / "config.json").string();
    if (options.dtype == torch::kFloat16 &&
        models::VAEConfig::from_json(io::read_json_file(config_path), config_path).force_upcast)
      vae_options.dtype = torch::kFloat32;
    model.vae = models::load_vae(vae_dir, vae_options);
  }
  model.scheduler = diffusion::load_scheduler_config(
      (fs::path(path("scheduler")) / "scheduler_config.json").string());
  auto settings = fs::path(dir) / kSettingsFile;
  if (fs::exists(settings)) {
    auto json = io::read_json_file(settings.string());
    if (!json.is_object() || !json.contains("recommended"))
      fail("{}: expected an object with 'recommended'", settings.string());
    model.recommended =
        Recommended::from_json(json["recommended"], settings.string() + " recommended");
  } else {
    model.recommended.sampler = diffusion::default_sampler_kind(model.scheduler);
  }
  check_components(model, dir);
  return model;
}

namespace {

// The scheduler of stable-diffusion-xl-base-1.0 and stable-diffusion-v1-5.
diffusion::SchedulerConfig builtin_scheduler() {
  return diffusion::from_json({{"_class_name", "EulerDiscreteScheduler"},
                               {"beta_start", 0.00085},
                               {"beta_end", 0.012},
                               {"beta_schedule", "scaled_linear"},
                               {"num_train_timesteps", 1000},
                               {"prediction_type", "epsilon"},
                               {"timestep_spacing", "leading"},
                               {"steps_offset", 1}},
                              "built-in SDXL scheduler");
}

// Loads `module` from `files` through `map`; checkpoint keys under `prefix` that the map does
// not read are refused (unless listed in `ignored`).
void load_mapped(torch::nn::Module& module, const std::shared_ptr<io::WeightFiles>& files,
                 io::KeyMap map, const std::string& prefix, const models::ModelLoadOptions& options,
                 const std::string& what, std::vector<std::string> ignored = {}) {
  io::MappedWeights mapped(files, std::move(map), prefix, std::move(ignored));
  io::load_weights(module, mapped, options.weights(), what);
  module.eval();
}

}  // namespace

void use_builtin_tokenizers_and_scheduler(TextToImageModel& model, const std::string& vocab_path,
                                          bool sdxl) {
  auto tokenizer = std::make_shared<text::CLIPTokenizer>(text::CLIPTokenizer::load(vocab_path));
  model.pad_id = tokenizer->eos_id();
  model.tokenizer = tokenizer;
  if (sdxl) {
    model.pad_id_2 = tokenizer->token_to_id("!");
    model.tokenizer_2 = tokenizer;
  }
  model.scheduler = builtin_scheduler();
}

TextToImageModel load_single_file(const std::string& file, const models::ModelLoadOptions& options,
                                  const SingleFileOptions& sf) {
  if (!fs::is_regular_file(file)) fail("{}: no such file", file);
  auto files = std::make_shared<io::WeightFiles>(std::vector<std::string>{file});
  const auto layout = models::detect_layout(*files);
  if (layout == models::CheckpointLayout::kDiffusersUNet ||
      layout == models::CheckpointLayout::kOriginalUNet)
    fail_usage(
        "{}: holds only a UNet ({}); give the pipeline with --model DIR and this file with "
        "--unet",
        file, models::to_string(layout));
  if (layout == models::CheckpointLayout::kUnknown)
    fail("{}: not a single-file checkpoint (no {}input_blocks.0.0.weight)", file,
         models::kOriginalUNetPrefix);
  const bool sdxl = layout == models::CheckpointLayout::kSdxlSingleFile;

  TextToImageModel model;
  model.name = fs::path(file).filename().string();
  // Configs: the given pipeline directory's, or the built-in ones of the detected architecture.
  models::UNetConfig unet_config = sdxl ? models::UNetConfig::sdxl() : models::UNetConfig::sd15();
  models::CLIPTextConfig te1_config = models::CLIPTextConfig::sdxl_clip_l();
  models::CLIPTextConfig te2_config = models::CLIPTextConfig::sdxl_clip_g();
  models::VAEConfig vae_config = models::VAEConfig::sdxl();
  if (!sdxl) {
    vae_config.scaling_factor = 0.18215;
    vae_config.sample_size = 512;
  }
  model.force_zeros_for_empty_prompt = sdxl;
  if (!sf.config_dir.empty()) {
    const fs::path dir(sf.config_dir);
    auto read = [&](const char* component, const char* name) {
      const auto path = (dir / component / name).string();
      if (!fs::exists(path)) fail("--config {}: missing {}/{}", sf.config_dir, component, name);
      return std::make_pair(io::read_json_file(path), path);
    };
    auto [u, up] = read("unet", "config.json");
    unet_config = models::UNetConfig::from_json(u, up);
    auto [t1, t1p] = read("text_encoder", "config.json");
    te1_config = models::CLIPTextConfig::from_json(t1, t1p);
    if (sdxl) {
      auto [t2, t2p] = read("text_encoder_2", "config.json");
      te2_config = models::CLIPTextConfig::from_json(t2, t2p);
      te2_config.with_projection = true;
    }
    auto [v, vp] = read("vae", "config.json");
    vae_config = models::VAEConfig::from_json(v, vp);
    model.tokenizer = load_tokenizer((dir / "tokenizer").string(), &model.pad_id);
    if (sdxl) model.tokenizer_2 = load_tokenizer((dir / "tokenizer_2").string(), &model.pad_id_2);
    model.scheduler =
        diffusion::load_scheduler_config((dir / "scheduler" / "scheduler_config.json").string());
    if (fs::exists(dir / "model_index.json"))
      model.force_zeros_for_empty_prompt = io::read_json_file((dir / "model_index.json").string())
                                               .value("force_zeros_for_empty_prompt", sdxl);
  } else {
    use_builtin_tokenizers_and_scheduler(model, sf.vocab_path, sdxl);
    model.recommended.steps = 30;
    model.recommended.guidance_scale = sdxl ? 5.0 : 7.5;
  }
  te1_config.with_projection = false;

  model.unet = models::make_unet_uninitialised(unet_config);
  load_mapped(*model.unet, files,
              models::unet_original_key_map(*model.unet, models::kOriginalUNetPrefix),
              models::kOriginalUNetPrefix, options, file + " (UNet)");
  const std::string te1_prefix = sdxl ? models::kSdxlClipLPrefix : models::kSd1ClipPrefix;
  model.text_encoder = models::make_clip_text_uninitialised(te1_config);
  load_mapped(*model.text_encoder, files,
              models::clip_prefixed_key_map(*model.text_encoder, te1_prefix), te1_prefix, options,
              file + " (text encoder)", {te1_prefix + "text_model.embeddings.position_ids"});
  if (sdxl) {
    model.text_encoder_2 = models::make_clip_text_uninitialised(te2_config);
    const std::string p = models::kSdxlClipGPrefix;
    load_mapped(*model.text_encoder_2, files, models::open_clip_key_map(*model.text_encoder_2, p),
                p, options, file + " (text encoder 2)", {p + "logit_scale", p + "attn_mask"});
  }
  auto vae_options = options;
  if (options.dtype == torch::kFloat16 && vae_config.force_upcast)
    vae_options.dtype = torch::kFloat32;
  model.vae = models::make_vae_uninitialised(vae_config);
  load_mapped(*model.vae, files,
              models::vae_original_key_map(*model.vae, models::kOriginalVAEPrefix),
              models::kOriginalVAEPrefix, vae_options, file + " (VAE)");
  model.unet->compute_dtype = options.dtype;
  model.text_encoder->set_compute_dtype(options.dtype);
  if (sdxl) model.text_encoder_2->set_compute_dtype(options.dtype);
  model.vae->compute_dtype = vae_options.dtype;
  check_components(model, file);
  return model;
}

void save_model(const TextToImageModel& model, const std::string& dir,
                c10::optional<torch::ScalarType> weights_dtype) {
  io::check_replaceable(dir, "model_index.json");
  io::write_directory_atomic(dir, [&](const std::string& tmp_dir) {
    const fs::path tmp(tmp_dir);
    const char* pipeline_class = model.is_sdxl()     ? "StableDiffusionXLPipeline"
                                 : model.is_latent() ? "StableDiffusionPipeline"
                                                     : "LightningPixelPipeline";
    nlohmann::json index = {{"_class_name", pipeline_class},
                            {"_diffusers_version", "0.27.2"},
                            {"unet", {"diffusers", "UNet2DConditionModel"}},
                            {"text_encoder", {"transformers", "CLIPTextModel"}},
                            {"tokenizer", {"transformers", "CLIPTokenizer"}},
                            {"scheduler", {"diffusers", model.scheduler.class_name}}};
    models::save_unet(model.unet, (tmp / "unet").string(), weights_dtype);
    models::save_clip_text(model.text_encoder, (tmp / "text_encoder").string(), weights_dtype);
    model.tokenizer->save((tmp / "tokenizer").string(), model.pad_id);
    if (model.is_sdxl()) {
      index["text_encoder_2"] = {"transformers", "CLIPTextModelWithProjection"};
      index["tokenizer_2"] = {"transformers", "CLIPTokenizer"};
      index["force_zeros_for_empty_prompt"] = model.force_zeros_for_empty_prompt;
      models::save_clip_text(model.text_encoder_2, (tmp / "text_encoder_2").string(),
                             weights_dtype);
      model.tokenizer_2->save((tmp / "tokenizer_2").string(), model.pad_id_2);
    }
    if (model.is_latent()) {
      index["vae"] = {"diffusers", "AutoencoderKL"};
      models::save_vae(model.vae, (tmp / "vae").string(), weights_dtype);
    }
    io::write_json_file((tmp / "model_index.json").string(), index);
    fs::create_directories(tmp / "scheduler");
    io::write_json_file((tmp / "scheduler" / "scheduler_config.json").string(),
                        diffusion::to_json(model.scheduler));
    io::write_json_file((tmp / kSettingsFile).string(),
                        {{"recommended", model.recommended.to_json()}});
  });
}

namespace {

// Token ids [B, T] (T = the encoder's max_position_embeddings), truncated with a warning.
torch::Tensor tokenize(const text::CLIPTokenizer& tokenizer, int64_t pad_id,
                       const models::CLIPTextModel& encoder,
                       const std::vector<std::string>& prompts, bool warn_truncation) {
  const int64_t length = encoder->config.max_position_embeddings;
  auto ids = torch::empty({static_cast<int64_t>(prompts.size()), length}, torch::kInt64);
  auto acc = ids.accessor<int64_t, 2>();
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto enc = tokenizer.encode_padded(prompts[i], pad_id, length);
    if (warn_truncation && enc.eos_position == length - 1 &&
        static_cast<int64_t>(tokenizer.encode(prompts[i]).size()) > length)
      spdlog::warn("prompt '{}' is longer than {} tokens and was truncated", prompts[i], length);
    for (int64_t j = 0; j < length; ++j)
      acc[static_cast<int64_t>(i)][j] = enc.input_ids[static_cast<size_t>(j)];
  }
  return ids;
}

models::CLIPTextOutput run_encoder(models::CLIPTextModel encoder, const torch::Tensor& ids) {
  auto device = encoder->text_model->final_layer_norm->weight.device();
  return encoder->forward(ids.to(device));
}

}  // namespace

torch::Tensor tokenize_prompts(const TextToImageModel& model,
                               const std::vector<std::string>& prompts, bool warn_truncation) {
  return tokenize(*model.tokenizer, model.pad_id, model.text_encoder, prompts, warn_truncation);
}

PromptEmbeds encode_conditioning(const TextToImageModel& model,
                                 const std::vector<std::string>& prompts, bool warn_truncation) {
  auto first = run_encoder(model.text_encoder, tokenize_prompts(model, prompts, warn_truncation));
  if (!model.is_sdxl()) return {first.last_hidden_state, {}};
  // SDXL (diffusers' encode_prompt): both encoders' penultimate hidden states, concatenated;
  // the pooled embedding is the second encoder's projected output.
  auto second = run_encoder(model.text_encoder_2, tokenize(*model.tokenizer_2, model.pad_id_2,
                                                           model.text_encoder_2, prompts, false));
  auto context =
      torch::cat({first.penultimate_hidden_state,
                  second.penultimate_hidden_state.to(first.penultimate_hidden_state.device())},
                 -1);
  return {context, second.text_embeds.to(context.device())};
}

PromptEmbeds encode_negative(const TextToImageModel& model, const std::string& negative_prompt) {
  if (!(model.is_sdxl() && model.force_zeros_for_empty_prompt && negative_prompt.empty()))
    return encode_conditioning(model, {negative_prompt});
  // Zeros of the conditioning's shapes; no text encoder needs to run.
  const auto& t1 = model.text_encoder->config;
  const auto& t2 = model.text_encoder_2->config;
  const auto options =
      torch::TensorOptions()
          .dtype(model.text_encoder->dtype())
          .device(model.text_encoder->text_model->final_layer_norm->weight.device());
  return {torch::zeros({1, t1.max_position_embeddings, t1.hidden_size + t2.hidden_size}, options),
          torch::zeros({1, t2.projection_dim}, options)};
}

torch::Tensor encode_prompts(const TextToImageModel& model, const std::vector<std::string>& prompts,
                             bool warn_truncation) {
  return encode_conditioning(model, prompts, warn_truncation).context;
}

torch::Tensor decode_latents(const TextToImageModel& model, const torch::Tensor& latents,
                             const std::optional<models::VAETiling>& tiling) {
  if (!model.is_latent()) return latents.to(torch::kFloat32);
  torch::NoGradGuard no_grad;
  auto vae = model.vae;  // holders share the module; decode is non-const
  auto z = vae->config.from_unet_latent(latents.to(torch::kFloat32));
  auto run = [&] {
    auto out = tiling ? vae->decode_tiled(z, *tiling) : vae->decode(z);
    return out.to(torch::kFloat32);
  };
  auto images = run();
  if (!torch::isfinite(images).all().item<bool>()) {
    if (vae->dtype() != torch::kFloat16)
      fail("the VAE decode produced NaN or Inf values (the latents hold NaN or Inf?)");
    spdlog::warn(
        "the VAE overflowed in f16; decoding again in f32 (set force_upcast in "
        "vae/config.json to do this from the start)");
    vae->to(torch::kFloat32);
    vae->compute_dtype = torch::kFloat32;
    images = run();
  }
  return images;
}

GenerateRequest resolve_request(const TextToImageModel& model, GenerateRequest r) {
  if (r.prompts.empty()) fail_usage("no prompt to generate");
  size_t bad = 0;
  for (const auto* text : {&r.negative_prompt})
    if (!text::is_valid_utf8(*text, &bad))
      fail_usage("--negative-prompt is not valid UTF-8 (byte {})", bad);
  for (const auto& prompt : r.prompts)
    if (!text::is_valid_utf8(prompt, &bad))
      fail_usage("--prompt is not valid UTF-8 (byte {})", bad);
  if (r.steps < 0) fail_usage("--steps must be >= 1, got {}", r.steps);
  if (r.steps == 0) r.steps = model.recommended.steps;
  if (r.steps > model.scheduler.num_train_timesteps)
    fail_usage("--steps {} is more than the model's {} training timesteps", r.steps,
               model.scheduler.num_train_timesteps);
  if (!r.guidance_scale) r.guidance_scale = model.recommended.guidance_scale;
  if (!std::isfinite(*r.guidance_scale) || *r.guidance_scale < 0)
    fail_usage("--guidance must be a finite number >= 0, got {}", *r.guidance_scale);
  if (!r.sampler) r.sampler = model.recommended.sampler;
  if (!r.timestep_spacing) r.timestep_spacing = model.scheduler.timestep_spacing;
  if (!r.prediction_type) r.prediction_type = model.scheduler.prediction_type;
  if (r.control_image.defined()) {
    if (model.controlnet.is_empty())
      fail_usage("--control: the model has no ControlNet (give --control-model DIR)");
    if (r.control_image.dim() != 3 ||
        r.control_image.size(0) != model.controlnet->config.conditioning_channels)
      fail_usage("--control: expected a {}-channel image, got [{}]",
                 model.controlnet->config.conditioning_channels,
                 fmt::join(r.control_image.sizes(), ", "));
    if (!std::isfinite(r.control_scale))
      fail_usage("--control-scale must be a finite number, got {}", r.control_scale);
    if (r.height == 0) r.height = r.control_image.size(1);
    if (r.width == 0) r.width = r.control_image.size(2);
  }
  if (r.height == 0) r.height = model.sample_size();
  if (r.width == 0) r.width = model.sample_size();
  const int64_t m = model.size_multiple();
  for (auto [flag, v] :
       {std::pair<const char*, int64_t>{"--height", r.height}, {"--width", r.width}})
    if (v <= 0 || v % m != 0 || v > 4096)
      fail_usage("{} {}: must be a positive multiple of {} (at most 4096) for this model", flag, v,
                 m);
  if (r.max_batch < 1) fail_usage("batch size must be >= 1, got {}", r.max_batch);
  return r;
}

const std::vector<std::string> kPresetNames = {"lightning-1step", "lightning-2step",
                                               "lightning-4step", "lightning-8step"};

void apply_preset(const std::string& preset, GenerateRequest& r) {
  if (std::find(kPresetNames.begin(), kPresetNames.end(), preset) == kPresetNames.end())
    fail_usage("--preset '{}': unknown (known: {})", preset, fmt::join(kPresetNames, ", "));
  const int64_t steps = std::stoll(preset.substr(std::string("lightning-").size()));
  if (r.steps == 0) r.steps = steps;
  if (!r.guidance_scale) r.guidance_scale = 0.0;
  if (!r.sampler) r.sampler = diffusion::SamplerKind::kEuler;
  if (!r.timestep_spacing) r.timestep_spacing = diffusion::TimestepSpacing::kTrailing;
  if (!r.prediction_type && steps == 1) r.prediction_type = diffusion::PredictionType::kSample;
}

std::vector<std::string> checkpoint_name_warnings(const TextToImageModel& model,
                                                  const std::vector<std::string>& file_names,
                                                  const GenerateRequest& r) {
  std::vector<std::string> names = file_names;
  names.push_back(model.name);
  if (!model.unet_file.empty()) names.push_back(model.unet_file);
  std::vector<std::string> warnings;
  static const std::regex steps_re("([0-9]+)[-_]?steps?", std::regex::icase);
  for (const auto& name : names) {
    std::smatch m;
    if (std::regex_search(name, m, steps_re) && std::stoll(m[1]) != r.steps)
      warnings.push_back(fmt::format("'{}' is a {}-step checkpoint but {} steps are used", name,
                                     m[1].str(), r.steps));
    if (name.find("x0") != std::string::npos &&
        r.prediction_type != diffusion::PredictionType::kSample)
      warnings.push_back(fmt::format(
          "'{}' looks like an x0 (sample-prediction) checkpoint; use --prediction-type sample",
          name));
  }
  return warnings;
}

diffusion::SchedulerConfig effective_scheduler(const TextToImageModel& model,
                                               const GenerateRequest& r) {
  auto config = model.scheduler;
  if (r.timestep_spacing) config.timestep_spacing = *r.timestep_spacing;
  if (r.prediction_type) config.prediction_type = *r.prediction_type;
  return config;
}

torch::Tensor initial_noise(uint64_t seed, int64_t channels, int64_t height, int64_t width) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return torch::randn({channels, height, width}, generator, torch::kFloat32);
}

torch::Tensor generate(const TextToImageModel& model, const GenerateRequest& request,
                       const std::function<void(int64_t, int64_t)>& on_step,
                       torch::Tensor* latents_out) {
  const auto r = resolve_request(model, request);
  const auto scheduler = effective_scheduler(model, r);
  const auto sampler = diffusion::make_sampler(*r.sampler, scheduler, r.steps);
  const bool cfg = diffusion::uses_guidance(*r.guidance_scale);
  const auto device = model.unet->conv_in->weight.device();
  const auto dtype = model.unet->dtype();
  torch::NoGradGuard no_grad;
  auto unet = model.unet;  // holders share the module; forward is non-const
  auto controlnet = model.controlnet;

  const auto n = static_cast<int64_t>(r.prompts.size());
  const int64_t c = model.latent_channels();
  const int64_t f = model.vae_scale();
  PromptEmbeds uncond;
  if (cfg) uncond = encode_negative(model, r.negative_prompt);
  // The ControlNet's image [1, C, H, W] on the device, at the output size.
  torch::Tensor control_image;
  if (r.control_image.defined()) {
    control_image = r.control_image.to(torch::kFloat32).unsqueeze(0);
    if (control_image.size(2) != r.height || control_image.size(3) != r.width)
      control_image = torch::nn::functional::interpolate(
          control_image, torch::nn::functional::InterpolateFuncOptions()
                             .size(std::vector<int64_t>{r.height, r.width})
                             .mode(torch::kBilinear)
                             .align_corners(false)
                             .antialias(true));
    control_image = control_image.to(device);
  }
  std::vector<torch::Tensor> latents;
  const int64_t total = ((n + r.max_batch - 1) / r.max_batch) * sampler->num_steps();
  int64_t done = 0;
  for (int64_t start = 0; start < n; start += r.max_batch) {
    const int64_t b = std::min(r.max_batch, n - start);
    std::vector<std::string> prompts(r.prompts.begin() + start, r.prompts.begin() + start + b);
    auto cond = encode_conditioning(model, prompts);
    auto context =
        cfg ? torch::cat({uncond.context.expand({b, -1, -1}), cond.context}) : cond.context;
    context = context.to(dtype);
    torch::Tensor pooled, time_ids;
    if (model.is_sdxl()) {
      pooled =
          (cfg ? torch::cat({uncond.pooled.expand({b, -1}), cond.pooled}) : cond.pooled).to(dtype);
      // SDXL's micro-conditioning: original size, crop top-left (0, 0), target size.
      time_ids = torch::tensor({static_cast<float>(r.height), static_cast<float>(r.width), 0.f, 0.f,
                                static_cast<float>(r.height), static_cast<float>(r.width)})
                     .to(device, dtype)
                     .expand({context.size(0), 6});
    }
    // [rows of the UNet batch, C, H, W]
    const auto control = control_image.defined()
                             ? control_image.expand({context.size(0), -1, -1, -1})
                             : control_image;
    std::vector<torch::Tensor> noise;
    for (int64_t i = 0; i < b; ++i)
      noise.push_back(
          initial_noise(r.seed + static_cast<uint64_t>(start + i), c, r.height / f, r.width / f));
    auto x = (torch::stack(noise) * sampler->init_noise_sigma()).to(device);
    for (int64_t i = 0; i < sampler->num_steps(); ++i) {
      auto input = sampler->scale_model_input(x, i);
      if (cfg) input = torch::cat({input, input});
      models::UNetInputs inputs;
      inputs.sample = input.to(dtype);
      inputs.timestep = torch::full({input.size(0)}, sampler->timestep(i),
                                    torch::TensorOptions().dtype(torch::kFloat32).device(device));
      inputs.encoder_hidden_states = context;
      inputs.text_embeds = pooled;
      inputs.time_ids = time_ids;
      if (control.defined()) {
        auto residuals = controlnet->forward(inputs, control, r.control_scale);
        inputs.down_residuals = std::move(residuals.down);
        inputs.mid_residual = residuals.mid;
      }
      auto out = unet->forward(inputs).to(torch::kFloat32);
      if (cfg) out = diffusion::guide_batched(out, *r.guidance_scale);
      x = sampler->step(out, i, x).prev_sample;
      if (on_step) on_step(++done, total);
    }
    latents.push_back(x);
  }
  auto all = torch::cat(latents);
  if (latents_out) *latents_out = all.cpu();
  return decode_latents(model, all, r.vae_tiling).cpu();
}

void attach_controlnet(TextToImageModel& model, models::ControlNetModel controlnet,
                       const std::string& name) {
  if (!model.is_latent())
    fail("{}: a ControlNet needs a latent model (with a VAE); {} is a pixel-space model", name,
         model.name);
  const auto& c = controlnet->config;
  const auto& u = model.unet->config;
  if (controlnet->encoder->skip_channels() != model.unet->skip_channels())
    fail(
        "{}: its residuals (channels {}) do not fit the UNet's skips ({}): a ControlNet for "
        "another architecture",
        name, fmt::join(controlnet->encoder->skip_channels(), ","),
        fmt::join(model.unet->skip_channels(), ","));
  if (c.unet.in_channels != u.in_channels || c.unet.cross_attention_dim != u.cross_attention_dim ||
      c.unet.addition_embed_type != u.addition_embed_type ||
      c.unet.projection_class_embeddings_input_dim != u.projection_class_embeddings_input_dim)
    fail(
        "{}: its inputs (in_channels {}, cross_attention_dim {}, addition_embed_type '{}') do "
        "not fit the UNet's ({}, {}, '{}')",
        name, c.unet.in_channels, c.unet.cross_attention_dim[0], c.unet.addition_embed_type,
        u.in_channels, u.cross_attention_dim[0], u.addition_embed_type);
  if (c.downscale() != model.vae_scale())
    fail("{}: its conditioning embedding downsamples by {}, the VAE by {}", name, c.downscale(),
         model.vae_scale());
  model.controlnet = std::move(controlnet);
  model.controlnet_name = name;
}

LoRASpec LoRASpec::parse(const std::string& value) {
  LoRASpec spec{value, 1.0};
  const auto colon = value.rfind(':');
  if (colon != std::string::npos && colon + 1 < value.size()) {
    const std::string tail = value.substr(colon + 1);
    char* end = nullptr;
    const double scale = std::strtod(tail.c_str(), &end);
    if (end && *end == '\0') {
      if (!std::isfinite(scale)) fail_usage("--lora {}: the scale must be a finite number", value);
      spec = {value.substr(0, colon), scale};
    }
  }
  if (!fs::is_regular_file(spec.path)) fail_usage("--lora {}: no such file", spec.path);
  return spec;
}

void apply_loras(TextToImageModel& model, const std::vector<LoRASpec>& loras, bool allow_partial) {
  // The UNet's layers also answer to their original-layout names (kohya sd-scripts' SDXL LoRAs).
  std::map<std::string, std::string> unet_aliases;
  for (const auto& [name, source] : models::unet_original_key_map(*model.unet, "")) {
    const std::string suffix = ".weight";
    if (name.size() > suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
      unet_aliases[name.substr(0, name.size() - suffix.size())] =
          source.key.substr(0, source.key.size() - suffix.size());
  }
  std::vector<models::LoRATarget> targets = {
      {model.unet.get(), "lora_unet_", {"unet.", ""}, unet_aliases},
      {model.text_encoder.get(), "lora_te_", {"text_encoder."}},
      {model.text_encoder.get(), "lora_te1_", {}},
  };
  if (model.is_sdxl())
    targets.push_back({model.text_encoder_2.get(), "lora_te2_", {"text_encoder_2."}});
  for (const auto& spec : loras) {
    const auto file = models::read_lora_file(spec.path);
    const auto report = models::apply_lora(file, targets, spec.scale, allow_partial);
    if (!report.unmatched.empty())
      spdlog::warn("{}: {} of {} modules matched no layer and were skipped (first: {})", spec.path,
                   report.unmatched.size(), file.modules.size(), report.unmatched.front());
    spdlog::info("lora: merged {} ({} format, {} modules) with scale {:g}", spec.path, file.format,
                 report.applied, spec.scale);
    model.loras.push_back(
        fmt::format("{}:{:g}", fs::path(spec.path).filename().string(), spec.scale));
  }
}

std::string parameters_text(const TextToImageModel& model, const GenerateRequest& r, size_t index) {
  std::string text = r.prompts.at(index);
  if (!r.negative_prompt.empty()) text += "\nNegative prompt: " + r.negative_prompt;
  text += fmt::format(
      "\nSteps: {}, Sampler: {}, CFG scale: {:g}, Seed: {}, Size: {}x{}, Model: {}, Timestep "
      "spacing: {}, Prediction type: {}, Version: lightning.cpp",
      r.steps, sampler_title(*r.sampler), *r.guidance_scale, r.seed + index, r.width, r.height,
      model.name, diffusion::to_string(*r.timestep_spacing),
      diffusion::to_string(*r.prediction_type));
  if (!model.unet_file.empty()) text += fmt::format(", UNet: {}", model.unet_file);
  if (!model.loras.empty()) text += fmt::format(", LoRA: {}", fmt::join(model.loras, ", "));
  if (r.control_image.defined())
    text += fmt::format(", ControlNet: {}, Control scale: {:g}", model.controlnet_name,
                        r.control_scale);
  if (r.vae_tiling)
    text +=
        fmt::format(", VAE tiling: {} px, overlap {}", r.vae_tiling->tile, r.vae_tiling->overlap);
  return text;
}

}  // namespace lightning::generate
