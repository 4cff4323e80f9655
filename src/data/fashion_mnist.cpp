#include "data/fashion_mnist.h"

#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>

#include <torch/torch.h>

#include "core/error.h"

namespace lightning::data {
namespace {

struct GzCloser {
  void operator()(gzFile_s* f) const { gzclose(f); }
};

// Reads exactly n bytes; false at end of file.
bool read_exact(gzFile file, void* out, size_t n, const std::string& path) {
  size_t done = 0;
  while (done < n) {
    const int chunk = static_cast<int>(std::min<size_t>(n - done, 1 << 30));
    const int got = gzread(file, static_cast<char*>(out) + done, chunk);
    if (got < 0) {
      int code = 0;
      fail("{}: read failed: {}", path, gzerror(file, &code));
    }
    if (got == 0) return false;
    done += static_cast<size_t>(got);
  }
  return true;
}

// Items with their article, in label order.
const std::array<std::string, kFashionMnistClasses> kItems = {
    "a t-shirt", "a pair of trousers", "a pullover", "a dress",      "a coat", "a sandal",
    "a shirt",   "a sneaker",          "a bag",      "an ankle boot"};

}  // namespace

torch::Tensor read_idx(const std::string& path) {
  std::unique_ptr<gzFile_s, GzCloser> file(gzopen(path.c_str(), "rb"));
  if (!file) fail("{}: cannot open: {}", path, std::strerror(errno ? errno : ENOENT));
  uint8_t magic[4];
  if (!read_exact(file.get(), magic, 4, path)) fail("{}: truncated IDX header", path);
  if (magic[0] != 0 || magic[1] != 0) fail("{}: not an IDX file (bad magic number)", path);
  if (magic[2] != 0x08)
    fail("{}: IDX data type 0x{:02x} is not supported (only unsigned bytes, 0x08)", path, magic[2]);
  const int rank = magic[3];
  if (rank < 1 || rank > 4) fail("{}: IDX rank {} is not supported", path, rank);
  std::vector<int64_t> shape;
  int64_t numel = 1;
  for (int i = 0; i < rank; ++i) {
    uint8_t b[4];
    if (!read_exact(file.get(), b, 4, path)) fail("{}: truncated IDX header", path);
    const int64_t dim = (int64_t{b[0]} << 24) | (b[1] << 16) | (b[2] << 8) | b[3];
    if (dim <= 0 || dim > (int64_t{1} << 31)) fail("{}: IDX dimension {} is invalid", path, dim);
    numel *= dim;
    if (numel > (int64_t{1} << 34)) fail("{}: IDX data of {} elements is too large", path, numel);
    shape.push_back(dim);
  }
  auto data = torch::empty(shape, torch::kUInt8);
  if (!read_exact(file.get(), data.data_ptr(), static_cast<size_t>(numel), path))
    fail("{}: truncated: the header promises {} bytes of data", path, numel);
  uint8_t extra;
  if (read_exact(file.get(), &extra, 1, path))
    fail("{}: trailing bytes after {} bytes of data", path, numel);
  return data;
}

FashionMnist load_fashion_mnist(Split split, const std::string& dir) {
  const std::string prefix = split == Split::kTrain ? "train" : "t10k";
  const auto images_path =
      (std::filesystem::path(dir) / (prefix + "-images-idx3-ubyte.gz")).string();
  const auto labels_path =
      (std::filesystem::path(dir) / (prefix + "-labels-idx1-ubyte.gz")).string();
  if (!std::filesystem::exists(images_path))
    fail("{}: not found (install the Debian package dataset-fashion-mnist)", images_path);
  FashionMnist out;
  out.images = read_idx(images_path);
  auto labels = read_idx(labels_path);
  if (out.images.dim() != 3 || out.images.size(1) != 28 || out.images.size(2) != 28)
    fail("{}: expected [N, 28, 28] images, got [{}]", images_path,
         fmt::join(out.images.sizes(), ", "));
  if (labels.dim() != 1 || labels.size(0) != out.images.size(0))
    fail("{}: {} labels for {} images in {}", labels_path, labels.numel(), out.images.size(0),
         images_path);
  if (labels.max().item<int64_t>() >= kFashionMnistClasses)
    fail("{}: label {} out of range [0, {})", labels_path, labels.max().item<int64_t>(),
         kFashionMnistClasses);
  out.labels = labels.to(torch::kInt64);
  return out;
}

const std::array<std::string, kFashionMnistClasses>& fashion_mnist_class_names() {
  static const std::array<std::string, kFashionMnistClasses> names = {
      "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
      "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return names;
}

const std::vector<std::string>& caption_templates() {
  static const std::vector<std::string> templates = {"a photo of {}",
                                                     "{}",
                                                     "{}, product photo",
                                                     "a picture of {}",
                                                     "a black and white photo of {}",
                                                     "{} on a black background",
                                                     "a small photo of {}",
                                                     "a catalogue photo of {}"};
  return templates;
}

std::string caption(int64_t label, size_t template_index) {
  if (label < 0 || label >= kFashionMnistClasses) fail("caption: label {} out of range", label);
  const auto& templates = caption_templates();
  return fmt::format(fmt::runtime(templates.at(template_index % templates.size())),
                     kItems[static_cast<size_t>(label)]);
}

std::string random_caption(int64_t label, std::mt19937_64& rng) {
  std::uniform_int_distribution<size_t> pick(0, caption_templates().size() - 1);
  return caption(label, pick(rng));
}

std::string class_prompt(int64_t label) {
  return caption(label, 0);
}

torch::Tensor to_model_pixels(const torch::Tensor& images) {
  auto x = images.to(torch::kFloat32).div(127.5).sub(1.0).unsqueeze(1);  // [N, 1, 28, 28]
  return torch::constant_pad_nd(x, {2, 2, 2, 2}, -1.0);                  // [N, 1, 32, 32]
}

}  // namespace lightning::data
