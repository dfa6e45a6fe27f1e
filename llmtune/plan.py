"""`llmtune plan`: per-GPU memory of a recipe, estimated before anything is launched.

The model is built from its config on the meta device (accelerate's `init_empty_weights`: no weights
are read or allocated, nothing but the config is needed), the recipe's adapter is applied to it, and
the trainable and frozen parameters are counted. Memory per GPU then follows from the method,
precision, optimizer, launch (DDP, DeepSpeed ZeRO stage and offload, FSDP), process count and batch
shape, using the usual accounting (ZeRO paper, Rajbhandari et al. 2020; activation sizes after
Korthikanti et al. 2022, for pre-norm decoders with SwiGLU and fused attention). It is an estimate of
the peak memory torch allocates; the CUDA context and allocator slack come on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmtune.recipe import Recipe

GB = 1e9
CUDA_CONTEXT_BYTES = 0.6e9  # CUDA context + cuBLAS workspaces: outside torch's allocator, measured ~0.5-0.7 GB on H100s
ALLOCATOR_SLACK = 1.10  # the caching allocator's fragmentation over torch's peak allocation
TRL_LOGPROB_CHUNK = 32768  # TRL's fused LM head scores logits in chunks of this many rows (trl/trainer/utils.py)
# Optimizer state bytes per trainable parameter held in fp32 (Adam: two moments).
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "adamw_hf": 8,
    "adamw": 8,
    "adafactor": 0.1,
    "sgd": 0,
    "adamw_8bit": 2,
    "adamw_bnb_8bit": 2,
    "paged_adamw_8bit": 2,
    "lion_8bit": 1,
    "paged_lion_8bit": 1,
    "lion_32bit": 4,
    "paged_lion_32bit": 4,
    "paged_adamw_32bit": 8,
}


@dataclass
class LaunchShape:
    """The part of an accelerate config the estimate needs."""

    kind: str = "single"  # single | ddp | deepspeed | fsdp
    processes: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False

    def describe(self) -> str:
        if self.kind == "deepspeed":
            offload = [w for w, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_params)) if on]
            return f"DeepSpeed ZeRO-{self.zero_stage} x {self.processes}" + (
                f", {' and '.join(offload)} offloaded to CPU" if offload else ""
            )
        if self.kind == "fsdp":
            return f"FSDP (full shard) x {self.processes}" + (", parameters offloaded to CPU" if self.offload_params else "")
        return f"DDP x {self.processes}" if self.kind == "ddp" else "one process"


@dataclass
class MemoryPlan:
    model: str
    device: str
    precision: str
    method: str
    launch: LaunchShape
    batch: tuple[int, int, int]  # per-device batch, sequence length, accumulation
    total_params: int
    trainable_params: int
    gpu: dict[str, float] = field(default_factory=dict)  # bytes per GPU, by component
    cpu_offload: float = 0.0  # bytes in CPU RAM, all processes together (offloaded states)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        """Estimated peak of torch's allocations on one GPU (compare with torch.cuda.max_memory_allocated)."""
        return sum(self.gpu.values())

    @property
    def required_bytes(self) -> float:
        """What one GPU must have free: the peak, allocator slack, and the CUDA context."""
        return self.peak_bytes * ALLOCATOR_SLACK + (CUDA_CONTEXT_BYTES if self.device == "cuda" else 0)

    def fits(self, gpu_memory: float | None) -> bool | None:
        return None if not gpu_memory else self.required_bytes <= gpu_memory

    def as_dict(self, gpu_memory: float | None = None) -> dict:
        return {
            "model": self.model,
            "device": self.device,
            "precision": self.precision,
            "method": self.method,
            "launch": self.launch.describe(),
            "processes": self.launch.processes,
            "batch_size": self.batch[0],
            "seq_len": self.batch[1],
            "grad_accum": self.batch[2],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "per_gpu_bytes": {k: round(v) for k, v in self.gpu.items()},
            "peak_bytes": round(self.peak_bytes),
            "required_bytes": round(self.required_bytes),
            "cpu_offload_bytes": round(self.cpu_offload),
            "gpu_memory_bytes": round(gpu_memory) if gpu_memory else None,
            "fits": self.fits(gpu_memory),
            "notes": self.notes,
        }


