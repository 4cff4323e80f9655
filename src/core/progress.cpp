#include "core/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>

#include <fmt/format.h>

namespace lightning {

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  if (s < 60) return fmt::format("{:.1f}s", s);
  auto total = static_cast<int64_t>(s + 0.5);
  if (total < 3600) return fmt::format("{}m{:02d}s", total / 60, total % 60);
  return fmt::format("{}h{:02d}m", total / 3600, (total % 3600) / 60);
}

ProgressBar::ProgressBar(std::string label, int64_t total, std::string unit, int64_t start)
    : label_(std::move(label)),
      unit_(std::move(unit)),
      total_(total),
      start_(start),
      done_(start),
      tty_(isatty(STDERR_FILENO) != 0),
      t0_(std::chrono::steady_clock::now()),
      last_draw_(t0_) {}

ProgressBar::~ProgressBar() {
  finish();
}

double ProgressBar::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
}

void ProgressBar::update(int64_t done, const std::string& suffix) {
  done_ = done;
  suffix_ = suffix;
  auto now = std::chrono::steady_clock::now();
  double since = std::chrono::duration<double>(now - last_draw_).count();
  if (tty_ ? since >= 0.1 : since >= plain_interval_s) {
    last_draw_ = now;
    draw(false);
  }
}

void ProgressBar::finish() {
  if (finished_) return;
  finished_ = true;
  draw(true);
}

void ProgressBar::draw(bool final) {
  double elapsed = elapsed_s();
  int64_t counted = done_ - start_;
  double rate = elapsed > 0 ? counted / elapsed : 0;
  double eta = rate > 0 ? (total_ - done_) / rate : NAN;
  double frac = total_ > 0 ? std::min(1.0, static_cast<double>(done_) / total_) : 1.0;
  std::string rate_text = rate >= 1 || rate == 0 ? fmt::format("{:.2f} {}/s", rate, unit_)
                                                 : fmt::format("{:.2f} s/{}", 1 / rate, unit_);
  std::string tail = fmt::format("{}/{} [{}<{}, {}]{}{}", done_, total_, format_duration(elapsed),
                                 final ? "0s" : format_duration(eta), rate_text,
                                 suffix_.empty() ? "" : " ", suffix_);
  if (total_ <= 0) {  // an unknown total (a stream): the count, time and rate only
    tail = fmt::format("{} {} [{}, {}]{}{}", done_, unit_, format_duration(elapsed), rate_text,
                       suffix_.empty() ? "" : " ", suffix_);
    if (tty_)
      std::fprintf(stderr, "\r\033[K%s %s%s", label_.c_str(), tail.c_str(), final ? "\n" : "");
    else
      std::fprintf(stderr, "%s %s\n", label_.c_str(), tail.c_str());
    std::fflush(stderr);
    return;
  }
  if (tty_) {
    constexpr int kWidth = 24;
    int filled = static_cast<int>(frac * kWidth);
    std::string bar(filled, '#');
    bar.resize(kWidth, '.');
    std::fprintf(stderr, "\r\033[K%s %3.0f%% |%s| %s%s", label_.c_str(), frac * 100, bar.c_str(),
                 tail.c_str(), final ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s %3.0f%% %s\n", label_.c_str(), frac * 100, tail.c_str());
  }
  std::fflush(stderr);
}

}  // namespace lightning
