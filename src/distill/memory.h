// What each phase of a distillation recipe holds in memory (weights and optimiser state), from a
// teacher's shapes: logged by `lightning distill`, checked by `lightning bench --distill`, and the
// table of docs/benchmarks.md.
#pragma once

#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "distill/recipe.h"

namespace lightning::generate {
struct TextToImageModel;
}

namespace lightning::distill {

// What a phase holds in weights and optimiser state, before activations: frozen tensors in the
// recipe's frozen_weights_dtype (for "f32": at their element size), trained float32 parameters at
// 16 bytes each (weights, gradients, Adam's two moments). A stage with adversarial phases holds its
// discriminator throughout (trained only in those phases); a LoRA phase's student shares the
// teacher's weights.
struct PhaseMemory {
  size_t stage = 0;  // index into recipe.stages
  std::string phase;
  double bytes = 0;
};
// Every phase of the recipe, from the parameter counts of `teacher` (every stage's teacher has
// its shapes). `lightning distill` logs the largest and warns when it exceeds the CPU's memory.
std::vector<PhaseMemory> estimate_phase_memory(const DistillRecipe& recipe,
                                               const generate::TextToImageModel& teacher);

// The largest phase against the memory of `device` where it is known: the CPU's (MemTotal, and
// swap) or the GPU's.
struct MemoryCheck {
  PhaseMemory largest;
  std::string stage_name;
  std::string memory_of = "this machine's";  // whose memory `available` is ("cuda:0's")
  double available = 0;                      // bytes; 0: unknown
  double swap = 0;                           // the CPU's swap, bytes
  bool exceeds() const { return available > 0 && largest.bytes > available; }
  // Beyond memory and swap together: it cannot run at all (a dry run in swap is slow but runs).
  bool exceeds_with_swap() const { return exceeds() && largest.bytes > available + swap; }
  // "stage 2 (32-to-8) full holds about 75.9 GB of weights and optimiser state before
  // activations[, more than this machine's 23.4 GB of memory[ and 60.0 GB of swap]]" (on a GPU:
  // "more than cuda:0's 85.0 GB of memory")
  std::string describe() const;
};
MemoryCheck check_phase_memory(const DistillRecipe& recipe,
                               const generate::TextToImageModel& teacher,
                               const torch::Device& device);

}  // namespace lightning::distill