def estimate_memory(recipe: Recipe, options=None, device: str | None = None) -> MemoryPlan:
    """Per-GPU memory for `recipe` launched as `options` (llmtune.launch.LaunchOptions) says."""
    import torch

    from llmtune.methods import method_of

    method = method_of(recipe)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    launch = launch_shape(options)
    model, config = _empty_model(recipe, method)
    counts = _count(model, recipe)
    compute_bytes = _dtype_bytes(_compute_dtype(recipe.model.dtype, device))
    whole = recipe.adapter.kind in ("full", "freeze") or method.MODEL == "sequence_classifier"
    b, s, accum = recipe.train.batch_size, recipe.data.max_length, recipe.train.grad_accum
    n = launch.processes
    plan = MemoryPlan(
        model=recipe.model.name,
        device=device,
        precision=_precision_text(recipe, device, whole, launch),
        method=f"{recipe.method.kind} / {recipe.adapter.kind}"
        + (f" on a {recipe.model.quantization} base" if recipe.model.quantization != "none" else ""),
        launch=launch,
        batch=(b, s, accum),
        total_params=counts["total"],
        trainable_params=counts["trainable"],
    )
    trainable, frozen, quantized = counts["trainable"], counts["frozen"], counts["quantized"]
    quant_bytes = {"4bit": 0.516, "8bit": 1.0, "none": compute_bytes}[recipe.model.quantization]  # nf4 + double-quantized scales
    adam = OPTIMIZER_STATE_BYTES.get(recipe.train.optimizer, 8)

    if launch.kind == "deepspeed":
        # DeepSpeed runs the module in 16 bits when mixed precision is on and keeps fp32 master weights
        # inside the optimizer (ZeRO paper: 2 + 2 + 12 bytes per trainable parameter).
        mixed = compute_bytes == 2
        weight_bytes = 2 if mixed else 4
        params = (trainable + frozen - quantized) * weight_bytes + quantized * quant_bytes
        grads = trainable * weight_bytes
        optimizer = trainable * (adam + (4 if mixed else 0))
        stage = launch.zero_stage
        optimizer /= n if stage >= 1 else 1
        grads /= n if stage >= 2 else 1
        if stage >= 3:
            params /= n
            plan.gpu["gathered layers (ZeRO-3)"] = counts["largest_block"] * 2 * weight_bytes + counts["embedding"] * weight_bytes
        else:
            # Reduce and all-gather buckets (DeepSpeed's defaults: 5e8 elements each, never more than the model).
            plan.gpu["communication buckets"] = 2 * min(trainable, 5e8) * weight_bytes
        if launch.offload_optimizer:
            plan.cpu_offload += optimizer * n
            optimizer = 0
        if launch.offload_params and stage >= 3:
            plan.cpu_offload += params * n
            params = 0
    else:
        # llmtune holds whatever trains in fp32 (whole models are loaded in fp32; PEFT keeps adapters in fp32).
        trainable_bytes = 4
        frozen_bytes = 4 if whole else compute_bytes
        params = trainable * trainable_bytes + (frozen - quantized) * frozen_bytes + quantized * quant_bytes
        grads = trainable * trainable_bytes
        optimizer = trainable * adam * trainable_bytes / 4
        if launch.kind == "fsdp":
            params, grads, optimizer = params / n, grads / n, optimizer / n
            plan.gpu["gathered layers (FSDP)"] = counts["largest_block"] * 2 * (compute_bytes + trainable_bytes)
            if launch.offload_params:
                plan.cpu_offload += (params + optimizer) * n
                params = optimizer = 0
        elif launch.kind == "ddp":
            plan.gpu["DDP gradient buckets"] = trainable * trainable_bytes  # DDP reduces through its own bucket copy
    plan.gpu = {"parameters": params, "gradients": grads, "optimizer states": optimizer, **plan.gpu}
    plan.gpu["activations"] = _activation_bytes(config, recipe, b, s, compute_bytes)
    # What the method adds: a second sequence per pair, the vocabulary's logits, a frozen reference, ...
    shape = MemoryShape(recipe, config, b, s, device, compute_bytes, counts["total"], counts["trainable"], whole)
    plan.gpu |= method.memory_terms(shape)
    if recipe.model.quantization != "none":
        plan.gpu["dequantized layer"] = counts["largest_linear"] * compute_bytes * 2
    plan.notes += [
        f"sequence length is data.max_length ({s}), the worst case; shorter rows need less activation memory",
        "the CUDA context (~0.6 GB) and allocator slack (~10%) come on top of the peak"
        if device == "cuda"
        else "on CPU the process also holds the Python and torch libraries (~0.5-1 GB RSS)",
    ]
    return plan


