#include "nn/resnet.h"

namespace lightning::nn {

ResnetBlock2DImpl::ResnetBlock2DImpl(const ResnetBlock2DOptions& options_) : options(options_) {
  reset();
}

void ResnetBlock2DImpl::reset() {
  const auto in = options.in_channels(), out = options.out_channels();
  norm1 = register_module("norm1", GroupNorm(options.groups(), in, options.eps()));
  conv1 = register_module("conv1", Conv2d(in, out, 3, 1, 1));
  if (options.temb_channels() > 0)
    time_emb_proj = register_module("time_emb_proj", Linear(options.temb_channels(), out));
  norm2 = register_module("norm2", GroupNorm(options.groups(), out, options.eps()));
  conv2 = register_module("conv2", Conv2d(out, out, 3, 1, 1));
  if (in != out) conv_shortcut = register_module("conv_shortcut", Conv2d(in, out, 1));
}

torch::Tensor ResnetBlock2DImpl::forward(const torch::Tensor& x, const torch::Tensor& temb) {
  auto h = conv1(torch::silu(norm1(x)));
  if (time_emb_proj && temb.defined()) {
    h = h + time_emb_proj(torch::silu(temb)).unsqueeze(-1).unsqueeze(-1);  // [B, out, 1, 1]
  }
  h = torch::silu(norm2(h));
  if (options.dropout() > 0) h = torch::dropout(h, options.dropout(), is_training());
  h = conv2(h);
  auto shortcut = conv_shortcut ? conv_shortcut(x) : x;
  auto y = shortcut + h;
  if (options.output_scale_factor() != 1.0) y = y / options.output_scale_factor();
  return y;
}

}  // namespace lightning::nn
