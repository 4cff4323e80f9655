// mmap reader and atomic writer for safetensors files (format: see safetensors_format.h).
#include "io/safetensors.h"
#include "io/safetensors_bytes.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace lightning::io {

namespace {

std::optional<DType> dtype_of(torch::ScalarType type) {
  switch (type) {
    case torch::kDouble:
      return DType::F64;
    case torch::kFloat:
      return DType::F32;
    case torch::kHalf:
      return DType::F16;
    case torch::kBFloat16:
      return DType::BF16;
    case torch::kLong:
      return DType::I64;
    case torch::kInt:
      return DType::I32;
    case torch::kShort:
      return DType::I16;
    case torch::kChar:
      return DType::I8;
    case torch::kByte:
      return DType::U8;
    case torch::kBool:
      return DType::BOOL;
    default:
      return std::nullopt;
  }
}

// Closes a file descriptor on scope exit.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

// Writes all of [data, data + size), retrying short writes and EINTR.
void write_all(int fd, const void* data, size_t size, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("{}: write failed: {}", path, std::strerror(errno));
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
}

// A JSON string literal for `text`, or an Error naming the file if it is not valid UTF-8.
std::string json_string(const std::string& text, const std::string& path) {
  try {
    return nlohmann::json(text).dump();
  } catch (const nlohmann::json::exception&) {
    fail("{}: name '{}' is not valid UTF-8", path, text);
  }
}

}  // namespace

torch::ScalarType to_torch(DType dtype) {
  switch (dtype) {
    case DType::F64:
      return torch::kDouble;
    case DType::F32:
      return torch::kFloat;
    case DType::F16:
      return torch::kHalf;
    case DType::BF16:
      return torch::kBFloat16;
    case DType::I64:
      return torch::kLong;
    case DType::I32:
      return torch::kInt;
    case DType::I16:
      return torch::kShort;
    case DType::I8:
      return torch::kChar;
    case DType::U8:
      return torch::kByte;
    case DType::BOOL:
      return torch::kBool;
  }
  fail("safetensors: invalid DType value {}", static_cast<int>(dtype));
}

DType from_torch(torch::ScalarType type) {
  const auto dtype = dtype_of(type);
  if (!dtype) fail("safetensors cannot hold dtype {}", c10::toString(type));
  return *dtype;
}

// The whole file mapped private copy-on-write: views handed out by get() may be written by their
// users (e.g. in-place ops) without ever reaching the file.
struct SafetensorsFile::Mapping {
  uint8_t* data = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (data) ::munmap(data, size);
  }
};

SafetensorsFile::SafetensorsFile(const std::string& path)
    : path_(path), mapping_(std::make_shared<Mapping>()) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open: {}", path, std::strerror(errno));
  FdCloser closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail("{}: cannot stat: {}", path, std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail("{}: not a regular file", path);
  const auto size = static_cast<size_t>(st.st_size);
  if (size == 0) parse_safetensors_header(nullptr, 0, path);  // throws: too short

  void* data = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  if (data == MAP_FAILED) fail("{}: cannot mmap {} bytes: {}", path, size, std::strerror(errno));
  mapping_->data = static_cast<uint8_t*>(data);
  mapping_->size = size;

  header_ = parse_safetensors_header(mapping_->data, size, path);
  for (size_t i = 0; i < header_.tensors.size(); ++i)
    index_.emplace(header_.tensors[i].name, i);
}

std::vector<std::string> SafetensorsFile::keys() const {
  std::vector<std::string> names;
  names.reserve(header_.tensors.size());
  for (const auto& entry : header_.tensors)
    names.push_back(entry.name);
  return names;
}

bool SafetensorsFile::contains(const std::string& name) const {
  return index_.count(name) != 0;
}

const TensorEntry& SafetensorsFile::entry(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) fail("{}: no tensor '{}'", path_, name);
  return header_.tensors[it->second];
}

torch::Tensor SafetensorsFile::get(const std::string& name) const {
  const TensorEntry& e = entry(name);
  const auto options = torch::TensorOptions().dtype(to_torch(e.dtype));
  const std::vector<int64_t>& shape = e.shape;
  if (e.end == e.begin) return torch::empty(shape, options);  // no bytes to view

  uint8_t* data = mapping_->data + header_.data_start + e.begin;
  // libtorch kernels assume element-aligned data; a header length that is not a multiple of 8
  // (the reference writer pads it, other writers may not) misaligns the data section.
  if (reinterpret_cast<uintptr_t>(data) % dtype_size(e.dtype) != 0) {
    torch::Tensor copy = torch::empty(shape, options);
    std::memcpy(copy.data_ptr(), data, e.end - e.begin);
    return copy;
  }
  // The deleter owns a reference to the mapping, so a view outlives this SafetensorsFile.
  std::shared_ptr<Mapping> keep_alive = mapping_;
  return torch::from_blob(
      data, shape, [keep_alive](void*) mutable { keep_alive.reset(); }, options);
}