@dataclass
class MemoryShape:
    """What a method's `memory_terms` sees of the run it is planned for, with the plan's own formulas."""

    recipe: Recipe
    config: object  # the model's (text) config
    batch_size: int
    seq_len: int
    device: str
    compute_bytes: int
    total_params: int
    trainable_params: int
    whole: bool  # whole weights train (full, freeze, or a new head): held in fp32

    def activations(self, sequences: int) -> float:
        """Saved activations of `sequences` rows of seq_len tokens through every layer."""
        return _activation_bytes(self.config, self.recipe, sequences, self.seq_len, self.compute_bytes)

    def logits(self, sequences: int) -> float:
        """The language-model head's logits and loss for `sequences` rows."""
        return _logit_bytes(self.config, sequences, self.seq_len, self.device)

    def frozen_copy(self) -> float:
        """A frozen copy of the model (e.g. a reference) in the compute dtype."""
        return self.total_params * self.compute_bytes

    def kv_cache(self, sequences: int) -> float:
        """Keys and values of every layer while generating `sequences` rows of up to seq_len tokens."""
        c = self.config
        kv_dim = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * (
            getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        )
        return 2 * c.num_hidden_layers * sequences * self.seq_len * kv_dim * self.compute_bytes

    def other_model(self, path: str | None) -> float:
        """A second model held for inference (e.g. a reward model) in the compute dtype, counted from its
        config; the policy's own size when the folder does not exist yet (a later pipeline stage)."""
        if path and (Path(path) / "config.json").is_file():
            import torch
            from accelerate import init_empty_weights
            from transformers import AutoConfig, AutoModelForSequenceClassification

            with init_empty_weights():
                other = AutoModelForSequenceClassification.from_config(
                    AutoConfig.from_pretrained(path, num_labels=1), dtype=torch.float32
                )
            return sum(p.numel() for p in other.parameters()) * self.compute_bytes
        return self.total_params * self.compute_bytes


def launch_shape(options) -> LaunchShape:
    """Read the accelerate config (and --num-processes) the run will launch with."""
    if options is None or options.config is None:
        return LaunchShape()
    from llmtune.launch import read_accelerate_config

    config = read_accelerate_config(options.config)
    kind = {
        "NO": "single",
        "MULTI_GPU": "ddp",
        "MULTI_CPU": "ddp",
        "MULTI_XPU": "ddp",
        "MULTI_NPU": "ddp",
        "DEEPSPEED": "deepspeed",
        "FSDP": "fsdp",
    }.get(str(config.get("distributed_type", "NO")).upper(), "ddp")
    processes = options.num_processes or int(config.get("num_processes", 1) or 1)
    if kind == "single":
        return LaunchShape(processes=1)
    if kind == "deepspeed":
        ds = config.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            import json

            zero = json.loads(Path(ds["deepspeed_config_file"]).read_text()).get("zero_optimization", {})
            return LaunchShape(
                "deepspeed",
                processes,
                int(zero.get("stage", 0)),
                (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None),
                (zero.get("offload_param") or {}).get("device", "none") not in ("none", None),
            )
        return LaunchShape(
            "deepspeed",
            processes,
            int(ds.get("zero_stage", 2)),
            ds.get("offload_optimizer_device", "none") not in ("none", None),
            ds.get("offload_param_device", "none") not in ("none", None),
        )
    if kind == "fsdp":
        fsdp = config.get("fsdp_config") or {}
        return LaunchShape("fsdp", processes, offload_params=bool(fsdp.get("fsdp_offload_params", False)))
    return LaunchShape("ddp" if processes > 1 else "single", processes)


