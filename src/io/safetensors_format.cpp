// Strict safetensors header validation, mirroring the reference implementation
// (huggingface/safetensors, safetensors/src/tensor.rs: `read_metadata` and `Metadata::validate`):
// the header length must be <= 100 MB and inside the file; the header must be UTF-8 JSON (its
// spec: "MUST begin with a { character", may be padded with trailing spaces); after sorting the
// tensors by data_offsets, each begins where the previous ended, the first at 0, and the last end
// equals the data section size exactly (`buffer_end + 8 + n == buffer_len`, else
// MetadataIncompleteBuffer); each tensor's byte size equals numel x dtype size with checked
// arithmetic. The spec also disallows duplicate keys, which nlohmann::json would silently merge,
// so the parse callback below detects them.
#include "io/safetensors_format.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace lightning::io {

namespace {

using nlohmann::json;

// A valid header nests three levels deep (header -> entry -> shape); the limit only keeps
// hostile inputs from building huge bookkeeping stacks.
constexpr int kMaxJsonDepth = 32;

constexpr const char* kMetadataKey = "__metadata__";

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};

// Names as written by the reference writer (safetensors `Dtype` serde names).
constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 8},   {DType::F32, "F32", 4}, {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2}, {DType::I64, "I64", 8}, {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},   {DType::I8, "I8", 1},   {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1},
};

const DTypeInfo& info(DType dtype) {
  for (const auto& entry : kDTypes)
    if (entry.dtype == dtype) return entry;
  fail("safetensors: invalid DType value {}", static_cast<int>(dtype));
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i)
    value = (value << 8) | p[i];
  return value;
}

// "3*4*4" (separator "*") or "3, 4, 4" for error messages; a scalar (shape []) has one element.
std::string shape_string(const std::vector<int64_t>& shape, const char* separator) {
  if (shape.empty() && separator[0] == '*') return "1";
  std::string out;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += separator;
    out += std::to_string(shape[i]);
  }
  return out;
}

// Thrown from inside the JSON parse callback and turned into an Error by the caller.
struct CallbackFailure {
  std::string message;
};

// Parses [first, last) as JSON, rejecting duplicate object keys and excessive nesting.
json parse_json(const uint8_t* first, const uint8_t* last, const std::string& file) {
  std::vector<std::set<std::string>> keys_per_object;  // one set per open object
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth >= kMaxJsonDepth)
          throw CallbackFailure{fmt::format("JSON nested deeper than {} levels", kMaxJsonDepth)};
        if (event == json::parse_event_t::object_start) keys_per_object.emplace_back();
        break;
      case json::parse_event_t::object_end:
        keys_per_object.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys_per_object.back().insert(parsed.get<std::string>()).second)
          throw CallbackFailure{
              fmt::format("duplicate JSON key '{}'", parsed.get_ref<const std::string&>())};
        break;
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(first, last, callback);
  } catch (const CallbackFailure& failure) {
    fail("{}: invalid header: {}", file, failure.message);
  } catch (const json::exception& e) {
    // nlohmann's message: "[json.exception.parse_error.101] parse error at line 1, column 5:
    // syntax error ..."; drop the bracketed id, keep the position and the reason.
    std::string message = e.what();
    const auto bracket = message.find("] ");
    if (message.rfind("[json.exception", 0) == 0 && bracket != std::string::npos)
      message.erase(0, bracket + 2);
    fail("{}: malformed JSON header: {}", file, message);
  }
}

std::vector<int64_t> parse_shape(const json& value, const std::string& file,
                                 const std::string& name) {
  if (!value.is_array())
    fail("{}: tensor '{}': 'shape' must be an array of integers, got {}", file, name,
         value.type_name());
  std::vector<int64_t> shape;
  shape.reserve(value.size());
  for (const auto& dim : value) {
    if (dim.is_number_integer() && !dim.is_number_unsigned() && dim.get<int64_t>() < 0)
      fail("{}: tensor '{}': negative dimension {} in shape", file, name, dim.get<int64_t>());
    if (!dim.is_number_unsigned())
      fail("{}: tensor '{}': shape dimensions must be non-negative integers, got {}", file, name,
           dim.type_name());
    const uint64_t size = dim.get<uint64_t>();
    if (size > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail("{}: tensor '{}': dimension {} is too large", file, name, size);
    shape.push_back(static_cast<int64_t>(size));
  }
  return shape;
}

// numel x dtype size, refusing any shape whose non-zero dimensions overflow int64 even if a
// zero dimension makes the product 0 (libtorch could not describe such a tensor either).
uint64_t checked_byte_size(const std::vector<int64_t>& shape, DType dtype, const std::string& file,
                           const std::string& name) {
  uint64_t nonzero_product = dtype_size(dtype);
  bool empty = false;
  for (const int64_t dim : shape) {
    if (dim == 0) {
      empty = true;
      continue;
    }
    if (__builtin_mul_overflow(nonzero_product, static_cast<uint64_t>(dim), &nonzero_product) ||
        nonzero_product > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail("{}: tensor '{}': shape [{}] x {} bytes per element overflows", file, name,
           shape_string(shape, ", "), dtype_size(dtype));
  }
  return empty ? 0 : nonzero_product;
}

void parse_offsets(const json& value, const std::string& file, const std::string& name,
                   uint64_t data_size, TensorEntry* entry) {
  if (!value.is_array() || value.size() != 2 || !value[0].is_number_unsigned() ||
      !value[1].is_number_unsigned())
    fail("{}: tensor '{}': 'data_offsets' must be two non-negative integers [begin, end]", file,
         name);
  entry->begin = value[0].get<uint64_t>();
  entry->end = value[1].get<uint64_t>();
  if (entry->end < entry->begin)
    fail("{}: tensor '{}': data_offsets end {} < begin {}", file, name, entry->end, entry->begin);
  if (entry->end > data_size)
    fail("{}: tensor '{}': data_offsets end {} is past the end of the {}-byte data section", file,
         name, entry->end, data_size);
}

TensorEntry parse_entry(const std::string& name, const json& value, const std::string& file,
                        uint64_t data_size) {
  if (!value.is_object())
    fail("{}: tensor '{}': entry must be an object, got {}", file, name, value.type_name());
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!value.contains(field)) fail("{}: tensor '{}': missing '{}'", file, name, field);

  TensorEntry entry;
  entry.name = name;
  const json& dtype = value.at("dtype");
  if (!dtype.is_string())
    fail("{}: tensor '{}': 'dtype' must be a string, got {}", file, name, dtype.type_name());
  if (!parse_dtype(dtype.get_ref<const std::string&>(), &entry.dtype))
    fail("{}: tensor '{}': unknown dtype '{}'", file, name, dtype.get_ref<const std::string&>());
  entry.shape = parse_shape(value.at("shape"), file, name);
  parse_offsets(value.at("data_offsets"), file, name, data_size, &entry);

  const uint64_t expected = checked_byte_size(entry.shape, entry.dtype, file, name);
  if (entry.end - entry.begin != expected)
    fail("{}: tensor '{}': byte size {} != {} {} elements ({} bytes)", file, name,
         entry.end - entry.begin, shape_string(entry.shape, "*"), dtype_name(entry.dtype),
         expected);
  return entry;
}

std::map<std::string, std::string> parse_metadata(const json& value, const std::string& file) {
  if (!value.is_object())
    fail("{}: '{}' must be an object of strings, got {}", file, kMetadataKey, value.type_name());
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string())
      fail("{}: '{}' value of '{}' must be a string, got {}", file, kMetadataKey, key,
           item.type_name());
    metadata.emplace(key, item.get<std::string>());
  }
  return metadata;
}

