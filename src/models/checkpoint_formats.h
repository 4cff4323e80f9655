// The original (Stability AI / CompVis "single-file") checkpoint layouts, as tables from this
// project's module names (diffusers' and transformers' names) to the checkpoint's keys:
//   UNet   model.diffusion_model.{input_blocks,middle_block,output_blocks,time_embed,label_emb,out}
//   VAE    first_stage_model.{encoder,decoder}.{down,mid,up}... (mid attention as 1x1 convs,
//          decoder levels numbered in reverse)
//   CLIP-L conditioner.embedders.0.transformer.text_model.*   (SDXL; transformers' own names)
//          cond_stage_model.transformer.text_model.*          (SD 1.x)
//   CLIP-G conditioner.embedders.1.model.*  (OpenCLIP: fused attn.in_proj_weight in q, k, v
//          order, ln_1/ln_2, mlp.c_fc/c_proj, positional_embedding, ln_final, text_projection
//          stored transposed)
// The tables are built from the module itself, so they follow any config (layers per block,
// attention or not per level), and io::MappedWeights applies them strictly.
#pragma once

#include <memory>
#include <string>

#include "io/key_map.h"
#include "models/clip_text.h"
#include "models/unet.h"
#include "models/vae.h"

namespace lightning::models {

constexpr const char* kOriginalUNetPrefix = "model.diffusion_model.";
constexpr const char* kOriginalVAEPrefix = "first_stage_model.";
constexpr const char* kSdxlClipLPrefix = "conditioner.embedders.0.transformer.";
constexpr const char* kSdxlClipGPrefix = "conditioner.embedders.1.model.";
constexpr const char* kSd1ClipPrefix = "cond_stage_model.transformer.";

io::KeyMap unet_original_key_map(const UNet2DConditionModelImpl& unet, const std::string& prefix);
io::KeyMap vae_original_key_map(const AutoencoderKLImpl& vae, const std::string& prefix);
// transformers' CLIPTextModel names behind a prefix (OpenAI CLIP-L in SD and SDXL files).
io::KeyMap clip_prefixed_key_map(const CLIPTextModelImpl& clip, const std::string& prefix);
// OpenCLIP's text tower (SDXL's CLIP-G, with projection).
io::KeyMap open_clip_key_map(const CLIPTextModelImpl& clip, const std::string& prefix);

// What a single safetensors file holds, judged by its keys.
enum class CheckpointLayout {
  kDiffusersUNet,   // a bare diffusers UNet (sdxl_lightning_Nstep_unet.safetensors)
  kOriginalUNet,    // a bare original UNet (input_blocks..., with or without the prefix)
  kSdxlSingleFile,  // UNet + VAE + CLIP-L + CLIP-G in the original layout
  kSd1SingleFile,   // UNet + VAE + CLIP-L (cond_stage_model) in the original layout
  kUnknown
};
CheckpointLayout detect_layout(const io::WeightSource& weights);
const char* to_string(CheckpointLayout layout);

// Loads the UNet of `unet` from `file` in any UNet-bearing layout above (the module's config
// decides the shapes). Throws naming the file when its layout has no UNet or does not fit.
void load_unet_weights(UNet2DConditionModelImpl& unet, const std::string& file,
                       const io::LoadOptions& options);

}  // namespace lightning::models
