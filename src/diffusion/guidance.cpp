#include "diffusion/guidance.h"

#include <torch/torch.h>

#include "core/error.h"

namespace lightning::diffusion {

bool uses_guidance(double guidance_scale) {
  return guidance_scale > 1.0;
}

torch::Tensor guide(const torch::Tensor& uncond, const torch::Tensor& cond, double guidance_scale) {
  if (uncond.sizes() != cond.sizes()) {
    fail("classifier-free guidance: uncond of shape {} and cond of shape {} differ",
         fmt::join(uncond.sizes(), "x"), fmt::join(cond.sizes(), "x"));
  }
  if (!uses_guidance(guidance_scale)) return cond;
  return uncond + guidance_scale * (cond - uncond);
}

torch::Tensor guide_batched(const torch::Tensor& model_output, double guidance_scale) {
  if (model_output.dim() < 1 || model_output.size(0) % 2 != 0) {
    fail("classifier-free guidance: batched model output of shape {} needs an even batch",
         fmt::join(model_output.sizes(), "x"));
  }
  const auto halves = model_output.chunk(2, 0);  // [uncond, cond], as the pipeline concatenates
  return guide(halves[0], halves[1], guidance_scale);
}

}  // namespace lightning::diffusion
