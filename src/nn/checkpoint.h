// Gradient checkpointing (activation recomputation), as torch.utils.checkpoint's reentrant
// variant: the forward pass of a block runs without recording a graph and keeps only its
// inputs; the backward pass runs the block again with gradients on and back-propagates through
// that. Training memory for activations falls to the blocks' inputs and one block's internals,
// for about one more forward pass of compute.
#pragma once

#include <functional>
#include <vector>

#include <torch/types.h>

namespace lightning::nn {

using CheckpointedFn = std::function<std::vector<torch::Tensor>(const std::vector<torch::Tensor>&)>;

// fn(inputs), with fn's intermediate activations recomputed in the backward pass instead of
// stored. fn must be deterministic (no dropout; the project's UNets train with dropout 0) and
// depend on nothing but `inputs` and module parameters. Gradients reach the parameters fn uses
// even when no input requires grad (a frozen conv_in before LoRA-trained blocks). Undefined
// inputs are passed through as undefined. With grad mode off this is fn(inputs).
std::vector<torch::Tensor> checkpoint(const CheckpointedFn& fn,
                                      const std::vector<torch::Tensor>& inputs);

}  // namespace lightning::nn
