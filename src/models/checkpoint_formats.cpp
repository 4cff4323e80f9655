#include "models/checkpoint_formats.h"

#include <filesystem>
#include <utility>
#include <vector>

#include "core/error.h"

namespace lightning::models {
namespace {

// A diffusers-name prefix and the checkpoint prefix it becomes; `inner` renames the first path
// component after it (a resnet's or attention's own layers).
struct Rule {
  std::string from, to;
  const std::vector<std::pair<std::string, std::string>>* inner = nullptr;
};

const std::vector<std::pair<std::string, std::string>> kUNetResnet = {
    {"norm1", "in_layers.0"},  {"conv1", "in_layers.2"},  {"time_emb_proj", "emb_layers.1"},
    {"norm2", "out_layers.0"}, {"conv2", "out_layers.3"}, {"conv_shortcut", "skip_connection"}};
const std::vector<std::pair<std::string, std::string>> kVAEResnet = {
    {"conv_shortcut", "nin_shortcut"}};
const std::vector<std::pair<std::string, std::string>> kVAEAttention = {
    {"group_norm", "norm"}, {"to_q", "q"}, {"to_k", "k"}, {"to_v", "v"}, {"to_out.0", "proj_out"}};

// Maps every tensor of `module` through the longest matching rule; a name no rule covers keeps
// its name (behind `prefix`).
io::KeyMap apply_rules(const torch::nn::Module& module, const std::vector<Rule>& rules,
                       const std::string& prefix) {
  io::KeyMap map;
  for (const auto& [name, tensor] : io::module_tensors(module)) {
    const Rule* best = nullptr;
    for (const auto& r : rules)
      if (name.rfind(r.from, 0) == 0 && (!best || r.from.size() > best->from.size())) best = &r;
    std::string key = name;
    if (best) {
      std::string rest = name.substr(best->from.size());
      if (best->inner)
        for (const auto& [a, b] : *best->inner)
          if (rest.rfind(a + ".", 0) == 0) {
            rest = b + rest.substr(a.size());
            break;
          }
      key = best->to + rest;
    }
    map[name] = {prefix + key};
  }
  return map;
}

}  // namespace

io::KeyMap unet_original_key_map(const UNet2DConditionModelImpl& unet, const std::string& prefix) {
  const auto& c = unet.config;
  const size_t n = c.num_blocks();
  std::vector<Rule> rules = {{"conv_in.", "input_blocks.0.0."},
                             {"time_embedding.linear_1.", "time_embed.0."},
                             {"time_embedding.linear_2.", "time_embed.2."},
                             {"add_embedding.linear_1.", "label_emb.0.0."},
                             {"add_embedding.linear_2.", "label_emb.0.2."},
                             {"conv_norm_out.", "out.0."},
                             {"conv_out.", "out.2."},
                             {"mid_block.resnets.0.", "middle_block.0.", &kUNetResnet},
                             {"mid_block.attentions.0.", "middle_block.1."},
                             {"mid_block.resnets.1.", "middle_block.2.", &kUNetResnet}};
  int64_t index = 1;  // input_blocks.0 is conv_in
  for (size_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < c.layers_per_block[i]; ++j, ++index) {
      const auto from = fmt::format("down_blocks.{}.", i);
      rules.push_back({fmt::format("{}resnets.{}.", from, j),
                       fmt::format("input_blocks.{}.0.", index), &kUNetResnet});
      rules.push_back(
          {fmt::format("{}attentions.{}.", from, j), fmt::format("input_blocks.{}.1.", index)});
    }
    if (i + 1 < n)
      rules.push_back({fmt::format("down_blocks.{}.downsamplers.0.conv.", i),
                       fmt::format("input_blocks.{}.0.op.", index++)});
  }
  index = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t layers = c.layers_per_block[n - 1 - i] + 1;
    const bool attention = c.up_block_types[i] == "CrossAttnUpBlock2D";
    for (int64_t j = 0; j < layers; ++j) {
      rules.push_back({fmt::format("up_blocks.{}.resnets.{}.", i, j),
                       fmt::format("output_blocks.{}.0.", index + j), &kUNetResnet});
      rules.push_back({fmt::format("up_blocks.{}.attentions.{}.", i, j),
                       fmt::format("output_blocks.{}.1.", index + j)});
    }
    if (i + 1 < n)
      rules.push_back(
          {fmt::format("up_blocks.{}.upsamplers.0.conv.", i),
           fmt::format("output_blocks.{}.{}.conv.", index + layers - 1, attention ? 2 : 1)});
    index += layers;
  }
  return apply_rules(unet, rules, prefix);
}

