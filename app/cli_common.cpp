#include "app/commands.h"

namespace lightning::app {

void add_threads_option(CLI::App& command, int* threads) {
  *threads = 0;
  command.add_option("--threads", *threads, "CPU threads for libtorch (default: all cores)")
      ->check(CLI::NonNegativeNumber);
}

}  // namespace lightning::app
