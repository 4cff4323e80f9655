// Safetensors in memory: a small file's bytes built or read without touching the file system
// (a member of a tar shard, e.g. one cached training sample). Same format and checks as
// io/safetensors.h; implemented in safetensors.cpp.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

namespace lightning::io {

// The bytes of a safetensors file holding `tensors` in order, with `metadata`; `what` names it in
// errors (duplicate names, unsupported dtypes).
std::string encode_safetensors(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                               const std::map<std::string, std::string>& metadata,
                               const std::string& what);

// Every tensor of a safetensors file's bytes (copies), and its metadata if asked. Throws Error
// naming `what` for anything parse_safetensors_header refuses.
std::map<std::string, torch::Tensor> decode_safetensors(
    const std::string& bytes, const std::string& what,
    std::map<std::string, std::string>* metadata = nullptr);

}  // namespace lightning::io