// The ranges must tile [0, data_size) in order: no overlap, no gap, no trailing bytes.
void check_tiling(const std::vector<TensorEntry>& tensors, uint64_t data_size,
                  const std::string& file) {
  uint64_t expected_begin = 0;
  const TensorEntry* previous = nullptr;
  for (const auto& entry : tensors) {
    if (entry.begin < expected_begin)
      fail("{}: tensor '{}': data range [{}, {}) overlaps tensor '{}' [{}, {})", file, entry.name,
           entry.begin, entry.end, previous->name, previous->begin, previous->end);
    if (entry.begin > expected_begin) {
      if (previous)
        fail(
            "{}: tensor '{}': gap of {} bytes between its data range [{}, {}) and tensor '{}' "
            "ending at {}",
            file, entry.name, entry.begin - expected_begin, entry.begin, entry.end, previous->name,
            previous->end);
      fail("{}: tensor '{}': first data range starts at {}, not 0", file, entry.name, entry.begin);
    }
    expected_begin = entry.end;
    previous = &entry;
  }
  if (expected_begin != data_size)
    fail(
        "{}: data section is {} bytes but the tensors cover only {} (the file is truncated or "
        "has trailing bytes)",
        file, data_size, expected_begin);
}

}  // namespace

size_t dtype_size(DType dtype) {
  return info(dtype).size;
}

const char* dtype_name(DType dtype) {
  return info(dtype).name;
}

bool parse_dtype(const std::string& name, DType* out) {
  for (const auto& entry : kDTypes) {
    if (name == entry.name) {
      *out = entry.dtype;
      return true;
    }
  }
  return false;
}

uint64_t TensorEntry::numel() const {
  uint64_t n = 1;
  for (const int64_t dim : shape)
    n *= static_cast<uint64_t>(dim);
  return n;
}

SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size,
                                           const std::string& file) {
  if (size < 8) fail("{}: file is {} bytes, too short for the 8-byte header length", file, size);
  const uint64_t header_size = read_u64_le(data);
  if (header_size > kMaxHeaderBytes)
    fail("{}: header length {} exceeds the {}-byte limit", file, header_size, kMaxHeaderBytes);
  if (header_size > size - 8)
    fail("{}: header length {} runs past the end of the {}-byte file", file, header_size, size);
  const uint8_t* header_begin = data + 8;
  const uint8_t* header_end = header_begin + header_size;
  if (header_size == 0 || header_begin[0] != '{')
    fail("{}: header is not a JSON object (it must start with '{{'; not a safetensors file?)",
         file);

  // nlohmann::json stops at a NUL byte as if the input ended there, which would accept junk
  // after it; valid JSON never contains one (control characters inside strings are escaped).
  if (const void* nul = std::memchr(header_begin, 0, header_size))
    fail("{}: header contains a NUL byte at offset {}", file,
         static_cast<const uint8_t*>(nul) - data);
  const json root = parse_json(header_begin, header_end, file);
  if (!root.is_object()) fail("{}: header must be a JSON object, got {}", file, root.type_name());

  SafetensorsHeader header;
  header.data_start = 8 + header_size;
  header.data_size = size - header.data_start;
  for (const auto& [name, value] : root.items()) {
    if (name == kMetadataKey) {
      header.metadata = parse_metadata(value, file);
      continue;
    }
    header.tensors.push_back(parse_entry(name, value, file, header.data_size));
  }
  // Data order, as the reference sorts its tensors before validating. The JSON object iterates
  // in name order, so stable_sort keeps equal ranges (empty tensors) deterministic.
  std::stable_sort(header.tensors.begin(), header.tensors.end(),
                   [](const TensorEntry& a, const TensorEntry& b) {
                     return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
                   });
  check_tiling(header.tensors, header.data_size, file);
  return header;
}

}  // namespace lightning::io
