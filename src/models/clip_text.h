// CLIPTextModel and CLIPTextModelWithProjection as transformers.models.clip.modeling_clip
// (v4.38.2): pre-LayerNorm transformer with a causal mask, learned absolute positions, a final
// LayerNorm and a pooled output at the end-of-text token. Submodule names equal transformers',
// so `text_model.encoder.layers.0.self_attn.q_proj.weight` etc. load with no renaming.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/types.h>
#include <nlohmann/json.hpp>

#include "nn/layers.h"

namespace lightning::models {

// The fields of a transformers CLIPTextConfig (config.json of a text_encoder folder), with
// transformers' defaults. Presets: SDXL's text_encoder (CLIP ViT-L/14) and text_encoder_2
// (OpenCLIP ViT-bigG/14).
struct CLIPTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 512;              // CLIP-L 768, OpenCLIP-G 1280
  int64_t intermediate_size = 2048;       // 3072, 5120
  int64_t num_hidden_layers = 12;         // 12, 32
  int64_t num_attention_heads = 8;        // 12, 20 (head dim 64)
  int64_t max_position_embeddings = 77;   // the tokenizer's model_max_length
  std::string hidden_act = "quick_gelu";  // "quick_gelu" (CLIP-L) or "gelu" (erf; OpenCLIP-G)
  double layer_norm_eps = 1e-5;
  int64_t projection_dim = 512;  // width of text_embeds: 768, 1280
  int64_t bos_token_id = 49406;  // SDXL configs say 0 (unused by the model)
  int64_t eos_token_id = 49407;  // SDXL configs say 2: see pooled_positions()
  int64_t pad_token_id = 1;      // unused by the model (no padding mask)
  // CLIPTextModelWithProjection (has text_projection). From `architectures` when the config
  // has it; otherwise unset until the loader decides from the weights (text_projection.weight).
  std::optional<bool> with_projection;

  static CLIPTextConfig from_json(const nlohmann::json& json, const std::string& file);
  nlohmann::json to_json() const;
  int64_t head_dim() const { return hidden_size / num_attention_heads; }

  static CLIPTextConfig sdxl_clip_l();  // stable-diffusion-xl-base-1.0 text_encoder
  static CLIPTextConfig sdxl_clip_g();  // stable-diffusion-xl-base-1.0 text_encoder_2
};

// The token whose final state is the pooled output, per row of input_ids [B, T] -> [B] int64.
// Rule (DESIGN.md, "Compatibility notes: CLIP text"):
// - eos_token_id != 2: the first position of eos_token_id (as transformers); a row without it
//   pools its last position (transformers would take position 0 there).
// - eos_token_id == 2 (legacy configs written before transformers PR #24773, e.g. SDXL's):
//   transformers takes argmax(input_ids). With the real vocabulary (vocab_size > 49407) we take
//   the first position of the tokenizer's end-of-text id 49407 instead (last position if
//   absent), which is the same token for tokenizer output, with 0 or eos padding, and stays
//   right when ids above 49407 are added. With a smaller vocabulary (tiny test models) there is
//   no known eos id, so argmax(input_ids) is used exactly as transformers does.
torch::Tensor pooled_positions(const torch::Tensor& input_ids, const CLIPTextConfig& config);

// transformers' CLIPTextEmbeddings: token + position embeddings. Older files also carry the
// `position_ids` buffer; accept_position_ids() registers it so strict loading accepts it (it is
// not used: positions are always 0..T-1).
class CLIPTextEmbeddingsImpl : public torch::nn::Cloneable<CLIPTextEmbeddingsImpl> {
 public:
  explicit CLIPTextEmbeddingsImpl(const CLIPTextConfig& config);
  void reset() override;
  // [B, T] -> [B, T, hidden], in `dtype` when given (both lookups are converted before the sum).
  torch::Tensor forward(const torch::Tensor& input_ids,
                        std::optional<torch::ScalarType> dtype = std::nullopt);
  void accept_position_ids(const std::vector<int64_t>& shape);

  CLIPTextConfig config;
  nn::Embedding token_embedding{nullptr}, position_embedding{nullptr};
};
TORCH_MODULE(CLIPTextEmbeddings);

