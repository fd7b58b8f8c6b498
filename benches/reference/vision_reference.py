"""PyTorch reference for `dsvl-bench vision`: the DeepSeek-VL-7B hybrid vision tower at its real
dimensions with random weights, from the `transformers` implementation (`deepseek_vl_hybrid`).

It times exactly the work dsvl's encoder does for a batch of [B, 3, 1024, 1024] pixels in [0, 1]:
the antialiased bilinear resize to 384 for the SigLIP branch, per-branch normalisation, SAM-B with
its neck, HD path and downsamples, SigLIP-L, and the aligner, in float32, eager, under
`torch.inference_mode()` (on a GPU, `--device cuda:N --dtype bf16`: the same model in bfloat16,
each shape warmed up once, timings synchronised with the device). Preprocessing is timed with the reference pipeline's libraries
(PIL open/convert, torchvision-style Pillow bicubic resize, expand2square, numpy rescale).

Runs as a server (`--serve`): one JSON command per line on stdin, one JSON reply per line on
stdout, so `dsvl-bench vision` can alternate rounds between dsvl and this reference. See
benches/README.md.
"""
import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DeepseekVLHybridConfig, SamVisionConfig, SiglipVisionConfig
from transformers import SamVisionModel, SiglipVisionModel
from transformers.models.deepseek_vl_hybrid.modeling_deepseek_vl_hybrid import (
    DeepseekVLHybridAligner,
    DeepseekVLSamVisionNeck,
    DeepseekVLSamVisionProj,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class HybridTower(torch.nn.Module):
    """SAM-B (1024) + SigLIP-L (384) + aligner, as DeepSeek-VL-7B runs them."""

    def __init__(self):
        super().__init__()
        sam = SamVisionConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, output_channels=256,
                              window_size=14, global_attn_indexes=[2, 5, 8, 11], image_size=1024, patch_size=16)
        siglip = SiglipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                    num_attention_heads=16, image_size=384, patch_size=16, hidden_act="gelu",
                                    vision_use_head=False)
        cfg = DeepseekVLHybridConfig(vision_config=siglip.to_dict(), high_res_vision_config=sam.to_dict(),
                                     text_config={"model_type": "llama", "hidden_size": 4096})
        self.sam = SamVisionModel(sam)
        self.neck_hd = DeepseekVLSamVisionNeck(sam)
        self.proj = DeepseekVLSamVisionProj(sam, output_size=24)
        self.alpha = torch.nn.Parameter(torch.full((1,), 0.5))
        self.siglip = SiglipVisionModel(siglip)
        self.aligner = DeepseekVLHybridAligner(cfg)
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, images):
        # Antialiased resize in float32 (PyTorch has no bfloat16 kernel for it on the CPU).
        low = F.interpolate(images.float(), size=(384, 384), mode="bilinear", align_corners=False,
                            antialias=True).to(images.dtype)
        high = (images - self.clip_mean) / self.clip_std
        low = (low - 0.5) / 0.5
        out = self.sam(pixel_values=high, output_hidden_states=True)
        main = self.proj(out.last_hidden_state)
        hd = self.proj(self.neck_hd(out.hidden_states[2 + 1]))
        sam_tokens = (main + hd * self.alpha).flatten(2).transpose(1, 2)
        siglip_tokens = self.siglip(pixel_values=low).last_hidden_state
        return self.aligner(siglip_tokens, sam_tokens)


def reference_preprocess(path, size=1024, min_size=14):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    m = max(w, h)
    nh, nw = max(int(h / m * size), min_size), max(int(w / m * size), min_size)
    img = img.resize((nw, nh), Image.BICUBIC)  # what torchvision's resize calls on a PIL image
    bg = tuple(int(x * 255) for x in CLIP_MEAN)
    if nw != nh:
        canvas = Image.new("RGB", (max(nw, nh),) * 2, bg)
        canvas.paste(img, (0, (nw - nh) // 2) if nw > nh else ((nh - nw) // 2, 0))
        img = canvas
    x = np.asarray(img).transpose(2, 0, 1)
    return (x.astype(np.float64) * (1 / 255)).astype(np.float32)


def serve(args):
    """One JSON command per line on stdin, one JSON reply per line on stdout."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = HybridTower().eval().to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pixels = lambda b: torch.rand(b, 3, 1024, 1024, device=device, dtype=dtype)
    with torch.inference_mode():
        model(pixels(1))  # warm-up
    warmed = {1}
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "dtype": str(dtype), "device": str(device),
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}),
          flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "preprocess":
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < cmd["seconds"]:
                reference_preprocess(args.images[n % len(args.images)])
                n += 1
            reply = {"images_per_s": n / (time.perf_counter() - t0)}
        elif cmd["op"] == "encode":
            x = pixels(cmd["batch"])
            with torch.inference_mode():
                if device.type == "cuda" and cmd["batch"] not in warmed:
                    model(x)  # kernel selection and the allocator's pools, per shape
                    warmed.add(cmd["batch"])
                sync()
                t = time.perf_counter()
                out = model(x)
                sync()
                dt = time.perf_counter() - t
            assert out.shape == (cmd["batch"], 576, 4096), out.shape
            reply = {"images_per_s": cmd["batch"] / dt}
        else:
            reply = {"error": f"unknown op {cmd['op']}"}
        print(json.dumps(reply), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--images", nargs="+", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    serve(ap.parse_args())


if __name__ == "__main__":
    main()
