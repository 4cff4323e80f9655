#include <filesystem>
#include <vector>

#include "app/commands.h"
#include "core/error.h"

namespace lightning::app {

void add_threads_option(CLI::App& command, int* threads) {
  *threads = 0;
  command.add_option("--threads", *threads, "CPU threads for libtorch (default: all cores)")
      ->check(CLI::NonNegativeNumber);
}

namespace {

// `relative` beside the program (build/..), else under `source_dir`.
std::string find_shipped(const std::string& relative, const std::string& source_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto exe_dir = fs::read_symlink("/proc/self/exe", ec).parent_path();
  std::vector<fs::path> candidates;
  if (!ec) candidates = {exe_dir / relative, exe_dir / ".." / relative};
  candidates.push_back(fs::path(source_dir) / relative);
  for (const auto& c : candidates)
    if (fs::exists(c)) return c.lexically_normal().string();
  return candidates.back().string();
}

}  // namespace

std::string shipped_vocab() {
  const auto path = find_shipped("data/clip/bpe_simple_vocab_16e6.txt.gz", LIGHTNING_SOURCE_ROOT);
  if (!std::filesystem::exists(path)) fail("{}: shipped vocabulary not found (pass --vocab)", path);
  return path;
}

std::string shipped_recipe(const std::string& name) {
  return find_shipped("recipes/" + name, LIGHTNING_SOURCE_ROOT);
}

std::string shipped_models_root() {
  return find_shipped("models", LIGHTNING_SOURCE_ROOT);
}

}  // namespace lightning::app
