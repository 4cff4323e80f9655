#include "models/model_loader.h"

#include <filesystem>

#include "core/error.h"
#include "io/json_config.h"
#include "models/checkpoint_formats.h"
#include "nn/layers.h"

namespace lightning::models {
namespace fs = std::filesystem;

std::vector<std::string> find_weight_files(const std::string& dir, const std::string& basename,
                                           const std::string& variant) {
  if (!fs::is_directory(dir)) fail("{}: not a directory", dir);
  std::vector<std::string> names;
  if (!variant.empty()) names.push_back(basename + "." + variant + ".safetensors");
  names.push_back(basename + ".safetensors");
  if (variant.empty()) names.push_back(basename + ".fp16.safetensors");
  for (const auto& name : names) {
    const auto path = fs::path(dir) / name;
    if (fs::exists(path)) return {path.string()};
    // Sharded: <name>.index.json maps each tensor to a shard file.
    const auto index = fs::path(dir) / (name + ".index.json");
    if (fs::exists(index)) {
      const auto json = io::read_json_file(index.string());
      if (!json.contains("weight_map") || !json["weight_map"].is_object())
        fail("{}: missing 'weight_map'", index.string());
      std::vector<std::string> shards;
      for (const auto& item : json["weight_map"].items()) {
        if (!item.value().is_string())
          fail("{}: weight_map['{}'] is not a file name", index.string(), item.key());
        const auto shard = (fs::path(dir) / item.value().get<std::string>()).string();
        if (std::find(shards.begin(), shards.end(), shard) == shards.end()) shards.push_back(shard);
      }
      return shards;
    }
  }
  if (fs::exists(fs::path(dir) / (basename + ".bin")))
    fail("{}: only {}.bin (a pickle) found; convert it to safetensors", dir, basename);
  fail("{}: no {} weights found (looked for {})", dir, basename, fmt::join(names, ", "));
}

std::string resolve_component_dir(const std::string& dir, const std::string& component) {
  if (fs::exists(fs::path(dir) / "config.json")) return dir;
  const auto sub = fs::path(dir) / component;
  if (fs::exists(sub / "config.json")) return sub.string();
  if (!fs::exists(dir)) fail("{}: no such directory", dir);
  fail("{}: no config.json (nor {}/config.json)", dir, component);
}

UNet2DConditionModel make_unet_uninitialised(const UNetConfig& config) {
  nn::SkipInitGuard skip_init;
  return UNet2DConditionModel(config);
}

namespace {

// A diffusers component directory: Config from config.json, weights strictly from
// diffusion_pytorch_model[.<variant>].safetensors.
template <typename Config, typename Make>
auto load_diffusers_component(const std::string& dir_in, const std::string& component,
                              const ModelLoadOptions& options, Make make) {
  const auto dir = resolve_component_dir(dir_in, component);
  const auto config_path = (fs::path(dir) / "config.json").string();
  auto model = make(Config::from_json(io::read_json_file(config_path), config_path));
  io::WeightFiles weights(find_weight_files(dir, "diffusion_pytorch_model", options.variant));
  io::load_weights(*model, weights, options.weights(), dir);
  model->compute_dtype = options.dtype;
  model->eval();
  return model;
}

template <typename Model>
void save_diffusers_component(const Model& model, const std::string& dir,
                              c10::optional<torch::ScalarType> dtype) {
  fs::create_directories(dir);
  io::write_json_file((fs::path(dir) / "config.json").string(), model->config.to_json());
  io::save_weights(*model, (fs::path(dir) / "diffusion_pytorch_model.safetensors").string(), dtype);
}

}  // namespace

UNet2DConditionModel load_unet(const std::string& dir, const ModelLoadOptions& options) {
  return load_diffusers_component<UNetConfig>(dir, "unet", options, make_unet_uninitialised);
}

UNet2DConditionModel load_unet_file(const std::string& config_dir, const std::string& file,
                                    const ModelLoadOptions& options) {
  const auto dir = resolve_component_dir(config_dir, "unet");
  const auto config_path = (fs::path(dir) / "config.json").string();
  const auto config = UNetConfig::from_json(io::read_json_file(config_path), config_path);
  auto unet = make_unet_uninitialised(config);
  load_unet_weights(*unet, file, options.weights());
  unet->compute_dtype = options.dtype;
  unet->eval();
  return unet;
}

void save_unet(const UNet2DConditionModel& unet, const std::string& dir,
               c10::optional<torch::ScalarType> dtype) {
  save_diffusers_component(unet, dir, dtype);
}

void save_clip_text(const CLIPTextModel& model, const std::string& dir,
                    c10::optional<torch::ScalarType> dtype) {
  fs::create_directories(dir);
  io::write_json_file((fs::path(dir) / "config.json").string(), model->config.to_json());
  io::save_weights(*model, (fs::path(dir) / "model.safetensors").string(), dtype);
}

CLIPTextModel make_clip_text_uninitialised(const CLIPTextConfig& config) {
  nn::SkipInitGuard skip_init;
  return CLIPTextModel(config);
}

CLIPTextModel load_clip_text(const std::string& dir_in, const ModelLoadOptions& options) {
  const auto dir = resolve_component_dir(dir_in, "text_encoder");
  const auto config_path = (fs::path(dir) / "config.json").string();
  auto config = CLIPTextConfig::from_json(io::read_json_file(config_path), config_path);
  io::WeightFiles weights(find_weight_files(dir, "model", options.variant));
  if (!config.with_projection) config.with_projection = weights.contains("text_projection.weight");
  auto model = make_clip_text_uninitialised(config);
  const std::string position_ids = "text_model.embeddings.position_ids";
  if (weights.contains(position_ids))
    model->text_model->embeddings->accept_position_ids(weights.entry(position_ids).shape);
  io::load_weights(*model, weights, options.weights(), dir);
  model->set_compute_dtype(options.dtype);
  model->eval();
  return model;
}

AutoencoderKL make_vae_uninitialised(const VAEConfig& config) {
  nn::SkipInitGuard skip_init;
  return AutoencoderKL(config);
}

AutoencoderKL load_vae(const std::string& dir, const ModelLoadOptions& options) {
  return load_diffusers_component<VAEConfig>(dir, "vae", options, make_vae_uninitialised);
}

ControlNetModel load_controlnet(const std::string& dir_in, const ModelLoadOptions& options) {
  const auto dir = resolve_component_dir(dir_in, "controlnet");
  const auto config_path = (fs::path(dir) / "config.json").string();
  const auto config = ControlNetConfig::from_json(io::read_json_file(config_path), config_path);
  ControlNetModel model{nullptr};
  {
    nn::SkipInitGuard skip_init;
    model = ControlNetModel(config);
  }
  io::WeightFiles weights(find_weight_files(dir, "diffusion_pytorch_model", options.variant));
  io::load_weights(*model, weights, options.weights(), dir);
  model->set_compute_dtype(options.dtype);
  model->eval();
  return model;
}

void save_vae(const AutoencoderKL& vae, const std::string& dir,
              c10::optional<torch::ScalarType> dtype) {
  save_diffusers_component(vae, dir, dtype);
}

}  // namespace lightning::models
