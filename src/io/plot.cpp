#include "io/plot.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include <fmt/format.h>
#include <torch/torch.h>

#include <stb/stb_easy_font.h>

namespace lightning::io {
namespace {

using Color = std::array<uint8_t, 3>;

class Canvas {
 public:
  Canvas(int64_t w, int64_t h) : w_(w), h_(h), rgb_(static_cast<size_t>(w * h * 3), 255) {}

  void set(int64_t x, int64_t y, Color c) {
    if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
    auto* p = &rgb_[static_cast<size_t>((y * w_ + x) * 3)];
    p[0] = c[0], p[1] = c[1], p[2] = c[2];
  }
  void fill_rect(double x0, double y0, double x1, double y1, Color c) {
    for (auto y = static_cast<int64_t>(std::floor(y0)); y < static_cast<int64_t>(std::ceil(y1));
         ++y)
      for (auto x = static_cast<int64_t>(std::floor(x0)); x < static_cast<int64_t>(std::ceil(x1));
           ++x)
        set(x, y, c);
  }
  // A 2-pixel-wide line (Bresenham on a doubled stroke).
  void line(double x0, double y0, double x1, double y1, Color c, int thickness = 2) {
    double dx = x1 - x0, dy = y1 - y0;
    int n = static_cast<int>(std::max(std::abs(dx), std::abs(dy))) + 1;
    for (int i = 0; i <= n; ++i) {
      double t = static_cast<double>(i) / n;
      auto x = static_cast<int64_t>(std::lround(x0 + t * dx));
      auto y = static_cast<int64_t>(std::lround(y0 + t * dy));
      for (int a = 0; a < thickness; ++a)
        for (int b = 0; b < thickness; ++b)
          set(x + a, y + b, c);
    }
  }
  // Text in stb_easy_font's font (glyphs ~6 px high at scale 1), top-left at (x, y).
  void text(double x, double y, const std::string& s, double scale, Color c) {
    if (s.empty()) return;
    std::vector<char> buffer(s.size() * 1024 + 64);  // generous: glyphs take up to ~14 quads
    std::vector<char> str(s.begin(), s.end());
    str.push_back('\0');
    unsigned char color[4] = {c[0], c[1], c[2], 255};
    int quads = stb_easy_font_print(0, 0, str.data(), color, buffer.data(),
                                    static_cast<int>(buffer.size()));
    for (int q = 0; q < quads; ++q) {
      float v[4][4];
      std::memcpy(v, buffer.data() + q * 64, 64);
      double qx0 = std::min({v[0][0], v[1][0], v[2][0], v[3][0]});
      double qx1 = std::max({v[0][0], v[1][0], v[2][0], v[3][0]});
      double qy0 = std::min({v[0][1], v[1][1], v[2][1], v[3][1]});
      double qy1 = std::max({v[0][1], v[1][1], v[2][1], v[3][1]});
      fill_rect(x + qx0 * scale, y + qy0 * scale, x + qx1 * scale, y + qy1 * scale, c);
    }
  }
  static double text_width(const std::string& s, double scale) {
    std::vector<char> str(s.begin(), s.end());
    str.push_back('\0');
    return stb_easy_font_width(str.data()) * scale;
  }
  torch::Tensor tensor() const {
    return torch::from_blob(const_cast<uint8_t*>(rgb_.data()), {h_, w_, 3}, torch::kUInt8)
        .permute({2, 0, 1})
        .contiguous();
  }

