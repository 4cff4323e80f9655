#include "io/image.h"

#include <png.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include <torch/torch.h>

#include "core/error.h"
#include "io/files.h"

namespace lightning::io {
namespace {

struct FileCloser {
  void operator()(FILE* f) const {
    if (f) std::fclose(f);
  }
};

// libpng reports errors through longjmp; the message is kept for the exception thrown after.
void on_png_error(png_structp png, png_const_charp message) {
  auto* buffer = static_cast<std::string*>(png_get_error_ptr(png));
  if (buffer) *buffer = message;
  png_longjmp(png, 1);
}
void on_png_warning(png_structp, png_const_charp) {}

}  // namespace

torch::Tensor to_uint8_image(const torch::Tensor& pixels) {
  return ((pixels.to(torch::kFloat32).clamp(-1, 1) + 1) * 127.5).round().to(torch::kUInt8);
}

void write_png(const std::string& path, const torch::Tensor& image,
               const std::map<std::string, std::string>& text) {
  if (image.dim() != 3 || image.scalar_type() != torch::kUInt8)
    fail("{}: write_png needs a uint8 [C, H, W] image", path);
  const int64_t C = image.size(0), H = image.size(1), W = image.size(2);
  int color;
  switch (C) {
    case 1:
      color = PNG_COLOR_TYPE_GRAY;
      break;
    case 3:
      color = PNG_COLOR_TYPE_RGB;
      break;
    case 4:
      color = PNG_COLOR_TYPE_RGBA;
      break;
    default:
      fail("{}: {} channels cannot be written as PNG (1, 3 or 4)", path, C);
  }
  if (H <= 0 || W <= 0) fail("{}: empty image", path);
  auto hwc = image.permute({1, 2, 0}).contiguous().cpu();  // [H, W, C] rows for libpng

  const std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  std::unique_ptr<FILE, FileCloser> file(std::fopen(tmp.c_str(), "wb"));
  if (!file) fail("{}: cannot write: {}", path, std::strerror(errno));
  std::string error;
  png_structp png =
      png_create_write_struct(PNG_LIBPNG_VER_STRING, &error, on_png_error, on_png_warning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info) {
    png_destroy_write_struct(&png, &info);
    ::unlink(tmp.c_str());
    fail("{}: libpng could not start", path);
  }
  // Kept alive until png_write_info: libpng stores pointers to these strings.
  std::vector<std::string> keys, values;
  std::vector<png_text> chunks;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    file.reset();
    ::unlink(tmp.c_str());
    fail("{}: PNG write failed: {}", path, error);
  }
  png_init_io(png, file.get());
  png_set_IHDR(png, info, static_cast<png_uint_32>(W), static_cast<png_uint_32>(H), 8, color,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  for (const auto& [key, value] : text) {
    keys.push_back(key);
    values.push_back(value);
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    png_text t{};
    t.compression = PNG_TEXT_COMPRESSION_NONE;
    t.key = const_cast<char*>(keys[i].c_str());
    t.text = const_cast<char*>(values[i].c_str());
    t.text_length = values[i].size();
    chunks.push_back(t);
  }
  if (!chunks.empty()) png_set_text(png, info, chunks.data(), static_cast<int>(chunks.size()));
  png_write_info(png, info);
  const auto* data = hwc.data_ptr<uint8_t>();
  for (int64_t y = 0; y < H; ++y)
    png_write_row(png, data + y * W * C);
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  if (std::fflush(file.get()) != 0 || ::fsync(fileno(file.get())) != 0) {
    const int err = errno;
    file.reset();
    ::unlink(tmp.c_str());
    fail("{}: write failed: {}", path, std::strerror(err));
  }
  file.reset();
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail("{}: cannot rename into place: {}", path, std::strerror(err));
  }
}

