"""Sparse fine-tuning: sft_kernels/sparse_adam.py against its reference, and sparse.py's optimizer,
selection and delta files against torch.optim.AdamW and plain arithmetic.

Without a GPU the Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) on tiny shapes.
Tolerances: fp32 state 1e-6 relative (the kernel and the reference round in a different order);
bf16 weights within one bf16 unit (base + delta, a hair apart in fp32, may round either way).
"""
import copy
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import checkpoint
import sft_kernels.sparse_adam as sparse_adam
import sparse
import zero_lite
from conftest import ROOT, TINY, run_trainer, train_here
from model import GPT, GPTConfig, family_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def assert_rel_close(actual, expected, tol, what):
    err = (actual.double() - expected.double()).norm()
    assert err <= tol * expected.double().norm() + 1e-12, f"{what}: relative error {err / expected.double().norm():.2e}"


def sparse_state(shape, n, dtype, seed):
    """A weight, n distinct flat indices into it, dense gradients for 3 steps and zero state."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    indices = torch.randperm(weight.numel(), generator=gen)[:n].sort().values.to(DEVICE, torch.int32)
    grads = [torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3)]
    state = dict(delta=torch.zeros(n, device=DEVICE), exp_avg=torch.zeros(n, device=DEVICE),
                 exp_avg_sq=torch.zeros(n, device=DEVICE),
                 base=weight.reshape(-1).index_select(0, indices).float())
    return weight, indices, grads, state


@pytest.mark.parametrize("shape, n, dtype, gathered, block", [
    ((4, 5), 0, torch.float32, True, 1024),       # empty index set: nothing changes
    ((4, 5), 1, torch.float32, True, 1024),       # one entry
    ((7, 13), 50, torch.float32, True, 1024),     # odd matrix
    ((7, 13), 45, torch.float32, False, 32),      # dense gradient gathered by the kernel; a partial last block
    ((33, 9), 100, torch.bfloat16, True, 32),     # bf16 weight, 4 blocks of 32 with a tail of 4
    ((33, 9), 297, torch.bfloat16, False, 64),    # every entry
])
def test_kernel_matches_reference(monkeypatch, shape, n, dtype, gathered, block):
    monkeypatch.setattr(sparse_adam, "BLOCK", block)
    weight, indices, grads, state = sparse_state(shape, n, dtype, seed=n)
    ours_w, ours = weight.clone(), {k: v.clone() for k, v in state.items()}
    ref_w, ref = weight.clone(), {k: v.clone() for k, v in state.items()}
    for step, g in enumerate(grads, start=1):
        g_in = g.reshape(-1).index_select(0, indices) if gathered else g
        sparse_adam.sparse_adamw_(ours_w, indices, g_in, **ours, **HYPER, step=step, gathered=gathered)
        sparse_adam.reference_sparse_adamw_(ref_w, indices, g_in, **ref, **HYPER, step=step, gathered=gathered)
    for key in state:
        assert_rel_close(ours[key], ref[key], 1e-6, key)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 1e-6  # bf16: base + delta may round one unit apart
    assert torch.allclose(ours_w.float(), ref_w.float(), rtol=ulp, atol=1e-6)
    untouched = torch.ones(weight.numel(), dtype=torch.bool, device=DEVICE)
    untouched[indices.long()] = False
    assert torch.equal(ours_w.reshape(-1)[untouched], weight.reshape(-1)[untouched])
    if n:
        assert ours["delta"].abs().min() > 0  # every selected entry moved


def test_reference_is_adamw_on_the_delta():
    """At full density with no weight decay, three reference steps equal torch.optim.AdamW's."""
    weight, indices, grads, state = sparse_state((6, 7), 42, torch.float32, seed=1)
    dense = weight.clone().requires_grad_()
    adamw = torch.optim.AdamW([dense], lr=HYPER["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for step, g in enumerate(grads, start=1):
        sparse_adam.reference_sparse_adamw_(weight, indices, g, **state, **{**HYPER, "weight_decay": 0.0},
                                            step=step, gathered=False)
        dense.grad = g.clone()
        adamw.step()
    assert_rel_close(weight, dense.detach(), 1e-6, "weight")


@pytest.mark.parametrize("indices, message", [
    (torch.tensor([1, 3, 3], dtype=torch.int32), "duplicates"),
    (torch.tensor([0, 20], dtype=torch.int32), r"\[0, 20\)"),
    (torch.tensor([-1], dtype=torch.int32), r"\[0, 20\)"),
    (torch.tensor([1, 2]), "int32"),
])
def test_check_indices_refuses(indices, message):
    with pytest.raises(ValueError, match=message):
        sparse_adam.check_indices(indices, 20)
    sparse_adam.check_indices(torch.tensor([], dtype=torch.int32), 20)  # empty is fine


# -----------------------------------------------------------------------------
# The optimizer on a tiny GPT


def tiny_gpt(seed=0, bias=True):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, bias=bias)).to(DEVICE)