 private:
  int64_t w_, h_;
  std::vector<uint8_t> rgb_;
};

// "Nice" tick positions covering [lo, hi] (1, 2, 5 x 10^k steps).
std::vector<double> nice_ticks(double lo, double hi, int target) {
  double span = hi - lo;
  if (!(span > 0)) return {lo};
  double raw = span / target;
  double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> ticks;
  for (double t = std::ceil(lo / step) * step; t <= hi + step * 1e-9; t += step)
    ticks.push_back(std::abs(t) < step * 1e-9 ? 0.0 : t);
  return ticks;
}

std::string tick_label(double v) {
  double a = std::abs(v);
  if (a != 0 && (a >= 1e5 || a < 1e-3)) return fmt::format("{:.0e}", v);
  return fmt::format("{:g}", v);
}

}  // namespace

std::vector<double> moving_average(const std::vector<double>& values, size_t window) {
  std::vector<double> out(values.size());
  double sum = 0;
  window = std::max<size_t>(window, 1);
  for (size_t i = 0; i < values.size(); ++i) {
    sum += values[i];
    if (i >= window) sum -= values[i - window];
    out[i] = sum / static_cast<double>(std::min(i + 1, window));
  }
  return out;
}

torch::Tensor render_line_plot(const std::vector<PlotSeries>& series, const PlotOptions& o) {
  Canvas canvas(o.width, o.height);
  const double left = 80, right = 20, top = 40, bottom = 50;
  const double pw = o.width - left - right, ph = o.height - top - bottom;
  const Color axis{40, 40, 40}, grid{225, 225, 225};

  auto ty = [&](double y) { return o.log_y ? std::log10(y) : y; };
  double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin, ymin = xmin, ymax = -xmin;
  for (const auto& s : series)
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
      if (!std::isfinite(s.y[i]) || (o.log_y && s.y[i] <= 0)) continue;
      xmin = std::min(xmin, s.x[i]), xmax = std::max(xmax, s.x[i]);
      ymin = std::min(ymin, ty(s.y[i])), ymax = std::max(ymax, ty(s.y[i]));
    }
  if (!std::isfinite(xmin)) xmin = 0, xmax = 1, ymin = 0, ymax = 1;
  if (xmax == xmin) xmax = xmin + 1;
  if (ymax == ymin) ymax = ymin + 1, ymin -= 1;
  double pad = (ymax - ymin) * 0.05;
  ymin -= pad, ymax += pad;

  auto px = [&](double x) { return left + (x - xmin) / (xmax - xmin) * pw; };
  auto py = [&](double y) { return top + (1 - (y - ymin) / (ymax - ymin)) * ph; };

  // Grid and ticks.
  const double scale = 1.5;
  for (double t : nice_ticks(xmin, xmax, 6)) {
    canvas.line(px(t), top, px(t), top + ph, grid, 1);
    std::string label = tick_label(t);
    canvas.text(px(t) - Canvas::text_width(label, scale) / 2, top + ph + 8, label, scale, axis);
  }
  std::vector<double> yticks;
  if (o.log_y) {
    for (double e = std::floor(ymin); e <= std::ceil(ymax); e += 1) {
      for (double m : {1.0, 2.0, 5.0}) {
        double v = std::log10(m) + e;
        if (v >= ymin && v <= ymax) yticks.push_back(v);
      }
    }
  } else {
    yticks = nice_ticks(ymin, ymax, 6);
  }
  for (double t : yticks) {
    canvas.line(left, py(t), left + pw, py(t), grid, 1);
    std::string label = tick_label(o.log_y ? std::pow(10.0, t) : t);
    canvas.text(left - 6 - Canvas::text_width(label, scale), py(t) - 4, label, scale, axis);
  }
  canvas.line(left, top, left, top + ph, axis, 1);
  canvas.line(left, top + ph, left + pw, top + ph, axis, 1);

  // Series, clipped to the plot area.
  for (const auto& s : series) {
    bool have = false;
    double lx = 0, ly = 0;
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
      if (!std::isfinite(s.y[i]) || (o.log_y && s.y[i] <= 0)) {
        have = false;
        continue;
      }
      double x = px(s.x[i]), y = py(ty(s.y[i]));
      if (have) canvas.line(lx, ly, x, y, s.color);
      lx = x, ly = y, have = true;
    }
  }

  // Title, axis labels and legend.
  canvas.text(o.width / 2.0 - Canvas::text_width(o.title, 2) / 2, 10, o.title, 2, axis);
  canvas.text(left + pw / 2 - Canvas::text_width(o.x_label, scale) / 2, o.height - 22, o.x_label,
              scale, axis);
  canvas.text(8, top - 18, o.y_label, scale, axis);
  double ly = top + 8;
  for (const auto& s : series) {
    if (s.name.empty()) continue;
    double w = Canvas::text_width(s.name, scale);
    canvas.fill_rect(left + pw - w - 34, ly + 3, left + pw - w - 12, ly + 6, s.color);
    canvas.text(left + pw - w - 6, ly, s.name, scale, axis);
    ly += 16;
  }
  return canvas.tensor();
}

}  // namespace lightning::io
