#!/usr/bin/env python3
"""PyTorch / transformers reference for `pipeline model bench` (same shapes, same steps).

Builds LlavaForConditionalGeneration from a model directory (config.json, plus weights when
present; random init otherwise), then times, as medians over --steps runs after one warm-up:
forward (no grad), a LoRA step (PEFT, rank r on every language-model projection; masked CE on
the text positions; backward; AdamW), a full step (language model + projector trainable,
vision frozen, as LLaVA-1.5), and greedy `generate` at batch 1 and 16 (new tokens/s,
prefill included). With --rust-json it prints a side-by-side table against the candle report.

Degrades gracefully: without torch/transformers it prints the candle numbers alone (exit 0);
without peft the LoRA step is reported as missing.
"""
import argparse
import json
import os
import statistics
import sys
import time

LORA_TARGETS = r".*\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "stages", "tests", "fixtures", "llava-tiny")


CPU = {}  # metric -> median process CPU ms, filled by timed()


def timed(steps, fn, key=None):
    """Median wall ms over `steps` runs after a warm-up; the CPU-time median goes to CPU[key]."""
    fn()
    ts, cs = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
        cs.append((time.process_time() - c) * 1e3)
    if key:
        CPU[key] = statistics.median(cs)
    return statistics.median(ts)


def torch_bench(a):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    def load():
        if os.path.exists(os.path.join(a.model, "model.safetensors")) or os.path.exists(os.path.join(a.model, "model.safetensors.index.json")):
            m = LlavaForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
        else:
            cfg = LlavaConfig.from_pretrained(a.model)
            cfg._attn_implementation = a.attn
            m = LlavaForConditionalGeneration(cfg).float()
        return m

    model = load().eval()
    cfg = model.config
    side, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    n_img = (side // patch) ** 2 + (1 if cfg.vision_feature_select_strategy == "full" else 0)
    img, vocab = cfg.image_token_id, cfg.text_config.vocab_size
    pad = cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 0
    g = torch.Generator().manual_seed(1)

    def batch(b):
        text = torch.randint(3, vocab, (b, a.text_len), generator=g)
        text[(text == img) | (text == pad)] = 3
        ids = torch.cat([torch.full((b, n_img), img), text], 1)
        px = torch.rand((b, 3, side, side), generator=g) * 2 - 1
        labels = ids.clone()
        labels[:, :n_img] = -100
        return ids, px, labels

    ids, px, labels = batch(a.batch)
    out = {"batch": a.batch, "image_tokens": n_img, "text_len": a.text_len, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "attn": a.attn}
    want = lambda key: a.only is None or a.only == key
    if want("forward_ms"):
        with torch.no_grad():
            out["forward_ms"] = timed(a.steps, lambda: model(input_ids=ids, pixel_values=px), "forward_ms")

    def gen_tok_s(b):
        gi, gp, _ = batch(b)
        mask = torch.ones_like(gi)
        def run():
            with torch.no_grad():
                model.generate(input_ids=gi, pixel_values=gp, attention_mask=mask, max_new_tokens=a.new_tokens,
                               min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=pad)
        key = f"generate_tok_s_b{b}"
        wall = timed(max(1, min(a.steps, 3)), run, key)
        CPU[key] = b * a.new_tokens / (CPU[key] / 1e3)
        return b * a.new_tokens / (wall / 1e3)

    for b in (1, 16):
        if want(f"generate_tok_s_b{b}"):
            out[f"generate_tok_s_b{b}"] = gen_tok_s(b)

    def step_fn(m, params):
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        def step():
            opt.zero_grad(set_to_none=True)
            loss = m(input_ids=ids, pixel_values=px, labels=labels).loss
            loss.backward()
            opt.step()
        return step

    if want("lora_step_ms"):
        try:
            from peft import LoraConfig, get_peft_model
            lm = get_peft_model(load(), LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS))
            lm.train()
            out["lora_step_ms"] = timed(a.steps, step_fn(lm, [p for p in lm.parameters() if p.requires_grad]), "lora_step_ms")
            del lm
        except ImportError:
            out["lora_step_ms"] = None
            print("peft not installed: LoRA step skipped", file=sys.stderr)

    if want("full_step_ms"):
        full = load().train()
        for n, p in full.named_parameters():
            p.requires_grad = "vision_tower" not in n
        out["full_step_ms"] = timed(a.steps, step_fn(full, [p for p in full.parameters() if p.requires_grad]), "full_step_ms")
    out["cpu"] = dict(CPU)
    return out


def table(rust, torch_, title="wall clock"):
    rows = [("forward_ms", "ms", False), ("lora_step_ms", "ms", False), ("full_step_ms", "ms", False),
            ("generate_tok_s_b1", "tok/s", True), ("generate_tok_s_b16", "tok/s", True)]
    lines = [f"| metric ({title}) | candle | torch | candle advantage |", "|---|---|---|---|"]
    for key, unit, higher_better in rows:
        r = rust.get(key) if rust else None
        t = torch_.get(key) if torch_ else None
        fmt = lambda v: "-" if v is None else f"{v:.1f} {unit}"
        adv = "-"
        if r and t:
            adv = f"{(r / t if higher_better else t / r):.2f}x"
        lines.append(f"| {key} | {fmt(r)} | {fmt(t)} | {adv} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=FIXTURE, help="model dir with config.json (weights optional)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", "1")))
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--rust-json", help="the JSON report of `pipeline model bench` / `cargo bench --bench model`")
    p.add_argument("--json-out", help="write the torch numbers here as JSON")
    p.add_argument("--only", choices=["forward_ms", "lora_step_ms", "full_step_ms", "generate_tok_s_b1", "generate_tok_s_b16"],
                   help="time this measurement alone (for interleaving short runs with the candle bench's --only)")
    a = p.parse_args()
    rust = None
    if a.rust_json:
        with open(a.rust_json) as f:
            rust = json.load(f)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"torch/transformers not available ({e}); showing candle numbers only", file=sys.stderr)
        print(table(rust, None))
        return 0
    res = torch_bench(a)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"shapes: batch {a.batch} x ({res['image_tokens']} image + {a.text_len} text), lora r={a.lora_rank}, "
          f"{a.new_tokens} new tokens, threads torch={res['threads']} candle={rust.get('threads') if rust else '-'}, "
          f"torch {res['torch']} attn={a.attn}")
    print(table(rust, res))
    print()
    print(table(rust.get("cpu") if rust else None, res.get("cpu"), "process CPU time"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
