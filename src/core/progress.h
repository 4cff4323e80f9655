// Progress reporting for long jobs (training, sampling, evaluation): on a terminal, one line
// redrawn in place with a bar, the rate, the elapsed time and the ETA; otherwise (logs, CI) a
// plain line at most every `plain_interval_s` seconds and at the end.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace lightning {

class ProgressBar {
 public:
  // `label` starts each line ("train", "sample"); `unit` names what is counted ("step", "img").
  ProgressBar(std::string label, int64_t total, std::string unit = "it", int64_t start = 0);
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // Moves to `done` (absolute) and sets the trailing text (e.g. "loss 0.0412").
  void update(int64_t done, const std::string& suffix = "");
  // Prints the final line (also done by the destructor).
  void finish();
  // Seconds since the bar started.
  double elapsed_s() const;

  // Seconds between plain lines when stderr is not a terminal (default 10).
  double plain_interval_s = 10.0;

 private:
  void draw(bool final);

  std::string label_, unit_, suffix_;
  int64_t total_, start_, done_;
  bool tty_, finished_ = false;
  std::chrono::steady_clock::time_point t0_, last_draw_;
};

// "1h02m", "3m05s", "12.3s".
std::string format_duration(double seconds);

}  // namespace lightning
