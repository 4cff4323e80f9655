// Image codecs for training data: PNG (libpng), JPEG (libjpeg-turbo) and WebP (libwebp), decoded
// from memory (a tar member, a file's bytes) into uint8 tensors, and the encoders that write
// datasets and test fixtures. The format is recognised by its signature, not by a file name.
#pragma once

#include <string>

#include <torch/types.h>

namespace lightning::io {

enum class ImageFormat { kUnknown, kPng, kJpeg, kWebp };
std::string to_string(ImageFormat format);

// The format of an encoded image from its first bytes.
ImageFormat sniff_image_format(const std::string& bytes);

// Decodes a PNG, JPEG or WebP image into uint8 [C, H, W]: C = 1 for grey images, else 3 (RGB;
// an alpha channel is dropped, as PIL's convert("RGB") does). Throws Error naming `what` for an
// unknown format, corrupt or truncated data, or a side longer than kMaxImageSide.
torch::Tensor decode_image(const std::string& bytes, const std::string& what);

// Encoders for uint8 [C, H, W] images, C = 1 (grey) or 3 (RGB).
std::string encode_jpeg(const torch::Tensor& image, int quality = 90);
std::string encode_webp_lossless(const torch::Tensor& image);  // grey is stored as RGB
std::string encode_png(const torch::Tensor& image);

// Converts uint8 [C, H, W] to `channels` (1: ITU-R BT.601 luma of RGB; 3: grey repeated).
torch::Tensor to_channels(const torch::Tensor& image, int64_t channels);

}  // namespace lightning::io
