#include "io/state_dict.h"

#include <algorithm>
#include <optional>

#include "core/error.h"

namespace lightning::io {
namespace {

std::string shape_str(c10::IntArrayRef shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

// "a, b, c and 12 more"
std::string some(const std::vector<std::string>& items, size_t limit = 6) {
  std::vector<std::string> head(items.begin(), items.begin() + std::min(limit, items.size()));
  std::string out = fmt::format("{}", fmt::join(head, ", "));
  if (items.size() > limit) out += fmt::format(" and {} more", items.size() - limit);
  return out;
}

}  // namespace

WeightFiles::WeightFiles(const std::vector<std::string>& paths) {
  for (const auto& path : paths) {
    files_.push_back(std::make_shared<SafetensorsFile>(path));
    const size_t f = files_.size() - 1;
    for (const auto& key : files_.back()->keys()) {
      if (index_.count(key))
        fail("{}: tensor '{}' also appears in {}", path, key, files_[index_[key]]->path());
      index_[key] = f;
    }
  }
}

std::vector<std::string> WeightFiles::keys() const {
  std::vector<std::string> out;
  for (const auto& item : index_)
    out.push_back(item.first);
  return out;
}

std::vector<int64_t> WeightFiles::shape(const std::string& name) const {
  return entry(name).shape;
}

const TensorEntry& WeightFiles::entry(const std::string& name) const {
  return files_.at(index_.at(name))->entry(name);
}
torch::Tensor WeightFiles::get(const std::string& name) const {
  return files_.at(index_.at(name))->get(name);
}
void WeightFiles::release(const std::string& name) const {
  files_.at(index_.at(name))->release(name);
}
const std::string& WeightFiles::file_of(const std::string& name) const {
  return files_.at(index_.at(name))->path();
}
std::string WeightFiles::describe() const {
  std::vector<std::string> names;
  for (const auto& f : files_)
    names.push_back(f->path());
  return fmt::format("{}", fmt::join(names, ", "));
}

std::map<std::string, torch::Tensor> module_tensors(const torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& item : module.named_parameters(/*recurse=*/true))
    out[item.key()] = item.value();
  for (const auto& item : module.named_buffers(/*recurse=*/true))
    out[item.key()] = item.value();
  return out;
}

void check_weights(const torch::nn::Module& module, const WeightSource& weights,
                   const std::string& what) {
  const auto targets = module_tensors(module);
  std::vector<std::string> missing, unexpected, misshaped;
  for (const auto& [name, tensor] : targets) {
    if (!weights.contains(name)) {
      missing.push_back(name);
      continue;
    }
    const auto shape = weights.shape(name);
    if (c10::IntArrayRef(shape) != tensor.sizes())
      misshaped.push_back(fmt::format("{} (file {} vs model {})", name, shape_str(shape),
                                      shape_str(tensor.sizes())));
  }
  for (const auto& name : weights.keys())
    if (!targets.count(name)) unexpected.push_back(name);
  for (const auto& name : weights.unused())
    unexpected.push_back(name);
  if (!missing.empty() || !unexpected.empty() || !misshaped.empty()) {
    std::vector<std::string> parts;
    if (!missing.empty())
      parts.push_back(fmt::format("{} missing: {}", missing.size(), some(missing)));
    if (!unexpected.empty())
      parts.push_back(fmt::format("{} unexpected: {}", unexpected.size(), some(unexpected)));
    if (!misshaped.empty())
      parts.push_back(fmt::format("{} mis-shaped: {}", misshaped.size(), some(misshaped, 3)));
    fail("{}: weights in {} do not fit the config: {}", what, weights.describe(),
         fmt::format("{}", fmt::join(parts, "; ")));
  }
}

namespace {
// Where `converted` (`source` in f16) turned finite values into inf: the largest magnitude of
// `source` (f16 holds up to 65504), else nothing.
std::optional<double> beyond_f16_range(const torch::Tensor& source,
                                       const torch::Tensor& converted) {
  if (converted.scalar_type() != torch::kHalf || source.scalar_type() == torch::kHalf ||
      !converted.isinf().any().item<bool>() || source.isinf().any().item<bool>())
    return std::nullopt;
  return source.abs().max().item<double>();
}
}  // namespace

void load_weights(torch::nn::Module& module, const WeightSource& weights,
                  const LoadOptions& options, const std::string& what) {
  check_weights(module, weights, what);
  auto targets = module_tensors(module);

  torch::NoGradGuard no_grad;
  for (auto& [name, tensor] : targets) {
    auto source = weights.get(name);
    const bool floating = source.is_floating_point();
    const auto dtype = floating ? options.dtype : source.scalar_type();
    if (source.scalar_type() == dtype && source.device() == options.device) {
      tensor.set_data(source);  // a view of the mapping: no copy
    } else {
      auto converted = source.to(options.device, dtype);
      if (const auto max = beyond_f16_range(source, converted))
        fail(
            "{}: weight '{}' in {} holds values beyond float16's range (|x| up to {:g}): load it "
            "in bf16 or f32",
            what, name, weights.describe(), *max);
      tensor.set_data(converted);
      source = torch::Tensor();
      weights.release(name);
    }
  }
}

void save_weights(const torch::nn::Module& module, const std::string& path,
                  c10::optional<torch::ScalarType> dtype,
                  const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& [name, tensor] : module_tensors(module)) {
    auto t = tensor.detach();
    if (dtype && t.is_floating_point() && t.scalar_type() != *dtype) {
      auto narrow = t.to(*dtype);
      if (const auto max = beyond_f16_range(t, narrow))
        fail("{}: weight '{}' holds values beyond float16's range (|x| up to {:g})", path, name,
             *max);
      t = narrow;
    }
    // On the host tensor by tensor: a GPU holds one converted copy at a time, not a model's
    // worth (SDXL's UNet in f16: 5 GB). The file is written from host memory anyway.
    tensors.emplace_back(name, t.to(torch::kCPU));
  }
  save_safetensors(path, tensors, metadata);
}

}  // namespace lightning::io
