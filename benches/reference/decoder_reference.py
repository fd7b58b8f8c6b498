"""PyTorch reference for `dsvl-bench decoder`: `transformers.LlamaForCausalLM` at the
DeepSeek-VL-1.3B language-model dimensions (24 layers, hidden 2048, 16 heads, FFN 5632, vocab
102400; other dimensions with `--config JSON`, which `dsvl-bench` fills from its own preset),
random weights, float32 (or bfloat16 with `--dtype bf16`), eager, `torch.inference_mode()`, KV
cache on. On the CPU attention is transformers' "eager"; on a GPU (`--device cuda:N`) it is
"sdpa" (PyTorch's fused attention, transformers' default there), and every timing synchronises
with the device.

Prefill: a forward over [batch, prompt_len] ids computing the last position's logits only
(`logits_to_keep=1`), like dsvl. Decode: after a prefill of the same context, `steps` forwards of
one token per sequence with the cache. Runs as a server (`--serve`): one JSON command per line.
"""
import argparse
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = dict(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384,
              rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default="{}", help="JSON: LlamaConfig fields replacing the defaults")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = LlamaConfig(**{**CONFIG, **json.loads(args.config)})
    cfg._attn_implementation = "eager" if device.type == "cpu" else "sdpa"
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    # Built in its dtype on its device: a 7B model initialised in f32 on the host takes minutes.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(default_dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "dtype": str(dtype), "device": str(device), "attention": cfg._attn_implementation,
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}),
          flush=True)
    warmed = set()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        b, t = cmd["batch"], cmd["prompt_len"]
        ids = torch.randint(0, min(100000, cfg.vocab_size), (b, t), device=device)
        with torch.inference_mode():
            if device.type == "cuda" and (b, t) not in warmed:
                # Kernel selection and the allocator's pools, per shape, before anything is timed
                # (dsvl-bench warms its side the same way).
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                warmed.add((b, t))
            if cmd["op"] == "prefill":
                sync()
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                sync()
                reply = {"tokens_per_s": b * t / (time.perf_counter() - t0)}
            elif cmd["op"] == "decode":
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                sync()
                t0 = time.perf_counter()
                for _ in range(cmd["steps"]):
                    out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    cache = out.past_key_values
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                sync()
                reply = {"tokens_per_s": b * cmd["steps"] / (time.perf_counter() - t0)}
            else:
                reply = {"error": f"unknown op {cmd['op']}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
