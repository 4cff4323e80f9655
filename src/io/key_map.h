// Reading a checkpoint of another layout through a table: each module tensor name maps to one
// checkpoint key, copied, transposed, reshaped or cut out of a fused tensor (OpenCLIP's in_proj).
// The tables themselves live with the models (models/checkpoint_formats.h).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/state_dict.h"

namespace lightning::io {

struct SourceTensor {
  enum class Op { kCopy, kTranspose, kRows, kReshape };
  std::string key;  // the checkpoint's key
  Op op = Op::kCopy;
  int64_t part = 0, parts = 1;  // kRows: rows [part * n / parts, (part + 1) * n / parts)
  std::vector<int64_t> shape;   // kReshape: the module's shape (same number of elements)
};

// Module tensor name -> where it comes from.
using KeyMap = std::map<std::string, SourceTensor>;

// A WeightSource over `base` (which holds the checkpoint's own keys) renamed by `map`. Keys of
// `base` that start with `prefix`, are not read by the map and are not in `ignored` are
// reported by unused(), so that a checkpoint with more (or other) tensors than the model is
// refused instead of half-loaded.
class MappedWeights : public WeightSource {
 public:
  MappedWeights(std::shared_ptr<const WeightSource> base, KeyMap map, std::string prefix,
                std::vector<std::string> ignored = {});
  std::vector<std::string> keys() const override;
  bool contains(const std::string& name) const override;
  std::vector<int64_t> shape(const std::string& name) const override;
  torch::Tensor get(const std::string& name) const override;
  void release(const std::string& name) const override;
  std::string describe() const override { return base_->describe(); }
  std::vector<std::string> unused() const override;

 private:
  std::shared_ptr<const WeightSource> base_;
  KeyMap map_;
  std::string prefix_;
  std::vector<std::string> ignored_;
};

}  // namespace lightning::io
