#include "models/clip_text.h"

#include <cmath>

#include "core/error.h"
#include "io/json_config.h"
#include "nn/attention.h"

namespace lightning::models {
namespace {

const char* const kTextModel = "CLIPTextModel";
const char* const kTextModelWithProjection = "CLIPTextModelWithProjection";
const char* const kQuickGelu = "quick_gelu";
const char* const kGelu = "gelu";
// Configs written before transformers PR #24773 carry eos_token_id 2 (a placeholder); the CLIP
// tokenizer's real end-of-text id is 49407, the largest id of its vocabulary.
constexpr int64_t kLegacyEosTokenId = 2;
constexpr int64_t kTokenizerEosTokenId = 49407;
// quick_gelu(x) = x * sigmoid(1.702 x) (transformers.activations.QuickGELUActivation).
constexpr double kQuickGeluScale = 1.702;

// Keys that transformers' PretrainedConfig (and CLIPTextConfig) writes but that do not change
// this model's inference forward: dropout rates (eval only), initialisation, generation and
// task settings, bookkeeping. Seen in real text_encoder/config.json files (SD1.x's full dump of
// PretrainedConfig, SDXL's short form).
const char* const kIgnoredKeys[] = {"attention_dropout",
                                    "dropout",
                                    "initializer_factor",
                                    "initializer_range",
                                    "torch_dtype",
                                    "transformers_version",
                                    "add_cross_attention",
                                    "bad_words_ids",
                                    "begin_suppress_tokens",
                                    "chunk_size_feed_forward",
                                    "cross_attention_hidden_size",
                                    "decoder_start_token_id",
                                    "diversity_penalty",
                                    "do_sample",
                                    "early_stopping",
                                    "encoder_no_repeat_ngram_size",
                                    "exponential_decay_length_penalty",
                                    "finetuning_task",
                                    "forced_bos_token_id",
                                    "forced_eos_token_id",
                                    "gradient_checkpointing",
                                    "id2label",
                                    "is_decoder",
                                    "is_encoder_decoder",
                                    "label2id",
                                    "length_penalty",
                                    "max_length",
                                    "min_length",
                                    "no_repeat_ngram_size",
                                    "num_beam_groups",
                                    "num_beams",
                                    "num_return_sequences",
                                    "output_attentions",
                                    "output_hidden_states",
                                    "output_scores",
                                    "prefix",
                                    "problem_type",
                                    "remove_invalid_values",
                                    "repetition_penalty",
                                    "return_dict",
                                    "return_dict_in_generate",
                                    "sep_token_id",
                                    "suppress_tokens",
                                    "task_specific_params",
                                    "temperature",
                                    "tf_legacy_loss",
                                    "tie_encoder_decoder",
                                    "tie_word_embeddings",
                                    "tokenizer_class",
                                    "top_k",
                                    "top_p",
                                    "torchscript",
                                    "typical_p",
                                    "use_bfloat16",
                                    "use_cache"};

}  // namespace

CLIPTextConfig CLIPTextConfig::from_json(const nlohmann::json& json, const std::string& file) {
  io::ConfigReader r(json, file);
  CLIPTextConfig c;
  // A full CLIPConfig (model_type "clip") nests the text config under "text_config".
  r.expect("model_type", "clip_text_model");
  const auto architectures = r.get_raw("architectures");
  if (!architectures.is_null()) {
    if (!architectures.is_array() || architectures.size() != 1 || !architectures[0].is_string())
      r.fail_key("architectures", "expected one class name, got " + architectures.dump());
    const auto name = architectures[0].get<std::string>();
    if (name != kTextModel && name != kTextModelWithProjection)
      r.fail_key("architectures", fmt::format("'{}' is not supported (supported: {}, {})", name,
                                              kTextModel, kTextModelWithProjection));
    c.with_projection = name == kTextModelWithProjection;
  }
  c.vocab_size = r.get_int("vocab_size", c.vocab_size);
  c.hidden_size = r.get_int("hidden_size", c.hidden_size);
  c.intermediate_size = r.get_int("intermediate_size", c.intermediate_size);
  c.num_hidden_layers = r.get_int("num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = r.get_int("num_attention_heads", c.num_attention_heads);
  c.max_position_embeddings = r.get_int("max_position_embeddings", c.max_position_embeddings);
  c.hidden_act = r.get_string("hidden_act", c.hidden_act);
  c.layer_norm_eps = r.get_double("layer_norm_eps", c.layer_norm_eps);
  c.projection_dim = r.get_int("projection_dim", c.projection_dim);
  c.bos_token_id = r.get_int("bos_token_id", c.bos_token_id);
  c.eos_token_id = r.get_int("eos_token_id", c.eos_token_id);
  c.pad_token_id = r.get_int("pad_token_id", c.pad_token_id);

  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "max_position_embeddings", "projection_dim"})
    if (r.has(key) && r.get_int(key, 1) <= 0) r.fail_key(key, "must be positive");
  if (c.hidden_act != kQuickGelu && c.hidden_act != kGelu)
    r.fail_key("hidden_act", fmt::format("'{}' is not supported (supported: {}, {})", c.hidden_act,
                                         kQuickGelu, kGelu));
  if (c.hidden_size % c.num_attention_heads != 0)
    r.fail_key("num_attention_heads", fmt::format("{} does not divide hidden_size {}",
                                                  c.num_attention_heads, c.hidden_size));
  // Pruned heads would change the shapes of the attention projections.
  const auto pruned = r.get_raw("pruned_heads");
  if (!pruned.is_null() && !pruned.empty())
    r.fail_key("pruned_heads", "pruned attention heads are not supported");
  for (const char* key : kIgnoredKeys)
    r.get_raw(key);
  r.refuse_unknown_keys();
  return c;
}

