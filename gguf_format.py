"""GGUF, llama.cpp's one-file format (also run by Ollama and LM Studio), read by a small reader of its own
(GGUFCursor: `gguf`'s reader takes seconds over a vocabulary) and written and dequantized through `gguf`,
llama.cpp's own Python package. model.py's GPT.from_pretrained delegates here for a `.gguf` path.

Reading turns the metadata into a GPTConfig (architectures llama, qwen2, qwen3 and gpt2 as GGUF names
them), dequantizes every tensor to float32 and maps llama.cpp's tensor names onto GPT's state dict,
undoing the row order llama.cpp's converter gives a Llama's q and k for its rotary kernel. The tokenizer
metadata is read here too (tokenizer.py builds the tokenizer from it). Anything the GPT would compute
differently, or a tensor type that cannot be dequantized, is refused in one sentence naming the file.
"""
import math
import struct
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch

from hf_format import exported_weights, hf_part_rows, sliding_window_override, write_atomically
from model import GPT, family_config

# GGUF's architecture name -> the family (model_type). llama.cpp writes Mistral models as "llama".
GGUF_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}

# Our tensors (in transformer.h.<i>.) -> llama.cpp's (in blk.<i>.); several are concatenated along dim 0
# into ours (q, k, v into c_attn; gate, up into c_fc). llama.cpp stores every matrix as nn.Linear does.
LLAMA_LAYER_TENSORS = {
    "ln_1.weight": ["attn_norm.weight"],
    "attn.c_attn.weight": ["attn_q.weight", "attn_k.weight", "attn_v.weight"],
    "attn.c_attn.bias": ["attn_q.bias", "attn_k.bias", "attn_v.bias"],
    "attn.q_norm.weight": ["attn_q_norm.weight"],
    "attn.k_norm.weight": ["attn_k_norm.weight"],
    "attn.c_proj.weight": ["attn_output.weight"],
    "ln_2.weight": ["ffn_norm.weight"],
    "mlp.c_fc.weight": ["ffn_gate.weight", "ffn_up.weight"],
    "mlp.c_proj.weight": ["ffn_down.weight"],
}
GPT2_LAYER_TENSORS = {
    "ln_1.weight": ["attn_norm.weight"], "ln_1.bias": ["attn_norm.bias"],
    "attn.c_attn.weight": ["attn_qkv.weight"], "attn.c_attn.bias": ["attn_qkv.bias"],
    "attn.c_proj.weight": ["attn_output.weight"], "attn.c_proj.bias": ["attn_output.bias"],
    "ln_2.weight": ["ffn_norm.weight"], "ln_2.bias": ["ffn_norm.bias"],
    "mlp.c_fc.weight": ["ffn_up.weight"], "mlp.c_fc.bias": ["ffn_up.bias"],
    "mlp.c_proj.weight": ["ffn_down.weight"], "mlp.c_proj.bias": ["ffn_down.bias"],
}
TOP_TENSORS = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
               "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
               "lm_head.weight": "output.weight"}
# The tensors whose rows llama.cpp's converter reorders for rotary positions (Llama only; Qwen keeps them).
ROTARY_PERMUTED = ("attn_q.weight", "attn_k.weight")
MISSING = object()


# ----------------------------------------------------------------------------- reading

class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file: shape lists the fastest dimension first, as GGUF does; data is its bytes
    in the file's memory map (typed for plain float and int types, raw bytes for block-quantized ones)."""
    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple
    data: np.ndarray


class GGUFFile(NamedTuple):
    """What load_gguf and read_tokenizer_metadata need of a GGUF file: its metadata as plain Python values
    (numbers, strings and lists) and its tensors."""
    metadata: dict
    tensors: list


# GGUF's metadata types that are one fixed-size number, as struct (and numpy) type codes.
NUMBER_CODES = {gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H",
                gguf.GGUFValueType.INT16: "h", gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
                gguf.GGUFValueType.UINT64: "Q", gguf.GGUFValueType.INT64: "q", gguf.GGUFValueType.FLOAT32: "f",
                gguf.GGUFValueType.FLOAT64: "d", gguf.GGUFValueType.BOOL: "?"}
