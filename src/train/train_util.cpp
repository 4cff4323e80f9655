#include "train/train_util.h"

#include <algorithm>
#include <array>
#include <fstream>
#include <iterator>
#include <map>
#include <numeric>
#include <random>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "core/error.h"
#include "dist/group.h"
#include "io/image.h"
#include "io/json_config.h"
#include "io/plot.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "nn/layers.h"

namespace lightning::train {

LogIntervals read_log_section(const nlohmann::json& section, const std::string& where,
                              LogIntervals defaults) {
  io::ConfigReader l(section, where);
  LogIntervals out;
  out.log_every = l.get_int("log_every", defaults.log_every);
  out.sample_every = l.get_int("sample_every", defaults.sample_every);
  out.checkpoint_every = l.get_int("checkpoint_every", defaults.checkpoint_every);
  for (const char* key : {"log_every", "sample_every", "checkpoint_every"})
    if (l.get_int(key, 1) < 1) l.fail_key(key, "must be >= 1");
  l.refuse_unknown_keys();
  return out;
}

uint64_t mix_seed(uint64_t seed, uint64_t purpose, uint64_t index) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(purpose), static_cast<uint32_t>(index),
                    static_cast<uint32_t>(index >> 32)};
  std::mt19937_64 rng(seq);
  return rng();
}

at::Generator torch_generator(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

torch::Tensor EpochSampler::batch(int64_t step, int64_t batch_size) {
  auto out = torch::empty({batch_size}, torch::kInt64);
  auto* acc = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch_size; ++i) {
    const int64_t k = step * batch_size + i;
    const int64_t epoch = k / n_;
    if (epoch != epoch_) {
      perm_ = torch::randperm(n_, torch_generator(mix_seed(seed_, 1, static_cast<uint64_t>(epoch))),
                              torch::kInt64);
      epoch_ = epoch;
    }
    acc[i] = perm_.data_ptr<int64_t>()[k % n_];
  }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> named_params(const torch::nn::Module& module,
                                                                const std::string& prefix) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : module.named_parameters(true))
    out.emplace_back(prefix + item.key(), item.value());
  return out;
}

void ema_update(const std::vector<torch::Tensor>& ema, const std::vector<torch::Tensor>& source,
                double decay) {
  torch::NoGradGuard no_grad;
  if (ema.size() != source.size())
    fail("ema_update: {} averages for {} tensors", ema.size(), source.size());
  for (size_t i = 0; i < ema.size(); ++i)
    ema[i].mul_(decay).add_(source[i].detach(), 1.0 - decay);
}

double ema_decay_at(double decay, int64_t step) {
  return std::min(decay, (1.0 + static_cast<double>(step)) / (10.0 + static_cast<double>(step)));
}

namespace {
// The key of a parameter in Optimizer::state(): its TensorImpl address, printed as libtorch
// prints it (ostream formatting: c10::str, as c10::guts::to_string in 1.x) where the map is keyed
// by strings, else the address itself.
template <typename Key>
Key key_of(c10::TensorImpl* impl) {
  if constexpr (std::is_same_v<Key, std::string>)
    return c10::str(impl);
  else
    return static_cast<Key>(impl);
}
using StateKey = std::decay_t<decltype(std::declval<torch::optim::Optimizer&>().state())>::key_type;
StateKey state_key(const torch::Tensor& p) {
  return key_of<StateKey>(p.unsafeGetTensorImpl());
}

template <typename State>
void put_state(torch::optim::Optimizer& optimizer, const torch::Tensor& p, int64_t step,
               torch::Tensor exp_avg, torch::Tensor exp_avg_sq) {
  auto st = std::make_unique<State>();
  st->step(step);
  st->exp_avg(std::move(exp_avg));
  st->exp_avg_sq(std::move(exp_avg_sq));
  optimizer.state()[state_key(p)] = std::move(st);
}
}  // namespace

