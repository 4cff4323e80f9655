// The `lightning` program: parses the command line, runs one subcommand, and turns every
// failure into one line on stderr and an exit code (DESIGN.md: 0 ok, 1 runtime, 2 usage).
#include <signal.h>

#include <cstdio>
#include <exception>

#include <c10/util/Exception.h>
#include <CLI/CLI.hpp>

#include "app/commands.h"
#include "core/error.h"
#include "core/log.h"
#include "core/system.h"

int main(int argc, char** argv) {
  // A write past the file-size limit (ulimit -f) then fails with EFBIG and gets the same one-line
  // error as a full disk, instead of killing the process mid-write.
  signal(SIGXFSZ, SIG_IGN);
  lightning::init_logging();
  lightning::tune_allocator();
  CLI::App app{"lightning: few-step text-to-image diffusion (SDXL-Lightning) in C++", "lightning"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Help for every subcommand");
  lightning::app::add_forward_command(app);
  lightning::app::add_bench_command(app);
  lightning::app::add_tokenize_command(app);
  lightning::app::add_train_command(app);
  lightning::app::add_distill_command(app);
  lightning::app::add_cache_command(app);
  lightning::app::add_generate_command(app);
  lightning::app::add_eval_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "lightning: %s (see --help)\n", e.what());
    return 2;
  } catch (const lightning::UsageError& e) {
    std::fprintf(stderr, "lightning: %s\n", e.what());
    return 2;
  } catch (const lightning::Error& e) {
    std::fprintf(stderr, "lightning: %s\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    // libtorch errors carry a multi-line backtrace; keep the first line.
    std::string what = e.what_without_backtrace();
    std::fprintf(stderr, "lightning: %s\n", what.substr(0, what.find('\n')).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lightning: %s\n", e.what());
    return 1;
  }
  return 0;
}
