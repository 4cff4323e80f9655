// `lightning cache --recipe FILE --out DIR`: encodes a recipe's image data once (inputs in the
// model's space, captions text-encoded) into tar shards that `[data] dataset = "cache"` reads.
#include <string>

#include <spdlog/spdlog.h>

#include "app/commands.h"
#include "core/error.h"
#include "core/system.h"
#include "distill/recipe.h"
#include "generate/pipeline.h"
#include "train/cache.h"

namespace lightning::app {
namespace {

struct CacheArgs {
  std::string recipe, out, dtype = "f16";
  int64_t shard_size = 1000;
  int threads = 0;
};

}  // namespace

void add_cache_command(CLI::App& app) {
  auto args = std::make_shared<CacheArgs>();
  auto* cmd = app.add_subcommand(
      "cache",
      "Encode a recipe's training images once: each image fitted to its aspect-ratio bucket "
      "(centre crop) and put into the teacher's input space (VAE latents for latent models), "
      "each caption text-encoded; written as tar shards plus cache.json. Point the recipe at it "
      "with [data] dataset = \"cache\", dir = \"DIR\".\n"
      "Example: lightning cache --recipe my-recipe.toml --out data/my-cache");
  cmd->add_option("--recipe", args->recipe,
                  "Recipe whose [teacher] and [data] (webdataset or image-folder) to encode")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--out", args->out, "Cache directory (replaced only when complete)")->required();
  cmd->add_option("--shard-size", args->shard_size, "Samples per tar shard")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--dtype", args->dtype, "Stored precision of inputs and text encodings")
      ->check(CLI::IsMember({"f16", "f32", "bf16"}));
  add_threads_option(*cmd, &args->threads);
  cmd->callback([args] {
    set_threads(args->threads);
    const auto recipe = distill::DistillRecipe::load(args->recipe);
    if (recipe.dataset != "webdataset" && recipe.dataset != "image-folder")
      fail_usage(
          "--recipe {}: [data] dataset = \"{}\"; the cache encodes webdataset or "
          "image-folder data",
          args->recipe, recipe.dataset);
    const auto model_dir = generate::resolve_model_dir(recipe.teacher, shipped_models_root());
    const auto model = generate::load_model(model_dir, {});
    train::CacheOptions options;
    options.out_dir = args->out;
    options.shard_size = args->shard_size;
    options.dtype = args->dtype == "f32"    ? torch::kFloat32
                    : args->dtype == "bf16" ? torch::kBFloat16
                                            : torch::kFloat16;
    options.resolution = recipe.resolution;
    options.max_aspect = recipe.max_aspect;
    options.bucket_step = recipe.bucket_step;
    const auto result = train::write_cache(model, recipe.teacher, recipe.source, options);
    std::printf("%s\n", args->out.c_str());
    if (result.skipped)
      spdlog::warn("cache: {} record(s) could not be used (see the warnings above)",
                   result.skipped);
  });
}

}  // namespace lightning::app