# Tensor types stored as plain numpy arrays; every other type is read as raw bytes for gguf.quants.dequantize.
PLAIN_TENSOR_DTYPES = {gguf.GGMLQuantizationType.F32: "f4", gguf.GGMLQuantizationType.F16: "f2",
                       gguf.GGMLQuantizationType.F64: "f8", gguf.GGMLQuantizationType.I8: "i1",
                       gguf.GGMLQuantizationType.I16: "i2", gguf.GGMLQuantizationType.I32: "i4",
                       gguf.GGMLQuantizationType.I64: "i8"}


class GGUFCursor:
    """Reads GGUF's little (or big) endian values one after another from a buffer. gguf.GGUFReader makes a
    numpy view of every value it reads, which for a vocabulary and its merges (about 100,000 strings) takes
    seconds; struct and one numpy view per number array take a fraction of that."""

    def __init__(self, buffer, order="<"):
        self.buffer, self.order, self.offset = buffer, order, 0

    def number(self, code):
        (value,) = struct.unpack_from(self.order + code, self.buffer, self.offset)
        self.offset += struct.calcsize(code)
        return value

    def string(self):
        length = self.number("Q")
        if self.offset + length > len(self.buffer):
            raise ValueError(f"a string of {length} bytes at offset {self.offset} runs past the end of the file")
        text = bytes(self.buffer[self.offset:self.offset + length]).decode("utf-8")
        self.offset += length
        return text

    def value(self, value_type):
        """One metadata value of GGUF type value_type: a number, a string or a list."""
        value_type = gguf.GGUFValueType(value_type)
        if value_type == gguf.GGUFValueType.STRING:
            return self.string()
        if value_type != gguf.GGUFValueType.ARRAY:
            return self.number(NUMBER_CODES[value_type])
        item_type, count = gguf.GGUFValueType(self.number("I")), self.number("Q")
        if item_type not in NUMBER_CODES:
            return [self.value(item_type) for _ in range(count)]
        items = np.frombuffer(self.buffer, np.dtype(self.order + NUMBER_CODES[item_type]), count, self.offset)
        self.offset += items.nbytes
        return items.tolist()


