"""The formats other tools read and write: Hugging Face directories of GPT-2 and the Llama family
(Llama, Mistral, Qwen2, Qwen3). model.py's GPT.from_pretrained and save_pretrained delegate here.

Reading maps a family's config.json and tensor names onto GPTConfig and GPT's state dict (q, k, v
concatenated into c_attn, gate and up into c_fc; GPT-2's Conv1D weights transposed), refusing in one
sentence anything the GPT would compute differently. Writing maps back, so transformers'
AutoModelForCausalLM loads what the trainer exported, and LoRA factors become the adapter PEFT loads onto
the base model. Nothing is downloaded, nothing unpickled but tensors.
"""
import json
import math
import os
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from model import FAMILIES, GPT, GPTConfig, LoRALinear, family_config

# Hugging Face GPT-2 stores these as Conv1D weights, i.e. transposed relative to nn.Linear.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# The Llama family's tensors: ours (in transformer.h.<i>.) -> Hugging Face's (in model.layers.<i>.). Where
# several are listed they are concatenated along dim 0 into ours: q, k, v into c_attn; gate, up into c_fc.
LLAMA_LAYER_TENSORS = {
    "ln_1.weight": ["input_layernorm.weight"],
    "attn.c_attn.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.c_attn.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "attn.q_norm.weight": ["self_attn.q_norm.weight"],
    "attn.k_norm.weight": ["self_attn.k_norm.weight"],
    "attn.c_proj.weight": ["self_attn.o_proj.weight"],
    "ln_2.weight": ["post_attention_layernorm.weight"],
    "mlp.c_fc.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.c_proj.weight": ["mlp.down_proj.weight"],
}
LLAMA_TOP_TENSORS = {"transformer.wte.weight": "model.embed_tokens.weight",
                     "transformer.ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
# The weight files read_hf_weights looks for, in this order, and the endings of the shards an index names.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def load_pretrained(path, **overrides):
    """A GPT from a local Hugging Face directory of model_type gpt2, llama, mistral, qwen2 or qwen3 (never the
    network; nothing unpickled but tensors): config.json, and model.safetensors, its sharded form
    (model.safetensors.index.json) or pytorch_model.bin.

    Dropout is 0.0 unless overridden (e.g. dropout=0.1); overrides may also set attn_window and
    gradient_checkpointing. A sliding window in config.json becomes attn_window (the same mask); an
    attn_window override of 0 keeps it, a narrower one replaces it, a wider one is refused. The vocabulary
    size is the checkpoint's own (50257 for GPT-2)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory on disk: from_pretrained reads local Hugging Face "
                                "directories only and downloads nothing")
    config_file = path / "config.json"
    config = read_hf_config(config_file)
    window = sliding_window_override(config, overrides.pop("attn_window", 0), config_file)
    model = GPT(replace(config, attn_window=window, **overrides), init_weights=False)
    weights_file, tensors = read_hf_weights(path)
    load_hf_tensors(model, tensors, weights_file, config_file)
    return model

def sliding_window_override(config, window, file):
    """The attn_window a run asks for (0: the model's own) against the sliding window the model in file was
    trained with: it keeps or narrows that window, never widens it."""
    if config.attn_window and window > config.attn_window:
        raise ValueError(f"attn_window={window} is wider than the sliding window of {config.attn_window} "
                         f"in {file} that the model was trained with")
    return window or config.attn_window


@torch.no_grad()
def load_hf_tensors(model, tensors, weights_file, config_file):
    """Copy Hugging Face tensors into model, after checking that they are exactly the ones it needs."""
    cfg = model.config
    if cfg.model_type == "gpt2":  # original GPT-2 files have no 'transformer.' prefix
        tensors = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: t
                   for k, t in tensors.items()}
    ours = model.state_dict()
    names = hf_tensor_names(cfg, ours)
    embedding, head = names["transformer.wte.weight"][0], tensors.get("lm_head.weight")
    tied_differently = head is not None and embedding in tensors and not torch.equal(head, tensors[embedding])
    if cfg.tie_word_embeddings and tied_differently:
        raise ValueError(f"{weights_file}: lm_head.weight differs from {embedding}, but {config_file} says "
                         "tie_word_embeddings is true (one shared matrix)")
    wanted = {name for parts in names.values() for name in parts}
    for name in tensors:
        # lm_head.weight of a tied model is the embedding; attn.bias and rotary_emb.inv_freq are old buffers
        ignored = name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias", ".inv_freq"))
        if name not in wanted and not ignored:
            raise ValueError(f"{weights_file}: unexpected tensor {name!r}: not part of a {cfg.model_type} LM")
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ValueError(f"{weights_file}: missing tensors for the config in {config_file}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for key, parts in names.items():
        transposed = cfg.model_type == "gpt2" and key.endswith(HF_TRANSPOSED)
        for name, rows in zip(parts, hf_part_rows(cfg, key, ours[key].shape[0], len(parts))):
            want = (rows, *ours[key].shape[1:])
            want = want[::-1] if transposed else want  # in the file's layout
            if tuple(tensors[name].shape) != want:
                raise ValueError(f"{weights_file}: tensor {name!r} has shape {tuple(tensors[name].shape)} but "
                                 f"the config (from {config_file} and overrides) needs {want}")
        tensor = torch.cat([tensors[name] for name in parts])
        ours[key].copy_(tensor.t() if transposed else tensor)

@torch.no_grad()
def save_pretrained(model, path, token_ids=None):
    """Write config.json + model.safetensors of model's family (config.model_type), which
    transformers' AutoModelForCausalLM loads. token_ids (e.g. {"eos_token_id": 2}) go into config.json.

    LoRA deltas are merged into the written weights (the model itself is left as it is); GPT-2's missing
    biases (bias=False) are written as zeros. Each file goes to a temporary name first and is then
    renamed, so a crash never leaves a half-written file under the final name. attn_window is written as
    the sliding window of mistral, qwen2 and qwen3; gpt2 and llama cannot say it: pass it again to
    from_pretrained. A config the family's format cannot express is refused."""
    check_hf_expressible(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = exported_weights(model)
    tensors = {}
    for key, parts in hf_tensor_names(model.config, weights).items():
        t = weights[key].t() if model.config.model_type == "gpt2" and key.endswith(HF_TRANSPOSED) else weights[key]
        for name, piece in zip(parts, t.split(hf_part_rows(model.config, key, t.shape[0], len(parts)))):
            tensors[name] = piece.detach().contiguous().cpu()
    hf = {**hf_config(model.config), **(token_ids or {})}
    write_atomically(path / "model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    write_atomically(path / "config.json", lambda f: Path(f).write_text(json.dumps(hf, indent=2)))


def save_peft_adapter(model, path, base_name_or_path):
    """Write model's LoRA factors as the adapter that PEFT loads onto its base model (base_name_or_path, the
    model before LoRA, recorded in adapter_config.json): adapter_config.json and adapter_model.safetensors.

    Our y = x W^T + (s / r) x right left is PEFT's y = x W^T + (alpha / r) B(A(x)) with A = right^T,
    B = left^T and alpha = s. A fused module is written as the per-projection modules of its family's
    format: q, k, v of attn.c_attn and gate, up of mlp.c_fc each get the same A and their rows of B, so
    the adapter computes exactly what the model does. GPT-2's Conv1D modules keep PEFT's own flag for
    them (fan_in_fan_out), which changes how PEFT merges, not the factors. Returns path."""
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not wrapped:
        raise ValueError("the model has no LoRA modules, so there is no PEFT adapter to write")
    ranks = {(m.lora_right_weight.shape[1], m.lora_scaling) for m in wrapped.values()}
    if len(ranks) > 1:
        raise ValueError(f"LoRA modules of different ranks or scalings {sorted(ranks)} are not one PEFT adapter")
    (rank, scaling), = ranks  # scaling is s / r
    tensors = {}
    for name, m in wrapped.items():
        (parts,) = hf_tensor_names(model.config, [name + ".weight"]).values()
        rows = hf_part_rows(model.config, name + ".weight", m.weight.shape[0], len(parts))
        for part, b in zip(parts, m.lora_left_weight.t().split(rows)):
            module = "base_model.model." + part.removesuffix(".weight")
            tensors[module + ".lora_A.weight"] = m.lora_right_weight.t().detach().contiguous().cpu()
            tensors[module + ".lora_B.weight"] = b.detach().contiguous().cpu()
    targets = sorted(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                     for key in tensors if key.endswith(".lora_A.weight"))
    adapter = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base_name_or_path),
                   r=rank, lora_alpha=scaling * rank, lora_dropout=next(iter(wrapped.values())).lora_dropout.p,
                   target_modules=targets, fan_in_fan_out=model.config.model_type == "gpt2", bias="none",
                   use_rslora=False, use_dora=False, modules_to_save=None, inference_mode=True)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_atomically(path / "adapter_model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    write_atomically(path / "adapter_config.json", lambda f: Path(f).write_text(json.dumps(adapter, indent=2)))
    return path


def exported_weights(model):
    """model's state dict as the formats other tools read hold it: LoRA deltas merged into their weights (the
    model itself is left as it is), no LoRA factors, and GPT-2's missing biases (bias=False) as zeros."""
    weights = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and not m.merged:
            weights[name + ".weight"] = m.weight + m.delta_weight()
        gpt2_linear_or_norm = isinstance(m, (nn.Linear, nn.LayerNorm, LoRALinear)) and name != "lm_head"
        if model.config.model_type == "gpt2" and not model.config.bias and gpt2_linear_or_norm:
            weights[name + ".bias"] = m.weight.new_zeros(m.weight.shape[0])
    return {key: t for key, t in weights.items() if "lora_" not in key}


def check_hf_expressible(model):
    """Refuse to export a config that its family's config.json would read back as another model."""
    ours = model.config  # sizes resolved by GPTConfig on both sides: a 0 written anywhere compares as the size
    back = gpt_config_from_hf(hf_config(ours), "the exported config.json")
    not_in_format = {"dropout", "attn_window", "gradient_checkpointing"}  # the run's choices (see docstrings)
    if ours.model_type == "gpt2":
        not_in_format.add("bias")  # written as zeros
    for field in fields(ours):
        mine, theirs = getattr(ours, field.name), getattr(back, field.name)
        if field.name not in not_in_format and mine != theirs:
            raise ValueError(f"{field.name}={mine!r} cannot be written as a Hugging Face {ours.model_type} model "
                             f"(its config.json would load as {field.name}={theirs!r})")

def hf_config(cfg):
    """A GPTConfig in Hugging Face terms for its family (config.json)."""
    if cfg.model_type == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                    n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                    n_inner=None, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                    resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                    initializer_range=0.02, tie_word_embeddings=True,
                    # GPT-2's end-of-text is 50256; for a small vocabulary (the byte tokenizer) it is the last id
                    bos_token_id=min(50256, cfg.vocab_size - 1), eos_token_id=min(50256, cfg.vocab_size - 1))
    hf = dict(architectures=[HF_ARCHITECTURES[cfg.model_type]], model_type=cfg.model_type,
              vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
              head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.block_size,
              rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=None,
              tie_word_embeddings=cfg.tie_word_embeddings, attention_dropout=cfg.dropout, initializer_range=0.02)
    if cfg.rope_scaling == "llama3":
        hf["rope_scaling"] = dict(rope_type="llama3", factor=cfg.rope_factor,
                                  low_freq_factor=cfg.rope_low_freq_factor,
                                  high_freq_factor=cfg.rope_high_freq_factor,
                                  original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
    if cfg.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if cfg.model_type == "llama":
        hf["mlp_bias"] = False
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.attn_window or None
    if cfg.model_type in ("qwen2", "qwen3"):
        kind = "sliding_attention" if cfg.attn_window else "full_attention"
        hf.update(use_sliding_window=bool(cfg.attn_window), sliding_window=cfg.attn_window or None,
                  max_window_layers=0 if cfg.attn_window else cfg.n_layer, layer_types=[kind] * cfg.n_layer)
    return hf


def hf_tensor_names(config, keys):
    """{our state_dict key: the Hugging Face tensors it is made of, in order} for config's family (GPT-2's
    names are ours). A tied head is left out: Hugging Face ties it to the embedding as we do."""
    names = {}
    for key in keys:
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if config.model_type == "gpt2":
            names[key] = [key]
        elif key.startswith("transformer.h."):
            layer, rest = key.removeprefix("transformer.h.").split(".", 1)
            names[key] = [f"model.layers.{layer}.{name}" for name in LLAMA_LAYER_TENSORS[rest]]
        else:
            names[key] = [LLAMA_TOP_TENSORS[key]]
    return names


def hf_part_rows(config, key, rows, n_parts):
    """How many of our tensor's rows each of its n_parts Hugging Face tensors holds: q, k, v for c_attn."""
    if n_parts == 1:
        return [rows]
    if ".c_attn." in key:
        return [config.n_head * config.head_dim] + [config.n_kv_head * config.head_dim] * 2
    return [rows // n_parts] * n_parts


def read_hf_config(file):
    """The GPTConfig of a Hugging Face config.json; refuses anything this GPT would compute differently."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: from_pretrained expects a local Hugging Face directory "
                                "(config.json plus model.safetensors or pytorch_model.bin)")
    try:
        hf = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{file} must hold a JSON object (a model config), got a {type(hf).__name__}")
    return gpt_config_from_hf(hf, file)


def gpt_config_from_hf(hf, file):
    """GPTConfig from a Hugging Face config dict (read from file, named in errors)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{file}: model_type is {model_type!r}, but only {', '.join(map(repr, FAMILIES))} are "
                         "supported")
    return gpt2_config_from_hf(hf, file) if model_type == "gpt2" else llama_family_config_from_hf(hf, file)


def gpt2_config_from_hf(hf, file):
    if not set(architectures(hf, file)) <= {"GPT2LMHeadModel", "GPT2Model"}:
        raise ValueError(f"{file}: architectures is {hf['architectures']}; expected GPT2LMHeadModel")
    n_embd = hf_field(hf, "n_embd", "count", 768, file)
    supported = {"activation_function": ("gelu_new", ["gelu_new", "gelu_pytorch_tanh"]),
                 "n_inner": (None, [None, 4 * n_embd]),
                 "scale_attn_weights": (True, [True]), "scale_attn_by_inverse_layer_idx": (False, [False]),
                 "tie_word_embeddings": (True, [True])}
    for field, (default, allowed) in supported.items():
        if hf.get(field, default) not in allowed:
            raise ValueError(f"{file}: {field}={hf[field]!r} is not supported (this GPT-2 needs one of {allowed})")
    return GPTConfig(block_size=hf_field(hf, "n_positions", "count", 1024, file),
                     vocab_size=hf_field(hf, "vocab_size", "count", 50257, file),
                     n_layer=hf_field(hf, "n_layer", "count", 12, file), n_head=hf_field(hf, "n_head", "count", 12, file),
                     n_embd=n_embd, dropout=0.0, norm_eps=hf_field(hf, "layer_norm_epsilon", "number", 1e-5, file))


# What each kind of config.json field must hold, as (test, the words that say it in an error).
FIELD_KINDS = {"count": (lambda v: type(v) is int and v > 0, "a positive integer"),
               "size": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
               "number": (lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0, "a positive number"),
               "flag": (lambda v: type(v) is bool, "true or false")}


def hf_field(hf, name, kind, default, file, where="", nullable=False):
    """config.json's field `name` (default when absent, or null where nullable), checked to be of `kind` (see
    FIELD_KINDS): a string or a null where a number belongs would otherwise surface as a TypeError deep inside
    the model. where names the object it is in, when not config.json's top level (rope_scaling's, say)."""
    value = hf.get(name)
    if name not in hf or value is None and nullable:
        return default
    valid, meaning = FIELD_KINDS[kind]
    if not valid(value):
        raise ValueError(f"{file}: {where}{name} is {json.dumps(value)}, but must be {meaning}")
    return value


def architectures(hf, file):
    """config.json's architectures, a list of class names (absent or null: none named)."""
    names = hf.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{file}: architectures is {json.dumps(names)}, but must be a list of class names")
    return names


def json_object_field(hf, name, file):
    """A field that holds a JSON object, such as rope_scaling ({} when absent or null)."""
    value = hf.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{file}: {name} is {json.dumps(value)}, but must be a JSON object or null")
    return value


LLAMA_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings")
LLAMA_MATH = {"hidden_act": ["silu"], "attention_bias": [False], "mlp_bias": [False],  # fields that change
              "partial_rotary_factor": [1.0, None]}  # the math -> what this GPT computes (absent: the first)
LLAMA3_ROPE = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor",
               "original_max_position_embeddings": "rope_original_max_position_embeddings"}


def llama_family_config_from_hf(hf, file):
    model_type = hf["model_type"]
    for field in LLAMA_SIZES:
        if type(hf.get(field)) is not int or hf[field] <= 0:
            raise ValueError(f"{file}: model_type is {model_type!r} but {field} is missing or not a positive integer")
    expected = HF_ARCHITECTURES[model_type]
    if (architectures(hf, file) or [expected]) != [expected]:
        raise ValueError(f"{file}: architectures is {hf['architectures']}; expected [{expected!r}]")
    # transformers 4 | 5 spelling
    rope = {**json_object_field(hf, "rope_scaling", file), **json_object_field(hf, "rope_parameters", file)}
    rope_where = "rope_parameters' " if hf.get("rope_parameters") else "rope_scaling's "
    for field, allowed in LLAMA_MATH.items():
        value = rope.get(field, hf.get(field, allowed[0]))
        if value not in allowed:
            raise ValueError(f"{file}: {field}={value!r} is not supported (this model computes {field}={allowed[0]!r})")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"{file}: rope_scaling of type {kind!r} is not supported (only the default rotary "
                         "positions and 'llama3')")
    llama3 = {}
    if kind == "llama3":
        missing = [theirs for theirs in LLAMA3_ROPE if theirs not in rope]
        if missing:
            raise ValueError(f"{file}: rope_scaling of type 'llama3' lacks {', '.join(missing)}")
        llama3 = {ours: hf_field(rope, theirs, "count" if theirs.startswith("original") else "number", None, file,
                                 rope_where) for theirs, ours in LLAMA3_ROPE.items()}
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    rope_theta = (hf_field(rope, "rope_theta", "number", None, file, rope_where) if "rope_theta" in rope
                  else hf_field(hf, "rope_theta", "number", 10000.0, file))
    # null or 0 for these two means the default size, as transformers reads them
    n_kv_head = hf_field(hf, "num_key_value_heads", "size", 0, file, nullable=True)
    head_dim = hf_field(hf, "head_dim", "size", 0, file, nullable=True)
    return family_config(model_type, block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                         n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=width, n_kv_head=n_kv_head or heads,
                         head_dim=head_dim or width // heads, intermediate_size=hf["intermediate_size"],
                         norm_eps=hf_field(hf, "rms_norm_eps", "number", 1e-6, file), rope_theta=rope_theta,
                         rope_scaling="llama3" if llama3 else "none", **llama3,
                         tie_word_embeddings=hf_field(hf, "tie_word_embeddings", "flag", False, file),
                         attn_window=hf_sliding_window(hf, file))


def hf_sliding_window(hf, file):
    """attn_window for config.json's sliding window. Hugging Face's sliding mask lets query i see key j when
    i - w < j <= i, exactly attn_window's mask, so the window is honoured; a mix of sliding and full
    layers is refused. Mistral slides on every layer; Qwen2/3 on the layers that layer_types names (or,
    in older files, those from max_window_layers on when use_sliding_window)."""
    window = hf_field(hf, "sliding_window", "size", 0, file, nullable=True)
    if hf["model_type"] == "mistral":
        return window
    window = window if hf_field(hf, "use_sliding_window", "flag", False, file) else 0
    n_layer = hf["num_hidden_layers"]
    first_sliding = hf_field(hf, "max_window_layers", "size", 28, file)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if window and i >= first_sliding else "full_attention" for i in range(n_layer)]
    if not isinstance(layer_types, list) or not all(isinstance(kind, str) for kind in layer_types):
        raise ValueError(f"{file}: layer_types is {json.dumps(layer_types)}, but must be a list of attention kinds")
    if set(layer_types) == {"full_attention"}:
        return 0
    if set(layer_types) == {"sliding_attention"} and window:
        return window
    raise ValueError(f"{file}: layer_types {layer_types} (from use_sliding_window, sliding_window and "
                     "max_window_layers) is not supported: every layer must use full attention, or all one window")


