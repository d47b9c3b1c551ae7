"""LoRA adapters as PEFT writes them: hf_format.save_peft_adapter and the trainer's hf/adapter/, loaded by peft
itself onto the base model (transformers' AutoModelForCausalLM of the directory the LoRA model started from)
to the LoRA model's logits. Tiny random models of GPT-2 (fused Conv1D c_attn: fan_in_fan_out), Llama (untied
head, LoRA on it too) and Qwen2 (fused q/k/v and gate/up split into PEFT's per-projection modules)."""
import json

import pytest
import torch
import transformers
from peft import PeftModel

from checkpoint import export_peft_adapter
from conftest import run_trainer, write_reverse_pairs
from hf_format import save_peft_adapter
from model import GPT, LoRALinear, apply_lora

V = 320  # beyond the byte tokenizer's vocabulary, so the trainer can fine-tune these models on byte data
BASES = {
    "gpt2": transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "llama": transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False),
    "qwen2": transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True),
}
BYTE_DATA = ["--tokenizer=byte", "--template={prompt}={response}", "--max_seq_len=32", "--batch_size=4"]
LORA_MODULES = {"gpt2": "h.", "llama": "h.,lm_head", "qwen2": "h."}  # lm_head only where it is untied


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> a directory holding a random base model, saved by transformers."""
    dirs = {}
    for family, config in BASES.items():
        torch.manual_seed(0)
        dirs[family] = tmp_path_factory.mktemp(family)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(dirs[family])
    return dirs


def tokens(n=20, seed=1):
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(seed))


def peft_logits(base_dir, adapter_dir, idx):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(idx).logits


def transformers_logits(model_dir, idx):
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()(idx).logits


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", BASES)
def test_peft_loads_the_adapter_to_our_lora_models_logits(bases, tmp_path, family):
    model = GPT.from_pretrained(bases[family])
    assert apply_lora(model, lora_dim=4, lora_scaling=3.0, module_name=LORA_MODULES[family]) > 0
    torch.manual_seed(2)
    with torch.no_grad():  # both factors away from their init, so a swapped or mis-split factor shows
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_right_weight.normal_(0, 0.3)
                m.lora_left_weight.normal_(0, 0.3)
    idx = tokens()
    with torch.no_grad():
        ours = model.eval()(idx)
    adapter = save_peft_adapter(model, tmp_path / "adapter", bases[family])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(bases[family])
    assert config["fan_in_fan_out"] == (family == "gpt2")
    diff = max_abs_diff(peft_logits(bases[family], adapter, idx), ours)
    print(f"{family}: our LoRA model -> peft adapter on the base: max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    assert max_abs_diff(transformers_logits(bases[family], idx), ours) > 1e-2  # the adapter is what matches


def test_fused_modules_become_peft_projections_sharing_one_a(bases, tmp_path):
    from safetensors.torch import load_file
    model = GPT.from_pretrained(bases["qwen2"])
    apply_lora(model, lora_dim=2, module_name="h.0.attn.c_attn,h.1.mlp.c_fc")
    tensors = load_file(save_peft_adapter(model, tmp_path, "base") / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers."
    assert sorted(tensors) == sorted(f"{prefix}{module}.lora_{ab}.weight" for ab in "AB" for module in (
        "0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj", "1.mlp.gate_proj", "1.mlp.up_proj"))
    assert tensors[prefix + "0.self_attn.q_proj.lora_B.weight"].shape == (32, 2)  # 4 heads x 8
    assert tensors[prefix + "0.self_attn.k_proj.lora_B.weight"].shape == (16, 2)  # 2 KV heads x 8
    assert torch.equal(tensors[prefix + "1.mlp.gate_proj.lora_A.weight"], tensors[prefix + "1.mlp.up_proj.lora_A.weight"])
    with pytest.raises(ValueError, match="no LoRA modules"):
        save_peft_adapter(GPT.from_pretrained(bases["qwen2"]), tmp_path / "none", "base")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_reverse_pairs(tmp_path_factory.mktemp("data") / "train.jsonl", 48)


def test_a_lora_run_exports_the_adapter_beside_the_merged_model(bases, data_file, tmp_path):
    """hf/ is the merged model, hf/adapter/ the factors alone: both give the trained model's logits."""
    out = tmp_path / "run"
    proc = run_trainer([f"--init_from={bases['llama']}", f"--data_path={data_file}", "--lora_dim=4",
                        "--lora_scaling=4", "--only_optimize_lora", "--lora_learning_rate=3e-2", "--max_steps=3",
                        f"--output_dir={out}"], tmp_path, tiny=BYTE_DATA)
    assert "export: PEFT adapter ->" in proc.stdout + proc.stderr
    idx = tokens()
    merged = transformers_logits(out / "hf", idx)
    diff = max_abs_diff(peft_logits(bases["llama"], out / "hf" / "adapter", idx), merged)
    print(f"trained llama LoRA: hf/ (merged) against peft adapter on the base: max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    assert max_abs_diff(transformers_logits(bases["llama"], idx), merged) > 1e-3  # the run did train
    manifest = json.loads((out / "hf" / "sft_manifest.json").read_text())
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(manifest["files"])


def test_no_adapter_where_it_would_not_be_the_trained_model(bases, tmp_path):
    """Without --only_optimize_lora the embeddings and norms train too; from scratch there is no base on disk."""
    model = GPT.from_pretrained(bases["gpt2"])
    apply_lora(model, lora_dim=2)
    options = {"init_from": str(bases["gpt2"]), "only_optimize_lora": False}
    export = (tmp_path / "hf.tmp", tmp_path / "hf")
    assert "no PEFT adapter: without --only_optimize_lora" in export_peft_adapter(model, options, *export)
    scratch = {"init_from": "scratch", "only_optimize_lora": True}
    assert "no PEFT adapter: --init_from=scratch is not a model" in export_peft_adapter(model, scratch, *export)
    assert not (tmp_path / "hf.tmp" / "adapter").exists()
    written = export_peft_adapter(model, {**options, "only_optimize_lora": True}, *export)
    assert written == f"export: PEFT adapter -> {tmp_path / 'hf' / 'adapter'}"
    assert (tmp_path / "hf.tmp" / "adapter" / "adapter_model.safetensors").is_file()
