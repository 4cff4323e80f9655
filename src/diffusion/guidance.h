// Classifier-free guidance (Ho & Salimans 2022, eq. 6; StableDiffusionXLPipeline.__call__).
#pragma once

#include <torch/types.h>

namespace lightning::diffusion {

// Convention (diffusers' `do_classifier_free_guidance = guidance_scale > 1`): a scale <= 1
// means no guidance — the pipeline runs only the conditional branch. SDXL-Lightning students
// are sampled this way (METHOD.md §5: guidance 0 or 1).
bool uses_guidance(double guidance_scale);

// uncond + g * (cond - uncond) for g > 1; `cond` itself for g <= 1. Shapes [B, C, H, W] each.
torch::Tensor guide(const torch::Tensor& uncond, const torch::Tensor& cond, double guidance_scale);

// The usual batched form: model_output [2B, ...] = concat(uncond, cond) along dim 0, as the
// pipeline builds it; returns [B, ...].
torch::Tensor guide_batched(const torch::Tensor& model_output, double guidance_scale);

}  // namespace lightning::diffusion
