#include "io/image_codecs.h"

#include <png.h>
#include <webp/decode.h>
#include <webp/encode.h>

#include <csetjmp>
#include <cstdio>
// jpeglib.h needs FILE and size_t declared first.
#include <jerror.h>
#include <jpeglib.h>

#include <torch/torch.h>

#include "core/error.h"
#include "io/image.h"

namespace lightning::io {
namespace {

bool starts_with(const std::string& bytes, const char* prefix, size_t n, size_t at = 0) {
  return bytes.size() >= at + n && bytes.compare(at, n, prefix, n) == 0;
}

void check_side(int64_t height, int64_t width, const std::string& what) {
  if (height <= 0 || width <= 0 || height > kMaxImageSide || width > kMaxImageSide)
    fail("{}: image size {}x{} is outside 1..{}", what, width, height, kMaxImageSide);
}

torch::Tensor check_image(const torch::Tensor& image, const char* who) {
  if (image.dim() != 3 || image.scalar_type() != torch::kUInt8 ||
      (image.size(0) != 1 && image.size(0) != 3))
    fail("{}: needs a uint8 [C, H, W] image with 1 or 3 channels", who);
  return image.permute({1, 2, 0}).contiguous();  // HWC
}

// ---- JPEG: libjpeg reports errors through error_exit, which must not return; longjmp out.
struct JpegError {
  jpeg_error_mgr manager;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};
void on_jpeg_error(j_common_ptr info) {
  auto* error = reinterpret_cast<JpegError*>(info->err);
  (*info->err->format_message)(info, error->message);
  std::longjmp(error->jump, 1);
}
void on_jpeg_message(j_common_ptr, int) {}  // warnings (e.g. "premature end") are not fatal

torch::Tensor decode_jpeg(const std::string& bytes, const std::string& what) {
  jpeg_decompress_struct info{};
  JpegError error{};
  info.err = jpeg_std_error(&error.manager);
  error.manager.error_exit = on_jpeg_error;
  error.manager.emit_message = on_jpeg_message;
  torch::Tensor hwc;
  if (setjmp(error.jump)) {
    jpeg_destroy_decompress(&info);
    fail("{}: corrupt JPEG: {}", what, error.message);
  }
  jpeg_create_decompress(&info);
  jpeg_mem_src(&info, reinterpret_cast<const unsigned char*>(bytes.data()),
               static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&info, TRUE);
  if (info.image_height > kMaxImageSide || info.image_width > kMaxImageSide) {
    const int64_t h = info.image_height, w = info.image_width;
    jpeg_destroy_decompress(&info);
    check_side(h, w, what);
  }
  // CMYK and YCCK files (print and Photoshop exports, found in web-scraped data) are read as CMYK
  // and converted below.
  const bool cmyk = info.jpeg_color_space == JCS_CMYK || info.jpeg_color_space == JCS_YCCK;
  info.out_color_space = info.jpeg_color_space == JCS_GRAYSCALE ? JCS_GRAYSCALE
                         : cmyk                                 ? JCS_CMYK
                                                                : JCS_RGB;
  jpeg_start_decompress(&info);
  const int64_t H = info.output_height, W = info.output_width, C = info.output_components;
  hwc = torch::empty({H, W, C}, torch::kUInt8);
  while (info.output_scanline < info.output_height) {
    JSAMPROW row = hwc.data_ptr<uint8_t>() + static_cast<int64_t>(info.output_scanline) * W * C;
    jpeg_read_scanlines(&info, &row, 1);
  }
  // A file cut short decodes with grey rows and a warning; refuse it instead.
  const bool cut = error.manager.num_warnings > 0;
  jpeg_finish_decompress(&info);
  jpeg_destroy_decompress(&info);
  if (cut) fail("{}: corrupt JPEG: truncated or damaged data", what);
  if (cmyk) {
    // As Pillow reads them: the inks stored inverted (255 = no ink, Adobe's convention, which
    // Pillow assumes for every CMYK JPEG), then R = (255 - C) (255 - K) / 255, and so on.
    auto paper = hwc.to(torch::kInt32);  // 255 - ink
    auto rgb = paper.narrow(2, 0, 3) * paper.narrow(2, 3, 1);
    hwc = torch::div(rgb + 127, 255, "floor").to(torch::kUInt8);
  }
  return hwc.permute({2, 0, 1}).contiguous();
}

torch::Tensor decode_webp(const std::string& bytes, const std::string& what) {
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  int width = 0, height = 0;
  if (!WebPGetInfo(data, bytes.size(), &width, &height)) fail("{}: corrupt WebP header", what);
  check_side(height, width, what);
  auto hwc = torch::empty({height, width, 3}, torch::kUInt8);
  if (!WebPDecodeRGBInto(data, bytes.size(), hwc.data_ptr<uint8_t>(),
                         static_cast<size_t>(hwc.numel()), width * 3))
    fail("{}: corrupt WebP data", what);
  return hwc.permute({2, 0, 1}).contiguous();
}

}  // namespace

std::string to_string(ImageFormat format) {
  switch (format) {
    case ImageFormat::kPng:
      return "png";
    case ImageFormat::kJpeg:
      return "jpeg";
    case ImageFormat::kWebp:
      return "webp";
    case ImageFormat::kUnknown:
      break;
  }
  return "unknown";
}

ImageFormat sniff_image_format(const std::string& bytes) {
  if (starts_with(bytes, "\x89PNG\r\n\x1a\n", 8)) return ImageFormat::kPng;
  if (starts_with(bytes, "\xff\xd8\xff", 3)) return ImageFormat::kJpeg;
  if (starts_with(bytes, "RIFF", 4) && starts_with(bytes, "WEBP", 4, 8)) return ImageFormat::kWebp;
  return ImageFormat::kUnknown;
}

torch::Tensor decode_image(const std::string& bytes, const std::string& what) {
  torch::Tensor image;
  switch (sniff_image_format(bytes)) {
    case ImageFormat::kPng:
      image = decode_png(bytes, what).pixels;
      break;
    case ImageFormat::kJpeg:
      image = decode_jpeg(bytes, what);
      break;
    case ImageFormat::kWebp:
      image = decode_webp(bytes, what);
      break;
    case ImageFormat::kUnknown:
      fail("{}: not a PNG, JPEG or WebP image ({} bytes)", what, bytes.size());
  }
  // Grey + alpha -> grey, RGBA -> RGB.
  if (image.size(0) == 2 || image.size(0) == 4) image = image.narrow(0, 0, image.size(0) - 1);
  return image.contiguous();
}

std::string encode_jpeg(const torch::Tensor& image, int quality) {
  const auto hwc = check_image(image, "encode_jpeg");
  jpeg_compress_struct info{};
  JpegError error{};
  info.err = jpeg_std_error(&error.manager);
  error.manager.error_exit = on_jpeg_error;
  unsigned char* out = nullptr;
  unsigned long size = 0;
  if (setjmp(error.jump)) {
    jpeg_destroy_compress(&info);
    std::free(out);
    fail("encode_jpeg: {}", error.message);
  }
  jpeg_create_compress(&info);
  jpeg_mem_dest(&info, &out, &size);
  info.image_width = static_cast<JDIMENSION>(hwc.size(1));
  info.image_height = static_cast<JDIMENSION>(hwc.size(0));
  info.input_components = static_cast<int>(hwc.size(2));
  info.in_color_space = hwc.size(2) == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(&info);
  jpeg_set_quality(&info, quality, TRUE);
  jpeg_start_compress(&info, TRUE);
  const int64_t stride = hwc.size(1) * hwc.size(2);
  while (info.next_scanline < info.image_height) {
    JSAMPROW row = const_cast<uint8_t*>(hwc.data_ptr<uint8_t>()) +
                   static_cast<int64_t>(info.next_scanline) * stride;
    jpeg_write_scanlines(&info, &row, 1);
  }
  jpeg_finish_compress(&info);
  jpeg_destroy_compress(&info);
  std::string bytes(reinterpret_cast<const char*>(out), size);
  std::free(out);
  return bytes;
}

std::string encode_webp_lossless(const torch::Tensor& image) {
  auto hwc = check_image(image, "encode_webp_lossless");
  if (hwc.size(2) == 1) hwc = hwc.repeat({1, 1, 3});
  uint8_t* out = nullptr;
  const size_t size =
      WebPEncodeLosslessRGB(hwc.data_ptr<uint8_t>(), static_cast<int>(hwc.size(1)),
                            static_cast<int>(hwc.size(0)), static_cast<int>(hwc.size(1) * 3), &out);
  if (size == 0) fail("encode_webp_lossless: libwebp failed");
  std::string bytes(reinterpret_cast<const char*>(out), size);
  WebPFree(out);
  return bytes;
}

namespace {
void append_to_string(png_structp png, png_bytep data, png_size_t length) {
  static_cast<std::string*>(png_get_io_ptr(png))
      ->append(reinterpret_cast<const char*>(data), length);
}
void flush_nothing(png_structp) {}
void on_png_write_error(png_structp png, png_const_charp) {
  png_longjmp(png, 1);
}
}  // namespace

std::string encode_png(const torch::Tensor& image) {
  const auto hwc = check_image(image, "encode_png");
  png_structp png =
      png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, on_png_write_error, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info) {
    png_destroy_write_struct(&png, &info);
    fail("encode_png: libpng could not start");
  }
  std::string bytes;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    fail("encode_png: libpng failed");
  }
  png_set_write_fn(png, &bytes, append_to_string, flush_nothing);
  const auto H = static_cast<png_uint_32>(hwc.size(0)), W = static_cast<png_uint_32>(hwc.size(1));
  png_set_IHDR(png, info, W, H, 8, hwc.size(2) == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (png_uint_32 y = 0; y < H; ++y)
    png_write_row(png, const_cast<uint8_t*>(hwc.data_ptr<uint8_t>()) + y * W * hwc.size(2));
  png_write_end(png, info);
  png_destroy_write_struct(&png, &info);
  return bytes;
}

torch::Tensor to_channels(const torch::Tensor& image, int64_t channels) {
  const int64_t C = image.size(0);
  if (C == channels) return image;
  if (channels == 3 && C == 1) return image.repeat({3, 1, 1});
  if (channels == 1 && C == 3) {
    const auto w = torch::tensor({0.299f, 0.587f, 0.114f}).view({3, 1, 1});
    return (image.to(torch::kFloat32) * w).sum(0, true).round().clamp(0, 255).to(torch::kUInt8);
  }
  fail("cannot convert a {}-channel image to {} channels", C, channels);
}

}  // namespace lightning::io
