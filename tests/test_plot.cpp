// Loss-curve plots and progress formatting.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/progress.h"
#include "io/plot.h"

using namespace lightning;

TEST(Plot, DrawsSeriesAxesAndText) {
  io::PlotSeries s{"loss", {1, 2, 3, 4}, {1.0, 0.5, 0.25, 0.2}, {255, 0, 0}};
  io::PlotOptions o;
  o.title = "training loss";
  o.log_y = true;
  o.width = 320;
  o.height = 200;
  auto img = io::render_line_plot({s}, o);
  ASSERT_EQ(img.sizes(), (std::vector<int64_t>{3, 200, 320}));
  // Pure red pixels exist (the series), and dark ones (axes and text).
  auto red = img[0].eq(255) & img[1].eq(0) & img[2].eq(0);
  EXPECT_GT(red.sum().item<int64_t>(), 50);
  EXPECT_GT(img[0].lt(100).sum().item<int64_t>(), 100);
  // No data: still an image, no crash.
  EXPECT_EQ(io::render_line_plot({}, o).size(1), 200);
}

TEST(Plot, MovingAverage) {
  auto m = io::moving_average({1, 2, 3, 4}, 2);
  EXPECT_EQ(m, (std::vector<double>{1, 1.5, 2.5, 3.5}));
}

TEST(Progress, FormatsDurations) {
  EXPECT_EQ(format_duration(3.21), "3.2s");
  EXPECT_EQ(format_duration(125), "2m05s");
  EXPECT_EQ(format_duration(3720), "1h02m");
  EXPECT_EQ(format_duration(-1), "?");
}