io::KeyMap vae_original_key_map(const AutoencoderKLImpl& vae, const std::string& prefix) {
  const size_t n = vae.config.block_out_channels.size();
  std::vector<Rule> rules = {{"encoder.conv_norm_out.", "encoder.norm_out."},
                             {"decoder.conv_norm_out.", "decoder.norm_out."}};
  for (const char* part : {"encoder", "decoder"}) {
    const std::string p = part;
    rules.push_back({p + ".mid_block.resnets.0.", p + ".mid.block_1.", &kVAEResnet});
    rules.push_back({p + ".mid_block.resnets.1.", p + ".mid.block_2.", &kVAEResnet});
    rules.push_back({p + ".mid_block.attentions.0.", p + ".mid.attn_1.", &kVAEAttention});
  }
  const int64_t layers = vae.config.layers_per_block;
  for (size_t i = 0; i < n; ++i) {
    // Resnets rename conv_shortcut to nin_shortcut; the decoder has one more per level, and its
    // levels are numbered from the bottom in the original layout.
    for (int64_t j = 0; j < layers; ++j)
      rules.push_back({fmt::format("encoder.down_blocks.{}.resnets.{}.", i, j),
                       fmt::format("encoder.down.{}.block.{}.", i, j), &kVAEResnet});
    for (int64_t j = 0; j <= layers; ++j)
      rules.push_back({fmt::format("decoder.up_blocks.{}.resnets.{}.", i, j),
                       fmt::format("decoder.up.{}.block.{}.", n - 1 - i, j), &kVAEResnet});
    rules.push_back({fmt::format("encoder.down_blocks.{}.downsamplers.0.", i),
                     fmt::format("encoder.down.{}.downsample.", i)});
    rules.push_back({fmt::format("decoder.up_blocks.{}.upsamplers.0.", i),
                     fmt::format("decoder.up.{}.upsample.", n - 1 - i)});
  }
  auto map = apply_rules(vae, rules, prefix);
  // The mid attention's projections are 1x1 convs there: read them reshaped to the Linear's.
  for (const auto& [name, tensor] : io::module_tensors(vae)) {
    if (name.find("mid_block.attentions.0.to_") == std::string::npos || tensor.dim() != 2) continue;
    auto& source = map.at(name);
    source.op = io::SourceTensor::Op::kReshape;
    source.shape = tensor.sizes().vec();
  }
  return map;
}

io::KeyMap clip_prefixed_key_map(const CLIPTextModelImpl& clip, const std::string& prefix) {
  return apply_rules(clip, {}, prefix);
}