def batch(seed, B=4, T=12):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 64, (B, T), generator=gen).to(DEVICE)
    return idx, torch.roll(idx, -1, 1)


def make_sparse(model, density, embedding=True, **kw):
    """SparseAdamW over every block Linear (and the embeddings); 1-D parameters trained densely."""
    matrices = sparse.sparse_matrices(model, "h.", embedding=embedding)
    chosen = {id(p) for _, p in matrices}
    for _, p in model.named_parameters():
        p.requires_grad_(id(p) in chosen or p.dim() == 1)
    dense = [p for p in model.parameters() if id(p) not in chosen and p.requires_grad]
    groups = [{"params": dense, "lr": 1e-2, "base_lr": 1e-2, "weight_decay": 0.0}]
    return sparse.SparseAdamW(matrices, groups, density, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, **kw)


def train(model, optimizer, steps, accum=1, seed=0):
    for step in range(steps):
        for micro in range(accum):
            idx, labels = batch(seed + step * accum + micro)
            (model(idx, labels) / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kernel", [False, True])
def test_density_one_equals_torch_adamw(kernel):
    """Every matrix sparse at density 1.0 (all entries): 10 steps equal torch.optim.AdamW's within 1e-6.
    No biases: the key bias's gradient is zero up to rounding noise, which Adam scales up to full
    steps, so rounding-level differences (base + delta against a weight updated in place) would
    decide its value."""
    ours, theirs = tiny_gpt(bias=False), tiny_gpt(bias=False)
    optimizer = make_sparse(ours, 1.0, kernel=kernel)
    reference = torch.optim.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    train(ours, optimizer, 10)
    train(theirs, reference, 10)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert_rel_close(a.detach(), b.detach(), 1e-6, name)
    assert optimizer.trainable_entries() == (sum(p.numel() for p in theirs.parameters() if p.dim() == 2),
                                             sum(p.numel() for p in theirs.parameters() if p.dim() == 1))


def test_no_dense_gradient_is_held_and_accumulation_adds_the_gathered_values():
    model = tiny_gpt()
    optimizer = make_sparse(model, 0.1)
    expected = tiny_gpt()
    for micro in range(2):
        idx, labels = batch(micro)
        model(idx, labels).backward()
        expected(idx, labels).backward()
    dense_grads = dict(expected.named_parameters())
    for name, weight, gathered in zip(optimizer.names, optimizer.matrices, optimizer.sparse_grads):
        assert weight.grad is None, f"{name} holds a dense gradient"
        want = dense_grads[name].grad.reshape(-1)[optimizer.state[weight]["indices"].long()]
        assert torch.allclose(gathered, want, atol=1e-6), name
    assert all(p.grad is not None for p in model.parameters() if p.dim() == 1)  # dense ones keep theirs
    optimizer.zero_grad(set_to_none=True)
    assert all(float(g.abs().sum()) == 0 for g in optimizer.sparse_grads)


def assert_weights_are_base_plus_delta(base_model, model, optimizer):
    """Outside the selected entries every weight is its base; inside, base + delta."""
    bases = dict(base_model.named_parameters())
    for name, weight in zip(optimizer.names, optimizer.matrices):
        state = optimizer.state[weight]
        expected = bases[name].detach().clone().reshape(-1)
        expected[state["indices"].long()] += state["delta"]
        assert torch.allclose(weight.detach().reshape(-1), expected, atol=1e-6), name
        sparse_adam.check_indices(state["indices"], weight.numel())
        assert torch.equal(state["indices"], state["indices"].sort().values)


def test_drop_and_regrow_keeps_the_count_and_the_base():
    base, model = tiny_gpt(), tiny_gpt()
    optimizer = make_sparse(model, 0.1, regrow_interval=2, regrow_share=0.5, total_steps=100)
    before = {n: optimizer.state[w]["indices"].clone() for n, w in zip(optimizer.names, optimizer.matrices)}
    train(model, optimizer, 4, accum=2)
    assert optimizer._grad_sums == [None] * len(optimizer.matrices) and not optimizer.collecting
    changed = 0
    for name, weight in zip(optimizer.names, optimizer.matrices):
        indices = optimizer.state[weight]["indices"]
        assert indices.numel() == before[name].numel()
        changed += int((~torch.isin(indices, before[name])).sum())
    assert changed > 0
    assert_weights_are_base_plus_delta(base, model, optimizer)


def test_select_by_gradient_takes_the_largest_summed_gradients():
    model, probe = tiny_gpt(), tiny_gpt()
    optimizer = make_sparse(model, 0.05)
    optimizer.select_by_gradient(lambda: [model(*batch(i)).backward() for i in range(2)])
    for i in range(2):
        probe(*batch(i)).backward()
    grads = dict(probe.named_parameters())
    for name, weight in zip(optimizer.names, optimizer.matrices):
        indices = optimizer.state[weight]["indices"]
        score = grads[name].grad.abs().reshape(-1)
        assert score[indices.long()].min() >= score.topk(indices.numel()).values.min() - 1e-7, name
        assert weight.grad is None
    assert all(float(g.abs().sum()) == 0 for g in optimizer.sparse_grads)
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_state_dict_round_trip():
    """A resumed optimizer continues exactly as the one it was saved from (int32 indices stay int32),
    the regrow at the step after the save included."""
    model = tiny_gpt()
    regrow = dict(regrow_interval=4, regrow_share=0.5, total_steps=100)
    optimizer = make_sparse(model, 0.2, embedding=True, **regrow)
    train(model, optimizer, 3)
    saved = copy.deepcopy(optimizer.state_dict())
    twin = copy.deepcopy(model)
    twin_optimizer = make_sparse(twin, 0.2, embedding=True, seed=5, **regrow)  # another initial selection
    twin_optimizer.load_state_dict(saved)
    assert twin_optimizer.state[twin_optimizer.matrices[0]]["indices"].dtype == torch.int32
    train(model, optimizer, 2, seed=50)
    train(twin, twin_optimizer, 2, seed=50)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_state_bytes_grow_with_density():
    model = tiny_gpt()
    entries = sum(p.numel() for _, p in sparse.sparse_matrices(model, "h."))
    dense_bytes = 2 * 4 * sum(p.numel() for p in model.parameters() if p.dim() == 1)
    for density in (0.1, 0.5):
        optimizer = make_sparse(tiny_gpt(), density, embedding=False)
        n = optimizer.trainable_entries()[0]
        assert abs(n - density * entries) <= len(optimizer.matrices)
        assert optimizer.state_bytes() == n * 5 * 4 + dense_bytes  # indices, delta, 2 moments, base


def test_engine_memory_report_counts_the_gathered_gradients_not_dense_ones():
    """The native engine's report holds a sparse matrix's gradient at its trainable entries only."""
    model = tiny_gpt()
    optimizer = make_sparse(model, 0.1, embedding=False)
    report = zero_lite.Engine(model, optimizer).memory_report()
    dense = sum(p.numel() for group in optimizer.param_groups if not group["sparse"] for p in group["params"])
    assert report["grads"] == 4 * (dense + optimizer.trainable_entries()[0])


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5])
def test_bad_density(density):
    with pytest.raises(ValueError, match="density must be in"):
        make_sparse(tiny_gpt(), density)


