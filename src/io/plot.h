// Line plots rendered straight to an RGB image (loss curves of training runs), with axis ticks
// and labels drawn in stb_easy_font's built-in vector font. No plotting library needed.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/types.h>

namespace lightning::io {

struct PlotSeries {
  std::string name;
  std::vector<double> x, y;
  std::array<uint8_t, 3> color{31, 119, 180};
};

struct PlotOptions {
  std::string title, x_label, y_label;
  bool log_y = false;  // base-10 logarithmic y axis (non-positive values are skipped)
  int64_t width = 800, height = 480;
};

// Renders the series as polylines over shared axes: uint8 [3, height, width].
torch::Tensor render_line_plot(const std::vector<PlotSeries>& series, const PlotOptions& options);

// A moving average over `window` points (the first points average what is available).
std::vector<double> moving_average(const std::vector<double>& values, size_t window);

}  // namespace lightning::io
