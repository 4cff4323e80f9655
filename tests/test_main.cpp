// Test entry point: logging to stderr, one libtorch thread per test process (CTest runs test
// processes in parallel), unless LIGHTNING_TEST_THREADS says otherwise.
#include <cstdlib>

#include <gtest/gtest.h>

#include "core/log.h"
#include "core/system.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  lightning::init_logging();
  const char* threads = std::getenv("LIGHTNING_TEST_THREADS");
  lightning::set_threads(threads ? std::atoi(threads) : 1);
  return RUN_ALL_TESTS();
}
