#include "distill/memory.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include "core/system.h"
#include "generate/pipeline.h"
#include "models/discriminator.h"
#include "models/lora.h"

namespace lightning::distill {

std::vector<PhaseMemory> estimate_phase_memory(const DistillRecipe& recipe,
                                               const generate::TextToImageModel& teacher) {
  // Bytes and parameters of a module; `encoder_only`: without a UNet's up path (what the
  // discriminator's backbone copies).
  auto size_of = [](const torch::nn::Module& module, bool encoder_only = false) {
    double bytes = 0, params = 0;
    for (const auto& item : module.named_parameters(true)) {
      const auto& name = item.key();
      const auto& p = item.value();
      if (encoder_only && (name.rfind("up_blocks.", 0) == 0 ||
                           name.rfind("conv_norm_out.", 0) == 0 || name.rfind("conv_out.", 0) == 0))
        continue;
      bytes += static_cast<double>(p.numel() * p.element_size());
      params += static_cast<double>(p.numel());
    }
    return std::pair{bytes, params};
  };
  // Frozen weights as the recipe holds them (the teacher given may hold them otherwise).
  const auto frozen_dtype = recipe.frozen_dtype();
  auto frozen_bytes = [&](const std::pair<double, double>& size) {
    return frozen_dtype ? size.second * static_cast<double>(c10::elementSize(*frozen_dtype))
                        : size.first;
  };
  const auto unet_size = size_of(*teacher.unet);
  const double unet_bytes = frozen_bytes(unet_size), unet_params = unet_size.second;
  const double backbone_params = size_of(*teacher.unet, /*encoder_only=*/true).second;
  double other = 0;  // text encoders and VAE, frozen (a pixel model has no VAE or second encoder)
  auto add_frozen = [&](const auto& holder) {
    if (!holder.is_empty()) other += frozen_bytes(size_of(*holder));
  };
  add_frozen(teacher.text_encoder);
  add_frozen(teacher.text_encoder_2);
  add_frozen(teacher.vae);
  constexpr double kTrained = 16, kFloat = 4;
  const int64_t channels = teacher.unet->config.block_out_channels.back();
  std::vector<PhaseMemory> out;
  for (size_t s = 0; s < recipe.stages.size(); ++s) {
    const auto& stage = recipe.stages[s];
    double disc_params = 0;
    if (stage.has_adversarial_phase()) {
      torch::NoGradGuard no_grad;
      disc_params = backbone_params;
      for (const int64_t in : {2 * channels, channels})
        for (const auto& p : models::DiscriminatorHead(in, stage.head)->parameters())
          disc_params += static_cast<double>(p.numel());
    }
    double lora_params = 0;
    if (stage.lora_rank > 0)
      lora_params = static_cast<double>(models::count_lora_parameters(
          *teacher.unet.ptr(), {stage.lora_rank, stage.lora_alpha > 0 ? stage.lora_alpha : 1.0,
                                models::LoRAConfig{}.exclude, std::nullopt}));
    for (const auto& phase : stage.phases()) {
      double bytes = unet_bytes + other;                              // the teacher
      const double student = phase.lora ? lora_params : unet_params;  // what the student trains
      bytes += student * (phase.train_generator ? kTrained : kFloat);
      bytes += disc_params * (phase.adversarial() ? kTrained : kFloat);
      out.push_back({s, phase.name, bytes});
    }
  }
  return out;
}

MemoryCheck check_phase_memory(const DistillRecipe& recipe,
                               const generate::TextToImageModel& teacher,
                               const torch::Device& device) {
  MemoryCheck check;
  for (const auto& phase : estimate_phase_memory(recipe, teacher))
    if (phase.bytes > check.largest.bytes) check.largest = phase;
  if (!recipe.stages.empty()) check.stage_name = recipe.stages[check.largest.stage].name;
  if (device.is_cpu()) {
    check.available = static_cast<double>(total_memory_bytes());
    check.swap = static_cast<double>(total_swap_bytes());
  } else if (device.is_cuda()) {
    const int index = device.has_index() ? device.index() : 0;
    check.available = static_cast<double>(cuda_total_memory_bytes(index));
    check.memory_of = fmt::format("cuda:{}'s", index);
  }
  return check;
}

std::string MemoryCheck::describe() const {
  auto text = fmt::format(
      "stage {} ({}) {} holds about {:.{}f} GB of weights and optimiser state before activations",
      largest.stage + 1, stage_name, largest.phase, largest.bytes / 1e9,
      largest.bytes >= 10e9 ? 1 : 2);
  if (exceeds_with_swap() && swap > 0)
    text += fmt::format(", more than {} {:.1f} GB of memory and {:.1f} GB of swap", memory_of,
                        available / 1e9, swap / 1e9);
  else if (exceeds())
    text += fmt::format(", more than {} {:.1f} GB of memory", memory_of, available / 1e9);
  return text;
}

}  // namespace lightning::distill