def visible_gpu_memory() -> float | None:
    """Total memory of the smallest visible GPU, or None without GPUs."""
    import torch

    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def warn_if_it_will_not_fit(recipe: Recipe, options) -> MemoryPlan | None:
    """Before a launch on GPUs: print a warning when the estimate exceeds the visible GPUs' memory."""
    gpu_memory = visible_gpu_memory()
    if gpu_memory is None:
        return None
    try:
        plan = estimate_memory(recipe, options, device="cuda")
    except Exception as exc:  # the estimate is advice; it must never stop a run
        print(f"[llmtune] note: no memory estimate ({type(exc).__name__}: {exc})")
        return None
    if not plan.fits(gpu_memory):
        import sys

        print(
            f"[llmtune] warning: this run needs about {plan.required_bytes / GB:.1f} GB per GPU under "
            f"{plan.launch.describe()}, but the visible GPUs have {gpu_memory / GB:.1f} GB; it will likely run out of "
            f"memory. See `llmtune plan {recipe.name}.yaml ...`; smaller train.batch_size or data.max_length, "
            "train.gradient_checkpointing: true, LoRA/QLoRA, or a DeepSpeed ZeRO-3 / FSDP config lower it.",
            file=sys.stderr,
            flush=True,
        )
    return plan


def format_plan(plan: MemoryPlan, gpu_memory: float | None) -> str:
    b, s, accum = plan.batch
    lines = [
        f"memory plan: {plan.model}, {plan.method}, {plan.precision}",
        f"  launch: {plan.launch.describe()}; device {plan.device}; per-device batch {b} x {s} tokens"
        f"{f' x {accum} accumulation' if accum > 1 else ''}",
        f"  parameters: {plan.trainable_params:,} trainable of {plan.total_params:,}",
        "",
        f"  {'per GPU' if plan.device == 'cuda' else 'per process (CPU)':31s}{'GB':>8s}",
    ]
    for name, value in plan.gpu.items():
        lines.append(f"  {name:31s}{value / GB:8.2f}")
    lines.append(f"  {'estimated peak (torch)':31s}{plan.peak_bytes / GB:8.2f}")
    if plan.device == "cuda":
        lines.append(f"  {'needs free (+context, slack)':31s}{plan.required_bytes / GB:8.2f}")
    if plan.cpu_offload:
        lines.append(f"  {'CPU RAM for offloaded states':31s}{plan.cpu_offload / GB:8.2f}  (all processes together)")
    if gpu_memory:
        verdict = "fits" if plan.fits(gpu_memory) else "DOES NOT FIT"
        lines.append(f"\n  {verdict} in {gpu_memory / GB:.1f} GB per GPU")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


# -- counting -----------------------------------------------------------------------------------


