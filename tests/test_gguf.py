"""gguf_format.py and the GGUF tokenizer, against code the project did not write: transformers' own GGUF
loading (AutoModelForCausalLM / AutoTokenizer with gguf_file=...).

The tiny files are written here with gguf.GGUFWriter the way llama.cpp's converter writes them (tensor
names, metadata keys, a Llama's q/k rows in its interleaved rotary order), from random models whose norms
and biases are moved off their init values so that a wrong mapping cannot hide; nothing is downloaded.
The SmolLM2 file that `bash setup.sh --model=smollm2-135m` fetches is checked where it is present.
"""
import json
import os
import gguf
import numpy as np
import pytest
import regex
import torch
import transformers

import gguf_format
from conftest import CHATML_TEMPLATE, ROOT, make_chatml_tokenizer_dir, write_reverse_pairs
from model import GPT, apply_lora, family_config
from tokenizer import ChatTemplate, get_tokenizer, gguf_tokenizer_metadata

Q = gguf.GGMLQuantizationType
# One tensor type per matrix of a two-layer Llama, so one file (one transformers load) covers them all.
TENSOR_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
SMOLLM2 = os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: more threads only add contention on a busy 2-core box. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """(tokens, merges, token types) of a tiny byte-level BPE with ChatML's special tokens."""
    directory = make_chatml_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))
    spec = json.load(open(os.path.join(directory, "tokenizer.json")))
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {t["content"] for t in spec["added_tokens"]}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    return tokens, merges, types


