#include "distill/objectives.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include <torch/torch.h>

#include "core/error.h"
#include "diffusion/parameterization.h"

namespace lightning::distill {

std::vector<int64_t> teacher_path(int64_t t, int64_t n, int64_t teacher_steps,
                                  int64_t num_train_timesteps) {
  if (n < 1) fail("teacher_path: n must be >= 1, got {}", n);
  if (teacher_steps < 1 || teacher_steps > num_train_timesteps)
    fail("teacher_path: teacher steps {} outside [1, {}]", teacher_steps, num_train_timesteps);
  if (t < 0 || t >= num_train_timesteps)
    fail("teacher_path: timestep {} outside [0, {}]", t, num_train_timesteps - 1);
  const auto grid = diffusion::trailing_timesteps(num_train_timesteps, teacher_steps);
  std::vector<int64_t> path = {t};
  const auto on_grid = std::find(grid.begin(), grid.end(), t);
  if (on_grid != grid.end()) {  // the grid's next entries, then the clean end
    const auto i = static_cast<int64_t>(on_grid - grid.begin());
    for (int64_t k = 1; k <= n; ++k)
      path.push_back(i + k < static_cast<int64_t>(grid.size()) ? grid[static_cast<size_t>(i + k)]
                                                               : -1);
    return path;
  }
  // Off the grid: steps of T / teacher_steps from t, rounded half to even (std::nearbyint in the
  // default rounding mode, as numpy's round).
  const double step = static_cast<double>(num_train_timesteps) / static_cast<double>(teacher_steps);
  for (int64_t k = 1; k <= n; ++k) {
    const auto next =
        static_cast<int64_t>(std::nearbyint(static_cast<double>(t + 1) - k * step)) - 1;
    path.push_back(std::max<int64_t>(-1, next));
  }
  return path;
}

torch::Tensor student_input(const diffusion::NoiseSchedule& schedule, const torch::Tensor& x0,
                            const torch::Tensor& eps, const torch::Tensor& t) {
  auto x_t = diffusion::add_noise(schedule, x0, eps, t);
  const int64_t last = schedule.num_train_timesteps() - 1;
  auto pure = (t == last).to(x_t.device()).view({-1, 1, 1, 1});
  return torch::where(pure, eps, x_t);
}

torch::Tensor teacher_target(const Denoiser& teacher, diffusion::PredictionType teacher_type,
                             const diffusion::NoiseSchedule& schedule, const torch::Tensor& x_t,
                             const torch::Tensor& t, int64_t n, int64_t teacher_steps,
                             torch::Tensor* t_prev) {
  torch::NoGradGuard no_grad;
  const int64_t B = x_t.size(0);
  const int64_t T = schedule.num_train_timesteps();
  auto t_cpu = t.to(torch::kCPU).to(torch::kInt64).contiguous();
  if (t_cpu.dim() != 1 || t_cpu.size(0) != B)
    fail("teacher_target: expected timesteps [{}], got {} values", B, t_cpu.numel());
  // Per-sample paths, [n + 1, B].
  // The batch holds few distinct timesteps (a grid): one path each.
  auto paths = torch::empty({n + 1, B}, torch::kInt64);
  auto acc = paths.accessor<int64_t, 2>();
  const auto* ts = t_cpu.data_ptr<int64_t>();
  std::map<int64_t, std::vector<int64_t>> by_t;
  for (int64_t i = 0; i < B; ++i) {
    auto it = by_t.find(ts[i]);
    if (it == by_t.end()) it = by_t.emplace(ts[i], teacher_path(ts[i], n, teacher_steps, T)).first;
    for (int64_t k = 0; k <= n; ++k)
      acc[k][i] = it->second[static_cast<size_t>(k)];
  }
  // Every sample takes part in every call (the denoiser's conditioning is bound to the whole
  // batch); samples already at the clean end compute a dummy step (t 0 -> -1) that is dropped.
  auto x = x_t;
  for (int64_t k = 0; k < n; ++k) {
    auto from = paths[k], to = paths[k + 1];
    auto active = from >= 0;
    if (!active.any().item<bool>()) break;
    auto ts = torch::where(active, from, torch::zeros_like(from)).to(x.device());
    auto tp = torch::where(active, to, torch::full_like(to, -1)).to(x.device());
    auto next = diffusion::ddim_step(schedule, teacher_type, teacher(x, ts), x, ts, tp);
    x = torch::where(active.to(x.device()).view({-1, 1, 1, 1}), next.to(x.scalar_type()), x);
  }
  if (t_prev) *t_prev = paths[n].to(t.device());
  return x;
}

namespace {
torch::Tensor expand_rows(const torch::Tensor& x, int64_t batch) {
  if (!x.defined() || x.size(0) == batch) return x;
  auto shape = x.sizes().vec();
  shape[0] = batch;
  return x.expand(shape);
}
torch::Tensor cat_defined(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.defined() != b.defined())
    fail("conditioning: one half of the batch has {} and the other not",
         a.defined() ? "a tensor" : "no tensor");
  return a.defined() ? torch::cat({a, b}) : a;
}
}  // namespace

