#include "models/lora.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include <fmt/format.h>
#include <torch/nn/init.h>

#include "core/error.h"
#include "io/safetensors.h"

namespace lightning::models {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

std::string shape_str(const torch::Tensor& t) {
  return fmt::format("[{}]", fmt::join(t.sizes(), ", "));
}

// weight += scale * up @ down, computed in float32 and stored in the weight's dtype. set_data: the
// weight may be a view of a memory-mapped file, which is never written.
void fold_into(torch::Tensor& weight, const torch::Tensor& down, const torch::Tensor& up,
               double scale) {
  torch::NoGradGuard no_grad;
  auto d = down.to(torch::kFloat32).flatten(1);  // [r, in * k * k]
  auto u = up.to(torch::kFloat32).flatten(1);    // [out, r]
  auto delta = (u.matmul(d) * scale).view(weight.sizes()).to(weight.device());
  weight.set_data((weight.to(torch::kFloat32) + delta).to(weight.scalar_type()));
}

// Suffixes of the halves of a pair, by format.
struct PairSuffixes {
  const char* down;
  const char* up;
};
constexpr PairSuffixes kKohya{".lora_down.weight", ".lora_up.weight"};
constexpr PairSuffixes kPeft{".lora_A.weight", ".lora_B.weight"};
constexpr PairSuffixes kDiffusersOld{".lora.down.weight", ".lora.up.weight"};

}  // namespace

std::vector<LayerRef> linear_and_conv_layers(torch::nn::Module& module) {
  std::vector<LayerRef> out;
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    LayerRef ref;
    ref.path = item.key();
    if (auto linear = std::dynamic_pointer_cast<nn::LinearImpl>(item.value())) {
      ref.linear = nn::Linear(linear);
    } else if (auto conv = std::dynamic_pointer_cast<nn::Conv2dImpl>(item.value())) {
      ref.conv = nn::Conv2d(conv);
    } else {
      continue;
    }
    out.push_back(std::move(ref));
  }
  return out;
}

std::string kohya_name(const std::string& prefix, const std::string& path) {
  std::string name = path;
  std::replace(name.begin(), name.end(), '.', '_');
  return prefix + name;
}

bool path_matches(const std::string& path, const std::string& entry) {
  return path == entry || starts_with(path, entry + ".");
}

namespace {

bool excluded(const LayerRef& layer, const LoRAConfig& config) {
  return std::any_of(config.exclude.begin(), config.exclude.end(),
                     [&](const std::string& e) { return path_matches(layer.path, e); });
}

}  // namespace

int64_t count_lora_parameters(torch::nn::Module& module, const LoRAConfig& config) {
  int64_t n = 0;
  for (auto& layer : linear_and_conv_layers(module)) {
    if (excluded(layer, config)) continue;
    const int64_t k = layer.linear ? 1 : layer.conv->kernel_size;
    n += config.rank * (layer.in_features() * k * k + layer.out_features());
  }
  return n;
}

size_t attach_lora(torch::nn::Module& module, const LoRAConfig& config) {
  if (config.rank < 1) fail("LoRA rank must be >= 1, got {}", config.rank);
  if (!(config.alpha > 0)) fail("LoRA alpha must be > 0, got {}", config.alpha);
  torch::NoGradGuard no_grad;
  size_t count = 0;
  for (auto& layer : linear_and_conv_layers(module)) {
    if (excluded(layer, config)) continue;
    const auto& w = layer.weight();
    auto options = w.options().dtype(config.dtype.value_or(w.scalar_type()));
    auto adapter = std::make_shared<nn::LowRankAdapter>();
    // `down` is drawn on the CPU, from the CPU generator, and then moved: the same adapters
    // whatever device the model is on (a CUDA generator draws other numbers).
    const auto cpu = options.device(torch::kCPU);
    if (layer.linear) {
      adapter->down = torch::empty({config.rank, layer.in_features()}, cpu);
      adapter->up = torch::zeros({layer.out_features(), config.rank}, options);
    } else {
      const int64_t k = layer.conv->kernel_size;
      adapter->down = torch::empty({config.rank, layer.in_features(), k, k}, cpu);
      adapter->up = torch::zeros({layer.out_features(), config.rank, 1, 1}, options);
    }
    torch::nn::init::kaiming_uniform_(adapter->down, std::sqrt(5.0));
    adapter->down = adapter->down.to(w.device());
    adapter->down.set_requires_grad(true);
    adapter->up.set_requires_grad(true);
    adapter->alpha = config.alpha;
    adapter->scale = config.alpha / static_cast<double>(config.rank);
    layer.adapter() = adapter;
    ++count;
  }
  return count;
}