std::vector<std::pair<std::string, torch::Tensor>> adam_state_tensors(
    torch::optim::Optimizer& optimizer,
    const std::vector<std::pair<std::string, torch::Tensor>>& params) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& [name, p] : params) {
    auto it = optimizer.state().find(state_key(p));
    if (it == optimizer.state().end()) continue;
    if (auto* adam = dynamic_cast<torch::optim::AdamParamState*>(it->second.get())) {
      out.emplace_back(name + ".exp_avg", adam->exp_avg());
      out.emplace_back(name + ".exp_avg_sq", adam->exp_avg_sq());
    } else if (auto* adamw = dynamic_cast<torch::optim::AdamWParamState*>(it->second.get())) {
      out.emplace_back(name + ".exp_avg", adamw->exp_avg());
      out.emplace_back(name + ".exp_avg_sq", adamw->exp_avg_sq());
    }
  }
  return out;
}

void restore_adam_state(torch::optim::Optimizer& optimizer,
                        const std::vector<std::pair<std::string, torch::Tensor>>& params,
                        const std::string& file, int64_t step, bool adamw) {
  io::SafetensorsFile f(file);
  for (const auto& [name, p] : params) {
    if (!f.contains(name + ".exp_avg")) continue;  // no state yet when saved
    auto m = f.get(name + ".exp_avg").to(p.device()).clone(),
         v = f.get(name + ".exp_avg_sq").to(p.device()).clone();
    if (m.sizes() != p.sizes())
      fail("{}: '{}.exp_avg' has another shape than the parameter", file, name);
    if (adamw)
      put_state<torch::optim::AdamWParamState>(optimizer, p, step, m, v);
    else
      put_state<torch::optim::AdamParamState>(optimizer, p, step, m, v);
  }
}

void keep_recipe_copy(const std::string& recipe_file, const std::string& out_dir) {
  std::ifstream in(recipe_file, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!text.empty()) io::write_file_atomic(out_dir + "/recipe.toml", text);
}

std::vector<nlohmann::json> truncate_metrics(const std::string& path, int64_t step) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(path);
  std::string line, kept;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("step") || j["step"].get<int64_t>() > step) continue;
    kept += line + "\n";
    lines.push_back(std::move(j));
  }
  io::write_file_atomic(path, kept);
  return lines;
}

void load_trainable_weights(torch::nn::Module& module, const std::string& file,
                            torch::Device device) {
  torch::NoGradGuard no_grad;
  io::WeightFiles weights({file});
  io::LoadOptions options;
  options.device = device;
  io::load_weights(module, weights, options, file);
  own_weights(module);
}

void write_curves_png(const std::vector<Curve>& curves, const std::string& path,
                      const std::string& title, const std::string& y_label, bool log_y,
                      size_t smooth) {
  static const std::array<std::array<uint8_t, 3>, 6> kColors = {{{31, 119, 180},
                                                                 {214, 39, 40},
                                                                 {44, 160, 44},
                                                                 {148, 103, 189},
                                                                 {255, 127, 14},
                                                                 {23, 190, 207}}};
  std::vector<io::PlotSeries> series;
  for (size_t i = 0; i < curves.size(); ++i) {
    const auto& c = curves[i];
    if (c.x.empty()) continue;
    auto color = kColors[i % kColors.size()];
    if (smooth > 1) {
      std::array<uint8_t, 3> light;
      for (size_t k = 0; k < 3; ++k)
        light[k] = static_cast<uint8_t>(color[k] + (255 - color[k]) * 6 / 10);
      series.push_back({c.name + " (raw)", c.x, c.y, light});
      series.push_back({c.name, c.x, io::moving_average(c.y, smooth), color});
    } else {
      series.push_back({c.name, c.x, c.y, color});
    }
  }
  if (series.empty()) return;
  io::PlotOptions options;
  options.title = title;
  options.x_label = "step";
  options.y_label = y_label;
  options.log_y = log_y;
  io::write_png(path, io::render_line_plot(series, options));
}

models::UNet2DConditionModel unet_sharing_weights(const models::UNet2DConditionModel& base) {
  models::UNet2DConditionModel unet{nullptr};
  {
    nn::SkipInitGuard skip_init;
    unet = models::UNet2DConditionModel(base->config);
  }
  unet->compute_dtype = base->compute_dtype;
  torch::NoGradGuard no_grad;
  const auto params = base->named_parameters(true);
  for (auto& item : unet->named_parameters(true)) {
    const auto* source = params.find(item.key());
    if (!source) fail("unet_sharing_weights: the base UNet has no parameter '{}'", item.key());
    item.value().set_data(*source);
    item.value().set_requires_grad(false);
  }
  const auto buffers = base->named_buffers(true);
  for (auto& item : unet->named_buffers(true)) {
    const auto* source = buffers.find(item.key());
    if (!source) fail("unet_sharing_weights: the base UNet has no buffer '{}'", item.key());
    item.value().set_data(*source);
  }
  return unet;
}

