"""Loading tokenizers and causal LMs from a Hub id or a local folder, with clear errors offline."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medqa.config import Config
from medqa.errors import ModelError

log = logging.getLogger(__name__)


def model_path(cfg: Config) -> str:
    return cfg.resolve(cfg.model.name_or_path)


def tokenizer_path(cfg: Config) -> str:
    return cfg.resolve(cfg.model.tokenizer_path)


def wants_tiny(cfg: Config) -> bool:
    """True when the configured model is the tiny one, and it has not been built yet."""
    tiny = cfg.model.tiny
    path = model_path(cfg)
    return tiny.enabled and Path(path).resolve() == Path(cfg.resolve(tiny.path)).resolve() and not Path(path).exists()


def _load_error(kind: str, name: str, exc: Exception) -> ModelError:
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")) or Path(name).exists():
        return ModelError(
            f"Could not load the {kind} from folder {name}: {type(exc).__name__}: {str(exc)[:300]}. Check that "
            "it holds a saved transformers model (config.json and weights, or tokenizer files), or build the tiny "
            "demo model with `medqa make-tiny-model --config configs/demo.yaml`.")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    why = ("offline mode is on (HF_HUB_OFFLINE=1)" if offline
           else "the Hugging Face Hub could not be reached or has no such repository")
    return ModelError(
        f"Could not load the {kind} {name!r}: {why}, and it is not in the local cache "
        f"({type(exc).__name__}: {str(exc)[:200]}). To work offline, set model.name_or_path (and model.tokenizer) "
        "to a local folder saved with save_pretrained, or run the embedded demo with --config configs/demo.yaml, "
        "which builds a tiny BioGPT locally.")


def load_tokenizer(cfg: Config, path: str | None = None):
    """AutoTokenizer for the configured model, with `model_max_length` set and a pad token that is not EOS."""
    from transformers import AutoTokenizer

    name = path or tokenizer_path(cfg)
    if not Path(name).exists() and (name.startswith((".", "/", "~")) or "${" in cfg.model.tokenizer_path):
        raise ModelError(f"Tokenizer folder {name} not found. Build it (`medqa make-tiny-model --config ...` for "
                         "the demo) or set model.tokenizer / model.name_or_path to an existing folder or Hub id.")
    token = os.environ.get("HF_TOKEN")  # read from the environment, never from a config file
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.model.revision, token=token,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:
        raise _load_error("tokenizer", name, exc) from None
    # BioGPT leaves model_max_length unset (a huge sentinel); cap it at our sequence length.
    if tok.model_max_length is None or tok.model_max_length > 1_000_000:
        tok.model_max_length = cfg.data.max_length
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # Never pad with EOS: masking pads would then also hide the EOS the model must learn to emit.
        candidate = tok.unk_token if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id else None
        if candidate is not None:
            tok.pad_token = candidate
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
        log.info("Tokenizer %s had no separate pad token; using %r (id %d).", name, tok.pad_token, tok.pad_token_id)
    return tok
