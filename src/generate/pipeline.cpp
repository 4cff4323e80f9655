#include "generate/pipeline.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "core/error.h"
#include "diffusion/guidance.h"
#include "io/files.h"
#include "io/json_config.h"
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
  return unet->config.sample_size > 0 ? unet->config.sample_size : 32;
}

int64_t TextToImageModel::size_multiple() const {
  return int64_t{1} << (unet->config.num_blocks() - 1);
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

TextToImageModel load_model(const std::string& dir, const models::ModelLoadOptions& options) {
  if (!fs::is_directory(dir)) fail("{}: not a directory", dir);
  auto index_path = fs::path(dir) / "model_index.json";
  if (!fs::exists(index_path))
    fail("{}: missing (not a diffusers-style model directory)", index_path.string());
  auto index = io::read_json_file(index_path.string());
  if (!index.is_object()) fail("{}: expected a JSON object", index_path.string());
  if (index.contains("vae") && !index["vae"].is_null())
    fail("{}: the model has a VAE (latent space); this pipeline generates pixel-space models only",
         index_path.string());
  for (const char* component : {"unet", "text_encoder", "tokenizer", "scheduler"})
    if (!fs::is_directory(fs::path(dir) / component))
      fail("{}: missing component folder '{}'", dir, component);

  TextToImageModel model;
  model.name = fs::path(dir).lexically_normal().filename().string();
  if (model.name.empty())
    model.name = fs::path(dir).lexically_normal().parent_path().filename().string();
  model.unet = models::load_unet((fs::path(dir) / "unet").string(), options);
  model.text_encoder = models::load_clip_text((fs::path(dir) / "text_encoder").string(), options);
  auto tokenizer_dir = (fs::path(dir) / "tokenizer").string();
  auto tokenizer =
      std::make_shared<text::CLIPTokenizer>(text::CLIPTokenizer::from_directory(tokenizer_dir));
  model.pad_id = read_pad_id(*tokenizer, tokenizer_dir);
  model.tokenizer = std::move(tokenizer);
  model.scheduler = diffusion::load_scheduler_config(
      (fs::path(dir) / "scheduler" / "scheduler_config.json").string());
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

  const auto& u = model.unet->config;
  const auto& t = model.text_encoder->config;
  if (u.cross_attention_dim.empty() || u.cross_attention_dim[0] != t.hidden_size)
    fail("{}: unet cross_attention_dim {} does not match text_encoder hidden_size {}", dir,
         u.cross_attention_dim.empty() ? 0 : u.cross_attention_dim[0], t.hidden_size);
  if (!u.addition_embed_type.empty())
    fail("{}: unet addition_embed_type '{}' (SDXL-style) needs the SDXL pipeline", dir,
         u.addition_embed_type);
  if (u.in_channels != u.out_channels)
    fail("{}: unet in_channels {} != out_channels {}", dir, u.in_channels, u.out_channels);
  for (const auto& [token, id] : model.tokenizer->vocab())
    if (id >= t.vocab_size)
      fail("{}: tokenizer id {} ('{}') is outside the text encoder's vocab_size {}", dir, id, token,
           t.vocab_size);
  return model;
}

void save_model(const TextToImageModel& model, const std::string& dir,
                c10::optional<torch::ScalarType> weights_dtype) {
  io::write_directory_atomic(dir, [&](const std::string& tmp_dir) {
    const fs::path tmp(tmp_dir);
    nlohmann::json index = {{"_class_name", "LightningPixelPipeline"},
                            {"_diffusers_version", "0.27.2"},
                            {"unet", {"diffusers", "UNet2DConditionModel"}},
                            {"text_encoder", {"transformers", "CLIPTextModel"}},
                            {"tokenizer", {"transformers", "CLIPTokenizer"}},
                            {"scheduler", {"diffusers", model.scheduler.class_name}}};
    io::write_json_file((tmp / "model_index.json").string(), index);
    models::save_unet(model.unet, (tmp / "unet").string(), weights_dtype);
    models::save_clip_text(model.text_encoder, (tmp / "text_encoder").string(), weights_dtype);
    model.tokenizer->save((tmp / "tokenizer").string());
    fs::create_directories(tmp / "scheduler");
    io::write_json_file((tmp / "scheduler" / "scheduler_config.json").string(),
                        diffusion::to_json(model.scheduler));
    io::write_json_file((tmp / kSettingsFile).string(),
                        {{"recommended", model.recommended.to_json()}});
  });
}

torch::Tensor tokenize_prompts(const TextToImageModel& model,
                               const std::vector<std::string>& prompts, bool warn_truncation) {
  const int64_t length = model.text_encoder->config.max_position_embeddings;
  auto ids = torch::empty({static_cast<int64_t>(prompts.size()), length}, torch::kInt64);
  auto acc = ids.accessor<int64_t, 2>();
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto enc = model.tokenizer->encode_padded(prompts[i], model.pad_id, length);
    if (warn_truncation && enc.eos_position == length - 1 &&
        static_cast<int64_t>(model.tokenizer->encode(prompts[i]).size()) > length)
      spdlog::warn("prompt '{}' is longer than {} tokens and was truncated", prompts[i], length);
    for (int64_t j = 0; j < length; ++j)
      acc[static_cast<int64_t>(i)][j] = enc.input_ids[static_cast<size_t>(j)];
  }
  return ids;
}

