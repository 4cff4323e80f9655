// PNG images (libpng): atomic writes with text metadata (tEXt chunks, e.g. the A1111-style
// "parameters" chunk that lets an image be reproduced), reads, and image grids.
#pragma once

#include <map>
#include <string>

#include <torch/types.h>

namespace lightning::io {

// Converts model pixels in [-1, 1] ([C, H, W] or [B, C, H, W], any float dtype) to uint8
// [.., C, H, W] in [0, 255] with rounding; values outside [-1, 1] are clamped.
torch::Tensor to_uint8_image(const torch::Tensor& pixels);

// Writes a uint8 image [C, H, W] (C = 1 grey, 3 RGB, 4 RGBA) as an 8-bit PNG with the given
// text chunks, atomically (temporary file + rename). Throws Error naming the file on failure.
void write_png(const std::string& path, const torch::Tensor& image,
               const std::map<std::string, std::string>& text = {});

struct PngImage {
  torch::Tensor pixels;                     // uint8 [C, H, W]
  std::map<std::string, std::string> text;  // tEXt / iTXt / zTXt chunks
};

// The largest width or height a decoder accepts (a header claiming more is refused before any
// allocation, so a corrupt or hostile file cannot exhaust memory).
constexpr int64_t kMaxImageSide = 16384;

// Reads an 8-bit or 16-bit grey/grey-alpha/RGB/RGBA/palette PNG (16-bit is reduced to 8).
PngImage read_png(const std::string& path);
// The same from the bytes of a PNG file; `what` names it in errors.
PngImage decode_png(const std::string& bytes, const std::string& what);

// Tiles images [B, C, H, W] into one [C, rows * H + pad, cols * W + pad] grid, row-major, with
// `padding` pixels of `pad_value` between tiles. cols = 0 picks ceil(sqrt(B)).
torch::Tensor make_grid(const torch::Tensor& images, int64_t cols = 0, int64_t padding = 2,
                        double pad_value = 0);

}  // namespace lightning::io