def read_gguf(path):
    """The metadata and tensors of the GGUF file at path (versions 2 and 3, either byte order). The tensor
    data stays in the file's memory map until it is dequantized."""
    data = np.memmap(path, mode="r").view(np.ndarray)  # a plain view: slicing a memmap runs its bookkeeping
    cursor = GGUFCursor(memoryview(data))
    if cursor.number("I") != gguf.GGUF_MAGIC:
        raise ValueError("it does not start with GGUF's magic bytes")
    version = cursor.number("I")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        cursor.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not one this reader knows (2 or 3)")
    tensor_count, metadata_count = cursor.number("Q"), cursor.number("Q")
    metadata = {}
    for _ in range(metadata_count):
        key = cursor.string()
        if key in metadata:
            raise ValueError(f"metadata key {key} appears twice")
        metadata[key] = cursor.value(cursor.number("I"))
    infos = [tensor_info(cursor) for _ in range(tensor_count)]
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment is {alignment!r}, not a power of two")
    names = [info[0] for info in infos]
    if len(set(names)) < len(names):
        raise ValueError(f"tensor {next(n for n in names if names.count(n) > 1)} appears twice")
    start = -(-cursor.offset // alignment) * alignment
    return GGUFFile(metadata, [tensor_view(data, start, info, cursor.order) for info in infos])


def tensor_info(cursor):
    """(name, shape with the fastest dimension first, type number, data offset) of the tensor at cursor."""
    name, dimensions = cursor.string(), cursor.number("I")
    shape = [cursor.number("Q") for _ in range(dimensions)]
    return name, shape, cursor.number("I"), cursor.number("Q")


def tensor_view(data, start, info, order):
    """A GGUFTensor over data from its info (name, shape fastest first, type, offset from start)."""
    name, shape, type_number, offset = info
    tensor_type = gguf.GGMLQuantizationType(type_number)
    rows = tuple(reversed(shape))  # numpy's order: slowest dimension first
    if tensor_type in PLAIN_TENSOR_DTYPES:
        dtype = np.dtype(order + PLAIN_TENSOR_DTYPES[tensor_type])
    else:
        dtype, rows = np.dtype(np.uint8), gguf.quants.quant_shape_to_byte_shape(rows, tensor_type)
    size = math.prod(rows) * dtype.itemsize
    if start + offset + size > len(data):
        raise ValueError(f"tensor {name} runs past the end of the file")
    array = data[start + offset:start + offset + size].view(dtype).reshape(rows)
    return GGUFTensor(name, tensor_type, tuple(shape), array)


def open_gguf(path):
    """The GGUFFile at path; a missing, truncated or foreign file is named in one sentence."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file on disk (GGUF files are read locally; nothing is downloaded)")
    try:
        return read_gguf(path)
    except Exception as e:  # numpy, struct, enum and our own errors share no useful base class
        raise ValueError(f"{path} is not a readable GGUF file (truncated, or another format): "
                         f"{type(e).__name__}: {e}") from None


def metadata_value(gguf_file, key, path, default=MISSING):
    """The value of metadata key (a number, string or list); a required key that is absent is an error."""
    if key not in gguf_file.metadata:
        if default is MISSING:
            raise ValueError(f"{path}: metadata {key} is missing")
        return default
    return gguf_file.metadata[key]


def load_gguf(path, **overrides):
    """A GPT from a GGUF file of architecture llama, qwen2, qwen3 or gpt2, every tensor dequantized to
    float32. overrides may set dropout, attn_window and gradient_checkpointing, as for a Hugging Face
    directory (see hf_format.load_pretrained)."""
    gguf_file = open_gguf(path)
    config = gguf_config(gguf_file, path)
    window = sliding_window_override(config, overrides.pop("attn_window", 0), path)
    model = GPT(replace(config, attn_window=window, **overrides), init_weights=False)
    load_gguf_tensors(model, gguf_file, path)
    return model


def gguf_config(gguf_file, path):
    """GPTConfig from a GGUF file's metadata; refuses what this GPT would compute differently."""
    architecture = metadata_value(gguf_file, "general.architecture", path)
    if architecture not in GGUF_FAMILIES:
        raise ValueError(f"{path}: architecture {architecture!r} is not supported (only "
                         f"{', '.join(GGUF_FAMILIES)} GGUF files are read)")
    tensors = {t.name: t for t in gguf_file.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor token_embd.weight (the token embedding) is missing")
    vocab_size = int(tensors["token_embd.weight"].shape[1])  # GGUF lists shapes fastest dimension first

    def value(name, default=MISSING):
        number = metadata_value(gguf_file, f"{architecture}.{name}", path, default)
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            raise ValueError(f"{path}: metadata {architecture}.{name} is {number!r}, not one number")
        return number

    sizes = dict(block_size=value("context_length"), vocab_size=vocab_size, n_layer=value("block_count"),
                 n_head=value("attention.head_count"), n_embd=value("embedding_length"))
    for field, size in sizes.items():
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"{path}: {field} (from its metadata) is {size!r}, not a positive integer")
    n_embd, n_head = sizes["n_embd"], sizes["n_head"]
    if architecture == "gpt2":
        if value("feed_forward_length", 4 * n_embd) != 4 * n_embd:
            raise ValueError(f"{path}: gpt2.feed_forward_length is {value('feed_forward_length')}, but GPT-2's "
                             f"MLP is 4 * embedding_length = {4 * n_embd} wide")
        return family_config("gpt2", norm_eps=value("attention.layer_norm_epsilon"), **sizes)
    head_dim = value("attention.key_length", n_embd // n_head)
    for name, wanted in (("attention.value_length", head_dim), ("rope.dimension_count", head_dim)):
        if value(name, wanted) != wanted:
            raise ValueError(f"{path}: {architecture}.{name} is {value(name)}, but this model needs it equal to "
                             f"the head size {head_dim} (partial rotary or other value widths are not supported)")
    scaling = metadata_value(gguf_file, f"{architecture}.rope.scaling.type", path, "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        what = f"rope scaling {scaling!r}" if scaling != "none" else "per-frequency rotary factors (rope_freqs)"
        raise ValueError(f"{path}: {what} is not supported (only plain rotary positions from GGUF)")
    name = str(metadata_value(gguf_file, "general.name", path, ""))
    family = "mistral" if architecture == "llama" and "mistral" in name.lower() else GGUF_FAMILIES[architecture]
    return family_config(family, **sizes, n_kv_head=value("attention.head_count_kv", n_head), head_dim=head_dim,
                         intermediate_size=value("feed_forward_length"),
                         norm_eps=value("attention.layer_norm_rms_epsilon"),
                         rope_theta=float(value("rope.freq_base", 10000.0)),
                         attn_window=value("attention.sliding_window", 0),
                         tie_word_embeddings="output.weight" not in tensors)


def gguf_tensor_names(config, keys):
    """{our state_dict key: the GGUF tensors it is made of, in order} for config's family. A tied head is
    left out (llama.cpp reuses token_embd.weight)."""
    layer_tensors = GPT2_LAYER_TENSORS if config.model_type == "gpt2" else LLAMA_LAYER_TENSORS
    names = {}
    for key in keys:
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if key.startswith("transformer.h."):
            layer, rest = key.removeprefix("transformer.h.").split(".", 1)
            names[key] = [f"blk.{layer}.{name}" for name in layer_tensors[rest]]
        else:
            names[key] = [TOP_TENSORS[key]]
    return names


def unpermute_rotary(weight, n_head):
    """Undo llama.cpp's converter, which orders each head's q/k rows as interleaved pairs (its rotary kernel
    turns rows 2i and 2i+1 together) where Hugging Face's layout, and ours, turns i with i + head_dim/2."""
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(
        weight.shape)


def permute_rotary(weight, n_head):
    """Our q/k rows in llama.cpp's interleaved order (the inverse of unpermute_rotary)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(
        weight.shape)


def dequantized(tensor, path):
    """A GGUF tensor as float32 torch, in nn.Linear's (out, in) layout."""
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, KeyError):
        raise ValueError(f"{path}: tensor {tensor.name} is of type {tensor.tensor_type.name}, which cannot be "
                         f"dequantized (the gguf package has no dequantizer for it)") from None
    except ValueError as e:  # data that does not fill its blocks: a damaged file
        raise ValueError(f"{path}: tensor {tensor.name} cannot be read ({e})") from None
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))


