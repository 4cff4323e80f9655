#!/usr/bin/env python3
"""The peer baseline of `lightning bench --pipeline sdxl`: the same SDXL-shaped text-to-image run
with random weights, done by diffusers' UNet2DConditionModel, AutoencoderKL and
EulerDiscreteScheduler (trailing spacing, no CFG: SDXL-Lightning's settings) and transformers'
CLIP text models, on PyTorch. Timed the same way: median over repeats, synchronised, from token
ids to pixels on the host.

Needs torch and diffusers (--part unet-vae) or transformers (--part text); both parts in one
process where both import. Example (a GPU machine):
  python3 bench/diffusers_baseline.py --part unet-vae --device cuda --dtype f16 --steps 4
"""
import argparse
import contextlib
import statistics
import time

import torch

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def timed(fn, device, warmup, repeat):
    times = []
    for i in range(warmup + repeat):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def on(device):
    """Builds modules directly on `device` where PyTorch can (>= 2.0), else on the CPU."""
    return device if hasattr(device, "__enter__") else contextlib.nullcontext()


def text_part(args, device, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                  pad_token_id=1)
    with on(device):
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12,
                                           hidden_act="quick_gelu", projection_dim=768, **common))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, hidden_act="gelu", projection_dim=1280, **common))
    te1, te2 = te1.to(device, dtype).eval(), te2.to(device, dtype).eval()
    ids = torch.full((1, 77), 49407, dtype=torch.long, device=device)
    ids[0, :12] = torch.arange(49406 - 11, 49407)  # a start token and 11 words, then padding

    @torch.no_grad()
    def encode():
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids, output_hidden_states=True)
        return torch.cat([h1, out2.hidden_states[-2]], -1), out2.text_embeds

    print(f"| diffusers/transformers text encoders | {args.dtype} | "
          f"{timed(encode, device, args.warmup, args.repeat):.4f} |")


def unet_vae_part(args, device, dtype):
    import sys

    # diffusers 0.27 imports transformers whenever it is installed, which this part does not
    # need; hiding it lets diffusers run beside a transformers that wants another hub version.
    sys.modules.setdefault("transformers", None)
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    with on(device):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=[320, 640, 1280],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512],
                            down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
                            sample_size=1024, scaling_factor=0.13025,
                            force_upcast=not args.no_vae_upcast)
    unet = unet.to(device, dtype).eval()
    vae_dtype = torch.float32 if dtype == torch.float16 and vae.config.force_upcast else dtype
    vae = vae.to(device, vae_dtype).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear",
                                       timestep_spacing="trailing")
    size = args.image // 8
    context = torch.randn(1, 77, 2048, device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(1, 1280, device=device, dtype=dtype),
             "time_ids": torch.tensor([[args.image, args.image, 0, 0, args.image, args.image]],
                                      device=device, dtype=dtype)}
    step_times = []

    @torch.no_grad()
    def run():
        scheduler.set_timesteps(args.steps, device=device)
        x = torch.randn(1, 4, size, size, device=device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            start = time.perf_counter()
            inp = scheduler.scale_model_input(x, t).to(dtype)
            eps = unet(inp, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            x = scheduler.step(eps.float(), t, x).prev_sample
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - start)
        image = vae.decode((x / vae.config.scaling_factor).to(vae_dtype)).sample
        return image.float().cpu()

    total = timed(run, device, args.warmup, args.repeat)
    step = statistics.median(step_times[args.warmup * args.steps:])
    latent = torch.randn(1, 4, size, size, device=device, dtype=vae_dtype)
    decode = timed(lambda: vae.decode(latent).sample, device, args.warmup, args.repeat)
    label = f"{args.image}x{args.image} {args.steps} steps"
    print(f"| diffusers unet steps + vae decode {label} | {args.dtype} | {total:.4f} |")
    print(f"| diffusers unet step {label} | {args.dtype} | {step:.4f} |")
    print(f"| diffusers vae decode {label} (vae {str(vae_dtype)[6:]}) | {args.dtype} | "
          f"{decode:.4f} |")
    if device.type == "cuda":
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["unet-vae", "text", "all"], default="all")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f16")
    parser.add_argument("--image", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-vae-upcast", action="store_true",
                        help="run the VAE in f16 too (as an fp16-fix VAE does)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print("| what | dtype | seconds |\n|---|---|---|")
    if args.part in ("text", "all"):
        text_part(args, device, dtype)
    if args.part in ("unet-vae", "all"):
        unet_vae_part(args, device, dtype)


if __name__ == "__main__":
    main()