// transformers' CLIPAttention: q/k/v/out projections with bias, scale head_dim^-0.5.
class CLIPAttentionImpl : public torch::nn::Cloneable<CLIPAttentionImpl> {
 public:
  explicit CLIPAttentionImpl(const CLIPTextConfig& config);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // [B, T, hidden], causal self-attention

  CLIPTextConfig config;
  nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
};
TORCH_MODULE(CLIPAttention);

// transformers' CLIPMLP: fc1 -> hidden_act -> fc2.
class CLIPMLPImpl : public torch::nn::Cloneable<CLIPMLPImpl> {
 public:
  explicit CLIPMLPImpl(const CLIPTextConfig& config);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);

  CLIPTextConfig config;
  nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(CLIPMLP);

// transformers' CLIPEncoderLayer: x + attn(ln1(x)), then x + mlp(ln2(x)).
class CLIPEncoderLayerImpl : public torch::nn::Cloneable<CLIPEncoderLayerImpl> {
 public:
  explicit CLIPEncoderLayerImpl(const CLIPTextConfig& config);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);

  CLIPTextConfig config;
  CLIPAttention self_attn{nullptr};
  nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  CLIPMLP mlp{nullptr};
};
TORCH_MODULE(CLIPEncoderLayer);

// transformers' CLIPEncoder: the list of layers.
class CLIPEncoderImpl : public torch::nn::Cloneable<CLIPEncoderImpl> {
 public:
  explicit CLIPEncoderImpl(const CLIPTextConfig& config);
  void reset() override;

  CLIPTextConfig config;
  std::vector<CLIPEncoderLayer> layer_list;
  torch::nn::ModuleList layers{nullptr};
};
TORCH_MODULE(CLIPEncoder);

struct CLIPTextOutput {
  torch::Tensor last_hidden_state;         // [B, T, hidden], after final_layer_norm
  torch::Tensor penultimate_hidden_state;  // [B, T, hidden], hidden_states[-2] (no final norm)
  torch::Tensor pooler_output;             // [B, hidden], last_hidden_state at pooled_positions
  torch::Tensor text_embeds;               // [B, projection_dim], with projection only
};

// transformers' CLIPTextTransformer (the `text_model` submodule).
class CLIPTextTransformerImpl : public torch::nn::Cloneable<CLIPTextTransformerImpl> {
 public:
  explicit CLIPTextTransformerImpl(const CLIPTextConfig& config);
  void reset() override;
  CLIPTextOutput forward(const torch::Tensor& input_ids);

  // The dtype the layers compute in (the embeddings are converted to it); unset: the weights'.
  std::optional<torch::ScalarType> compute_dtype;
  CLIPTextConfig config;
  CLIPTextEmbeddings embeddings{nullptr};
  CLIPEncoder encoder{nullptr};
  nn::LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(CLIPTextTransformer);

// CLIPTextModel, or CLIPTextModelWithProjection when config.with_projection (adds
// text_projection, Linear(hidden, projection_dim) without bias, applied to the pooled output).
class CLIPTextModelImpl : public torch::nn::Cloneable<CLIPTextModelImpl> {
 public:
  explicit CLIPTextModelImpl(const CLIPTextConfig& config);
  void reset() override;
  // A deep copy (see nn::copy_tensors for why Cloneable's is not used).
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device = c10::nullopt) const override;
  // input_ids [B, T] integer, T <= max_position_embeddings, ids in [0, vocab_size). Throws Error
  // naming 'input_ids' otherwise.
  CLIPTextOutput forward(const torch::Tensor& input_ids);
  bool has_projection() const { return config.with_projection.value_or(false); }
  // See CLIPTextTransformerImpl::compute_dtype (set by the loaders).
  void set_compute_dtype(torch::ScalarType dtype) { text_model->compute_dtype = dtype; }
  torch::ScalarType dtype() const {
    return text_model->compute_dtype.value_or(text_model->final_layer_norm->weight.scalar_type());
  }

  CLIPTextConfig config;
  CLIPTextTransformer text_model{nullptr};
  nn::Linear text_projection{nullptr};
};
TORCH_MODULE(CLIPTextModel);

}  // namespace lightning::models