void own_weights(torch::nn::Module& module, std::optional<torch::ScalarType> dtype) {
  torch::NoGradGuard no_grad;
  for (auto& p : module.parameters(true)) {
    if (dtype && p.is_floating_point() && p.scalar_type() != *dtype)
      p.set_data(p.detach().to(*dtype));
    else
      p.set_data(p.detach().clone());
  }
  for (auto& b : module.buffers(true))
    b.set_data(b.detach().clone());
}

OptimizerShards::OptimizerShards(const std::vector<torch::Tensor>& params, int ranks)
    : owner_(params.size(), 0), ranks_(ranks) {
  std::vector<size_t> order(params.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return params[a].numel() > params[b].numel(); });
  std::vector<int64_t> load(static_cast<size_t>(ranks), 0);
  for (size_t k : order) {
    const auto r = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    owner_[k] = static_cast<int>(r);
    load[r] += params[k].numel();
  }
}

std::vector<std::pair<std::string, torch::Tensor>> OptimizerShards::mine(
    const std::vector<std::pair<std::string, torch::Tensor>>& named, int rank) const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t k = 0; k < named.size(); ++k)
    if (owner_[k] == rank) out.push_back(named[k]);
  return out;
}

void OptimizerShards::sync(const std::vector<torch::Tensor>& params,
                           const dist::Group& group) const {
  torch::NoGradGuard no_grad;
  for (int r = 0; r < ranks_; ++r) {
    std::vector<torch::Tensor> owned;
    int64_t total = 0;
    for (size_t k = 0; k < params.size(); ++k)
      if (owner_[k] == r) {
        owned.push_back(params[k]);
        total += params[k].numel();
      }
    if (owned.empty()) continue;
    torch::Tensor flat;
    if (r == group.rank()) {
      std::vector<torch::Tensor> pieces;
      for (const auto& p : owned)
        pieces.push_back(p.detach().reshape({-1}));
      flat = torch::cat(pieces);
    } else {
      flat = torch::empty({total}, owned[0].options());
    }
    group.broadcast({flat}, r);
    if (r == group.rank()) continue;
    int64_t offset = 0;
    for (auto& p : owned) {
      p.detach().copy_(flat.narrow(0, offset, p.numel()).view_as(p));
      offset += p.numel();
    }
  }
}

std::vector<std::pair<std::string, torch::Tensor>> OptimizerShards::gather_state(
    torch::optim::Optimizer& optimizer,
    const std::vector<std::pair<std::string, torch::Tensor>>& named,
    const dist::Group& group) const {
  std::map<std::string, torch::Tensor> own;
  for (auto& [name, t] : adam_state_tensors(optimizer, mine(named, group.rank())))
    own[name] = t;
  std::vector<double> has(named.size(), 0.0);
  for (size_t k = 0; k < named.size(); ++k)
    if (owner_[k] == group.rank() && own.count(named[k].first + ".exp_avg")) has[k] = 1;
  has = group.sum(has);
  std::vector<std::pair<std::string, torch::Tensor>> out;
  torch::NoGradGuard no_grad;
  for (size_t k = 0; k < named.size(); ++k) {
    if (has[k] == 0) continue;
    const auto& [name, p] = named[k];
    const bool owner = owner_[k] == group.rank();
    auto m = owner ? own.at(name + ".exp_avg") : torch::empty_like(p);
    auto v = owner ? own.at(name + ".exp_avg_sq") : torch::empty_like(p);
    group.broadcast({m, v}, owner_[k]);
    if (group.is_main()) {
      out.emplace_back(name + ".exp_avg", m);
      out.emplace_back(name + ".exp_avg_sq", v);
    }
  }
  return out;
}

}  // namespace lightning::train