io::KeyMap open_clip_key_map(const CLIPTextModelImpl& clip, const std::string& prefix) {
  io::KeyMap map;
  const std::string layers = "text_model.encoder.layers.";
  const std::vector<std::pair<std::string, std::string>> layer_parts = {
      {"self_attn.out_proj.", "attn.out_proj."},
      {"layer_norm1.", "ln_1."},
      {"layer_norm2.", "ln_2."},
      {"mlp.fc1.", "mlp.c_fc."},
      {"mlp.fc2.", "mlp.c_proj."}};
  for (const auto& [name, tensor] : io::module_tensors(clip)) {
    io::SourceTensor s;
    if (name == "text_model.embeddings.token_embedding.weight") {
      s.key = "token_embedding.weight";
    } else if (name == "text_model.embeddings.position_embedding.weight") {
      s.key = "positional_embedding";
    } else if (name.rfind("text_model.final_layer_norm.", 0) == 0) {
      s.key = "ln_final." + name.substr(28);
    } else if (name == "text_projection.weight") {
      s.key = "text_projection";
      s.op = io::SourceTensor::Op::kTranspose;
    } else if (name.rfind(layers, 0) == 0) {
      const auto dot = name.find('.', layers.size());
      const std::string index = name.substr(layers.size(), dot - layers.size());
      const std::string rest = name.substr(dot + 1);
      const std::string block = "transformer.resblocks." + index + ".";
      s.key = block + rest;  // unknown parts stay as they are (and are reported missing)
      for (const auto& [from, to] : layer_parts)
        if (rest.rfind(from, 0) == 0) s.key = block + to + rest.substr(from.size());
      for (int part = 0; part < 3; ++part) {
        const std::string proj = std::string(1, "qkv"[part]) + "_proj.";
        if (rest.rfind("self_attn." + proj, 0) == 0) {
          const bool weight = rest.substr(10 + proj.size()) == "weight";
          s.key = block + (weight ? "attn.in_proj_weight" : "attn.in_proj_bias");
          s.op = io::SourceTensor::Op::kRows;
          s.part = part;
          s.parts = 3;
        }
      }
    } else {
      s.key = name;
    }
    s.key = prefix + s.key;
    map[name] = s;
  }
  return map;
}

CheckpointLayout detect_layout(const io::WeightSource& weights) {
  const auto has = [&](const std::string& key) { return weights.contains(key); };
  const std::string unet_probe = "input_blocks.0.0.weight";
  if (has(std::string(kOriginalUNetPrefix) + unet_probe)) {
    if (has(std::string(kSdxlClipGPrefix) + "ln_final.weight"))
      return CheckpointLayout::kSdxlSingleFile;
    if (has(std::string(kSd1ClipPrefix) + "text_model.final_layer_norm.weight"))
      return CheckpointLayout::kSd1SingleFile;
    return CheckpointLayout::kOriginalUNet;
  }
  if (has(unet_probe)) return CheckpointLayout::kOriginalUNet;
  if (has("conv_in.weight") && has("time_embedding.linear_1.weight"))
    return CheckpointLayout::kDiffusersUNet;
  return CheckpointLayout::kUnknown;
}

const char* to_string(CheckpointLayout layout) {
  switch (layout) {
    case CheckpointLayout::kDiffusersUNet:
      return "diffusers UNet";
    case CheckpointLayout::kOriginalUNet:
      return "original-layout UNet";
    case CheckpointLayout::kSdxlSingleFile:
      return "SDXL single-file checkpoint";
    case CheckpointLayout::kSd1SingleFile:
      return "SD 1.x single-file checkpoint";
    case CheckpointLayout::kUnknown:
      break;
  }
  return "unknown layout";
}

void load_unet_weights(UNet2DConditionModelImpl& unet, const std::string& file,
                       const io::LoadOptions& options) {
  if (!std::filesystem::is_regular_file(file)) fail("{}: no such file", file);
  auto files = std::make_shared<io::WeightFiles>(std::vector<std::string>{file});
  const auto layout = detect_layout(*files);
  switch (layout) {
    case CheckpointLayout::kDiffusersUNet:
      io::load_weights(unet, *files, options, file);
      return;
    case CheckpointLayout::kOriginalUNet:
    case CheckpointLayout::kSdxlSingleFile:
    case CheckpointLayout::kSd1SingleFile: {
      const std::string prefix =
          files->contains(std::string(kOriginalUNetPrefix) + "input_blocks.0.0.weight")
              ? kOriginalUNetPrefix
              : "";
      // A bare original UNet has no prefix: then every key of the file must be the UNet's.
      io::MappedWeights mapped(files, unet_original_key_map(unet, prefix), prefix);
      io::load_weights(unet, mapped, options, file);
      return;
    }
    case CheckpointLayout::kUnknown:
      break;
  }
  fail(
      "{}: not a UNet checkpoint (neither diffusers keys such as conv_in.weight nor original "
      "ones such as {}input_blocks.0.0.weight)",
      file, kOriginalUNetPrefix);
}

}  // namespace lightning::models