nlohmann::json CLIPTextConfig::to_json() const {
  nlohmann::json j = {{"model_type", "clip_text_model"},
                      {"vocab_size", vocab_size},
                      {"hidden_size", hidden_size},
                      {"intermediate_size", intermediate_size},
                      {"num_hidden_layers", num_hidden_layers},
                      {"num_attention_heads", num_attention_heads},
                      {"max_position_embeddings", max_position_embeddings},
                      {"hidden_act", hidden_act},
                      {"layer_norm_eps", layer_norm_eps},
                      {"projection_dim", projection_dim},
                      {"bos_token_id", bos_token_id},
                      {"eos_token_id", eos_token_id},
                      {"pad_token_id", pad_token_id}};
  if (with_projection)
    j["architectures"] = {*with_projection ? kTextModelWithProjection : kTextModel};
  return j;
}

CLIPTextConfig CLIPTextConfig::sdxl_clip_l() {
  CLIPTextConfig c;
  c.hidden_size = 768;
  c.intermediate_size = 3072;
  c.num_hidden_layers = 12;
  c.num_attention_heads = 12;
  c.hidden_act = kQuickGelu;
  c.projection_dim = 768;
  c.bos_token_id = 0;
  c.eos_token_id = kLegacyEosTokenId;
  c.with_projection = false;
  return c;
}

CLIPTextConfig CLIPTextConfig::sdxl_clip_g() {
  CLIPTextConfig c = sdxl_clip_l();
  c.hidden_size = 1280;
  c.intermediate_size = 5120;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 20;
  c.hidden_act = kGelu;
  c.projection_dim = 1280;
  c.with_projection = true;
  return c;
}

torch::Tensor pooled_positions(const torch::Tensor& input_ids, const CLIPTextConfig& config) {
  const int64_t T = input_ids.size(-1);
  int64_t eos = config.eos_token_id;
  if (eos == kLegacyEosTokenId) {
    if (config.vocab_size <= kTokenizerEosTokenId) return input_ids.argmax(-1);
    eos = kTokenizerEosTokenId;
  }
  // First position of eos: min over positions where the row holds eos (T where it does not).
  auto positions = torch::arange(T, input_ids.options().dtype(torch::kLong)).expand_as(input_ids);
  auto first = torch::where(input_ids == eos, positions, torch::full_like(positions, T));
  first = std::get<0>(first.min(-1));
  return torch::where(first == T, torch::full_like(first, T - 1), first);
}

