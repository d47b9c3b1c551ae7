"""model.py against transformers and against itself, for each family it builds: GPT-2 and the Llama family
(Llama, Mistral, Qwen2, Qwen3). Import and export, generation with the KV cache, packed rows and windows,
LoRA, gradient checkpointing, the loss seam and the chunked loss, and the refusals of what it cannot read.

Each family's reference is a tiny random model that transformers builds locally, with its norms and biases
moved away from their init values (ones, zeros) so that a wrong mapping cannot hide; nothing is downloaded.
"""
import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import sft_kernels.cross_entropy
from model import (GPT, GPTConfig, LoRALinear, apply_lora, causal_mask, family_config, merge_lora, only_optimize_lora,
                   unmerge_lora)
from sft_kernels.chunked_cross_entropy import linear_cross_entropy

V, T = 97, 32  # T is GPT-2's whole context here (n_positions), so every learned position is exercised
SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, rms_norm_eps=1e-5)
FAMILIES = {  # what each family's test model exercises
    "gpt2": (transformers.GPT2Config, dict(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=4,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),  # learned positions, biases
    "llama": (transformers.LlamaConfig, dict(SIZES, num_key_value_heads=2, tie_word_embeddings=False, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),  # head size 8: wavelengths 6, 63, 628, 6283 cross all three bands
    "mistral": (transformers.MistralConfig, dict(SIZES, num_key_value_heads=1, sliding_window=5, rope_theta=500.0)),
    "qwen2": (transformers.Qwen2Config, dict(SIZES, num_key_value_heads=2, tie_word_embeddings=True)),  # + qkv bias
    "qwen3": (transformers.Qwen3Config, dict(SIZES, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
}
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TINY = dict(block_size=T, vocab_size=V, n_layer=2, n_head=4, n_embd=32)  # a GPT-2 from scratch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are so small that per-op overhead dominates; more threads only add contention
    (measured: 8 s with one thread versus 15-50 s with two on a busy 2-core box). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_model(family, seed=0, **changes):
    """A random transformers model of the family, eval mode, with perturbed norms and biases."""
    config_class, sizes = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**{**sizes, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> a directory holding its reference model, saved by transformers."""
    dirs = {}
    for family in FAMILIES:
        dirs[family] = tmp_path_factory.mktemp(family)
        hf_model(family).save_pretrained(dirs[family])
    return dirs


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def tokens(B, n, seed=1):
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(seed))


def hf_logits(path, idx):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(idx).logits


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


def perturb_vectors(model):
    """Norm weights and biases away from ones and zeros, so that every tensor matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- Hugging Face import / export

@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_matches_transformers(hf_dirs, family):
    ours = GPT.from_pretrained(hf_dirs[family]).eval()
    idx = tokens(2, T)
    with torch.no_grad():
        diff = max_abs_diff(ours(idx), hf_logits(hf_dirs[family], idx))
    print(f"{family}: transformers -> GPT.from_pretrained: max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    cfg = ours.config
    shape = ("layernorm", "learned", "gelu") if family == "gpt2" else ("rmsnorm", "rotary", "swiglu")
    assert (cfg.model_type, cfg.norm, cfg.positions, cfg.mlp) == (family, *shape)
    expected = {"gpt2": dict(tie_word_embeddings=True, n_kv_head=4),
                "llama": dict(rope_scaling="llama3", n_kv_head=2, tie_word_embeddings=False),
                "mistral": dict(attn_window=5, n_kv_head=1, rope_theta=500.0),
                "qwen2": dict(qkv_bias=True, tie_word_embeddings=True),
                "qwen3": dict(qk_norm=True, head_dim=16, tie_word_embeddings=False)}[family]
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == cfg.tie_word_embeddings


def test_from_pretrained_reads_pytorch_model_bin_in_old_layout(tmp_path):
    """Original GPT-2 .bin files have no 'transformer.' prefix and carry attn.bias mask buffers."""
    hf = hf_model("gpt2", seed=3)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, T, T))
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    idx = tokens(1, 16)
    with torch.no_grad():
        assert max_abs_diff(GPT.from_pretrained(tmp_path)(idx), hf(idx).logits) < 1e-4


def model_from(source, hf_dirs):
    """(family, model) for a source of test_save_pretrained_loads_in_transformers."""
    family = source.split()[0]
    if source == family:
        return family, GPT.from_pretrained(hf_dirs[family]).eval()
    if family == "gpt2":  # bias=False: the export writes GPT-2's biases as zeros
        return family, perturb_vectors(tiny_gpt(seed=5, bias="without bias" not in source))
    if "windowed" in source:
        return family, windowed_scratch_model(family)
    # default sizes (intermediate_size, head_dim = 0)
    return family, GPT(family_config(family, block_size=64, vocab_size=V, n_layer=2, n_head=4, n_embd=32)).eval()


@pytest.mark.parametrize("source", [*FAMILIES, "gpt2 from scratch", "gpt2 from scratch without bias",
                                    "llama from scratch", "qwen3 from scratch, windowed"])
def test_save_pretrained_loads_in_transformers(hf_dirs, tmp_path, source):
    """The window of the windowed one is written as sliding_window."""
    family, ours = model_from(source, hf_dirs)
    ours.save_pretrained(tmp_path, token_ids=dict(eos_token_id=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == family and written["architectures"] == [ARCHITECTURES[family]]
    assert written["eos_token_id"] == 3
    idx = tokens(2, T)
    with torch.no_grad():
        diff = max_abs_diff(hf_logits(tmp_path, idx), ours(idx))
        print(f"{source}: GPT.save_pretrained -> transformers: max abs logit diff {diff:.2e}")
        assert diff < 1e-4
        again = GPT.from_pretrained(tmp_path, **({"bias": True} if family == "gpt2" else {})).eval()
        assert max_abs_diff(again(idx), ours(idx)) < 1e-5


def test_from_pretrained_overrides(hf_dirs):
    model = GPT.from_pretrained(hf_dirs["gpt2"], dropout=0.1, attn_window=4)
    assert model.config.dropout == 0.1 and model.config.attn_window == 4
    assert model.config.vocab_size == V  # the checkpoint's own size, never padded
    assert GPT.from_pretrained(hf_dirs["gpt2"]).config.dropout == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_num_params_and_flops_per_family(hf_dirs, family):
    ours = GPT.from_pretrained(hf_dirs[family])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[family])
    assert ours.num_params(non_embedding=False) == sum(p.numel() for p in hf.parameters())
    # A lookup table costs no matmul: GPT-2's position table, and an untied token embedding (a tied one
    # is the head too, which does)
    embedding = T * 32 if family == "gpt2" else 0 if ours.config.tie_word_embeddings else V * 32
    assert ours.num_params() == ours.num_params(non_embedding=False) - embedding
    attention_width = 4 * (16 if family == "qwen3" else 8)  # n_head * head_dim, not n_embd
    span = 5 if family == "mistral" else 16
    assert ours.flops_per_token(16) == 6 * ours.num_params() + 12 * 2 * attention_width * span
    assert isinstance(ours.transformer.wte, nn.Embedding)  # where the trainer hooks NEFTune


def test_flops_count_a_frozen_weight_without_its_own_gradient(hf_dirs):
    """MFU's FLOPs: 6 per trained weight, 4 per frozen one (forward and its input's gradient, no weight
    gradient): with LoRA on every block Linear the base counts 4, the factors 6, the tied head 4."""
    model = GPT.from_pretrained(hf_dirs["llama"])
    attention = model.flops_per_token(16) - 6 * model.num_params()
    apply_lora(model, 2)
    only_optimize_lora(model)
    factors = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert model.num_params(trained_only=True) == factors
    assert model.flops_per_token(16) == 4 * (model.num_params() - factors) + 6 * factors + attention


def test_sharded_safetensors_and_pytorch_model_bin_load(tmp_path):
    hf = hf_model("qwen2", seed=2)  # tied: a .bin holds lm_head.weight too, equal to the embedding
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = list((tmp_path / "sharded").glob("model-*.safetensors"))
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file() and len(shards) > 2
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # transformers 4's safe_serialization=False
    hf.config.to_json_file(tmp_path / "bin" / "config.json")
    idx = tokens(2, T)
    with torch.no_grad():
        for path in (tmp_path / "sharded", tmp_path / "bin"):
            assert max_abs_diff(GPT.from_pretrained(path).eval()(idx), hf(idx).logits) < 1e-4, path
    shards[0].unlink()
    with pytest.raises(ValueError, match=rf"model.safetensors.index.json: shard '{shards[0].name}' is not a file in"):
        GPT.from_pretrained(tmp_path / "sharded")


# ----------------------------------------------------------------------------- refusals, one sentence each

def edited_copy(src, dst, **fields):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config.update(fields)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


@pytest.mark.parametrize("family, fields, message", [
    ("gpt2", dict(model_type="llama"), r"config.json: model_type is 'llama'"),
    ("gpt2", dict(architectures=["GPT2DoubleHeadsModel"]), r"config.json: architectures"),
    ("gpt2", dict(activation_function="relu"), r"config.json: activation_function='relu'"),
    ("gpt2", dict(tie_word_embeddings=False), r"config.json: tie_word_embeddings"),
    ("llama", dict(model_type="mixtral"), r"model_type is 'mixtral', but only 'gpt2', 'llama'"),
    ("llama", dict(architectures=["LlamaForSequenceClassification"]), r"architectures is \['LlamaForSequence"),
    ("llama", dict(hidden_size=None), r"hidden_size is missing"),
    ("llama", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), r"rope_scaling of type 'yarn'"),
    ("llama", dict(rope_parameters=LLAMA3), r"'llama3' lacks original_max_position_embeddings"),
    ("llama", dict(attention_bias=True), r"attention_bias=True is not supported"),
    ("llama", dict(mlp_bias=True), r"mlp_bias=True is not supported"),
    ("qwen3", dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    ("qwen3", dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5 is not supported"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, layer_types=None),
     r"layer_types \['full_attention', 'sliding_attention'\]"),
])
def test_unsupported_config_is_refused_naming_the_field(hf_dirs, tmp_path, family, fields, message):
    edited_copy(hf_dirs[family], tmp_path, **fields)
    with pytest.raises(ValueError, match=message) as e:
        GPT.from_pretrained(tmp_path)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("family, fields, message", [
    ("gpt2", dict(vocab_size=100), r"model.safetensors: tensor '.*wte.weight' has shape \(97, 32\).*needs \(100, 32\)"),
    ("llama", dict(num_key_value_heads=4),
     r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(16, 32\) but the config .* needs \(32, 32\)"),
])
def test_shape_mismatch_names_the_tensor_and_shapes(hf_dirs, tmp_path, family, fields, message):
    edited_copy(hf_dirs[family], tmp_path, **fields)
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("family, tensor", [("gpt2", "transformer.h.1.mlp.c_fc.weight"),
                                            ("qwen3", "model.layers.1.self_attn.k_norm.weight")])
def test_missing_tensor_is_named(hf_dirs, tmp_path, family, tensor):
    edited_copy(hf_dirs[family], tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[tensor]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model.safetensors: missing tensors .*{tensor}"):
        GPT.from_pretrained(tmp_path)


def test_missing_directory_and_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere is not a directory on disk.*downloads nothing"):
        GPT.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config.json not found"):
        GPT.from_pretrained(tmp_path)


def test_missing_weights_names_the_files(hf_dirs, tmp_path):
    (tmp_path / "config.json").write_bytes((hf_dirs["gpt2"] / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(tmp_path)


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("this ran while loading weights",))


def test_pytorch_model_bin_is_never_unpickled_as_code(hf_dirs, tmp_path, capsys):
    (tmp_path / "config.json").write_bytes((hf_dirs["gpt2"] / "config.json").read_bytes())
    torch.save({"wte.weight": RunsCodeWhenUnpickled()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin cannot be read.*UnpicklingError"):
        GPT.from_pretrained(tmp_path)
    assert "this ran" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate", "empty", "text"])
def test_damaged_weights_file_is_named_in_one_sentence(hf_dirs, tmp_path, damage):
    edited_copy(hf_dirs["gpt2"], tmp_path)
    weights = tmp_path / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes({"truncate": blob[:len(blob) // 2], "empty": b"", "text": b"not tensors"}[damage])
    with pytest.raises(ValueError, match=r"model.safetensors cannot be read, it may be truncated or damaged"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "config.json must hold a JSON object .* got a list"),
    ('"gpt2"', "config.json must hold a JSON object .* got a str"),
    ('{"model_type": "gp', "config.json is not valid JSON"),
    ("\udcff", "config.json is not valid JSON"),
])
def test_config_json_that_is_not_an_object_is_named(hf_dirs, tmp_path, text, message):
    edited_copy(hf_dirs["gpt2"], tmp_path)
    (tmp_path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(tmp_path)


def test_tied_head_that_differs_from_the_embedding_is_refused(tmp_path):
    hf = hf_model("qwen2", seed=2)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] += 1.0
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"lm_head.weight differs from model.embed_tokens.weight.*tie_word_embeddings"):
        GPT.from_pretrained(tmp_path)


def test_window_wider_than_the_models_is_refused(hf_dirs):
    assert GPT.from_pretrained(hf_dirs["mistral"], attn_window=3).config.attn_window == 3
    with pytest.raises(ValueError, match=r"attn_window=8 is wider than the sliding window of 5 in .*config.json"):
        GPT.from_pretrained(hf_dirs["mistral"], attn_window=8)


@pytest.mark.parametrize("family, fields, message", [
    ("gpt2", dict(n_head=5), r"n_head=5"),
    ("gpt2", dict(attn_window=-1), r"attn_window=-1"),
    ("llama", dict(norm="batchnorm"), r"norm='batchnorm' is not one of layernorm, rmsnorm"),
    ("llama", dict(n_kv_head=3), r"n_head=4 must be a multiple of n_kv_head=3"),
    ("llama", dict(head_dim=7), r"rotary positions need an even head size, got head_dim=7"),
    ("mixtral", {}, r"model_type='mixtral' is not one of gpt2, llama"),
])
def test_bad_config_is_refused(family, fields, message):
    with pytest.raises(ValueError, match=message):
        GPT(family_config(family, **{**dict(block_size=16, vocab_size=V, n_layer=1, n_head=4, n_embd=32), **fields}))


def test_export_the_format_cannot_express_is_refused(tmp_path):
    model = GPT(family_config("llama", block_size=16, vocab_size=V, n_layer=1, n_head=4, n_embd=32, bias=True))
    with pytest.raises(ValueError, match=r"bias=True cannot be written as a Hugging Face llama model"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt()(tokens(1, T + 1))


# ----------------------------------------------------------------------------- attention windows, packed rows

def test_window_at_least_seq_len_equals_full_attention():
    full, windowed = tiny_gpt(), tiny_gpt(attn_window=16)
    idx = tokens(2, 16)
    segments = torch.zeros_like(idx)  # forces the explicit-mask path rather than the flash shortcut
    with torch.no_grad():
        assert max_abs_diff(windowed(idx, segment_ids=segments), full(idx)) < 1e-5
    assert torch.equal(causal_mask(16, 16, "cpu"), torch.ones(16, 16).tril().bool())


def test_small_window_ignores_tokens_outside_it():
    """With window w and L layers, position i sees tokens back to i - L*(w-1); nothing earlier matters."""
    w, L, n = 3, TINY["n_layer"], 20
    model = tiny_gpt(attn_window=w)
    idx = tokens(1, n)
    changed = idx.clone()
    changed[0, :4] = (changed[0, :4] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(changed)
    reach = 3 + L * (w - 1)  # last position that can still see a changed token
    assert max_abs_diff(a[:, reach + 1:], b[:, reach + 1:]) == 0.0
    assert max_abs_diff(a[:, reach], b[:, reach]) > 1e-4  # the window really does reach this far
    full = tiny_gpt()
    with torch.no_grad():
        assert max_abs_diff(full(idx)[:, -1], full(changed)[:, -1]) > 1e-4  # and full attention sees it all


def windowed_scratch_model(family):
    torch.manual_seed(4)
    return perturb_vectors(GPT(family_config(family, block_size=64, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2,
                                             n_embd=32, attn_window=5))).eval()


def test_window_matches_transformers_sliding_mask(tmp_path):
    """A Llama-shaped model with attn_window equals transformers' sliding-window mask (as Mistral)."""
    ours = windowed_scratch_model("mistral")
    ours.save_pretrained(tmp_path)
    idx = tokens(2, T)
    with torch.no_grad():
        full = GPT(replace(ours.config, attn_window=0)).eval()  # the same weights without the window ...
        full.load_state_dict(ours.state_dict())
        assert max_abs_diff(full(idx), ours(idx)) > 1e-3  # ... differ: the window matters at this length
        assert max_abs_diff(hf_logits(tmp_path, idx), ours(idx)) < 1e-4
        # and the window's explicit-mask path (packed rows) agrees with the plain one
        assert max_abs_diff(ours(idx, segment_ids=torch.zeros_like(idx)), ours(idx)) < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # learned positions; rotary positions restart per sample
@pytest.mark.parametrize("window", [0, 3])
def test_packed_row_equals_samples_run_separately(hf_dirs, family, window):
    model = GPT.from_pretrained(hf_dirs[family], attn_window=window).eval()
    samples = [tokens(1, n, seed=n)[0] for n in (5, 9, 4)]
    packed = torch.cat(samples)[None]  # (1, 18)
    segments = torch.cat([torch.full((len(s),), i) for i, s in enumerate(samples)])[None]
    with torch.no_grad():
        logits = model(packed, segment_ids=segments)[0]
        alone = torch.cat([model(s[None])[0] for s in samples])
        assert max_abs_diff(logits, alone) < 1e-5
        labels = torch.cat([torch.roll(s, -1) for s in samples])[None]  # any labels: same tokens both ways
        loss = model(packed, labels, segment_ids=segments)
        ref = F.cross_entropy(alone, labels[0])
        assert abs(loss.item() - ref.item()) < 1e-5


# ----------------------------------------------------------------------------- generation

def generate_without_cache(model, prompt, n, eos_id=None):
    """Reference: re-run the whole (cropped) context every step, as nanoGPT does."""
    idx, out = torch.tensor([prompt]), []
    for _ in range(n):
        with torch.no_grad():
            token = model(idx[:, -model.config.block_size:])[0, -1].argmax().item()
        if token == eos_id:
            break
        out.append(token)
        idx = torch.cat([idx, torch.tensor([[token]])], dim=1)
    return out


PROMPTS = [[5, 17, 3], [8, 1, 44, 90, 12, 60, 7], [2], [30, 31, 32, 33, 34]]  # left-padded into one batch


def sharpen(model):
    """Large weights: at init scale greedy output hardly depends on the context, so a generation bug in
    masking or positions would go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "wte" in name else 0.3)
    return model


def sharp_gpt(seed, **overrides):
    return sharpen(tiny_gpt(seed, **overrides))


def sharp_pretrained(path, seed=7, **overrides):
    torch.manual_seed(seed)
    return sharpen(GPT.from_pretrained(path, **overrides).eval())


@pytest.mark.parametrize("source", [*FAMILIES, "gpt2 windowed"])  # generation runs past mistral's window
def test_cached_greedy_generation_equals_uncached_batched_and_one_by_one(hf_dirs, source):
    family, window = source.split()[0], 4 if "windowed" in source else 0
    model = sharp_pretrained(hf_dirs[family], attn_window=window)
    expected = [generate_without_cache(model, p, 12) for p in PROMPTS]
    assert [model.generate([p], 12, temperature=0)[0] for p in PROMPTS] == expected
    assert model.generate(PROMPTS, 12, temperature=0) == expected
    assert len(set(map(tuple, expected))) > 1  # the prompts really lead to different outputs
    if window:  # and the window matters
        assert expected != sharp_pretrained(hf_dirs[family]).generate(PROMPTS, 12, temperature=0)


def test_generation_past_block_size_crops_context():
    model = sharp_gpt(seed=8, block_size=12)
    expected = [generate_without_cache(model, p, 15) for p in PROMPTS]
    assert model.generate(PROMPTS, 15, temperature=0) == expected
    assert all(len(e) == 15 for e in expected)


def test_generation_never_produces_ids_past_vocab_limit():
    """A vocabulary padded for speed has rows that are no token: sampling must never pick them."""
    model = sharp_gpt(seed=9)
    with torch.no_grad():
        model.lm_head.weight[90:] *= 50  # make the padding rows the most likely
    assert any(t >= 90 for row in model.generate(PROMPTS, 8, temperature=0) for t in row)
    for temperature in (0, 1.0):
        rows = model.generate(PROMPTS, 8, temperature=temperature, vocab_limit=90)
        assert all(t < 90 for row in rows for t in row)


def test_generation_stops_at_eos_per_row():
    model = sharp_gpt(seed=7)
    free = model.generate(PROMPTS, 12, temperature=0)
    eos = free[1][4]  # a token row 1 emits at step 4
    out = model.generate(PROMPTS, 12, temperature=0, eos_id=eos)
    for row, full in zip(out, free):
        assert row == (full[:full.index(eos)] if eos in full else full)
        assert eos not in row
    assert out[1] == free[1][:free[1].index(eos)]
    assert model.generate(torch.tensor([PROMPTS[1]]), 12, temperature=0, eos_id=eos) == [out[1]]


def test_sampling_filters():
    model = sharp_gpt(seed=7)
    greedy = model.generate(PROMPTS, 8, temperature=0)
    torch.manual_seed(0)
    assert model.generate(PROMPTS, 8, temperature=1.0, top_k=1) == greedy
    assert model.generate(PROMPTS, 8, temperature=1.0, top_p=1e-6) == greedy
    sampled = model.generate(PROMPTS, 8, temperature=1.0)
    assert sampled != greedy and all(0 <= t < V for row in sampled for t in row)


# ----------------------------------------------------------------------------- LoRA

def lora_model(seed=0):
    model = tiny_gpt(seed)
    assert apply_lora(model, lora_dim=4, lora_scaling=2.0) == 4 * TINY["n_layer"]  # c_attn, attn/mlp c_proj, c_fc
    return model


def randomize_lora(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_left_weight.normal_(0, 0.5)


def test_lora_starts_as_identity_and_then_changes_outputs():
    base, model = tiny_gpt(), lora_model()
    idx = tokens(2, 16)
    with torch.no_grad():
        assert max_abs_diff(model(idx), base(idx)) == 0.0
        randomize_lora(model)
        assert max_abs_diff(model(idx), base(idx)) > 1e-3


@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 13), (2, 1, 13)])
def test_lora_linear_matches_its_formula_values_and_gradients(shape):
    """x W^T + b + (s / r) (x right) left, and the gradients of x, the factors and the bias, at odd sizes and
    with 2-D and 3-D inputs: the fused accumulation in LoRALinear.forward is the plain formula."""
    gen = torch.Generator().manual_seed(len(shape))
    layer = LoRALinear(torch.nn.Linear(13, 11), lora_dim=3, lora_scaling=2.0)
    with torch.no_grad():
        layer.lora_left_weight.copy_(torch.randn(3, 11, generator=gen))
        layer.bias.requires_grad_(True)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 11, generator=gen)
    params = [x, layer.lora_right_weight, layer.lora_left_weight, layer.bias]
    fused = torch.autograd.grad((layer(x) * upstream).sum(), params)
    plain_out = x @ layer.weight.t() + layer.bias + (x @ layer.lora_right_weight @ layer.lora_left_weight) * (2.0 / 3)
    plain = torch.autograd.grad((plain_out * upstream).sum(), params)
    torch.testing.assert_close(layer(x), plain_out)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want)


def test_lora_linear_runs_under_bfloat16_autocast_as_its_formula_does():
    """Autocast makes the projection bfloat16 while the factors stay float32: the in-place accumulation casts them."""
    gen = torch.Generator().manual_seed(3)
    layer = LoRALinear(torch.nn.Linear(16, 12), lora_dim=4)
    with torch.no_grad():
        layer.lora_left_weight.copy_(torch.randn(4, 12, generator=gen))
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        plain = F.linear(x, layer.weight, layer.bias) + (x @ layer.lora_right_weight @ layer.lora_left_weight) / 4
    assert out.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(out, plain, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert layer.lora_left_weight.grad.dtype == torch.float32 and x.grad.shape == x.shape


def test_lora_merge_equals_lora_and_unmerge_restores_weights():
    model = lora_model()
    randomize_lora(model)
    idx = tokens(2, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        lora_out = model(idx)
        merge_lora(model)
        merge_lora(model)  # a second merge must not add the delta again
        assert max_abs_diff(model(idx), lora_out) < 1e-5
        c_attn = "transformer.h.0.attn.c_attn.weight"
        assert max_abs_diff(model.state_dict()[c_attn], before[c_attn]) > 1e-3  # merged into the weight
        unmerge_lora(model)
        assert max_abs_diff(model(idx), lora_out) < 1e-5
    for k, v in model.state_dict().items():
        assert max_abs_diff(v, before[k]) < 1e-6, k


def test_lora_patterns_and_only_optimize_lora():
    model = tiny_gpt()
    assert apply_lora(model, 2, module_name="attn.c_attn, mlp.c_fc") == 2 * TINY["n_layer"]
    assert not model.transformer.h[0].attn.c_attn.weight.requires_grad  # DeepSpeed-Chat freezes wrapped weights
    assert model.transformer.h[0].attn.c_attn.bias.requires_grad
    only_optimize_lora(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_right_weight" in n or "lora_left_weight" in n for n in trainable)
    with pytest.raises(ValueError, match="tied"):
        apply_lora(tiny_gpt(), 2, module_name="lm_head")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_wraps_the_projections_and_save_pretrained_writes_them_merged(hf_dirs, tmp_path, family):
    """q|k|v (c_attn), o, gate|up or fc (c_fc), down; the export holds the merged weights, and the model
    itself is left as it was (unmerged)."""
    model = GPT.from_pretrained(hf_dirs[family]).eval()
    assert apply_lora(model, lora_dim=4, lora_scaling=2.0) == 4 * 2
    wrapped = sorted(name.split(".", 3)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == sorted(["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] * 2)
    randomize_lora(model)
    idx = tokens(2, T)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        lora_out = model(idx)
        assert max_abs_diff(lora_out, GPT.from_pretrained(hf_dirs[family]).eval()(idx)) > 1e-3
        model.save_pretrained(tmp_path)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
        assert max_abs_diff(hf_logits(tmp_path, idx), lora_out) < 1e-4
        merge_lora(model)
        assert max_abs_diff(model(idx), lora_out) < 1e-5


def test_lora_on_an_untied_head_reaches_the_loss(hf_dirs):
    model = GPT.from_pretrained(hf_dirs["llama"]).eval()
    assert apply_lora(model, 2, module_name="lm_head") == 1
    with torch.no_grad():
        model.lm_head.lora_left_weight.normal_(0, 0.5)
    idx, labels = tokens(1, T), tokens(1, T, seed=2)
    with torch.no_grad():
        assert abs(model(idx, labels).item() - F.cross_entropy(model(idx)[0], labels[0]).item()) < 1e-5


# ----------------------------------------------------------------------------- training paths

def forward_and_backward(model, idx, labels, seed):
    """(loss, gradients, forward calls per block, bytes the autograd graph saved outside checkpointed blocks)."""
    calls = [0] * len(model.transformer.h)
    for i, block in enumerate(model.transformer.h):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(seed)  # the same dropout masks both times
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(idx, labels)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], calls, sum(saved)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_recomputes_each_block_and_gives_the_same_grads(hf_dirs, family):
    """Checkpointing ignored would pass a comparison of gradients alone: each block must also run its
    forward a second time in the backward, and keep less for it."""
    idx, labels = tokens(2, T), tokens(2, T, seed=2)
    runs = [forward_and_backward(GPT.from_pretrained(hf_dirs[family], gradient_checkpointing=flag, dropout=0.1)
                                 .train(), idx, labels, seed=3) for flag in (False, True)]
    (plain_loss, plain_grads, plain_calls, plain_saved), (loss, grads, calls, saved) = runs
    assert plain_calls == [1, 1] and calls == [2, 2]  # the blocks really were recomputed in the backward
    assert saved < plain_saved / 2, (saved, plain_saved)  # their activations were not kept
    assert max_abs_diff(loss, plain_loss) < 1e-6
    for a, b in zip(plain_grads, grads):
        assert max_abs_diff(a, b) < 1e-6


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # a tied head; an untied one
def test_loss_seam_gets_the_head_and_matches_cross_entropy(hf_dirs, family):
    model = GPT.from_pretrained(hf_dirs[family]).eval()
    idx, labels = tokens(2, T), tokens(2, T, seed=2)
    labels[:, :9] = -100
    with torch.no_grad():
        for logits in (model(idx), hf_logits(hf_dirs[family], idx)):
            expected = F.cross_entropy(logits.reshape(-1, V), labels.view(-1), ignore_index=-100)
            assert abs(model(idx, labels).item() - expected.item()) < 1e-5
    seen = []
    model.loss_fn = lambda h, w, y: seen.append((h.shape, w, y.shape)) or h.sum() * 0
    model(idx, labels)
    assert len(seen) == 1 and seen[0][0] == (2 * T, 32) and seen[0][2] == (2 * T,)
    assert seen[0][1] is model.lm_head.weight
    assert (seen[0][1] is model.transformer.wte.weight) == (family == "gpt2")


def test_fused_loss_kernel_on_a_llama_model(hf_dirs):
    """The Triton loss (interpreted on CPU) behind the seam gives the torch seam's loss and gradients."""
    model = GPT.from_pretrained(hf_dirs["llama"]).eval()
    idx, labels = tokens(2, 24), tokens(2, 24, seed=2)
    labels[:, :9] = -100
    results = []
    for loss_fn in (model.loss_fn, sft_kernels.cross_entropy.fused_masked_linear_cross_entropy):
        model.loss_fn = loss_fn
        model.zero_grad()
        loss = model(idx, labels)
        loss.backward()
        results.append((loss.item(), model.lm_head.weight.grad.clone(), model.transformer.wte.weight.grad.clone()))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    assert max_abs_diff(results[0][1], results[1][1]) < 1e-5 and max_abs_diff(results[0][2], results[1][2]) < 1e-5


def reference_loss(hidden, weight, labels):
    return F.cross_entropy(hidden.double() @ weight.double().t(), labels, ignore_index=-100)


@pytest.mark.parametrize("chunk_size", [1024, 7])
def test_linear_cross_entropy_matches_torch(chunk_size):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (40,), generator=g)
    labels[::3] = -100
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
    (2.5 * loss).backward()  # a non-unit upstream gradient must be honoured
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = reference_loss(hidden, weight, labels)
    (2.5 * ref).backward()
    assert abs(loss.item() - ref.item()) < 1e-10
    assert max_abs_diff(gh, hidden.grad) < 1e-10 and max_abs_diff(gw, weight.grad) < 1e-10
    assert gh[::3].abs().max() == 0.0
    with torch.no_grad():
        assert abs(linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size).item() - ref.item()) < 1e-10


def test_linear_cross_entropy_refuses_a_second_backward():
    """Its gradients are computed in the forward and scaled in place by the backward (no (V, C) copy at the
    backward's start), so a retained graph's second backward must fail rather than scale them twice."""
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.randint(0, 11, (6,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_linear_cross_entropy_all_masked_is_zero_with_zero_grads():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((6,), -100))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_linear_cross_entropy_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(64, 32, generator=g), torch.randn(300, 32, generator=g) * 0.1
    labels = torch.randint(0, 300, (64,), generator=g)
    loss = linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - reference_loss(hidden, weight, labels).item()) < 2e-2


def test_residual_projections_get_scaled_init():
    model = GPT(GPTConfig(**{**TINY, "n_embd": 128, "n_layer": 8}))
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 2e-3
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / 4) < 5e-4
    assert model.lm_head.weight is model.transformer.wte.weight


def test_compiled_model_trains_on_a_short_batch_like_eager():
    """torch.compile with batches of changing size and masked share (the last batch of an epoch is
    short): the loss runs outside the traced graph and both give the same loss and gradients.
    Tracing the loss here once crashed inside dynamo on a short batch (torch 2.11, H100)."""
    eager = tiny_gpt().train()
    compiled = torch.compile(tiny_gpt().train(), backend="eager")  # dynamo traces, nothing is code-generated
    gen = torch.Generator().manual_seed(0)
    for batch, masked in ((4, 10), (4, 3), (3, 20)):
        idx = torch.randint(0, V, (batch, 16), generator=gen)
        labels = torch.randint(0, V, (batch, 16), generator=gen)
        labels[:, :masked] = -100
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(idx, labels)
            loss.backward()
            losses.append(loss.item())
        torch.testing.assert_close(losses[0], losses[1])
        for p, q in zip(eager.parameters(), compiled.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