namespace {

// libpng reads an in-memory PNG through this cursor.
struct MemoryCursor {
  const unsigned char* data;
  size_t size, offset;
};
void read_from_memory(png_structp png, png_bytep out, png_size_t length) {
  auto* cursor = static_cast<MemoryCursor*>(png_get_io_ptr(png));
  if (length > cursor->size - cursor->offset) png_error(png, "truncated data");
  std::memcpy(out, cursor->data + cursor->offset, length);
  cursor->offset += length;
}

}  // namespace

PngImage decode_png(const std::string& bytes, const std::string& what) {
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  if (bytes.size() < 8 || png_sig_cmp(data, 0, 8) != 0) fail("{}: not a PNG file", what);
  std::string error;
  png_structp png =
      png_create_read_struct(PNG_LIBPNG_VER_STRING, &error, on_png_error, on_png_warning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info) {
    png_destroy_read_struct(&png, &info, nullptr);
    fail("{}: libpng could not start", what);
  }
  PngImage out;
  torch::Tensor hwc;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    fail("{}: corrupt PNG: {}", what, error);
  }
  MemoryCursor cursor{data, bytes.size(), 8};
  png_set_read_fn(png, &cursor, read_from_memory);
  png_set_sig_bytes(png, 8);
  // A header that claims more pixels than any training image has is refused before allocation.
  png_set_user_limits(png, kMaxImageSide, kMaxImageSide);
  png_read_info(png, info);
  // Normalise to 8-bit grey, grey+alpha, RGB or RGBA.
  png_set_strip_16(png);
  png_set_packing(png);
  if (png_get_color_type(png, info) == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (png_get_color_type(png, info) == PNG_COLOR_TYPE_GRAY && png_get_bit_depth(png, info) < 8)
    png_set_expand_gray_1_2_4_to_8(png);
  if (png_get_valid(png, info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(png);
  png_read_update_info(png, info);
  const auto W = static_cast<int64_t>(png_get_image_width(png, info));
  const auto H = static_cast<int64_t>(png_get_image_height(png, info));
  const auto C = static_cast<int64_t>(png_get_channels(png, info));
  if (static_cast<int64_t>(png_get_rowbytes(png, info)) != W * C)
    fail("{}: unexpected PNG row layout", what);
  hwc = torch::empty({H, W, C}, torch::kUInt8);
  std::vector<png_bytep> rows(static_cast<size_t>(H));
  for (int64_t y = 0; y < H; ++y)
    rows[static_cast<size_t>(y)] = hwc.data_ptr<uint8_t>() + y * W * C;
  png_read_image(png, rows.data());
  png_read_end(png, info);
  png_textp text = nullptr;
  int count = 0;
  if (png_get_text(png, info, &text, &count) > 0) {
    for (int i = 0; i < count; ++i)
      out.text[text[i].key] = std::string(text[i].text, text[i].text_length);
  }
  png_destroy_read_struct(&png, &info, nullptr);
  out.pixels = hwc.permute({2, 0, 1}).contiguous();
  return out;
}

PngImage read_png(const std::string& path) {
  std::string bytes;
  if (!read_file_bytes(path, &bytes)) fail("{}: cannot open: {}", path, std::strerror(errno));
  return decode_png(bytes, path);
}

torch::Tensor make_grid(const torch::Tensor& images, int64_t cols, int64_t padding,
                        double pad_value) {
  if (images.dim() != 4) fail("make_grid: expected [B, C, H, W], got {} dims", images.dim());
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  if (cols <= 0) cols = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(B))));
  cols = std::max<int64_t>(1, std::min(cols, B));
  const int64_t rows = (B + cols - 1) / cols;
  auto grid = torch::full({C, rows * (H + padding) + padding, cols * (W + padding) + padding},
                          pad_value, images.options());
  for (int64_t i = 0; i < B; ++i) {
    const int64_t y = padding + (i / cols) * (H + padding),
                  x = padding + (i % cols) * (W + padding);
    grid.slice(1, y, y + H).slice(2, x, x + W).copy_(images[i]);
  }
  return grid;
}

}  // namespace lightning::io