def test_pattern_matching_nothing():
    with pytest.raises(ValueError, match="'nothing' matches no Linear"):
        sparse.sparse_matrices(tiny_gpt(), "nothing")
    names = [n for n, _ in sparse.sparse_matrices(tiny_gpt(), "mlp", embedding=True)]
    assert names == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.mlp.c_fc.weight",
                     "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_fc.weight",
                     "transformer.h.1.mlp.c_proj.weight"]


def test_untied_head_counts_as_an_embedding_and_trains():
    """A Llama-shaped model: the untied lm_head is chosen with the embeddings, and every chosen matrix's
    gradient reaches its selected entries (rotary, RMSNorm and SwiGLU in between)."""
    torch.manual_seed(0)
    model = GPT(family_config("llama", block_size=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1,
                              n_embd=16)).to(DEVICE)
    names = [n for n, _ in sparse.sparse_matrices(model, "h.", embedding=True)]
    assert (names[0], names[-1], len(names)) == ("transformer.wte.weight", "lm_head.weight", 2 + 4 * 2)
    assert "lm_head.weight" not in [n for n, _ in sparse.sparse_matrices(model, "h.")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, make_sparse(model, 0.1), 2)
    for name in names:
        changed = (dict(model.named_parameters())[name] != before[name]).sum().item()
        assert 0 < changed <= sparse.entries_for(before[name].numel(), 0.1), name


# -----------------------------------------------------------------------------
# Delta files


