// The safetensors container format, parsed without libtorch (so the fuzzer can link it alone).
// Layout: u64 little-endian header length N, N bytes of JSON header, then the data section.
// Header: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//          "__metadata__": {"key": "string value", ...}} with offsets relative to the data section.
// Reference: https://github.com/huggingface/safetensors (format description in its README).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace lightning::io {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

// Bytes per element of a dtype.
size_t dtype_size(DType dtype);
// "F32" etc., as written in safetensors headers.
const char* dtype_name(DType dtype);
// Parses a safetensors dtype name; returns false for an unknown one.
bool parse_dtype(const std::string& name, DType* out);

struct TensorEntry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section
  uint64_t end = 0;
  uint64_t numel() const;
};

struct SafetensorsHeader {
  std::vector<TensorEntry> tensors;  // in data order (sorted by begin offset)
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // absolute file offset of the data section (8 + header length)
  uint64_t data_size = 0;   // bytes in the data section
};

// Largest header the reader accepts (the reference implementation's limit is 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100ull * 1024 * 1024;

// Parses and validates a whole file image [data, data + size). `file` names the file in errors.
// Throws lightning::Error naming the file and, where one is at fault, the tensor, for:
// a file shorter than 8 bytes; a header length past the end of the file or above
// kMaxHeaderBytes; malformed JSON or a header that is not an object; a tensor entry with missing
// or mistyped fields; an unknown dtype; a negative or overflowing shape; offsets outside the data
// section; end < begin; overlapping ranges or a gap between them; a byte size different from
// numel x dtype size; non-string metadata values. Also refused, as the format's spec requires: a
// header not starting with '{', duplicate JSON keys, NUL bytes in the header, and data bytes not
// covered by any tensor (the ranges must tile the data section from 0 to its end exactly).
SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size,
                                           const std::string& file);

}  // namespace lightning::io