CLIPTextEmbeddingsImpl::CLIPTextEmbeddingsImpl(const CLIPTextConfig& config_) : config(config_) {
  reset();
}

void CLIPTextEmbeddingsImpl::reset() {
  token_embedding =
      register_module("token_embedding", nn::Embedding(config.vocab_size, config.hidden_size));
  position_embedding = register_module(
      "position_embedding", nn::Embedding(config.max_position_embeddings, config.hidden_size));
}

void CLIPTextEmbeddingsImpl::accept_position_ids(const std::vector<int64_t>& shape) {
  register_buffer("position_ids", torch::zeros(shape, torch::kLong));
}

torch::Tensor CLIPTextEmbeddingsImpl::forward(const torch::Tensor& input_ids,
                                              std::optional<torch::ScalarType> dtype) {
  const int64_t T = input_ids.size(1);
  auto positions = torch::arange(T, input_ids.options().dtype(torch::kLong));
  auto tokens = token_embedding(input_ids), places = position_embedding(positions);
  if (dtype) {
    tokens = tokens.to(*dtype);
    places = places.to(*dtype);
  }
  return tokens + places.unsqueeze(0);
}

CLIPAttentionImpl::CLIPAttentionImpl(const CLIPTextConfig& config_) : config(config_) {
  reset();
}

void CLIPAttentionImpl::reset() {
  const int64_t d = config.hidden_size;
  q_proj = register_module("q_proj", nn::Linear(d, d));
  k_proj = register_module("k_proj", nn::Linear(d, d));
  v_proj = register_module("v_proj", nn::Linear(d, d));
  out_proj = register_module("out_proj", nn::Linear(d, d));
}

torch::Tensor CLIPAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t B = x.size(0), T = x.size(1);
  const int64_t H = config.num_attention_heads, D = config.head_dim();
  // [B, T, H*D] -> [B, H, T, D]
  auto q = q_proj(x).view({B, T, H, D}).transpose(1, 2);
  auto k = k_proj(x).view({B, T, H, D}).transpose(1, 2);
  auto v = v_proj(x).view({B, T, H, D}).transpose(1, 2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  auto h = nn::scaled_dot_product_attention(q, k, v, scale, /*upcast=*/false, /*causal=*/true);
  return out_proj(h.transpose(1, 2).reshape({B, T, H * D}));
}

CLIPMLPImpl::CLIPMLPImpl(const CLIPTextConfig& config_) : config(config_) {
  reset();
}

void CLIPMLPImpl::reset() {
  fc1 = register_module("fc1", nn::Linear(config.hidden_size, config.intermediate_size));
  fc2 = register_module("fc2", nn::Linear(config.intermediate_size, config.hidden_size));
}

torch::Tensor CLIPMLPImpl::forward(const torch::Tensor& x) {
  auto h = fc1(x);  // [B, T, intermediate]
  h = config.hidden_act == kQuickGelu ? h * torch::sigmoid(kQuickGeluScale * h) : torch::gelu(h);
  return fc2(h);
}

CLIPEncoderLayerImpl::CLIPEncoderLayerImpl(const CLIPTextConfig& config_) : config(config_) {
  reset();
}

void CLIPEncoderLayerImpl::reset() {
  self_attn = register_module("self_attn", CLIPAttention(config));
  layer_norm1 =
      register_module("layer_norm1", nn::LayerNorm(config.hidden_size, config.layer_norm_eps));
  mlp = register_module("mlp", CLIPMLP(config));
  layer_norm2 =
      register_module("layer_norm2", nn::LayerNorm(config.hidden_size, config.layer_norm_eps));
}