torch::Tensor encode_prompts(const TextToImageModel& model, const std::vector<std::string>& prompts,
                             bool warn_truncation) {
  auto ids = tokenize_prompts(model, prompts, warn_truncation);
  auto device = model.text_encoder->text_model->final_layer_norm->weight.device();
  auto encoder = model.text_encoder;  // holders share the module; forward is non-const
  return encoder->forward(ids.to(device)).last_hidden_state;
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
                       const std::function<void(int64_t, int64_t)>& on_step) {
  const auto r = resolve_request(model, request);
  const auto scheduler = effective_scheduler(model, r);
  const auto sampler = diffusion::make_sampler(*r.sampler, scheduler, r.steps);
  const bool cfg = diffusion::uses_guidance(*r.guidance_scale);
  const auto param = model.unet->conv_in->weight;
  const auto device = param.device();
  const auto dtype = param.scalar_type();
  torch::NoGradGuard no_grad;
  auto unet = model.unet;  // holders share the module; forward is non-const

  const auto n = static_cast<int64_t>(r.prompts.size());
  const int64_t c = model.image_channels();
  torch::Tensor uncond;
  if (cfg) uncond = encode_prompts(model, {r.negative_prompt});
  std::vector<torch::Tensor> images;
  const int64_t total = ((n + r.max_batch - 1) / r.max_batch) * sampler->num_steps();
  int64_t done = 0;
  for (int64_t start = 0; start < n; start += r.max_batch) {
    const int64_t b = std::min(r.max_batch, n - start);
    std::vector<std::string> prompts(r.prompts.begin() + start, r.prompts.begin() + start + b);
    auto cond = encode_prompts(model, prompts);
    auto context = cfg ? torch::cat({uncond.expand({b, -1, -1}), cond}) : cond;
    context = context.to(dtype);
    std::vector<torch::Tensor> noise;
    for (int64_t i = 0; i < b; ++i)
      noise.push_back(
          initial_noise(r.seed + static_cast<uint64_t>(start + i), c, r.height, r.width));
    auto x = (torch::stack(noise) * sampler->init_noise_sigma()).to(device);
    for (int64_t i = 0; i < sampler->num_steps(); ++i) {
      auto input = sampler->scale_model_input(x, i);
      if (cfg) input = torch::cat({input, input});
      models::UNetInputs inputs;
      inputs.sample = input.to(dtype);
      inputs.timestep = torch::full({input.size(0)}, sampler->timestep(i),
                                    torch::TensorOptions().dtype(torch::kFloat32).device(device));
      inputs.encoder_hidden_states = context;
      auto out = unet->forward(inputs).to(torch::kFloat32);
      if (cfg) out = diffusion::guide_batched(out, *r.guidance_scale);
      x = sampler->step(out, i, x).prev_sample;
      if (on_step) on_step(++done, total);
    }
    images.push_back(x.cpu());
  }
  return torch::cat(images);
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
  const std::vector<models::LoRATarget> targets = {
      {model.unet.get(), "lora_unet_", {"unet.", ""}},
      {model.text_encoder.get(), "lora_te_", {"text_encoder."}},
      {model.text_encoder.get(), "lora_te1_", {}},
  };
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
  if (!model.loras.empty()) text += fmt::format(", LoRA: {}", fmt::join(model.loras, ", "));
  return text;
}

}  // namespace lightning::generate
