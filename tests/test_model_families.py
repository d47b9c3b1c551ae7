"""model.py's Llama family (Llama, Mistral, Qwen2, Qwen3) against transformers, and against itself.

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

import sft_kernels.cross_entropy
from model import GPT, LoRALinear, apply_lora, family_config, merge_lora

V, T = 97, 24
SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, rms_norm_eps=1e-5)
FAMILIES = {  # what each family's test model exercises
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),  # head size 8: wavelengths 6, 63, 628, 6283 cross all three bands
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=1, sliding_window=5, rope_theta=500.0)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),  # + qkv bias
    "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: more threads only add contention on a busy 2-core box. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_model(family, seed=0, **changes):
    """A random transformers model of the family, eval mode, with perturbed norms and biases."""
    config_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**{**SIZES, **extra, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
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


def tokens(B, n, seed=1):
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(seed))


def hf_logits(path, idx):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(idx).logits


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


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
    assert (cfg.model_type, cfg.norm, cfg.positions, cfg.mlp) == (family, "rmsnorm", "rotary", "swiglu")
    expected = {"llama": dict(rope_scaling="llama3", n_kv_head=2, tie_word_embeddings=False),
                "mistral": dict(attn_window=5, n_kv_head=1, rope_theta=500.0),
                "qwen2": dict(qkv_bias=True, tie_word_embeddings=True),
                "qwen3": dict(qk_norm=True, head_dim=16, tie_word_embeddings=False)}[family]
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == cfg.tie_word_embeddings


def windowed_scratch_model(family):
    torch.manual_seed(4)
    model = GPT(family_config(family, block_size=64, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                              attn_window=5))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("source", [*FAMILIES, "llama from scratch", "qwen3 from scratch, windowed"])
def test_save_pretrained_loads_in_transformers(hf_dirs, tmp_path, source):
    if "scratch" in source:  # default sizes (intermediate_size, head_dim = 0) and a window written as sliding_window
        family = source.split()[0]
        ours = windowed_scratch_model(family) if "windowed" in source else GPT(family_config(
            family, block_size=64, vocab_size=V, n_layer=2, n_head=4, n_embd=32)).eval()
    else:
        family, ours = source, GPT.from_pretrained(hf_dirs[source]).eval()
    ours.save_pretrained(tmp_path, token_ids=dict(eos_token_id=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == family and written["architectures"] == [FAMILIES[family][0].__name__.replace(
        "Config", "ForCausalLM")] and written["eos_token_id"] == 3
    idx = tokens(2, T)
    with torch.no_grad():
        diff = max_abs_diff(hf_logits(tmp_path, idx), ours(idx))
        print(f"{source}: GPT.save_pretrained -> transformers: max abs logit diff {diff:.2e}")
        assert diff < 1e-4
        assert max_abs_diff(GPT.from_pretrained(tmp_path).eval()(idx), ours(idx)) < 1e-5


def sharpen(model):
    """Large weights: at init scale greedy output hardly depends on the context, hiding position bugs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "wte" in name else 0.3)
    return model


