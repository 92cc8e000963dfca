"""Support for real pretrained models: chat-template prompts, GGUF sources, Llama LoRA presets."""

from __future__ import annotations

import pytest
from conftest import demo_config

from medqa.errors import ConfigError, ModelError
from medqa.prompts import IGNORE_INDEX, encode_example, prompt_ids

CHAT = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture()
def chat_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHAT
    return tok


def test_chat_template_prompt_masks_only_the_prompt(chat_tokenizer, tmp_path):
    cfg = demo_config(tmp_path, "prompt.use_chat_template=true", "prompt.system=You are a doctor.")
    question, answer = "I have a dry cough since three days.", "Drink warm fluids and rest."
    enc = encode_example(chat_tokenizer, cfg.prompt, question, answer, 256)
    first = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert enc.input_ids[:first] == prompt_ids(chat_tokenizer, cfg.prompt, question)
    assert enc.labels[first:] == chat_tokenizer(answer, add_special_tokens=False)["input_ids"] + [2]
    text = chat_tokenizer.decode(enc.input_ids[:first])
    assert (
        text.index("system")
        < text.index("You are a doctor")
        < text.index("user")
        < text.index("dry cough")
        < text.index("assistant")
    )


def test_chat_template_required_when_asked(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    cfg = demo_config(tmp_path, "prompt.use_chat_template=true")
    with pytest.raises(ConfigError, match="has no chat template"):
        prompt_ids(AutoTokenizer.from_pretrained(tiny_model_dir), cfg.prompt, "a question")


def test_gguf_source_resolution(tmp_path):
    from medqa.modeling import ensure_converted, gguf_source

    cfg = demo_config(tmp_path, "model.gguf_file=pkg://json/__init__.py", f"model.name_or_path={tmp_path}/conv")
    assert gguf_source(cfg).name == "__init__.py" and gguf_source(cfg).is_file()
    cfg = demo_config(
        tmp_path, "model.gguf_file=pkg://no_such_package_xyz/model.gguf", f"model.name_or_path={tmp_path}/conv"
    )
    with pytest.raises(ModelError, match="pip install no-such-package-xyz gguf"):
        ensure_converted(cfg)
    cfg = demo_config(tmp_path, f"model.gguf_file={tmp_path}/missing.gguf", f"model.name_or_path={tmp_path}/conv")
    with pytest.raises(ModelError, match="not found"):
        ensure_converted(cfg)


def test_llama_presets_and_counts():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from medqa.lora_targets import lora_parameter_count, resolve_lora_targets
    from medqa.modeling import count_parameters

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    assert resolve_lora_targets(model, "qv") == ["q_proj", "v_proj"]
    assert resolve_lora_targets(model, "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    targets = resolve_lora_targets(model, "all-linear")
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # Grouped-query attention: k/v project to 2 heads x 8 = 16, not 32; the shape count follows the real layers.
    r, h, kv, f = 4, 32, 16, 48
    expected = 2 * r * ((h + h) * 2 + (h + kv) * 2 + (h + f) * 2 + (f + h))
    assert lora_parameter_count(model, targets, r) == expected
    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=targets, task_type="CAUSAL_LM"))
    assert count_parameters(peft_model)[0] == expected