Conditioning Conditioning::expand_to(int64_t batch) const {
  return {expand_rows(context, batch), expand_rows(pooled, batch), expand_rows(time_ids, batch)};
}

Conditioning Conditioning::cat(const Conditioning& a, const Conditioning& b) {
  return {cat_defined(a.context, b.context), cat_defined(a.pooled, b.pooled),
          cat_defined(a.time_ids, b.time_ids)};
}

Denoiser guided(ConditionedModel model, Conditioning cond, Conditioning uncond, double scale) {
  return [model = std::move(model), cond = std::move(cond), uncond = std::move(uncond), scale](
             const torch::Tensor& x, const torch::Tensor& t) -> torch::Tensor {
    const int64_t B = x.size(0);
    // Conditioning may be given for the full batch or as one row broadcast to every sample.
    if (scale <= 1.0) return model(x, t, cond.expand_to(B));  // as diffusers: no CFG at scale <= 1
    auto both = model(torch::cat({x, x}), torch::cat({t, t}),
                      Conditioning::cat(cond.expand_to(B), uncond.expand_to(B)));
    auto c = both.slice(0, 0, B), u = both.slice(0, B);
    return u + scale * (c - u);
  };
}

torch::Tensor student_jump(diffusion::PredictionType student_type,
                           const diffusion::NoiseSchedule& schedule, const torch::Tensor& output,
                           const torch::Tensor& x_t, const torch::Tensor& t,
                           const torch::Tensor& t_prev, torch::Tensor* x0) {
  diffusion::Denoised denoised;
  auto x_prev = diffusion::ddim_step(schedule, student_type, output, x_t, t, t_prev, &denoised);
  if (x0) *x0 = denoised.x0;
  return x_prev;
}

torch::Tensor discriminator_loss(const torch::Tensor& real_logits,
                                 const torch::Tensor& fake_logits) {
  return torch::softplus(-real_logits).mean() + torch::softplus(fake_logits).mean();
}

torch::Tensor generator_loss(const torch::Tensor& fake_logits) {
  return torch::softplus(-fake_logits).mean();
}

torch::Tensor sample_timesteps(const std::vector<int64_t>& choices,
                               const std::vector<double>& weights, int64_t batch,
                               at::Generator generator) {
  if (choices.empty() || choices.size() != weights.size())
    fail("re-noising timesteps: {} choices but {} weights", choices.size(), weights.size());
  auto w = torch::tensor(weights, torch::kFloat64);
  if ((w < 0).any().item<bool>() || !(w.sum().item<double>() > 0))
    fail("re-noising timesteps: weights must be >= 0 with a positive sum");
  auto index = torch::multinomial(w, batch, /*replacement=*/true, generator);
  return torch::tensor(choices, torch::kInt64).index_select(0, index);
}

}  // namespace lightning::distill