def read_hf_weights(path):
    """(file, tensors) of a Hugging Face checkpoint: model.safetensors, its shards (model.safetensors.index.json),
    else pytorch_model.bin (or its shards) loaded weights_only. A file that does not read (truncated, emptied,
    not tensors) is a ValueError naming it."""
    for name in HF_WEIGHT_FILES:
        file = path / name
        if file.is_file():
            shards = _shard_files(file) if name.endswith(".index.json") else [file]
            tensors = {}
            for shard in shards:
                tensors.update(_read_weights_file(shard))
            return file, tensors
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (nor a sharded "
                            "model.safetensors.index.json)")


def _shard_files(index_file):
    """The shard files a Hugging Face *.index.json names in its weight_map, which must lie beside it."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index_file} is not a Hugging Face index with a weight_map: "
                         f"{type(e).__name__}: {e}") from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or not (index_file.parent / shard).is_file():
            raise ValueError(f"{index_file}: shard {shard!r} is not a file in {index_file.parent}")
    return [index_file.parent / shard for shard in shards]


def _read_weights_file(file):
    try:
        tensors = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu",
                                                                                  weights_only=True)
    except Exception as e:  # safetensors, zipfile and unpickling errors share no base class
        raise ValueError(f"{file} cannot be read, it may be truncated or damaged: {type(e).__name__}: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{file} does not hold a dictionary of named tensors")
    return tensors


def write_atomically(file, write):
    """Call write(temporary name) then rename onto file, so readers never see a partial file. The file gets
    the permissions the user's umask gives a new file (0644 by default): safetensors creates its files 0600,
    which would keep colleagues on a shared machine from reading an exported model."""
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    write(str(tmp))
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, file)


def current_umask():
    """The process's umask (only readable by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