std::vector<std::pair<std::string, torch::Tensor>> lora_parameters(torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& layer : linear_and_conv_layers(module)) {
    const auto& a = layer.adapter();
    if (!a) continue;
    out.emplace_back(layer.path + ".lora_down.weight", a->down);
    out.emplace_back(layer.path + ".lora_up.weight", a->up);
  }
  return out;
}

size_t count_lora(torch::nn::Module& module) {
  size_t n = 0;
  for (auto& layer : linear_and_conv_layers(module))
    n += layer.adapter() ? 1 : 0;
  return n;
}

void merge_lora(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  for (auto& layer : linear_and_conv_layers(module)) {
    auto& a = layer.adapter();
    if (!a) continue;
    fold_into(layer.weight(), a->down, a->up, a->scale);
    a.reset();
  }
}

void remove_lora(torch::nn::Module& module) {
  for (auto& layer : linear_and_conv_layers(module))
    layer.adapter().reset();
}

void save_kohya_lora(torch::nn::Module& module, const std::string& path, const std::string& prefix,
                     c10::optional<torch::ScalarType> dtype,
                     const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (auto& layer : linear_and_conv_layers(module)) {
    const auto& a = layer.adapter();
    if (!a) continue;
    const auto name = kohya_name(prefix, layer.path);
    auto convert = [&](const torch::Tensor& t) {
      auto d = t.detach();
      return dtype ? d.to(*dtype) : d;
    };
    tensors.emplace_back(name + ".lora_down.weight", convert(a->down));
    tensors.emplace_back(name + ".lora_up.weight", convert(a->up));
    tensors.emplace_back(name + ".alpha", torch::tensor(static_cast<float>(a->alpha)));
  }
  if (tensors.empty()) fail("{}: the model has no LoRA adapters to save", path);
  io::save_safetensors(path, tensors, metadata);
}

LoRAFile read_lora_file(const std::string& path) {
  io::SafetensorsFile file(path);
  LoRAFile out;
  out.path = path;
  std::map<std::string, LoRAModule> by_stem;
  std::set<std::string> formats;
  for (const auto& key : file.keys()) {
    std::string stem;
    bool is_down = false, is_alpha = false;
    for (const auto& [format, suffixes] :
         {std::pair{"kohya", kKohya}, std::pair{"peft", kPeft}, std::pair{"peft", kDiffusersOld}}) {
      if (ends_with(key, suffixes.down)) {
        stem = key.substr(0, key.size() - std::string(suffixes.down).size());
        is_down = true;
      } else if (ends_with(key, suffixes.up)) {
        stem = key.substr(0, key.size() - std::string(suffixes.up).size());
      } else {
        continue;
      }
      formats.insert(format);
      break;
    }
    if (stem.empty() && ends_with(key, ".alpha")) {
      stem = key.substr(0, key.size() - 6);
      is_alpha = true;
    }
    if (stem.empty())
      fail(
          "{}: tensor '{}' is not part of a LoRA pair (expected .lora_down/.lora_up, "
          ".lora_A/.lora_B or .alpha; LoHa, LoKr and DoRA files are not supported)",
          path, key);
    auto& m = by_stem[stem];
    m.key = stem;
    auto t = file.get(key);
    if (is_alpha) {
      if (t.numel() != 1)
        fail("{}: '{}' must hold one value, got shape {}", path, key, shape_str(t));
      m.alpha = t.to(torch::kFloat64).item<double>();
    } else if (is_down) {
      m.down = t;
    } else {
      m.up = t;
    }
  }
  if (formats.size() > 1)
    fail("{}: mixes kohya (lora_down/lora_up) and PEFT (lora_A/lora_B) keys", path);
  if (by_stem.empty() || formats.empty()) fail("{}: holds no LoRA weights", path);
  out.format = *formats.begin();
  for (auto& [stem, m] : by_stem) {
    if (!m.down.defined() || !m.up.defined())
      fail("{}: '{}' has {} but no {}", path, stem,
           m.down.defined() ? "a down (A) matrix" : "an up (B) matrix",
           m.down.defined() ? "up (B) matrix" : "down (A) matrix");
    const bool chain = m.down.dim() >= 2 && m.up.dim() >= 2 && m.up.size(1) == m.down.size(0) &&
                       (m.up.dim() == 2 || (m.up.size(2) == 1 && m.up.size(3) == 1));
    if (!chain)
      fail("{}: '{}': down {} and up {} do not form a low-rank pair", path, stem, shape_str(m.down),
           shape_str(m.up));
    out.modules.push_back(std::move(m));
  }
  return out;
}

