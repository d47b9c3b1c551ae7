"""model.py against Hugging Face GPT-2 and against itself (cache vs. no cache, packed vs. separate, ...).

Every model here is tiny and random; transformers builds its reference models locally, nothing is downloaded.
"""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from model import GPT, GPTConfig, LoRALinear, apply_lora, causal_mask, merge_lora, only_optimize_lora, unmerge_lora
from sft_kernels.chunked_cross_entropy import linear_cross_entropy

TINY = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are so small that per-op overhead dominates; more threads only add contention
    (measured: 8 s with one thread versus 15-50 s with two on a busy 2-core box). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def hf_tiny(seed=0):
    """A random GPT2LMHeadModel with non-trivial biases and LayerNorms, so a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf_tiny().save_pretrained(path)
    return path


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


def tokens(B, T, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- Hugging Face import / export

def test_from_pretrained_matches_hf_logits(hf_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = GPT.from_pretrained(hf_dir).eval()
    idx = tokens(2, 32)
    with torch.no_grad():
        diff = max_abs_diff(ours(idx), hf(idx).logits)
    print(f"HF save -> GPT.from_pretrained: max abs logit diff {diff:.2e}")
    assert diff < 1e-4


def test_from_pretrained_reads_pytorch_model_bin_in_old_layout(tmp_path):
    """Original GPT-2 .bin files have no 'transformer.' prefix and carry attn.bias mask buffers."""
    hf = hf_tiny(seed=3)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    idx = tokens(1, 16)
    with torch.no_grad():
        assert max_abs_diff(GPT.from_pretrained(tmp_path)(idx), hf(idx).logits) < 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_save_pretrained_loads_in_transformers(tmp_path, bias):
    ours = tiny_gpt(seed=5, bias=bias)
    with torch.no_grad():  # random LayerNorms and biases so that every tensor matters
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = tokens(2, 32)
    with torch.no_grad():
        diff = max_abs_diff(ours(idx), hf(idx).logits)
    print(f"GPT.save_pretrained -> HF (bias={bias}): max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    again = GPT.from_pretrained(tmp_path, bias=True).eval()
    with torch.no_grad():
        assert max_abs_diff(again(idx), ours(idx)) < 1e-5


def test_from_pretrained_overrides(hf_dir):
    model = GPT.from_pretrained(hf_dir, dropout=0.1, attn_window=4)
    assert model.config.dropout == 0.1 and model.config.attn_window == 4
    assert model.config.vocab_size == 97  # the checkpoint's own size, never padded
    assert GPT.from_pretrained(hf_dir).config.dropout == 0.0


def test_num_params_matches_transformers(hf_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    ours = GPT.from_pretrained(hf_dir)
    assert ours.num_params(non_embedding=False) == sum(p.numel() for p in hf.parameters())
    assert ours.num_params() == ours.num_params(non_embedding=False) - 32 * 32
    N, L, C = ours.num_params(), 2, 32
    assert ours.flops_per_token(16) == 6 * N + 12 * L * C * 16


# ----------------------------------------------------------------------------- bad input

def copy_hf_dir(hf_dir, dst):
    for f in ("config.json", "model.safetensors"):
        (dst / f).write_bytes((hf_dir / f).read_bytes())
    return dst


def edit_config(path, **fields):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)


def test_missing_weights_names_the_files(hf_dir, tmp_path):
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("fields, message", [
    (dict(model_type="llama"), r"config.json: model_type is 'llama'"),
    (dict(architectures=["GPT2DoubleHeadsModel"]), r"config.json: architectures"),
    (dict(activation_function="relu"), r"config.json: activation_function='relu'"),
    (dict(tie_word_embeddings=False), r"config.json: tie_word_embeddings"),
])
def test_non_gpt2_config_is_refused(hf_dir, tmp_path, fields, message):
    edit_config(copy_hf_dir(hf_dir, tmp_path), **fields)
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(hf_dir, tmp_path):
    edit_config(copy_hf_dir(hf_dir, tmp_path), vocab_size=100)
    message = r"model.safetensors: tensor '.*wte.weight' has shape \(97, 32\).*needs \(100, 32\)"
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(tmp_path)


def test_missing_tensor_is_named(hf_dir, tmp_path):
    copy_hf_dir(hf_dir, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: missing tensors.*transformer.h.1.mlp.c_fc.weight"):
        GPT.from_pretrained(tmp_path)


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("this ran while loading weights",))


def test_pytorch_model_bin_is_never_unpickled_as_code(hf_dir, tmp_path, capsys):
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    torch.save({"wte.weight": RunsCodeWhenUnpickled()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin cannot be read.*UnpicklingError"):
        GPT.from_pretrained(tmp_path)
    assert "this ran" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate", "empty", "text"])
def test_damaged_weights_file_is_named_in_one_sentence(hf_dir, tmp_path, damage):
    copy_hf_dir(hf_dir, tmp_path)
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
def test_config_json_that_is_not_an_object_is_named(hf_dir, tmp_path, text, message):
    copy_hf_dir(hf_dir, tmp_path)
    (tmp_path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [dict(n_head=5), dict(attn_window=-1)])
def test_bad_config_is_refused(bad):
    (key, value), = bad.items()
    with pytest.raises(ValueError, match=f"{key}={value}"):
        GPT(GPTConfig(**{**TINY, **bad}))


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt()(tokens(1, 33))


# ----------------------------------------------------------------------------- attention variants

def test_window_at_least_seq_len_equals_full_attention():
    full, windowed = tiny_gpt(), tiny_gpt(attn_window=16)
    idx = tokens(2, 16)
    segments = torch.zeros_like(idx)  # forces the explicit-mask path rather than the flash shortcut
    with torch.no_grad():
        assert max_abs_diff(windowed(idx, segment_ids=segments), full(idx)) < 1e-5
    assert torch.equal(causal_mask(16, 16, "cpu"), torch.ones(16, 16).tril().bool())


def test_small_window_ignores_tokens_outside_it():
    """With window w and L layers, position i sees tokens back to i - L*(w-1); nothing earlier matters."""
    w, L, T = 3, TINY["n_layer"], 20
    model = tiny_gpt(attn_window=w)
    idx = tokens(1, T)
    changed = idx.clone()
    changed[0, :4] = (changed[0, :4] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model(idx), model(changed)
    reach = 3 + L * (w - 1)  # last position that can still see a changed token
    assert max_abs_diff(a[:, reach + 1:], b[:, reach + 1:]) == 0.0
    assert max_abs_diff(a[:, reach], b[:, reach]) > 1e-4  # the window really does reach this far
    full = tiny_gpt()
    with torch.no_grad():
        assert max_abs_diff(full(idx)[:, -1], full(changed)[:, -1]) > 1e-4  # and full attention sees it all


@pytest.mark.parametrize("window", [0, 3])
def test_packed_row_equals_samples_run_separately(window):
    model = tiny_gpt(attn_window=window)
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


PROMPTS = [[5, 17, 3], [8, 1, 44, 90, 12, 60, 7], [2], [30, 31, 32, 33, 34]]


def sharp_gpt(seed, **overrides):
    """A tiny GPT with large weights: at GPT-2's init scale greedy output hardly depends on the context,
    so a generation bug in masking or positions would go unnoticed."""
    model = tiny_gpt(seed, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "wte" in name else 0.3)
    return model


@pytest.mark.parametrize("window", [0, 4])
def test_cached_greedy_equals_uncached_batched_and_one_by_one(window):
    model = sharp_gpt(seed=7, attn_window=window)
    expected = [generate_without_cache(model, p, 12) for p in PROMPTS]
    assert [model.generate([p], 12, temperature=0)[0] for p in PROMPTS] == expected
    assert model.generate(PROMPTS, 12, temperature=0) == expected
    assert len(set(map(tuple, expected))) > 1  # the prompts really lead to different outputs
    if window:
        assert expected != sharp_gpt(seed=7).generate(PROMPTS, 12, temperature=0)  # and the window matters


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
    assert sampled != greedy and all(0 <= t < TINY["vocab_size"] for row in sampled for t in row)


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


def test_save_pretrained_with_lora_writes_merged_weights_and_leaves_model_alone(tmp_path):
    model = lora_model()
    randomize_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = tokens(2, 16)
    with torch.no_grad():
        assert max_abs_diff(hf(idx).logits, model(idx)) < 1e-4


# ----------------------------------------------------------------------------- training paths

def grads_of(model, idx, labels, seed):
    model.zero_grad()
    torch.manual_seed(seed)  # same dropout masks in both runs
    model(idx, labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_same_grads():
    plain, ckpt = tiny_gpt(dropout=0.1), tiny_gpt(dropout=0.1, gradient_checkpointing=True)
    plain.train(), ckpt.train()
    idx, labels = tokens(2, 16), tokens(2, 16, seed=2)
    calls = []
    ckpt.transformer.h[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    a, b = grads_of(plain, idx, labels, seed=3), grads_of(ckpt, idx, labels, seed=3)
    assert len(calls) == 2  # the block really was recomputed in backward
    for n in a:
        assert max_abs_diff(a[n], b[n]) < 1e-6, n


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


def test_forward_loss_goes_through_loss_fn_and_matches_logits():
    model = tiny_gpt()
    idx, labels = tokens(2, 16), tokens(2, 16, seed=2)
    labels[:, :6] = -100
    with torch.no_grad():
        expected = F.cross_entropy(model(idx).view(-1, TINY["vocab_size"]), labels.view(-1))
        assert abs(model(idx, labels).item() - expected.item()) < 1e-5
    seen = []
    model.loss_fn = lambda h, w, y: seen.append((h.shape, w is model.lm_head.weight, y.shape)) or h.sum() * 0
    model(idx, labels)
    assert seen == [(torch.Size([32, 32]), True, torch.Size([32]))]


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
        idx = torch.randint(0, TINY["vocab_size"], (batch, 16), generator=gen)
        labels = torch.randint(0, TINY["vocab_size"], (batch, 16), generator=gen)
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