def _empty_model(recipe: Recipe, method):
    """The recipe's model with its adapter, on the meta device: structure and counts, no memory."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from llmtune.models.adapter import apply_adapter
    from llmtune.models.load import resolve_model_path

    path = resolve_model_path(recipe.model.name)
    config = AutoConfig.from_pretrained(path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    classifier = method.MODEL == "sequence_classifier"
    labels = method.head_labels(None) if classifier else None  # None: known only from the data
    if labels:
        config.num_labels = len(labels)
    cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with init_empty_weights():
        model = cls.from_config(config, dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code)
    # Tie outside the context: init_empty_weights re-registers the tied head as a second meta tensor.
    model.tie_weights()
    with init_empty_weights():
        model = apply_adapter(
            model,
            recipe.adapter,
            task="SEQ_CLS" if classifier else "CAUSAL_LM",
            tokenizer_path=path,
            gradient_checkpointing=False,
        )
    return model, getattr(config, "text_config", config)


def _count(model, recipe: Recipe) -> dict:
    from torch import nn

    from llmtune.models.adapter import count_parameters

    trainable, total = count_parameters(model)
    # bitsandbytes quantizes every nn.Linear but the output head; count those frozen weights.
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    quantized = 0
    if recipe.model.quantization != "none":
        quantized = sum(m.weight.numel() for m in linear if id(m.weight) not in head_ids and not m.weight.requires_grad)
    blocks = _blocks(model)
    return {
        "trainable": trainable,
        "total": total,
        "frozen": total - trainable,
        "quantized": quantized,
        "largest_block": max((sum(p.numel() for p in blk.parameters()) for blk in blocks), default=0),
        "largest_linear": max((m.weight.numel() for m in linear if id(m.weight) not in head_ids), default=0),
        "embedding": model.get_input_embeddings().weight.numel(),
    }


def _blocks(model) -> list:
    """The repeated transformer blocks (what ZeRO-3 and FSDP gather one at a time)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names |= set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def _activation_bytes(config, recipe: Recipe, b: int, s: int, c: int) -> float:
    """Saved activations of one micro-batch through every layer (the backward pass's peak).

    Per token and layer, a pre-norm decoder keeps ~10h + 3kv + 4i values: the two norms' inputs and
    outputs, q/k/v and their rotated copies, the attention output and o_proj input, and the MLP's
    gate, up, activation and product. Eager attention adds the score and probability matrices.
    With gradient checkpointing only each layer's input is kept, plus one layer recomputed.
    """
    h = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    kv_dim = kv * (getattr(config, "head_dim", None) or h // heads)
    inter = getattr(config, "intermediate_size", None) or 4 * h
    layers = config.num_hidden_layers
    per_token_layer = (10 * h + 3 * kv_dim + 4 * inter) * c
    if recipe.model.attn_implementation == "eager":
        per_token_layer += 2 * heads * s * c
    if recipe.adapter.kind == "lora" and recipe.adapter.dropout > 0:
        per_token_layer += 7 * h * c  # the dropped copy of each adapted projection's input
    tokens = b * s
    if recipe.train.gradient_checkpointing:
        return tokens * (layers * h * c + per_token_layer)
    return tokens * layers * per_token_layer + tokens * 2 * h * c  # + embeddings and the final norm


def _logit_bytes(config, b: int, s: int, device: str) -> float:
    """The language-model head's logits and cross-entropy at the loss.

    On GPUs TRL's fused LM head scores the vocabulary in chunks (fp32 chunk and its gradient); on the
    CPU llmtune uses the model's own loss, which materialises the full logits in fp32, their
    log-softmax and, in the backward pass, their gradient.
    """
    vocab = config.vocab_size
    tokens = b * s
    if device == "cuda":
        return min(tokens, TRL_LOGPROB_CHUNK) * vocab * 4 * 2
    return tokens * vocab * 4 * 3


def _compute_dtype(requested: str, device: str):
    import torch

    if requested == "auto":
        # Planning for GPUs from a CPU machine: assume bf16-capable GPUs (Ampere or newer).
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, requested)


def _dtype_bytes(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _precision_text(recipe: Recipe, device: str, whole: bool, launch: LaunchShape) -> str:
    dtype = str(_compute_dtype(recipe.model.dtype, device)).removeprefix("torch.")
    if dtype == "float32":
        return "fp32"
    if launch.kind == "deepspeed":
        return f"{dtype} weights, fp32 master weights in the optimizer"
    return f"{dtype} autocast, fp32 trainable weights" if whole else f"{dtype} base, fp32 adapters"