def generate_without_cache(model, prompt, n):
    idx, out = torch.tensor([prompt]), []
    for _ in range(n):
        with torch.no_grad():
            token = model(idx)[0, -1].argmax().item()
        out.append(token)
        idx = torch.cat([idx, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_generation_equals_uncached(hf_dirs, family):
    model = sharpen(GPT.from_pretrained(hf_dirs[family]).eval())
    prompts = [[5, 17, 3], [8, 1, 44, 90, 12, 60, 7], [2]]  # left-padded into one batch, past mistral's window
    expected = [generate_without_cache(model, p, 10) for p in prompts]
    assert model.generate(prompts, 10, temperature=0) == expected
    assert [model.generate([p], 10, temperature=0)[0] for p in prompts] == expected
    assert len(set(map(tuple, expected))) > 1


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


def test_loss_seam_gets_the_untied_head_and_matches_cross_entropy(hf_dirs):
    model = GPT.from_pretrained(hf_dirs["llama"]).eval()
    idx, labels = tokens(2, T), tokens(2, T, seed=2)
    labels[:, :9] = -100
    with torch.no_grad():
        reference = F.cross_entropy(hf_logits(hf_dirs["llama"], idx).view(-1, V), labels.view(-1), ignore_index=-100)
        assert abs(model(idx, labels).item() - reference.item()) < 1e-5
    seen = []
    model.loss_fn = lambda h, w, y: seen.append(w) or h.sum() * 0
    model(idx, labels)
    assert seen[0] is model.lm_head.weight and seen[0] is not model.transformer.wte.weight


def test_fused_loss_kernel_on_a_llama_model(hf_dirs):
    """The Triton loss (interpreted on CPU) behind the seam gives the torch seam's loss and gradients."""
    model = GPT.from_pretrained(hf_dirs["llama"]).eval()
    idx, labels = tokens(2, T), tokens(2, T, seed=2)
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


# ----------------------------------------------------------------------------- LoRA, checkpointing, windows

def test_lora_defaults_wrap_attention_and_mlp_projections_and_merge(hf_dirs, tmp_path):
    model = GPT.from_pretrained(hf_dirs["llama"]).eval()
    assert apply_lora(model, lora_dim=4, lora_scaling=2.0) == 4 * 2
    wrapped = sorted(name.split(".", 3)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == sorted(["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] * 2)  # q|k|v, o, gate|up, down
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_left_weight.normal_(0, 0.5)
    idx = tokens(2, T)
    with torch.no_grad():
        lora_out = model(idx)
        assert max_abs_diff(lora_out, GPT.from_pretrained(hf_dirs["llama"]).eval()(idx)) > 1e-3
        model.save_pretrained(tmp_path)  # merged into the written weights
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


def test_gradient_checkpointing_gives_same_loss_and_grads(hf_dirs):
    idx, labels = tokens(2, T), tokens(2, T, seed=2)
    grads = []
    for flag in (False, True):
        model = GPT.from_pretrained(hf_dirs["qwen3"], gradient_checkpointing=flag, dropout=0.1).train()
        torch.manual_seed(3)  # the same dropout masks both times
        loss = model(idx, labels)
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert max_abs_diff(a, b) < 1e-6


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


@pytest.mark.parametrize("window", [0, 3])
def test_packed_row_restarts_rotary_positions(hf_dirs, window):
    model = GPT.from_pretrained(hf_dirs["llama"], attn_window=window).eval()
    samples = [tokens(1, n, seed=n)[0] for n in (5, 9, 4)]
    packed = torch.cat(samples)[None]
    segments = torch.cat([torch.full((len(s),), i) for i, s in enumerate(samples)])[None]
    with torch.no_grad():
        alone = torch.cat([model(s[None])[0] for s in samples])
        assert max_abs_diff(model(packed, segment_ids=segments)[0], alone) < 1e-5


def test_num_params_and_flops_per_family(hf_dirs):
    for family, path in hf_dirs.items():
        ours = GPT.from_pretrained(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert ours.num_params(non_embedding=False) == sum(p.numel() for p in hf.parameters()), family
        embedding = 0 if ours.config.tie_word_embeddings else V * 32  # a lookup table costs no matmul
        assert ours.num_params() == ours.num_params(non_embedding=False) - embedding, family
        attention_width = 4 * (16 if family == "qwen3" else 8)  # n_head * head_dim, not n_embd
        span = 5 if family == "mistral" else 16
        assert ours.flops_per_token(16) == 6 * ours.num_params() + 12 * 2 * attention_width * span, family
        assert isinstance(ours.transformer.wte, nn.Embedding)  # where the trainer hooks NEFTune


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


def test_missing_directory_and_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere is not a directory on disk.*downloads nothing"):
        GPT.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config.json not found"):
        GPT.from_pretrained(tmp_path)


def test_missing_layer_tensor_is_named(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file
    edited_copy(hf_dirs["qwen3"], tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors .*model.layers.1.self_attn.k_norm.weight"):
        GPT.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_part(hf_dirs, tmp_path):
    edited_copy(hf_dirs["llama"], tmp_path, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(16, 32\) "
                                         r"but the config .* needs \(32, 32\)"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("family, fields, message", [
    ("llama", dict(norm="batchnorm"), r"norm='batchnorm' is not one of layernorm, rmsnorm"),
    ("llama", dict(n_kv_head=3), r"n_head=4 must be a multiple of n_kv_head=3"),
    ("llama", dict(head_dim=7), r"rotary positions need an even head size, got head_dim=7"),
    ("mixtral", {}, r"model_type='mixtral' is not one of gpt2, llama"),
])
def test_bad_family_config_is_refused(family, fields, message):
    with pytest.raises(ValueError, match=message):
        GPT(family_config(family, **{**dict(block_size=16, vocab_size=V, n_layer=1, n_head=4, n_embd=32), **fields}))


def test_export_the_format_cannot_express_is_refused(tmp_path):
    model = GPT(family_config("llama", block_size=16, vocab_size=V, n_layer=1, n_head=4, n_embd=32, bias=True))
    with pytest.raises(ValueError, match=r"bias=True cannot be written as a Hugging Face llama model"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
