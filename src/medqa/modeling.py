"""Loading tokenizers and causal LMs from a Hub id or a local folder, with clear errors offline; the tokenizer's
identity; the one precision decision (`cuda_half_dtype`) and the dtypes that follow from it; the LoRA model and a
saved adapter on its base. Which layers LoRA targets is `medqa.lora_targets`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from medqa.artifacts import atomic_dir
from medqa.errors import ConfigError, ModelError
from medqa.faults import damaged
from medqa.lora_targets import lora_parameter_count, resolve_lora_targets
from medqa.manifest import check_inputs, fingerprint_model
from medqa.schema import Config

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def model_path(cfg: Config) -> str:
    return cfg.resolve(cfg.model.name_or_path)


def tokenizer_path(cfg: Config) -> str:
    return cfg.resolve(cfg.model.tokenizer_path)


def is_tiny_model(cfg: Config) -> bool:
    """True when the configured model is the tiny demo model (randomly initialised, built offline)."""
    tiny = cfg.model.tiny
    return bool(tiny.enabled) and Path(model_path(cfg)).resolve() == Path(cfg.resolve(tiny.path)).resolve()


def wants_tiny(cfg: Config) -> bool:
    """True when the configured model is the tiny one, and it has not been built yet."""
    return is_tiny_model(cfg) and not Path(model_path(cfg)).exists()


def _load_error(kind: str, name: str, exc: Exception) -> ModelError:
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")) or Path(name).exists():
        return ModelError(
            f"Could not load the {kind} from folder {name}: {type(exc).__name__}: {str(exc)[:300]}. Check that "
            "it holds a saved transformers model (config.json and weights, or tokenizer files), or build the tiny "
            "demo model with `medqa make-tiny-model --config configs/demo.yaml`."
        )
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    why = (
        "offline mode is on (HF_HUB_OFFLINE=1)"
        if offline
        else "the Hugging Face Hub could not be reached or has no such repository"
    )
    return ModelError(
        f"Could not load the {kind} {name!r}: {why}, and it is not in the local cache "
        f"({type(exc).__name__}: {str(exc)[:200]}). To work offline, set model.name_or_path (and model.tokenizer) "
        "to a local folder saved with save_pretrained, or run the embedded demo with --config configs/demo.yaml, "
        "which builds a tiny BioGPT locally."
    )


def gguf_source(cfg: Config) -> Path:
    """The configured GGUF file; `pkg://package/file` finds a file shipped inside an installed Python package."""
    spec = cfg.resolve(cfg.model.gguf_file)
    if spec.startswith("pkg://"):
        import importlib.util

        package, _, name = spec[len("pkg://") :].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                f"model.gguf_file={spec}: the Python package {package!r} is not installed. Install it "
                f"(`pip install {package.replace('_', '-')} gguf`, or `make real-demo`, which does) or "
                "give a path to a .gguf file."
            )
        path = Path(list(found.submodule_search_locations)[0]) / name
    else:
        path = Path(spec)
    if not path.is_file():
        raise ModelError(f"GGUF file {path} not found (model.gguf_file). Give the path of a .gguf checkpoint.")
    return path


def ensure_converted(cfg: Config) -> None:
    """With `model.gguf_file`, convert the GGUF checkpoint once into an ordinary transformers folder at
    `model.name_or_path`, so later stages and Ray trials load it in a fraction of a second instead of
    de-quantising again."""
    target = Path(model_path(cfg))
    if not cfg.model.gguf_file or target.exists():
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_source(cfg)
    log.info("Converting %s into %s (once).", source, target)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("Loading a GGUF checkpoint needs the `gguf` package: pip install gguf.") from None
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are already plain de-quantised tensors; only the GGUF quantizer marker blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _local_or_hub(cfg: Config, name: str, configured: str, missing: str) -> str:
    """`name`, a folder or a Hub id, once a GGUF checkpoint the config names is converted; a name that looks local
    (a path, or configured with ${workdir}) but is not there is refused with `missing` instead of being sent to the
    Hub."""
    ensure_converted(cfg)
    if not Path(name).exists() and (name.startswith((".", "/", "~")) or "${" in configured):
        raise ModelError(missing.format(name=name))
    return name


def load_tokenizer(cfg: Config, path: str | None = None):
    """AutoTokenizer for the configured model, with `model_max_length` set and a pad token that is not EOS."""
    from transformers import AutoTokenizer

    name = _local_or_hub(
        cfg,
        path or tokenizer_path(cfg),
        cfg.model.tokenizer_path,
        "Tokenizer folder {name} not found. Build it (`medqa make-tiny-model --config ...` for the demo) or set "
        "model.tokenizer / model.name_or_path to an existing folder or Hub id.",
    )
    token = os.environ.get("HF_TOKEN")  # read from the environment, never from a config file
    try:
        tok = AutoTokenizer.from_pretrained(
            name, revision=cfg.model.revision, token=token, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as exc:
        raise _load_error("tokenizer", name, exc) from None
    # BioGPT leaves model_max_length unset (a huge sentinel); cap it at our sequence length.
    if tok.model_max_length is None or tok.model_max_length > 1_000_000:
        tok.model_max_length = cfg.data.max_length
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # Prefer a pad token other than EOS, so a pad can never be mistaken for the EOS the model must learn.
        # Our batches mask padding by length (labels -100, attention 0), never by pad id, so where the vocabulary
        # has no other spare token EOS is safe; adding a new token would not fit the model's embedding.
        candidate = tok.unk_token if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id else None
        tok.pad_token = candidate if candidate is not None else tok.eos_token
        log.info("Tokenizer %s had no separate pad token; using %r (id %d).", name, tok.pad_token, tok.pad_token_id)
    return tok


# ------------------------------------------------------------------------------------------ tokenizer identity


def tokenizer_info(tokenizer) -> dict:
    """What must match between the tokenized data and the model's tokenizer."""
    import hashlib
    import json

    vocab = tokenizer.get_vocab()
    return {
        "name": str(tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_sha256": hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest(),
    }


# ------------------------------------------------------------------------------------------ model


def cuda_half_dtype():
    """The 16-bit dtype this CUDA GPU computes natively: bf16 on Ampere and newer, fp16 before (a T4, V100).

    The one place medqa decides precision: training's mixed precision, the scoring dtype and QLoRA's compute dtype
    all come from here. `is_bf16_supported()` alone also counts bf16 *emulation*, which a T4 offers at a fraction
    of its fp16 speed, so emulation is excluded."""
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def pick_device_dtype(cfg: Config):
    """auto: CUDA with bf16 where supported (Ampere+), fp16 on older GPUs such as a T4, fp32 on CPU/MPS. Every
    model that is scored (baseline, fine-tuned, best trial) is scored in this dtype."""
    import torch

    device = cfg.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    name = cfg.model.dtype
    if name == "auto":
        return torch.device(device), cuda_half_dtype() if device.startswith("cuda") else torch.float32
    return torch.device(device), getattr(torch, name)


def scoring_autocast(device, dtype):
    """A context that runs a model whose weights are not all in `dtype` (the training model: the base in the
    compute dtype, LoRA fp32) in the scoring dtype `dtype`, as in-training evaluation does. fp32 (CPU by default)
    or no dtype: nothing changes."""
    import contextlib

    import torch

    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def scoring_dtype(cfg: Config) -> str:
    """The dtype every metrics file records: the one models are scored in (`pick_device_dtype`)."""
    return str(pick_device_dtype(cfg)[1]).replace("torch.", "")


def allow_tf32() -> bool:
    """Let the fp32 matmuls that remain (the fp32 LoRA matrices' backward, fp32 scoring) use TF32 tensor cores on
    Ampere and newer (10-bit mantissa, ~8x the fp32 rate). Called by `load_model`, the one door every stage's model
    comes through; nothing changes on CPU or an older GPU. Returns whether it was enabled."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return False
    torch.set_float32_matmul_precision("high")
    return True


def load_model(cfg: Config, path: str | None = None, for_training: bool = False):
    """AutoModelForCausalLM on the chosen device and dtype, SDPA attention where the model supports it.
    Evaluation loads in the scoring dtype (`pick_device_dtype`); training loads the frozen base in
    `training_base_dtype` (the compute dtype on CUDA, fp32 elsewhere) and `build_lora_model` keeps LoRA in fp32."""
    from transformers import AutoModelForCausalLM

    name = _local_or_hub(
        cfg,
        path or model_path(cfg),
        cfg.model.name_or_path,
        "Model folder {name} not found. Run `medqa prepare --config configs/demo.yaml` (it builds the tiny demo "
        "model) or `medqa make-tiny-model`, or set model.name_or_path to an existing folder or a Hub id such as "
        "microsoft/biogpt.",
    )
    device, dtype = pick_device_dtype(cfg)
    if device.type == "cuda":
        allow_tf32()
    kwargs = dict(
        revision=cfg.model.revision,
        token=os.environ.get("HF_TOKEN"),
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=training_base_dtype(cfg, device) if for_training else dtype,
    )
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError) as exc:  # this architecture has no SDPA path
            log.info("SDPA attention unavailable for %s (%s); using eager attention.", name, exc)
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise _load_error("model", name, exc) from None
    return model.to(device)


# ------------------------------------------------------------------------------------------ LoRA


def precision(cfg: Config) -> dict:
    """Training's mixed precision ({"bf16": .., "fp16": ..} for TrainingArguments), from `cuda_half_dtype`."""
    import torch

    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = ("bf16" if cuda_half_dtype() == torch.bfloat16 else "fp16") if torch.cuda.is_available() else "no"
    if mp != "no" and not torch.cuda.is_available():
        raise ConfigError(f"train.mixed_precision={mp} needs a CUDA GPU; use auto or no on this machine.")
    return {"bf16": mp == "bf16", "fp16": mp == "fp16"}


def compute_dtype(cfg: Config):
    """The dtype attention runs in: the additive packing mask must match it."""
    import torch

    mixed = precision(cfg)
    return torch.bfloat16 if mixed["bf16"] else (torch.float16 if mixed["fp16"] else torch.float32)


def training_base_dtype(cfg: Config, device) -> torch.dtype:
    """The dtype the frozen base weights are held in while training.

    On CUDA the compute dtype (bf16, fp16 on a T4): autocast would otherwise cast every frozen weight again at
    every step (345M of them for BioGPT), and they take half the memory. The LoRA matrices stay fp32
    (`build_lora_model`): they are what the optimizer updates, and fp16 training's GradScaler can only unscale
    fp32 gradients. Elsewhere, and under FSDP (whose flattened shards want one dtype), fp32 as before."""
    import torch

    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if torch.device(device).type != "cuda" or fsdp:
        return torch.float32
    return compute_dtype(cfg)


def build_lora_model(cfg: Config):
    """The base model wrapped with peft LoRA (optionally 4-bit QLoRA on CUDA): the frozen base in
    `training_base_dtype`, the trainable LoRA matrices in fp32."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA's A matrices are initialised randomly
    if cfg.train.qlora:
        model = load_4bit(cfg)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    else:
        model = load_model(cfg, for_training=True)
    targets = resolve_lora_targets(model, cfg.lora.targets)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        use_rslora=cfg.lora.use_rslora,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable, total = count_parameters(model)
    log.info(
        "LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.3f%%)",
        cfg.lora.r,
        cfg.lora.alpha,
        targets,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), LoRA on {targets}")
    if not cfg.train.qlora:
        for p in model.parameters():
            if p.requires_grad:  # the LoRA matrices (peft upcasts them already; this makes it the rule here)
                p.data = p.data.float()
    return model


def load_4bit(cfg: Config):
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("train.qlora=true needs a CUDA GPU (bitsandbytes 4-bit); set train.qlora=false here.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("train.qlora=true needs bitsandbytes: pip install 'medqa[gpu]'.") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = cuda_half_dtype()
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True
    )
    return AutoModelForCausalLM.from_pretrained(
        model_path(cfg),
        quantization_config=quant,
        device_map={"": torch.cuda.current_device()},  # this rank's GPU
        trust_remote_code=cfg.model.trust_remote_code,
    )


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def lora_presets_table(model, r: int) -> list[dict]:
    """For each preset: its target layers and trainable parameters, counted by peft on a copy of the model and
    from the layer shapes; they must agree."""
    import copy

    from peft import LoraConfig, get_peft_model

    total = sum(p.numel() for p in model.parameters())
    rows = []
    for preset in ("qv", "attention", "all-linear"):
        targets = resolve_lora_targets(model, preset)
        peft_model = get_peft_model(
            copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM")
        )
        trainable, _ = count_parameters(peft_model)
        rows.append(
            {
                "preset": preset,
                "targets": ", ".join(targets),
                "trainable": trainable,
                "from_shapes": lora_parameter_count(model, targets, r),
                "percent": 100 * trainable / total,
            }
        )
        del peft_model
    return rows


def load_adapter_model(cfg: Config, adapter_dir: str | Path, expected: dict[str, str] | None = None):
    """The base model with a saved LoRA adapter on top (for scoring, generation and export). The adapter's
    manifest must name the same base model (and, when `expected` is given, the same data and prompt)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists() or not any(adapter_dir.glob("adapter_model.*")):
        raise ModelError(
            f"{adapter_dir} holds no LoRA adapter (adapter_config.json and adapter_model.safetensors). "
            "Run `medqa train --config <your config>` first, or point at the folder it wrote "
            "(outputs/finetune)."
        )
    check_inputs(
        cfg,
        adapter_dir,
        expected or {"base_model": fingerprint_model(model_path(cfg), cfg.model.revision)},
        "medqa train --config <your config>",
    )
    base = load_model(cfg)
    with damaged(adapter_dir, "the stage that wrote it: medqa train (outputs/finetune), medqa tune (outputs/best)"):
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model.to(next(base.parameters()).device).eval()
