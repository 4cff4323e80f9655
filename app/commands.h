// One function per subcommand: declares its options (CLI11) and the action that runs it.
#pragma once

#include <string>

#include <CLI/CLI.hpp>

namespace lightning::app {

void add_forward_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_tokenize_command(CLI::App& app);
void add_train_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_eval_command(CLI::App& app);
void add_distill_command(CLI::App& app);
void add_cache_command(CLI::App& app);

// Adds the shared --threads option (default: all cores) to a compute subcommand.
void add_threads_option(CLI::App& command, int* threads);

// The CLIP vocabulary shipped in data/clip (beside the program, else the source tree).
std::string shipped_vocab();
// The folder of shipped models (models/ beside the program, else the source tree).
std::string shipped_models_root();
// A shipped recipe, e.g. "sdxl-lightning.toml" (recipes/ beside the program, else the source
// tree).
std::string shipped_recipe(const std::string& name);

}  // namespace lightning::app