LoRAApplyReport apply_lora(const LoRAFile& file, const std::vector<LoRATarget>& targets,
                           double multiplier, bool allow_partial) {
  // Index every layer of every target by the names this file's format uses.
  std::map<std::string, LayerRef> layers;
  for (const auto& target : targets) {
    for (auto& layer : linear_and_conv_layers(*target.module)) {
      if (file.format == "kohya") {
        layers.emplace(kohya_name(target.kohya_prefix, layer.path), layer);
        auto alias = target.kohya_aliases.find(layer.path);
        if (alias != target.kohya_aliases.end())
          layers.emplace(kohya_name(target.kohya_prefix, alias->second), layer);
      } else {
        for (const auto& prefix : target.peft_prefixes)
          layers.emplace(prefix + layer.path, layer);
      }
    }
  }
  // Plan everything before changing anything.
  std::vector<std::pair<LayerRef, const LoRAModule*>> plan;
  LoRAApplyReport report;
  for (const auto& m : file.modules) {
    auto it = layers.find(m.key);
    if (it == layers.end()) {
      report.unmatched.push_back(m.key);
      continue;
    }
    auto layer = it->second;
    const auto w = layer.weight();
    const int64_t k = layer.conv ? layer.conv->kernel_size : 1;
    const bool down_ok = m.down.dim() == 2
                             ? (k == 1 && m.down.size(1) == layer.in_features())
                             : (m.down.dim() == 4 && m.down.size(1) == layer.in_features() &&
                                m.down.size(2) == k && m.down.size(3) == k);
    const bool up_ok = m.up.size(0) == layer.out_features();
    if (!down_ok || !up_ok)
      fail(
          "{}: '{}' (down {}, up {}) does not fit {} with weight {}: a LoRA for another "
          "architecture?",
          file.path, m.key, shape_str(m.down), shape_str(m.up), layer.path, shape_str(w));
    plan.emplace_back(layer, &m);
  }
  if (plan.empty())
    fail(
        "{}: none of its {} modules matches a layer of the model (first: '{}'): a LoRA for "
        "another architecture?",
        file.path, file.modules.size(), file.modules.front().key);
  if (!report.unmatched.empty() && !allow_partial) {
    std::vector<std::string> few(
        report.unmatched.begin(),
        report.unmatched.begin() + std::min<size_t>(3, report.unmatched.size()));
    fail(
        "{}: {} of its {} modules match no layer of the model ({}{}); pass "
        "--lora-allow-partial to apply the rest",
        file.path, report.unmatched.size(), file.modules.size(), fmt::join(few, ", "),
        report.unmatched.size() > few.size() ? ", ..." : "");
  }
  for (auto& [layer, m] : plan) {
    const double scale = multiplier * m->alpha.value_or(static_cast<double>(m->rank())) / m->rank();
    fold_into(layer.weight(), m->down, m->up, scale);
    ++report.applied;
  }
  return report;
}

}  // namespace lightning::models
