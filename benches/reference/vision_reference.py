"""PyTorch reference for `dsvl-bench vision`: the DeepSeek-VL-7B hybrid vision tower at its real
dimensions with random weights, from the `transformers` implementation (`deepseek_vl_hybrid`).

It times exactly the work dsvl's encoder does for a batch of [B, 3, 1024, 1024] pixels in [0, 1]:
the antialiased bilinear resize to 384 for the SigLIP branch, per-branch normalisation, SAM-B with
its neck, HD path and downsamples, SigLIP-L, and the aligner, in float32, eager, under
`torch.inference_mode()`. Preprocessing is timed with the reference pipeline's libraries
(PIL open/convert, torchvision-style Pillow bicubic resize, expand2square, numpy rescale).

Prints one JSON object on stdout. Run by `dsvl-bench vision`; see benches/README.md.
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
        low = F.interpolate(images, size=(384, 384), mode="bilinear", align_corners=False, antialias=True)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--images", nargs="+", required=True)
    ap.add_argument("--preprocess-seconds", type=float, default=3.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.preprocess_seconds:
        reference_preprocess(args.images[n % len(args.images)])
        n += 1
    result["preprocess_images_per_s"] = n / (time.perf_counter() - t0)

    model = HybridTower().eval()
    result["encode"] = {}
    with torch.inference_mode():
        model(torch.rand(1, 3, 1024, 1024))  # warm-up
        for b in [int(x) for x in args.batches.split(",")]:
            x = torch.rand(b, 3, 1024, 1024)
            t = time.perf_counter()
            for _ in range(args.iters):
                out = model(x)
            dt = time.perf_counter() - t
            assert out.shape == (b, 576, 4096), out.shape
            result["encode"][str(b)] = b * args.iters / dt
            print(f"reference batch {b}: {b * args.iters / dt:.4f} images/s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
