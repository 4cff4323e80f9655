#include "io/key_map.h"

#include <algorithm>
#include <set>

#include "core/error.h"

namespace lightning::io {

MappedWeights::MappedWeights(std::shared_ptr<const WeightSource> base, KeyMap map,
                             std::string prefix, std::vector<std::string> ignored)
    : base_(std::move(base)),
      map_(std::move(map)),
      prefix_(std::move(prefix)),
      ignored_(std::move(ignored)) {}

std::vector<std::string> MappedWeights::keys() const {
  std::vector<std::string> out;
  for (const auto& [name, source] : map_)
    if (base_->contains(source.key)) out.push_back(name);
  return out;
}

bool MappedWeights::contains(const std::string& name) const {
  auto it = map_.find(name);
  return it != map_.end() && base_->contains(it->second.key);
}

std::vector<int64_t> MappedWeights::shape(const std::string& name) const {
  const auto& s = map_.at(name);
  auto shape = base_->shape(s.key);
  switch (s.op) {
    case SourceTensor::Op::kCopy:
      return shape;
    case SourceTensor::Op::kTranspose:
      if (shape.size() != 2) return shape;  // reported as mis-shaped by the caller
      return {shape[1], shape[0]};
    case SourceTensor::Op::kRows:
      if (shape.empty() || shape[0] % s.parts != 0) return shape;
      shape[0] /= s.parts;
      return shape;
    case SourceTensor::Op::kReshape: {
      int64_t a = 1, b = 1;
      for (auto d : shape)
        a *= d;
      for (auto d : s.shape)
        b *= d;
      return a == b ? s.shape : shape;
    }
  }
  return shape;
}

torch::Tensor MappedWeights::get(const std::string& name) const {
  const auto& s = map_.at(name);
  auto t = base_->get(s.key);
  switch (s.op) {
    case SourceTensor::Op::kCopy:
      return t;
    case SourceTensor::Op::kTranspose:
      return t.t().contiguous();
    case SourceTensor::Op::kRows: {
      const int64_t n = t.size(0) / s.parts;
      return t.narrow(0, s.part * n, n);
    }
    case SourceTensor::Op::kReshape:
      return t.reshape(s.shape);
  }
  return t;
}

void MappedWeights::release(const std::string& name) const {
  base_->release(map_.at(name).key);
}

std::vector<std::string> MappedWeights::unused() const {
  std::set<std::string> used;
  for (const auto& item : map_)
    used.insert(item.second.key);
  std::vector<std::string> out;
  for (const auto& key : base_->keys())
    if (key.rfind(prefix_, 0) == 0 && !used.count(key) &&
        std::find(ignored_.begin(), ignored_.end(), key) == ignored_.end())
      out.push_back(key);
  return out;
}

}  // namespace lightning::io