@torch.no_grad()
def load_gguf_tensors(model, gguf_file, path):
    """Dequantize the file's tensors into model, after checking that they are exactly the ones it needs."""
    cfg = model.config
    tensors = {t.name: t for t in gguf_file.tensors}
    ours = model.state_dict()
    names = gguf_tensor_names(cfg, ours)
    wanted = {name for parts in names.values() for name in parts}
    head_is_copy = cfg.model_type == "gpt2" and "output.weight" in tensors  # llama.cpp's GPT-2 repeats wte
    unexpected = sorted(set(tensors) - wanted - ({"output.weight"} if head_is_copy else set()))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]!r}: not part of a {cfg.model_type} model as "
                         f"its metadata describes it")
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing tensors for its metadata: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    for key, parts in names.items():
        pieces = []
        for name, rows in zip(parts, hf_part_rows(cfg, key, ours[key].shape[0], len(parts))):
            piece = dequantized(tensors[name], path)
            want = (rows, *ours[key].shape[1:])
            if tuple(piece.shape) != want:
                raise ValueError(f"{path}: tensor {name!r} has shape {tuple(piece.shape)} but its metadata "
                                 f"needs {want}")
            if cfg.model_type in ("llama", "mistral") and name.endswith(ROTARY_PERMUTED):
                piece = unpermute_rotary(piece, rows // cfg.head_dim)
            pieces.append(piece)
        ours[key].copy_(torch.cat(pieces))
    if head_is_copy and not torch.equal(dequantized(tensors["output.weight"], path), ours["transformer.wte.weight"]):
        raise ValueError(f"{path}: output.weight differs from token_embd.weight, but GPT-2's head is the "
                         "token embedding")


def read_tokenizer_metadata(path):
    """The tokenizer a GGUF file describes, as plain values: model and pre (llama.cpp's names for the
    algorithm and the pre-tokenizer), tokens, token_type, merges, the special ids it names (bos, eos, unk,
    pad, eot, eom) and the chat template (None when absent). A file without tokenizer metadata is an error."""
    gguf_file = open_gguf(path)
    if not {"tokenizer.ggml.model", "tokenizer.ggml.tokens"} <= gguf_file.metadata.keys():
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.model and tokenizer.ggml.tokens metadata); "
                         "give --tokenizer a tokenizer that matches it")
    special = {role: metadata_value(gguf_file, f"tokenizer.ggml.{key}_token_id", path, None)
               for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"),
                                 ("eot", "eot"), ("eom", "eom"))}
    return dict(model=metadata_value(gguf_file, "tokenizer.ggml.model", path),
                pre=metadata_value(gguf_file, "tokenizer.ggml.pre", path, "default"),
                tokens=metadata_value(gguf_file, "tokenizer.ggml.tokens", path),
                token_type=metadata_value(gguf_file, "tokenizer.ggml.token_type", path, None),
                merges=metadata_value(gguf_file, "tokenizer.ggml.merges", path, []),
                special_ids={role: i for role, i in special.items() if i is not None},
                chat_template=metadata_value(gguf_file, "tokenizer.chat_template", path, None))


