// `lightning distill --recipe FILE`: progressive adversarial distillation of a model into a
// chain of few-step students (see recipes/fmnist-lightning.toml, src/distill/recipe.h and
// src/distill/trainer.h for the recipe and what a run directory holds).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <torch/cuda.h>

#include "app/commands.h"
#include "app/device.h"
#include "core/error.h"
#include "core/log.h"
#include "core/system.h"
#include "dist/group.h"
#include "dist/launch.h"
#include "distill/trainer.h"

namespace lightning::app {
namespace {

struct DistillArgs {
  std::string recipe, out;
  bool resume = false;
  int64_t until = 0;
  int threads = 0;
  std::string device = "cpu";
  int nproc = 1;
  int dist_timeout = 300;
};

}  // namespace

void add_distill_command(CLI::App& app) {
  auto args = std::make_shared<DistillArgs>();
  auto* cmd = app.add_subcommand(
      "distill",
      "Distil a model into few-step students, stage by stage (MSE and adversarial stages, LoRA or "
      "full UNet, the 1-step x0 switch). Writes per stage a model directory and (LoRA stages) a "
      "kohya LoRA file, plus metrics.jsonl, loss.png, sample grids and a resumable checkpoint/.\n"
      "Examples: lightning distill --recipe recipes/fmnist-lightning.toml --out runs/lightning\n"
      "          lightning distill --recipe recipes/fmnist-lightning.toml --out runs/lightning "
      "--resume\n"
      "Ctrl-C (or SIGTERM) writes a checkpoint and exits (status 130); --resume continues "
      "exactly.\n"
      "Data parallel: --nproc N runs N local processes; across machines, start one process per "
      "rank with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, as torchrun does (README).");
  cmd->add_option("--recipe", args->recipe, "TOML recipe")->required()->check(CLI::ExistingFile);
  cmd->add_option("--out", args->out, "Run directory (default: runs/<recipe file name>)");
  cmd->add_flag("--resume", args->resume, "Continue the run in --out from its checkpoint");
  cmd->add_option("--until", args->until,
                  "Stop after this many iterations (all stages counted) with a checkpoint; "
                  "continue later with --resume")
      ->check(CLI::PositiveNumber);
  add_threads_option(*cmd, &args->threads);
  cmd->add_option("--device", args->device,
                  "cpu or cuda[:N]: where the networks train (data and noise are drawn on the "
                  "CPU); with several ranks, cuda puts each on its own GPU, cuda:LOCAL_RANK, "
                  "over NCCL")
      ->capture_default_str();
  cmd->add_option("--nproc", args->nproc,
                  "Data-parallel processes on this machine (the batch is split between them; "
                  "--threads is shared out)")
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--dist-timeout", args->dist_timeout,
                  "Seconds a rank waits for the others (rendezvous and each collective) before it "
                  "stops with an error naming the rank that did not answer")
      ->check(CLI::Range(1, 86400));
  cmd->callback([args] {
    const std::string out =
        args->out.empty()
            ? (std::filesystem::path("runs") / std::filesystem::path(args->recipe).stem()).string()
            : args->out;
    const auto env = dist::launch_env_from_environment();
    torch::Device device = parse_device(args->device);
    // Several ranks on GPUs: one each, cuda:LOCAL_RANK, as under torchrun (NCCL).
    if ((args->nproc > 1 || (env && env->world_size > 1)) && device.is_cuda()) {
      if (device.has_index())
        fail_usage(
            "--device {}: with several ranks each trains on cuda:LOCAL_RANK; pass --device cuda",
            args->device);
      if (!dist::nccl_available())
        fail_usage(
            "--device cuda with several ranks needs NCCL, which this build lacks: rebuild with "
            "scripts/build-cuda.sh where NCCL's nccl.h is installed");
      const int gpus = static_cast<int>(torch::cuda::device_count());
      const int local = args->nproc > 1 ? args->nproc - 1 : env->local_rank;
      if (local >= gpus)
        fail_usage(
            "{} = {}{}: this machine has {} CUDA device(s), one per rank",
            args->nproc > 1 ? "--nproc" : "LOCAL_RANK",
            args->nproc > 1 ? args->nproc : env->local_rank,
            args->nproc > 1 || std::getenv("LOCAL_RANK") ? "" : " (RANK: LOCAL_RANK is not set)",
            gpus);
      if (env) device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local));
    }
    if (args->nproc > 1) {
      if (env)
        fail_usage(
            "--nproc {}: WORLD_SIZE is set already (this process is a rank of a launched "
            "job); use one or the other",
            args->nproc);
      // What would stop every rank alike is refused once, before any starts.
      const auto recipe = distill::DistillRecipe::load(args->recipe);
      if (recipe.batch_size % args->nproc != 0)
        fail_usage("{}: [train] batch_size = {} does not split evenly over {} ranks", args->recipe,
                   recipe.batch_size, args->nproc);
      const int threads =
          std::max(1, (args->threads > 0 ? args->threads : available_cores()) / args->nproc);
      std::vector<std::string> rank_args = {"distill",
                                            "--recipe",
                                            args->recipe,
                                            "--out",
                                            out,
                                            "--threads",
                                            std::to_string(threads),
                                            "--dist-timeout",
                                            std::to_string(args->dist_timeout),
                                            "--device",
                                            args->device};
      if (args->resume) rank_args.push_back("--resume");
      if (args->until > 0) {
        rank_args.push_back("--until");
        rank_args.push_back(std::to_string(args->until));
      }
      const int status =
          dist::launch_local(args->nproc, rank_args, std::chrono::seconds(args->dist_timeout + 10));
      if (status != 0) std::exit(status);
      return;
    }
    set_threads(args->threads);
    dist::Group group;
    if (env && env->world_size > 1) {
      set_log_rank(env->rank);
      group = dist::Group::connect(*env, std::chrono::seconds(args->dist_timeout), device);
    }
    distill::DistillResult result;
    try {
      const auto recipe = distill::DistillRecipe::load(args->recipe);
      distill::DistillOptions options;
      options.group = &group;
      options.out_dir = out;
      options.models_root = shipped_models_root();
      options.resume = args->resume;
      options.device = device;
      if (args->until > 0) options.until = args->until;
      result = distill::run_distillation(recipe, options);
    } catch (const std::exception& e) {
      group.report_failure(e.what());  // the other ranks name it instead of waiting
      throw;
    }
    if (group.is_main())
      for (const auto& dir : result.model_dirs)
        std::printf("%s\n", dir.c_str());
    std::fflush(stdout);
    if (result.interrupted) std::exit(130);
  });
}

}  // namespace lightning::app
