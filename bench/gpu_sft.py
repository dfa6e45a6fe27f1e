"""SFT throughput, MFU and peak memory on one GPU, plain and under DeepSpeed ZeRO-2/3, with
`llmtune plan`'s estimate beside the measured peak.

The model has Qwen2.5-0.5B's dimensions (24 layers, hidden 896, 14 heads / 2 KV heads, vocab
151,936, tied embeddings) with random weights built from the config, so nothing is downloaded; the
tokenizer is trained here on the synthetic rows. Each case runs `llmtune train` (full fine-tuning,
bf16 autocast on fp32 weights, or DeepSpeed's bf16 with fp32 master weights) as a user would:

    python bench/gpu_sft.py                       # plain, deepspeed_zero2, deepspeed_zero3; 30 steps, batch 8 x 1024
    python bench/gpu_sft.py --cases plain --steps 10
    python bench/gpu_sft.py --smoke               # tiny model on CPU, 3 steps: checks the script itself

The baseline beside llmtune is the same training through a plain TRL SFTTrainer (`plain_trl` case,
same model, data, batch and precision), so the ratio shows llmtune's overhead on a GPU.
MFU = 6 x parameters x tokens/s (+ attention: 12 x layers x hidden x seq_len x tokens/s) / peak bf16 FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM
QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
SMOKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


def build_model(out: Path, dims: dict, seq_len: int) -> int:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = [f"w{i}" for i in range(400)]
    corpus = [" ".join(words[j : j + 50]) for j in range(0, 400, 50)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = Qwen2Config(
        **dims, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)  # measure lengths with the tokenizer llmtune will load
    # Rows of about seq_len tokens: a prompt of a quarter, a completion of the rest.
    rng = __import__("random").Random(0)
    rows = []

    def rendered_length(prompt: str, completion: str) -> int:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    n_words = seq_len  # shrink until a row renders within seq_len tokens (about 4 tokens a word)
    probe = [rng.choice(words) for _ in range(seq_len)]
    while (
        n_words > 4 and rendered_length(" ".join(probe[: n_words // 4]), " ".join(probe[n_words // 4 : n_words])) > seq_len * 0.9
    ):
        n_words = int(n_words * 0.9)
    for _ in range(512):
        text = [rng.choice(words) for _ in range(n_words)]
        q = n_words // 4
        rows.append({"prompt": " ".join(text[:q]), "completion": " ".join(text[q:])})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sum(p.numel() for p in model.parameters())


def write_recipe(work: Path, model_dir: Path, args) -> Path:
    import yaml

    recipe = {
        "name": "gpu-sft-bench",
        "model": {"name": str(model_dir)},
        "data": {
            "sources": [{"path": str(model_dir / "train.jsonl"), "format": "prompt_completion"}],
            "max_length": args.seq_len,
        },
        "adapter": {"kind": "full"},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "learning_rate": 1e-5,
            "save_steps": 10**6,
            "logging_steps": 1,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_llmtune(recipe: Path, out: Path, config: str | None, device: str) -> dict:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launch = ["--accelerate-config", config, "--num-processes", "1"] if config else []
    plan = subprocess.run(
        [sys.executable, "-m", "llmtune.cli", "plan", str(recipe), "--json", "--device", device, *launch],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if plan.returncode:
        raise SystemExit(plan.stderr[-3000:])
    t0 = time.perf_counter()
    train = subprocess.run(
        [sys.executable, "-m", "llmtune.cli", "train", str(recipe), f"train.output_dir={out}", *launch],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if train.returncode:
        raise SystemExit(train.stdout[-2000:] + train.stderr[-4000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"plan": json.loads(plan.stdout), "rows": rows, "wall_s": time.perf_counter() - t0}


def run_plain_trl(model_dir: Path, out: Path, args, device: str) -> dict:
    """The baseline: TRL's SFTTrainer on the same rows, batch and precision, with nothing of llmtune."""
    code = f"""
import json, time, torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
bf16 = {device == "cuda"}
model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained({str(model_dir)!r})
data = load_dataset("json", data_files={str(model_dir / "train.jsonl")!r}, split="train")
class Log(TrainerCallback):
    t = None
    def on_step_end(self, a, state, c, **k):
        now = time.perf_counter()
        if self.t is not None:
            rows.append({{"step": state.global_step, "step_time_s": now - self.t, "tokens": state.num_input_tokens_seen}})
        self.t = now
rows = []
args = SFTConfig(output_dir={str(out)!r}, max_steps={args.steps}, per_device_train_batch_size={args.batch}, learning_rate=1e-5,
                 bf16=bf16, use_cpu=not bf16, max_length={args.seq_len}, save_strategy="no", report_to="none",
                 logging_steps=1, include_num_input_tokens_seen="non_padding",
                 activation_checkpointing={args.gradient_checkpointing})
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Log()])
trainer.train()
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print("RESULT " + json.dumps({{"rows": rows, "peak_gpu_mb": peak}}))
"""
    # Hub kernels off as llmtune has them (llmtune/__init__.py): with them on, an offline GPU fails the first step.
    env = os.environ | {"USE_HUB_KERNELS": "NO"}
    out_ = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    if out_.returncode:
        raise SystemExit(out_.stderr[-4000:])
    result = json.loads(next(l for l in out_.stdout.splitlines() if l.startswith("RESULT "))[7:])
    rows = result["rows"]
    speeds = [(b["tokens"] - a["tokens"]) / b["step_time_s"] for a, b in zip(rows, rows[1:])]
    return {
        "tokens_per_s": statistics.median(speeds[len(speeds) // 4 :]) if speeds else None,
        "peak_gpu_mb": result["peak_gpu_mb"],
    }


def summarise(result: dict, params: int, dims: dict, seq_len: int, peak_flops: float | None) -> dict:
    rows = result["rows"]
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    steady = speeds[len(speeds) // 4 :] or speeds  # drop the warm-up quarter
    tps = statistics.median(steady)
    flops_per_token = 6 * params + 12 * dims["num_hidden_layers"] * dims["hidden_size"] * seq_len
    peak_mb = max((r.get("peak_gpu_mb") or 0) for r in rows) or None
    return {
        "tokens_per_s": tps,
        "mfu": tps * flops_per_token / peak_flops if peak_flops else None,
        "peak_gpu_mb": peak_mb,
        "plan_peak_mb": result["plan"]["peak_bytes"] / 2**20,
        "plan_required_mb": result["plan"]["required_bytes"] / 2**20,
        "final_loss": rows[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="plain_trl,plain,deepspeed_zero2,deepspeed_zero3")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, 3 steps: check the script runs")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = SMOKE if args.smoke else QWEN25_05B
    if args.smoke:
        args.steps, args.batch, args.seq_len = 4, 2, 64
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    work = Path(tempfile.mkdtemp(prefix="llmtune-gpu-bench-"))
    params = build_model(work / "model", dims, args.seq_len)
    recipe = write_recipe(work, work / "model", args)
    print(
        f"{'smoke: tiny model' if args.smoke else 'Qwen2.5-0.5B dimensions'} ({params / 1e6:.0f}M parameters), full fine-tuning, "
        f"batch {args.batch} x {args.seq_len} tokens, {args.steps} steps, {gpu}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}\n"
    )
    print("| case | tokens/s | MFU | peak memory (measured) | `llmtune plan` peak | plan / measured | final loss |")
    print("|---|---|---|---|---|---|---|")
    baseline = None
    for case in args.cases.split(","):
        if case == "plain_trl":
            baseline = run_plain_trl(work / "model", work / "plain-trl", args, device)
            peak = baseline["peak_gpu_mb"]
            mfu = (
                baseline["tokens_per_s"]
                * (6 * params + 12 * dims["num_hidden_layers"] * dims["hidden_size"] * args.seq_len)
                / peak_flops
                if peak_flops and baseline["tokens_per_s"]
                else None
            )
            print(
                f"| plain TRL SFTTrainer (baseline) | {baseline['tokens_per_s'] or 0:,.0f} | {f'{mfu:.1%}' if mfu else '-'} | "
                f"{f'{peak:,.0f} MB' if peak else '-'} | - | - | - |",
                flush=True,
            )
            continue
        config = None if case == "plain" else case
        s = summarise(run_llmtune(recipe, work / f"run-{case}", config, device), params, dims, args.seq_len, peak_flops)
        ratio = (
            f" ({s['tokens_per_s'] / baseline['tokens_per_s']:.2f}x baseline)" if baseline and baseline["tokens_per_s"] else ""
        )
        measured = f"{s['peak_gpu_mb']:,.0f} MB" if s["peak_gpu_mb"] else "- (CPU)"
        vs = f"{s['plan_peak_mb'] / s['peak_gpu_mb']:.2f}" if s["peak_gpu_mb"] else "-"
        mfu = f"{s['mfu']:.1%}" if s["mfu"] else "-"
        print(
            f"| llmtune {case} | {s['tokens_per_s']:,.0f}{ratio} | {mfu} | {measured} | "
            f"{s['plan_peak_mb']:,.0f} MB | {vs} | {s['final_loss']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