def test_delta_round_trip_and_merge(tmp_path):
    base, model = tiny_gpt(), tiny_gpt()
    optimizer = make_sparse(model, 0.05, embedding=False)
    for p in model.parameters():
        if p.dim() == 1:
            p.requires_grad_(False)  # only the sparse entries train, so the delta is the whole change
    train(model, optimizer, 3)
    path = sparse.save_delta(optimizer, str(tmp_path / "delta.safetensors"), base_name="tiny")
    tensors = load_file(path)
    assert set(tensors) == {f"{n}.{k}" for n in optimizer.names for k in ("indices", "delta")}
    names = sparse.load_delta(base, path)
    assert names == sorted(optimizer.names)
    for a, b in zip(base.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    merged = tmp_path / "merged"
    base.save_pretrained(str(merged))
    assert torch.equal(GPT.from_pretrained(str(merged)).transformer.h[0].mlp.c_fc.weight,
                       model.transformer.h[0].mlp.c_fc.weight)


def test_merge_into_an_export_renews_its_checksums_and_refuses_a_damaged_base(tmp_path, capsys):
    base = tiny_gpt()
    export = tmp_path / "hf"
    base.save_pretrained(str(export))
    checkpoint.write_export_manifest(str(export))
    model = copy.deepcopy(base)
    optimizer = make_sparse(model, 0.05, embedding=False)
    train(model, optimizer, 2)
    delta = sparse.save_delta(optimizer, str(tmp_path / "delta.safetensors"))
    sparse.main(["merge", f"--base={export}", f"--delta={delta}", f"--out={export}"])
    checkpoint.check_export(str(export), "--model")  # the merged weights are what the manifest lists
    merged = GPT.from_pretrained(str(export)).transformer.h[0].mlp.c_fc.weight
    assert not torch.equal(merged, base.transformer.h[0].mlp.c_fc.weight)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    with pytest.raises(SystemExit) as stop:
        sparse.main(["merge", f"--base={export}", f"--delta={delta}", f"--out={tmp_path / 'out'}"])
    assert stop.value.code == 2
    assert f"--base={export} does not match the export's checksums" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_delta_that_does_not_fit(tmp_path):
    model = tiny_gpt()
    optimizer = make_sparse(model, 0.05, embedding=False)
    train(model, optimizer, 1)
    path = sparse.save_delta(optimizer, str(tmp_path / "delta.safetensors"))
    other_base = tiny_gpt(seed=1)
    before = copy.deepcopy(other_base.state_dict())
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.weight was trained on other base"):
        sparse.load_delta(other_base, path)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), other_base.state_dict().values()))
    wider = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight has shape \[48, 16\]"):
        sparse.load_delta(wider, path)
    deeper_delta = dict(load_file(path))
    deeper_delta["transformer.h.5.mlp.c_fc.weight.indices"] = torch.tensor([0], dtype=torch.int32)
    deeper_delta["transformer.h.5.mlp.c_fc.weight.delta"] = torch.tensor([1.0])
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    metadata["transformer.h.5.mlp.c_fc.weight"] = metadata["transformer.h.0.mlp.c_fc.weight"]
    save_file(deeper_delta, str(tmp_path / "deeper.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="tensor transformer.h.5.mlp.c_fc.weight is not in the model"):
        sparse.load_delta(tiny_gpt(), str(tmp_path / "deeper.safetensors"))
    with pytest.raises(ValueError, match="is not a sparse delta"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        sparse.load_delta(tiny_gpt(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="cannot be read"):
        sparse.load_delta(tiny_gpt(), str(tmp_path / "missing.safetensors"))


# -----------------------------------------------------------------------------
# In the trainer: train_sft.py --sparse_density, on one and two ranks

SPARSE_TINY = [*TINY, "--bias=false", "--max_steps=4"]
# Records the bytes of every all_reduce of more than 16 elements (the gradients; the loss and token
# counts are a few numbers) in the file $COUNT_FILE.<rank>.
COUNTING_DRIVER = """
import json, os, sys
import torch.distributed as dist
import train_sft
calls, all_reduce = [], dist.all_reduce
def counting(tensor, *args, **kwargs):
    if tensor.numel() > 16:
        calls.append(tensor.numel() * tensor.element_size())
    return all_reduce(tensor, *args, **kwargs)
dist.all_reduce = counting
train_sft.main(sys.argv[1:])
json.dump(calls, open(f"{os.environ['COUNT_FILE']}.{os.environ.get('RANK', '0')}", "w"))
"""


def train_in_process(args, tmp_path, check=True):
    """One rank in this process, on the tiny model without biases, 4 steps."""
    return train_here(args, tmp_path, check=check, tiny=SPARSE_TINY)


def losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def test_density_one_run_matches_a_dense_run(tmp_path, data_file):
    """Every matrix (embeddings too) sparse at density 1.0: the same losses as the dense run."""
    common = [f"--data_path={data_file}"]
    train_in_process(common + [f"--output_dir={tmp_path / 'dense'}"], tmp_path)
    train_in_process(common + ["--sparse_density=1.0", "--sparse_embedding", f"--output_dir={tmp_path / 'sparse'}"],
                     tmp_path)
    assert os.path.exists(tmp_path / "sparse" / "sparse_delta.safetensors")
    dense, ours = losses(tmp_path / "dense"), losses(tmp_path / "sparse")
    assert len(dense) == len(ours) == 4
    assert all(abs(a - b) <= 1e-5 for a, b in zip(dense, ours)), (dense, ours)


@pytest.mark.slow
def test_two_ranks_match_one_rank_and_only_the_selected_entries_cross(tmp_path, data_file):
    """Sparse 1% with drop/regrow every 2 steps: 2 ranks x 1 micro-batch give the losses of 1 rank x 2,
    and each step all-reduces the selected entries' gradients plus the dense 1-D ones, nothing more."""
    common = [f"--data_path={data_file}", "--sparse_density=0.01", "--sparse_regrow_interval=2",
              "--sparse_regrow_share=0.5", "--sparse_init=gradient"]
    train_in_process(common + ["--gradient_accumulation_steps=2", f"--output_dir={tmp_path / 'one'}"], tmp_path)
    driver = tmp_path / "count_all_reduce.py"
    driver.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\n" + COUNTING_DRIVER)
    counts = tmp_path / "counts"
    proc = run_trainer(common + [f"--output_dir={tmp_path / 'two'}"], tmp_path, nproc=2, script=str(driver),
                       env={"COUNT_FILE": str(counts)}, tiny=SPARSE_TINY)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert all(abs(a - b) <= 1e-5 for a, b in zip(one, two)), (one, two)
    entries, total, dense = (int(x.replace(",", "")) for x in re.search(
        r"sparse: ([\d,]+) of ([\d,]+) entries in \d+ matrices \([\d.]+%\) and ([\d,]+) dense",
        proc.stdout + proc.stderr).groups())
    matrices = [p.numel() for _, p in sparse.sparse_matrices(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32)), "h.")]
    assert total == sum(matrices) and entries == sum(sparse.entries_for(n, 0.01) for n in matrices)
    # Each step: the dense (LayerNorm) gradients in stage 0's bucket, all-reduced during the backward, and
    # the gathered entries after it. Once before the first step (the probe) and once at the regrow (step 2;
    # at step 4 the share has decayed to 0), each matrix's dense gradient sum, which chooses the entries.
    expected = [4 * dense, 4 * entries] * 4 + [4 * n for n in matrices] * 2
    assert sorted(json.load(open(f"{counts}.0"))) == sorted(expected)


@pytest.mark.parametrize("argv, message", [
    (["--sparse_density=1.5"], "--sparse_density must be between 0 and 1"),
    (["--sparse_density=-0.1"], "--sparse_density must be between 0 and 1"),
    (["--sparse_density=0.1", "--sparse_pattern=nothing"], "--sparse_pattern: pattern 'nothing' matches no Linear"),
    (["--sparse_density=0.1", "--lora_dim=2"], "--sparse_density cannot be combined with --lora_dim"),
    (["--sparse_density=0.1", "--zero_stage=1"], "--zero_stage=1 cannot carry its sparse gradients"),
])
def test_bad_sparse_options_are_refused(tmp_path, data_file, argv, message):
    proc = train_in_process([f"--data_path={data_file}", f"--output_dir={tmp_path}"] + argv, tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_resumed_sparse_run_gives_the_uninterrupted_losses_and_delta(tmp_path, data_file):
    """Resume at step 3 of 6 with a regrow at step 4: the same losses, model and delta file."""
    import shutil
    common = [f"--data_path={data_file}", "--max_steps=6", "--checkpoint_interval=3", "--keep_checkpoints=5",
              "--sparse_density=0.05", "--sparse_regrow_interval=4", "--sparse_regrow_share=0.5"]
    full, part = tmp_path / "full", tmp_path / "part"
    train_in_process(common + [f"--output_dir={full}"], tmp_path)
    part.mkdir()
    shutil.copytree(full / "ckpt-00000003", part / "ckpt-00000003")
    train_in_process(common + ["--resume", f"--output_dir={part}"], tmp_path)
    assert losses(part)[-3:] == losses(full)[-3:]
    for name in ("hf/model.safetensors", "sparse_delta.safetensors"):
        a, b = load_file(full / name), load_file(part / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
