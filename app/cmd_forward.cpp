// `lightning forward <model> --model DIR --inputs IN.safetensors --out OUT.safetensors`:
// one forward pass of a diffusers-layout model on named inputs (DESIGN.md contract), for
// parity checks against diffusers.
#include <filesystem>
#include <map>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "app/commands.h"
#include "app/device.h"
#include "core/error.h"
#include "core/system.h"
#include "io/safetensors.h"
#include "models/model_loader.h"

namespace lightning::app {
namespace {

struct ForwardArgs {
  std::string kind;
  std::string model;
  std::string inputs;
  std::string out;
  std::string dtype = "f32";
  std::string device = "cpu";
  int threads = 0;
};

models::UNetInputs unet_inputs(std::map<std::string, torch::Tensor> named, const std::string& file,
                               const torch::Device& device) {
  models::UNetInputs in;
  std::map<size_t, torch::Tensor> down;
  const std::regex down_re("down_([0-9]+)");
  for (auto& [name, tensor] : named) {
    auto t = tensor.to(device);
    std::smatch m;
    if (name == "sample")
      in.sample = t;
    else if (name == "timestep")
      in.timestep = t;
    else if (name == "encoder_hidden_states")
      in.encoder_hidden_states = t;
    else if (name == "text_embeds")
      in.text_embeds = t;
    else if (name == "time_ids")
      in.time_ids = t;
    else if (name == "mid")
      in.mid_residual = t;
    else if (std::regex_match(name, m, down_re))
      down[std::stoul(m[1])] = t;
    else
      fail(
          "{}: unknown input '{}' (expected sample, timestep, encoder_hidden_states, "
          "text_embeds, time_ids, down_0..down_N, mid)",
          file, name);
  }
  for (const char* required : {"sample", "timestep", "encoder_hidden_states"})
    if (!named.count(required)) fail("{}: missing input '{}'", file, required);
  for (size_t i = 0; i < down.size(); ++i) {
    if (!down.count(i))
      fail("{}: ControlNet residuals must be down_0..down_{}; down_{} is missing", file,
           down.size() - 1, i);
    in.down_residuals.push_back(down[i]);
  }
  if (in.mid_residual.defined() != !in.down_residuals.empty())
    fail("{}: ControlNet residuals need both down_0..down_N and mid", file);
  return in;
}

// CLIP text: the only input is 'input_ids' (integer [B, T]).
torch::Tensor clip_text_inputs(const std::map<std::string, torch::Tensor>& named,
                               const std::string& file, const torch::Device& device) {
  for (const auto& item : named)
    if (item.first != "input_ids")
      fail("{}: unknown input '{}' (expected input_ids)", file, item.first);
  if (!named.count("input_ids")) fail("{}: missing input 'input_ids'", file);
  return named.at("input_ids").to(device);
}

// The single named input of a VAE forward ('latent' or 'image').
torch::Tensor single_input(const std::map<std::string, torch::Tensor>& named,
                           const std::string& name, const std::string& file,
                           const torch::Device& device) {
  for (const auto& item : named)
    if (item.first != name) fail("{}: unknown input '{}' (expected {})", file, item.first, name);
  if (!named.count(name)) fail("{}: missing input '{}'", file, name);
  return named.at(name).to(device, torch::kFloat32);
}

void run_forward(const ForwardArgs& args) {
  set_threads(args.threads);
  const auto device = parse_device(args.device);
  const auto dtype = parse_dtype(args.dtype, device);
  if (!std::filesystem::exists(args.inputs)) fail("{}: no such file", args.inputs);
  auto named = io::load_safetensors(args.inputs);
  torch::NoGradGuard no_grad;
  std::vector<std::pair<std::string, torch::Tensor>> outputs;
  if (args.kind == "unet") {
    auto unet = models::load_unet(args.model, {dtype, device, "", {}});
    auto inputs = unet_inputs(named, args.inputs, device);
    outputs.emplace_back("out", unet->forward(inputs));
  } else if (args.kind == "clip-text") {
    auto model = models::load_clip_text(args.model, {dtype, device, "", {}});
    auto out = model->forward(clip_text_inputs(named, args.inputs, device));
    outputs.emplace_back("last_hidden_state", out.last_hidden_state);
    outputs.emplace_back("penultimate_hidden_state", out.penultimate_hidden_state);
    outputs.emplace_back("pooler_output", out.pooler_output);
    if (out.text_embeds.defined()) outputs.emplace_back("text_embeds", out.text_embeds);
  } else if (args.kind == "controlnet") {
    auto model = models::load_controlnet(args.model, {dtype, device, "", {}});
    if (!named.count("controlnet_cond")) fail("{}: missing input 'controlnet_cond'", args.inputs);
    const auto cond = named.at("controlnet_cond").to(device, torch::kFloat32);
    double scale = 1.0;
    if (named.count("conditioning_scale")) {
      const auto s = named.at("conditioning_scale");
      if (s.numel() != 1) fail("{}: input 'conditioning_scale' must hold one number", args.inputs);
      scale = s.to(torch::kFloat64).item<double>();
    }
    named.erase("controlnet_cond");
    named.erase("conditioning_scale");
    auto inputs = unet_inputs(named, args.inputs, device);
    if (!inputs.down_residuals.empty())
      fail("{}: a ControlNet takes no residuals (down_N, mid)", args.inputs);
    auto out = model->forward(inputs, cond, scale);
    for (size_t i = 0; i < out.down.size(); ++i)
      outputs.emplace_back(fmt::format("down_{}", i), out.down[i]);
    outputs.emplace_back("mid", out.mid);
  } else if (args.kind == "vae-decode") {
    auto vae = models::load_vae(args.model, {dtype, device, "", {}});
    outputs.emplace_back("out", vae->decode(single_input(named, "latent", args.inputs, device)));
  } else if (args.kind == "vae-encode") {
    auto vae = models::load_vae(args.model, {dtype, device, "", {}});
    auto dist = vae->encode(single_input(named, "image", args.inputs, device));
    outputs.emplace_back("mean", dist.mean);
    outputs.emplace_back("logvar", dist.logvar);
  } else {
    fail_usage(
        "forward: model kind '{}' is not available (supported: unet, clip-text, controlnet, "
        "vae-decode, vae-encode)",
        args.kind);
  }
  for (auto& item : outputs)
    item.second = item.second.to(torch::kCPU, torch::kFloat32).contiguous();
  io::save_safetensors(args.out, outputs);
}

}  // namespace

void add_forward_command(CLI::App& app) {
  auto args = std::make_shared<ForwardArgs>();
  auto* cmd = app.add_subcommand(
      "forward",
      "Run one forward pass of a diffusers-layout model on named inputs (parity checks).\n"
      "Inputs/outputs: unet 'out'; vae-decode 'latent' (divided by scaling_factor) -> 'out'; "
      "vae-encode 'image' in [-1, 1] -> 'mean', 'logvar'; clip-text 'last_hidden_state', "
      "'penultimate_hidden_state', "
      "'pooler_output' and, with a projection, 'text_embeds'; controlnet: the unet's inputs plus "
      "'controlnet_cond' (RGB in [0, 1]) and optional 'conditioning_scale' -> 'down_0'..'down_N', "
      "'mid'.\n"
      "Example: lightning forward unet --model models/tiny-unet --inputs in.safetensors "
      "--out out.safetensors");
  cmd->add_option("kind", args->kind, "Model kind: unet, vae-decode, vae-encode, clip-text")
      ->required()
      ->check(CLI::IsMember({"unet", "vae-decode", "vae-encode", "clip-text", "controlnet"}));
  cmd->add_option("--model", args->model, "Model directory (config.json + *.safetensors)")
      ->required();
  cmd->add_option("--inputs", args->inputs,
                  "Inputs (safetensors) with diffusers' names (clip-text: input_ids)")
      ->required();
  cmd->add_option("--out", args->out, "Output file (safetensors); written atomically")->required();
  add_dtype_device_options(*cmd, &args->dtype, &args->device);
  add_threads_option(*cmd, &args->threads);
  cmd->callback([args] { run_forward(*args); });
}

}  // namespace lightning::app
