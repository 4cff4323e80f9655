// Memory-mapped safetensors reader and atomic writer over libtorch tensors.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "io/safetensors_format.h"

namespace lightning::io {

torch::ScalarType to_torch(DType dtype);
DType from_torch(torch::ScalarType type);  // throws Error for types safetensors cannot hold

// A safetensors file mapped into memory. Tensors handed out by get() are views of the mapping
// (no copy) when the data is suitably aligned, else copies; views keep the mapping alive after
// the SafetensorsFile is destroyed. The mapping is private copy-on-write: writing into a view
// never changes the file.
class SafetensorsFile {
 public:
  // Maps and validates `path`; throws Error naming the file (and tensor) on any problem.
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  // Tensor names in data order.
  std::vector<std::string> keys() const;
  bool contains(const std::string& name) const;
  const TensorEntry& entry(const std::string& name) const;  // throws Error if absent
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  size_t size() const { return header_.tensors.size(); }

  // The tensor with its stored dtype and shape, on CPU.
  torch::Tensor get(const std::string& name) const;

  // Tells the kernel that the pages of `name` are no longer needed in this process's resident
  // set (madvise MADV_DONTNEED on whole pages inside the tensor's range). Used after a tensor has
  // been converted into its own storage, so that loading never holds two copies of the weights.
  // Must not be called while a view of that tensor is in use.
  void release(const std::string& name) const;

 private:
  struct Mapping;
  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  SafetensorsHeader header_;
  std::unordered_map<std::string, size_t> index_;
};

// Writes tensors (any device; copied to CPU contiguous) in the given order, with metadata, to a
// temporary file in the same directory, fsyncs and renames it over `path`. A failure leaves any
// existing file at `path` untouched. Throws Error naming the file (and tensor) on failure:
// duplicate names, the reserved name "__metadata__", unsupported dtypes.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Convenience: loads every tensor (as views of a mapping) into a name -> tensor map.
std::map<std::string, torch::Tensor> load_safetensors(const std::string& path);

}  // namespace lightning::io