# ----------------------------------------------------------------------------- writing

GGUF_TYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
              "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
              "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}


def check_gguf_expressible(config):
    """Refuse, in one sentence, a model that a GGUF file (as llama.cpp reads it) would describe as another."""
    if config.rope_scaling != "none":
        raise ValueError(f"rope_scaling={config.rope_scaling!r} cannot be written to GGUF here (llama.cpp keeps it "
                         "as a table of per-frequency factors, which this exporter does not write)")
    if config.attn_window:
        raise ValueError(f"attn_window={config.attn_window} cannot be written to GGUF: llama.cpp would run the "
                         f"{config.model_type} model with full attention")


def save_gguf(model, vocabulary, path, kind, name):
    """Write model (LoRA merged) as a GGUF file of its architecture that llama.cpp, Ollama and LM Studio
    run: the metadata of its config and of its tokenizer (vocabulary, the tokenizer's GGUF form with the
    chat template: tokenizer.gguf_tokenizer_metadata, passed in since tokenizer.py imports this module),
    and every matrix in kind (f32, f16 or q8_0; a matrix whose rows q8_0's 32-value blocks do not divide
    is written f16, as llama.cpp does), norms and biases in f32. A Llama's q and k rows are put in
    llama.cpp's rotary order. Written under a temporary name, then renamed onto path."""
    cfg = model.config
    check_gguf_expressible(cfg)
    weights = exported_weights(model)

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, GGUF_ARCHITECTURES[cfg.model_type])
        writer.add_name(name)
        writer.add_file_type(GGUF_TYPES[kind][1])
        if kind == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_architecture_metadata(writer, cfg)
        add_tokenizer_metadata(writer, vocabulary)
        for tensor_name, array, qtype in gguf_tensors(cfg, weights, GGUF_TYPES[kind][0]):
            writer.add_tensor(tensor_name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(Path(path), write)


def add_architecture_metadata(writer, cfg):
    """The config as llama.cpp's converter writes it for the architecture."""
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.model_type == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)


def add_tokenizer_metadata(writer, vocabulary):
    """tokenizer.ggml.*: a byte-level BPE (llama.cpp's "gpt2" model), its pre-tokenizer's name, the special
    ids and the chat template. No bos is added before text: training never added one."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary["pre"])
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["token_type"])
    writer.add_token_merges(vocabulary["merges"])
    for role, token_id in vocabulary["special_ids"].items():
        getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(False)
    if vocabulary["chat_template"]:
        writer.add_chat_template(vocabulary["chat_template"])


def gguf_tensors(cfg, weights, matrix_type):
    """(GGUF name, array as written, its tensor type) of every tensor, in llama.cpp's order and layout."""
    tensors = []
    for key, parts in gguf_tensor_names(cfg, weights).items():
        weight = weights[key].detach().float().cpu()
        for name, piece in zip(parts, weight.split(hf_part_rows(cfg, key, weight.shape[0], len(parts)))):
            if cfg.model_type in ("llama", "mistral") and name.endswith(ROTARY_PERMUTED):
                piece = permute_rotary(piece, piece.shape[0] // cfg.head_dim)
            tensors.append((name, *encoded_tensor(piece.contiguous().numpy(), matrix_type)))
    if cfg.model_type == "gpt2":  # llama.cpp's converter writes GPT-2's tied head as its own tensor
        tensors.append(("output.weight", *encoded_tensor(weights["transformer.wte.weight"].float().numpy(),
                                                         matrix_type)))
    return tensors


def encoded_tensor(array, matrix_type):
    """(array in its GGUF encoding, the type): matrices in matrix_type, vectors in f32."""
    qtype = matrix_type if array.ndim == 2 else gguf.GGMLQuantizationType.F32
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block_size:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(array, qtype), qtype