def random_blocks(qtype, rows, columns, rng):
    """Random bytes of a K-quant tensor (gguf cannot quantize these types) with small, finite f16 scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * columns // block_size, type_size), dtype=np.uint8)
    scale_at = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [type_size - 2]}[qtype]  # d (and dmin) of each block
    for at in scale_at:
        scales = rng.uniform(2e-4, 6e-4, len(blocks)).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def encoded(array, qtype, rng):
    """array (float32, rows x columns) in GGUF tensor type qtype, as the bytes GGUFWriter takes."""
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return random_blocks(qtype, *array.shape, rng)
    return gguf.quants.quantize(array, qtype)


def permute_like_llama_cpp(weight, n_head):
    """llama.cpp's converter's order for a Llama's q/k rows: each head's two halves interleaved."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(path, model, tokenizer, types=(Q.F32,), pre="gpt2", name="tiny", chat_template=CHATML_TEMPLATE,
               skip=(), extra_metadata=None):
    """Write model (our GPT) as llama.cpp would: metadata of its architecture, the tokenizer (tokens,
    merges, types, ids; pre-tokenizer `pre`), its matrices in tensor types cycling through `types` (norms
    and biases F32). skip names metadata keys to leave out; extra_metadata adds {key: string}."""
    cfg, rng = model.config, np.random.default_rng(0)
    arch = "llama" if cfg.model_type == "mistral" else cfg.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_head_count_kv(cfg.n_kv_head)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    tokens, merges, token_types = tokenizer
    if "tokenizer" not in skip:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_bos_token_id(tokens.index("<|im_start|>"))
        writer.add_pad_token_id(tokens.index("<|endoftext|>"))
        writer.add_chat_template(chat_template)
    for key, value in (extra_metadata or {}).items():
        writer.add_string(key, value)
    weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    matrices = 0
    for key, parts in gguf_format.gguf_tensor_names(cfg, weights).items():
        rows = [cfg.n_head * cfg.head_dim] + [cfg.n_kv_head * cfg.head_dim] * 2 if len(parts) == 3 else None
        pieces = np.split(weights[key], np.cumsum(rows)[:-1] if rows else len(parts))
        for tensor_name, piece in zip(parts, pieces):
            if arch == "llama" and tensor_name.endswith(("attn_q.weight", "attn_k.weight")):
                piece = permute_like_llama_cpp(piece, piece.shape[0] // cfg.head_dim)
            qtype = Q.F32
            if piece.ndim == 2:
                qtype, matrices = types[matrices % len(types)], matrices + 1
            writer.add_tensor(tensor_name, encoded(np.ascontiguousarray(piece), qtype, rng), raw_dtype=qtype)
    if arch == "gpt2":  # llama.cpp's converter repeats GPT-2's tied embedding as its head
        writer.add_tensor("output.weight", weights["transformer.wte.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def random_model(family, vocab_size, seed=0, **sizes):
    """A random GPT of the family with perturbed norms and biases, a little larger than its init."""
    torch.manual_seed(seed)
    shape = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=vocab_size)
    if family != "gpt2":
        shape.update(n_kv_head=2, intermediate_size=96, rope_theta=500.0, norm_eps=1e-5,
                     tie_word_embeddings=family in ("qwen2", "gpt2"))
    if family == "gpt2":  # transformers reads gpt2.context_length as n_ctx, not n_positions: its default, 1024
        shape.update(block_size=1024)
    if family == "qwen3":
        shape.update(head_dim=128)  # transformers reads no head size from a qwen3 GGUF: its default, 128
    model = GPT(family_config(family, **{**shape, **sizes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(4.0)
    return model


def transformers_logits(path, idx):
    reference = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                                  gguf_file=os.path.basename(path)).eval()
    with torch.no_grad():
        return reference(idx).logits


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_tiny_gguf_of_each_family_gives_transformers_logits(family, tiny_tokenizer, tmp_path):
    source = random_model(family, len(tiny_tokenizer[0]))
    path = write_gguf(tmp_path / f"{family}.gguf", source, tiny_tokenizer,
                      name="Mistral tiny" if family == "mistral" else "tiny")
    ours = GPT.from_pretrained(path).eval()
    assert ours.config.model_type == family  # a llama file named Mistral reads as mistral, as in transformers
    assert ours.config.tie_word_embeddings == source.config.tie_word_embeddings
    idx = torch.randint(0, source.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(idx)
        assert (logits - source(idx)).abs().max() < 1e-4  # F32: the very weights written
    assert (logits - transformers_logits(path, idx)).abs().max() < 1e-4


def test_every_tensor_type_dequantizes_as_transformers_does(tiny_tokenizer, tmp_path):
    """A Llama whose matrices cycle through F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K (rows of
    256 values: the K-quants' block), untied head: the same logits as transformers' own dequantizers."""
    source = random_model("llama", len(tiny_tokenizer[0]), n_embd=256, intermediate_size=256, n_head=4,
                          n_kv_head=2, n_layer=1, tie_word_embeddings=False)
    path = write_gguf(tmp_path / "types.gguf", source, tiny_tokenizer, types=TENSOR_TYPES)
    reader = gguf_format.open_gguf(path)
    assert {t.tensor_type for t in reader.tensors} == set(TENSOR_TYPES)
    ours = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, source.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = ours(idx)
    assert (logits - transformers_logits(path, idx)).abs().max() < 1e-4



V = gguf.GGUFValueType
# (value, its GGUF type, the item type of an array): every metadata type, each at a value its width needs.
EVERY_VALUE_TYPE = {"u8": (200, V.UINT8), "i8": (-100, V.INT8), "u16": (60000, V.UINT16), "i16": (-30000, V.INT16),
                    "u32": (4_000_000_000, V.UINT32), "i32": (-2_000_000_000, V.INT32),
                    "u64": (2 ** 63 + 5, V.UINT64), "i64": (-2 ** 62, V.INT64), "f32": (-0.375, V.FLOAT32),
                    "f64": (1e-300, V.FLOAT64), "yes": (True, V.BOOL), "no": (False, V.BOOL),
                    "text": ("héllo ▁ 世界\n", V.STRING), "empty": ("", V.STRING),
                    "ints": ([3, -1, 7], V.ARRAY, V.INT32), "floats": ([0.25, -2.0], V.ARRAY, V.FLOAT32),
                    "words": (["a", "", "ü b", "<|im_end|>"], V.ARRAY, V.STRING),
                    "nested": ([[1, 2], [3]], V.ARRAY, V.ARRAY)}


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_gguf_metadata_and_tensors_read_back_as_written(endian, tmp_path):
    """read_gguf against the values gguf.GGUFWriter wrote, in either byte order: every metadata type and
    arrays of numbers, strings and arrays; plain tensors (any shape) and a block-quantized one as stored."""
    path, rng = str(tmp_path / "values.gguf"), np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama", endianess=endian)
    for key, (value, *types) in EVERY_VALUE_TYPE.items():
        writer.add_key_value(f"test.{key}", value, *types)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float16),
               "c": rng.integers(-9, 9, (2, 3, 4)).astype(np.int32)}
    if endian == gguf.GGUFEndian.LITTLE:  # a quantized block's scale has no big-endian form in gguf
        tensors["q"] = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), Q.Q8_0)
    for name, array in tensors.items():
        writer.add_tensor(name, array.copy(), raw_dtype=Q.Q8_0 if name == "q" else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    read = gguf_format.read_gguf(path)
    assert read.metadata == {"general.architecture": "llama",
                             **{f"test.{key}": value for key, (value, *_) in EVERY_VALUE_TYPE.items()}}
    assert [t.name for t in read.tensors] == list(tensors)
    for tensor, array in zip(read.tensors, tensors.values()):
        assert tensor.data.shape == array.shape and np.array_equal(tensor.data, array), tensor.name
    assert read.tensors[-1].tensor_type == (Q.Q8_0 if "q" in tensors else Q.I32)
    assert read.tensors[0].shape == (5, 3)  # GGUF lists the fastest dimension first


# ----------------------------------------------------------------------------- tokenizers

def real_text():
    """Paragraphs of the project's own README and docs: real English, code, numbers and markup."""
    paragraphs = []
    for name in ["README.md", *sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")))]:
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        paragraphs += [p for p in text.split("\n\n") if p.strip()]
    return paragraphs


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe", "qwen2"])
def test_gguf_tokenizer_gives_transformers_ids_on_real_text(pre, tiny_tokenizer, tmp_path):
    path = write_gguf(tmp_path / "t.gguf", random_model("llama", len(tiny_tokenizer[0]), n_layer=1),
                      tiny_tokenizer, pre=pre)
    ours = get_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    paragraphs = real_text() + ["year 2024: 12345 + 678 = 13023", "it's  two\n\n\n  spaces\tand <|im_end|> here"]
    for text in paragraphs:
        assert ours.encode(text, allowed_special="all") == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text, allowed_special="all")) == text
    assert ours.eot_token == tiny_tokenizer[0].index("<|im_end|>")
    assert ours.encode_ordinary("<|im_end|>") != [ours.eot_token]  # special tokens in data stay text
    messages = [{"role": "user", "content": "what is two plus four"}, {"role": "assistant", "content": "six"}]
    chat = ChatTemplate(ours)
    assert chat.encode(messages) == theirs.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert chat.end_of_turn == ours.eot_token


# ----------------------------------------------------------------------------- bad input, through the trainer

def trainer(args, tmp_path):
    """(exit status, sentence) of a tiny trainer run, in this process (train_sft.outcome maps errors to codes)."""
    import train_sft
    tmp_path.mkdir(parents=True)
    data = write_reverse_pairs(tmp_path / "train.jsonl", 40)
    return train_sft.outcome([f"--data_path={data}", "--max_steps=1", "--max_seq_len=32", "--batch_size=2",
                              f"--output_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}", *args])


def bad_files(tmp_path, tiny_tokenizer):
    """{name: (path, what its one-sentence error must say)}."""
    good = write_gguf(tmp_path / "good.gguf", random_model("llama", len(tiny_tokenizer[0]), n_layer=1),
                      tiny_tokenizer)
    data = open(good, "rb").read()
    (tmp_path / "truncated.gguf").write_bytes(data[:len(data) // 3])
    (tmp_path / "version.gguf").write_bytes(data[:4] + (4).to_bytes(4, "little") + data[8:])
    (tmp_path / "foreign.gguf").write_bytes(b"PK\x03\x04" + os.urandom(200))
    unknown_arch = write_gguf(tmp_path / "arch.gguf", random_model("llama", len(tiny_tokenizer[0]), n_layer=1),
                              tiny_tokenizer)
    raw = open(unknown_arch, "rb").read().replace(b"llama", b"bloom")  # architecture and its keys' prefix
    (tmp_path / "arch.gguf").write_bytes(raw)
    no_tokenizer = write_gguf(tmp_path / "no_tokenizer.gguf", random_model("llama", len(tiny_tokenizer[0]),
                              n_layer=1), tiny_tokenizer, skip=("tokenizer",))
    unknown_pre = write_gguf(tmp_path / "pre.gguf", random_model("llama", len(tiny_tokenizer[0]), n_layer=1),
                             tiny_tokenizer, pre="made-up")
    odd_type = write_odd_tensor_type(tmp_path / "type.gguf", tiny_tokenizer)
    return {"truncated": (str(tmp_path / "truncated.gguf"), "is not a readable GGUF file"),
            "foreign": (str(tmp_path / "foreign.gguf"), "is not a readable GGUF file"),
            "version": (str(tmp_path / "version.gguf"), "GGUF version 4 is not one this reader knows"),
            "architecture": (str(tmp_path / "arch.gguf"), "architecture 'bloom' is not supported"),
            "tensor type": (odd_type, "is of type Q8_K, which cannot be dequantized"),
            "no tokenizer": (no_tokenizer, "holds no tokenizer"),
            "pre-tokenizer": (unknown_pre, "pre-tokenizer 'made-up' (tokenizer.ggml.pre) is not one")}


def write_odd_tensor_type(path, tiny_tokenizer):
    """A Llama whose ffn_down is stored as Q8_K, a type gguf reads but cannot dequantize."""
    model = random_model("llama", len(tiny_tokenizer[0]), n_layer=1, n_embd=256, intermediate_size=256)
    write_gguf(path, model, tiny_tokenizer)
    reader = gguf.GGUFReader(path)  # gguf's own reader keeps each value's type, which the rewrite needs
    writer = gguf.GGUFWriter(str(path) + ".tmp", "llama")
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_K]
    for tensor in reader.tensors:
        if tensor.name == "blk.0.ffn_down.weight":
            writer.add_tensor(tensor.name, np.zeros((256, 256 // block_size * type_size), np.uint8), raw_dtype=Q.Q8_K)
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(path) + ".tmp", path)
    return str(path)


@pytest.fixture(scope="module")
def bad(tiny_tokenizer, tmp_path_factory):
    return bad_files(tmp_path_factory.mktemp("bad"), tiny_tokenizer)


def test_bad_gguf_files_are_named_in_one_sentence(bad):
    for what, (path, message) in bad.items():
        load = get_tokenizer if what in ("no tokenizer", "pre-tokenizer") else GPT.from_pretrained
        with pytest.raises(ValueError) as error:
            load(path)
        assert message in str(error.value) and path in str(error.value) and "\n" not in str(error.value), what


def test_bad_gguf_through_the_trainer_exits_2(bad, tmp_path):
    """One run per place the trainer reads a GGUF: the model (a damaged file, a tensor type) and the tokenizer."""
    for what in ("truncated", "tensor type", "no tokenizer"):
        path, message = bad[what]
        exit_code, error = trainer([f"--init_from={path}"], tmp_path / what.replace(" ", "_"))
        assert exit_code == 2 and message in error and path in error and "\n" not in error, (what, error)
        assert not os.path.exists(tmp_path / what.replace(" ", "_") / "out" / "hf")


# ----------------------------------------------------------------------------- GGUF out

# Largest |logit difference| read back, as a share of the largest |logit|: f32 is exact up to float
# rounding; f16 and q8_0 round every matrix (measured about 6e-4 and 1.6e-2 on these models).
EXPORT_BOUNDS = {"f32": 1e-4, "f16": 2e-3, "q8_0": 5e-2}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gguf_export_reads_back_in_transformers(family, tiny_tokenizer, tmp_path):
    tokenizer_dir = make_chatml_tokenizer_dir(tmp_path / "tokenizer")
    enc = get_tokenizer(tokenizer_dir)
    model = random_model(family, enc.n_vocab + 9)  # padded rows, as a run from scratch has
    apply_lora(model, 4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_left" in name:
                p.normal_(0, 0.05)  # a LoRA delta that is not zero, to be merged into the file
    idx = torch.randint(0, enc.n_vocab, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(idx)
    for kind, bound in EXPORT_BOUNDS.items():
        path = tmp_path / f"model-{kind}.gguf"
        gguf_format.save_gguf(model, gguf_tokenizer_metadata(enc, model.config.vocab_size), path, kind, name="test")
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left behind
        back = transformers_logits(str(path), idx)
        scale = expected.abs().max()
        assert (back - expected).abs().max() <= bound * (scale if kind != "f32" else 1), kind
        assert (GPT.from_pretrained(str(path)).eval()(idx) - back).abs().max() < 1e-4, kind  # ours reads it alike
    exported = get_tokenizer(str(path))
    text = " ".join(real_text()[:5]) + " <|im_end|>"
    assert exported.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert (exported.chat_template, exported.eot_token) == (enc.chat_template, enc.eot_token)
    assert exported.n_vocab == model.config.vocab_size  # one token per embedding row, as llama.cpp wants


def test_the_trainer_fine_tunes_a_gguf_and_exports_one_that_sample_chats_with(tiny_tokenizer, tmp_path, capsys):
    import sample
    source = write_gguf(tmp_path / "base.gguf", random_model("llama", len(tiny_tokenizer[0]), n_layer=1),
                        tiny_tokenizer)
    exit_code, sentence = trainer([f"--init_from={source}", "--template=model", "--export_gguf=q8_0",
                                   "--learning_rate=1e-3"], tmp_path / "run")
    assert exit_code == 0, sentence
    exported = str(tmp_path / "run" / "out" / "model-q8_0.gguf")
    assert sorted(f for f in os.listdir(tmp_path / "run" / "out") if "gguf" in f) == ["model-q8_0.gguf"]
    assert GPT.from_pretrained(exported).config.n_layer == 1
    hf_dir = str(tmp_path / "run" / "out" / "hf")  # the Hugging Face export holds the GGUF's tokenizer too
    text = " ".join(real_text()[:3]) + "<|im_end|>"
    assert transformers.AutoTokenizer.from_pretrained(hf_dir)(text, add_special_tokens=False)["input_ids"] == \
        get_tokenizer(source).encode(text, allowed_special="all")
    assert ChatTemplate(get_tokenizer(hf_dir)).encode([{"role": "user", "content": "hi"}]) == \
        ChatTemplate(get_tokenizer(source)).encode([{"role": "user", "content": "hi"}])
    capsys.readouterr()
    for model in (exported, source, hf_dir):
        sample.main([f"--model={model}", "--prompt=hello", "--max_new_tokens=4"])
    assert len(capsys.readouterr().out.splitlines()) == 3
    exit_code, sentence = trainer([f"--init_from={source}", "--tokenizer=byte", "--max_seq_len=96",
                                   "--export_gguf=f16"], tmp_path / "byte")
    assert exit_code == 2 and "--export_gguf=f16: the byte tokenizer has no GGUF form" in sentence, sentence


# ----------------------------------------------------------------------------- a GGUF-initialised run's export

def test_a_gguf_initialised_run_exports_hf_whole_and_its_lora_adapter(tiny_tokenizer, tmp_path):
    """hf/ as from a directory: transformers loads the weights, AutoTokenizer the GGUF's tokenizer (the same
    ids) and chat template, the manifest lists them, sample.py's loader reads it back; the LoRA factors are
    an adapter that peft puts onto transformers' own load of the GGUF file, to the merged model's logits."""
    from peft import PeftModel
    import checkpoint
    path = write_gguf(tmp_path / "tiny.gguf", random_model("llama", len(tiny_tokenizer[0])), tiny_tokenizer)
    status, sentence = trainer([f"--init_from={path}", "--lora_dim=4", "--only_optimize_lora",
                                "--lora_learning_rate=3e-2", "--max_steps=2", "--max_seq_len=64",
                                "--template={prompt}={response}"], tmp_path / "run")
    assert status == 0, sentence
    hf = tmp_path / "run" / "out" / "hf"
    ours, exported = get_tokenizer(path), transformers.AutoTokenizer.from_pretrained(hf)
    text = "<|im_start|>user\nreverse the words, please<|im_end|>\n"
    assert exported.encode(text) == ours.encode(text, allowed_special="all")
    assert exported.chat_template == ours.chat_template and exported.eos_token == "<|im_end|>"
    manifest = json.loads((hf / "sft_manifest.json").read_text())["files"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors",
            "adapter/adapter_model.safetensors"} <= set(manifest)
    model, trained_with = checkpoint.load_model(str(hf))  # what sample.py --model=.../hf loads
    assert get_tokenizer(trained_with["tokenizer"]).stop_tokens == ours.stop_tokens
    idx = torch.randint(0, len(tiny_tokenizer[0]), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()(idx).logits
        assert (model.eval()(idx) - merged).abs().max().item() < 1e-4
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
        adapted = PeftModel.from_pretrained(base, hf / "adapter").eval()(idx).logits
    assert (adapted - merged).abs().max().item() < 1e-4
    assert (transformers_logits(path, idx) - merged).abs().max().item() > 1e-3  # the run did train


# ----------------------------------------------------------------------------- the real model, where present

needs_smollm2 = pytest.mark.skipif(not os.path.isfile(SMOLLM2), reason=f"{SMOLLM2} is not here: "
                                   "`bash setup.sh --model=smollm2-135m` fetches it")


def conversations(count=200):
    """count chats of real text: half from paragraphs of README and docs (question, answer and a second
    turn, some with a system message), half from the demo task's eval rows, as a user would chat them."""
    from data import demo_examples
    paragraphs = real_text()
    chats = []
    for i in range(count // 2):
        a, b, c = (paragraphs[(3 * i + k) % len(paragraphs)] for k in range(3))
        chat = [{"role": "user", "content": a}, {"role": "assistant", "content": b}]
        if i % 3 == 0:
            chat = [{"role": "system", "content": "You answer from the project's documentation."}] + chat
        if i % 2 == 0:
            chat += [{"role": "user", "content": c[:200]}, {"role": "assistant", "content": c[200:] or "Yes."}]
        chats.append(chat)
    for row in demo_examples(train_per_task=0, eval_per_task=count // 10)[1][:count - len(chats)]:
        chats.append([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}])
    return chats


@pytest.fixture(scope="module")
def smollm2():
    """(our GPT, transformers' model, our tokenizer, transformers' tokenizer) of the SmolLM2 file."""
    if not os.path.isfile(SMOLLM2):
        pytest.skip(f"{SMOLLM2} is not here: `bash setup.sh --model=smollm2-135m` fetches it")
    directory, name = os.path.split(SMOLLM2)
    return (GPT.from_pretrained(SMOLLM2).eval(),
            transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).eval(),
            get_tokenizer(SMOLLM2), transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name))


def digits_apart(reference, text):
    """transformers' ids for text cut before and after every digit first, as llama.cpp splits for the
    pre-tokenizer 'smollm' (its regexes run in turn: \\p{N}, then GPT-2's). transformers' GGUF loader has no
    entry for 'smollm' and splits as plain GPT-2, which differs where whitespace runs into a number."""
    return [i for piece in regex.split(r"(\p{N})", text) if piece
            for i in reference.encode(piece, add_special_tokens=False)]


@pytest.mark.slow
def test_smollm2_gguf_gives_transformers_logits_and_ids(smollm2):
    ours, theirs, enc, reference = smollm2
    assert (ours.config.model_type, ours.config.n_layer, ours.config.n_kv_head, ours.config.vocab_size) == \
        ("llama", 30, 3, 49152)
    chat = ChatTemplate(enc)
    differing = []
    for messages in conversations(200):
        text = reference.apply_chat_template(messages, tokenize=False)
        assert chat.render(messages) == text
        assert chat.encode(messages) == digits_apart(reference, text)
        if chat.encode(messages) != reference.apply_chat_template(messages, tokenize=True, return_dict=False):
            differing.append(text)
    assert all(regex.search(r"\s\s\p{N}", text) for text in differing)  # only where the splits disagree
    prompts = [chat.encode(messages[:-1], add_generation_prompt=True)[-64:] for messages in conversations(200)[::50]]
    with torch.no_grad():
        for ids in prompts:
            idx = torch.tensor([ids])
            assert (ours(idx) - theirs(idx).logits).abs().max() < 1e-4