torch::Tensor CLIPEncoderLayerImpl::forward(const torch::Tensor& x) {
  auto h = x + self_attn(layer_norm1(x));
  return h + mlp(layer_norm2(h));
}

CLIPEncoderImpl::CLIPEncoderImpl(const CLIPTextConfig& config_) : config(config_) {
  reset();
}

void CLIPEncoderImpl::reset() {
  layer_list.clear();
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    layer_list.push_back(CLIPEncoderLayer(config));
    layers->push_back(layer_list.back());
  }
}

CLIPTextTransformerImpl::CLIPTextTransformerImpl(const CLIPTextConfig& config_) : config(config_) {
  reset();
}

void CLIPTextTransformerImpl::reset() {
  embeddings = register_module("embeddings", CLIPTextEmbeddings(config));
  encoder = register_module("encoder", CLIPEncoder(config));
  final_layer_norm =
      register_module("final_layer_norm", nn::LayerNorm(config.hidden_size, config.layer_norm_eps));
}

CLIPTextOutput CLIPTextTransformerImpl::forward(const torch::Tensor& input_ids) {
  CLIPTextOutput out;
  auto h = embeddings(input_ids, compute_dtype);  // [B, T, hidden]
  // hidden_states = [embeddings, layer 0, ..., layer L-1]; [-2] is the last layer's input.
  for (auto& layer : encoder->layer_list) {
    out.penultimate_hidden_state = h;
    h = layer(h);
  }
  if (encoder->layer_list.empty()) out.penultimate_hidden_state = h;
  out.last_hidden_state = final_layer_norm(h);
  const auto rows = torch::arange(input_ids.size(0), input_ids.options().dtype(torch::kLong));
  out.pooler_output = out.last_hidden_state.index({rows, pooled_positions(input_ids, config)});
  return out;
}

std::shared_ptr<torch::nn::Module> CLIPTextModelImpl::clone(
    const c10::optional<torch::Device>& device) const {
  std::shared_ptr<CLIPTextModelImpl> copy;
  {
    nn::SkipInitGuard skip_init;
    copy = std::make_shared<CLIPTextModelImpl>(config);
  }
  nn::copy_tensors(*copy, *this, device);
  copy->text_model->compute_dtype = text_model->compute_dtype;
  copy->train(is_training());
  return copy;
}

CLIPTextModelImpl::CLIPTextModelImpl(const CLIPTextConfig& config_) : config(config_) {
  reset();
}

void CLIPTextModelImpl::reset() {
  text_model = register_module("text_model", CLIPTextTransformer(config));
  if (has_projection())
    text_projection = register_module(
        "text_projection", nn::Linear(config.hidden_size, config.projection_dim, /*bias=*/false));
}

CLIPTextOutput CLIPTextModelImpl::forward(const torch::Tensor& input_ids_in) {
  if (input_ids_in.dim() != 2)
    fail("input 'input_ids': expected shape [B, T], got [{}]",
         fmt::join(input_ids_in.sizes(), ", "));
  if (!c10::isIntegralType(input_ids_in.scalar_type(), /*includeBool=*/false))
    fail("input 'input_ids': expected integer ids, got {}",
         std::string(c10::toString(input_ids_in.scalar_type())));
  const int64_t T = input_ids_in.size(1);
  if (T < 1 || T > config.max_position_embeddings)
    fail("input 'input_ids': {} tokens, but the model takes 1..{} (max_position_embeddings)", T,
         config.max_position_embeddings);
  auto input_ids = input_ids_in.to(torch::kLong);
  if (input_ids.numel() > 0) {
    const int64_t lo = input_ids.min().item<int64_t>(), hi = input_ids.max().item<int64_t>();
    if (lo < 0 || hi >= config.vocab_size)
      fail("input 'input_ids': ids must be in [0, {}) (vocab_size), got {}..{}", config.vocab_size,
           lo, hi);
  }
  auto out = text_model(input_ids);
  if (has_projection()) out.text_embeds = text_projection(out.pooler_output);
  return out;
}

}  // namespace lightning::models
