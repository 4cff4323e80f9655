// Strict loading of named weights into a libtorch module: every parameter and buffer must be
// found with the right shape, and every tensor in the files must be used; otherwise one error
// lists the missing, unexpected and mis-shaped keys.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "io/safetensors.h"

namespace lightning::io {

// Tensors by the names a module gives them: safetensors files as they are (WeightFiles), or
// renamed and reshaped from another checkpoint layout (io/key_map.h).
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual std::vector<std::string> keys() const = 0;
  virtual bool contains(const std::string& name) const = 0;
  virtual std::vector<int64_t> shape(const std::string& name) const = 0;
  // The tensor (a view of the memory-mapped file where possible).
  virtual torch::Tensor get(const std::string& name) const = 0;
  // Drops the file pages behind `name` once it has been converted.
  virtual void release(const std::string& name) const = 0;
  // The files, joined with ", " (for messages).
  virtual std::string describe() const = 0;
  // Checkpoint tensors that belong to the model but that no name reads (reported as unexpected).
  virtual std::vector<std::string> unused() const { return {}; }
};

// Tensors by name, gathered from one or more safetensors files (sharded checkpoints).
class WeightFiles : public WeightSource {
 public:
  explicit WeightFiles(const std::vector<std::string>& paths);
  bool contains(const std::string& name) const override { return index_.count(name) > 0; }
  std::vector<std::string> keys() const override;
  std::vector<int64_t> shape(const std::string& name) const override;
  const TensorEntry& entry(const std::string& name) const;
  torch::Tensor get(const std::string& name) const override;
  void release(const std::string& name) const override;
  const std::string& file_of(const std::string& name) const;
  std::string describe() const override;

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> index_;
};

struct LoadOptions {
  // Floating-point parameters are converted to this type (f16 files become f32/bf16 on CPU).
  torch::ScalarType dtype = torch::kFloat32;
  torch::Device device = torch::kCPU;
};

// Loads `weights` into `module` strictly (see above). Where a file tensor already has the
// target dtype and device, the parameter becomes a view of the memory-mapped file (no copy);
// otherwise it is converted tensor by tensor and the file pages are released after each, so the
// weights are never held twice. `what` names the model in errors (e.g. the directory).
void load_weights(torch::nn::Module& module, const WeightSource& weights,
                  const LoadOptions& options, const std::string& what);

// The checks of load_weights without loading: every module tensor found with its shape, every
// source tensor used. Throws Error listing what does not fit.
void check_weights(const torch::nn::Module& module, const WeightSource& weights,
                   const std::string& what);

// The module's parameters and buffers by full dotted name (diffusers state-dict keys).
std::map<std::string, torch::Tensor> module_tensors(const torch::nn::Module& module);

// Saves the module's parameters and buffers (converted to `dtype` when given) as safetensors.
// A finite weight that f16 cannot hold is refused by name (never written as inf); the file is
// then left as it was.
void save_weights(const torch::nn::Module& module, const std::string& path,
                  c10::optional<torch::ScalarType> dtype = c10::nullopt,
                  const std::map<std::string, std::string>& metadata = {});

}  // namespace lightning::io