void SafetensorsFile::release(const std::string& name) const {
  const TensorEntry& e = entry(name);
  const long page = ::sysconf(_SC_PAGESIZE);
  const auto page_size = static_cast<uintptr_t>(page > 0 ? page : 4096);
  const auto begin = reinterpret_cast<uintptr_t>(mapping_->data + header_.data_start + e.begin);
  const uintptr_t end = begin + (e.end - e.begin);
  // Only pages entirely inside this tensor: the neighbours' bytes share the boundary pages.
  const uintptr_t first = (begin + page_size - 1) / page_size * page_size;
  const uintptr_t last = end / page_size * page_size;
  if (last <= first) return;
  // On a private file mapping MADV_DONTNEED drops the pages (and any copy-on-write changes);
  // a later access faults them in again from the file.
  if (::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED) != 0)
    fail("{}: tensor '{}': madvise failed: {}", path_, name, std::strerror(errno));
}

namespace {

// The header of a safetensors file holding `tensors` (validated; `path` names the file in
// errors) and the tensors as contiguous CPU copies, in order.
std::string build_header(const std::string& path,
                         const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                         const std::map<std::string, std::string>& metadata,
                         std::vector<torch::Tensor>* contiguous) {
  std::set<std::string> seen;
  contiguous->reserve(tensors.size());
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [key, value] : metadata) {
      if (!first) header += ',';
      first = false;
      header += json_string(key, path) + ':' + json_string(value, path);
    }
    header += '}';
  }
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name.empty()) fail("{}: empty tensor name", path);
    if (name == "__metadata__") fail("{}: tensor name '__metadata__' is reserved", path);
    if (!seen.insert(name).second) fail("{}: tensor '{}': duplicate name", path, name);
    if (!tensor.defined()) fail("{}: tensor '{}': undefined tensor", path, name);
    const auto dtype = dtype_of(tensor.scalar_type());
    if (!dtype)
      fail("{}: tensor '{}': safetensors cannot hold dtype {}", path, name,
           c10::toString(tensor.scalar_type()));
    torch::Tensor cpu = tensor.detach().to(torch::kCPU).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(cpu.numel()) * dtype_size(*dtype);

    if (header.size() > 1) header += ',';
    header += json_string(name, path) + ":{\"dtype\":\"" + dtype_name(*dtype) + "\",\"shape\":[";
    for (int64_t i = 0; i < cpu.dim(); ++i) {
      if (i) header += ',';
      header += std::to_string(cpu.size(i));
    }
    header += "],\"data_offsets\":[" + std::to_string(offset) + ',' +
              std::to_string(offset + bytes) + "]}";
    offset += bytes;
    contiguous->push_back(std::move(cpu));
  }
  header += '}';
  // The reference writer pads the header with spaces so that the data section starts 8-byte
  // aligned (8 + header length is a multiple of 8); readers can then view it zero-copy.
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > kMaxHeaderBytes)
    fail("{}: header of {} bytes exceeds the {}-byte limit", path, header.size(), kMaxHeaderBytes);

  return header;
}

}  // namespace

std::string encode_safetensors(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                               const std::map<std::string, std::string>& metadata,
                               const std::string& what) {
  std::vector<torch::Tensor> contiguous;
  const std::string header = build_header(what, tensors, metadata, &contiguous);
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] =
        static_cast<char>(static_cast<uint64_t>(header.size()) >> (8 * i));
  out += header;
  for (const auto& t : contiguous)
    out.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  return out;
}

std::map<std::string, torch::Tensor> decode_safetensors(
    const std::string& bytes, const std::string& what,
    std::map<std::string, std::string>* metadata) {
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  const auto header = parse_safetensors_header(data, bytes.size(), what);
  std::map<std::string, torch::Tensor> out;
  for (const auto& e : header.tensors) {
    auto t = torch::empty(e.shape, torch::TensorOptions().dtype(to_torch(e.dtype)));
    if (e.end > e.begin)
      std::memcpy(t.data_ptr(), data + header.data_start + e.begin, e.end - e.begin);
    out.emplace(e.name, std::move(t));
  }
  if (metadata) *metadata = header.metadata;
  return out;
}

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  // Validate and build the header before touching the file system, so that a refused save
  // leaves nothing behind.
  std::vector<torch::Tensor> contiguous;
  const std::string header = build_header(path, tensors, metadata, &contiguous);
  const std::string temp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("{}: cannot create {}: {}", path, temp, std::strerror(errno));
  try {
    FdCloser closer{fd};
    uint8_t length[8];
    for (int i = 0; i < 8; ++i)
      length[i] = static_cast<uint8_t>(static_cast<uint64_t>(header.size()) >> (8 * i));
    write_all(fd, length, sizeof(length), temp);
    write_all(fd, header.data(), header.size(), temp);
    for (const auto& tensor : contiguous)
      write_all(fd, tensor.data_ptr(), tensor.numel() * tensor.element_size(), temp);
    if (::fsync(fd) != 0) fail("{}: fsync failed: {}", temp, std::strerror(errno));
    closer.fd = -1;
    if (::close(fd) != 0) fail("{}: close failed: {}", temp, std::strerror(errno));
    if (::rename(temp.c_str(), path.c_str()) != 0)
      fail("{}: cannot rename {} over it: {}", path, temp, std::strerror(errno));
  } catch (...) {
    ::unlink(temp.c_str());
    throw;
  }
  // Make the rename itself durable; best effort, the data is already safely in place.
  const auto slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

std::map<std::string, torch::Tensor> load_safetensors(const std::string& path) {
  const SafetensorsFile file(path);
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& entry : file.keys())
    tensors.emplace(entry, file.get(entry));
  return tensors;
}

}  // namespace lightning::io
