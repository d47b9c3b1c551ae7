"""A GPT-2 written by hand, readable top to bottom (after nanoGPT's model.py).

Also here: the masked linear + cross-entropy loss seam that sft_kernels/ replaces, import and export of
Hugging Face GPT-2 directories, generation with a KV cache, and LoRA as DeepSpeed-Chat offers it.
"""
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed (from_pretrained keeps 50257)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2
    attn_window: int = 0  # 0: full causal attention; w > 0: each token sees the last w positions, itself included
    gradient_checkpointing: bool = False  # recompute each block's activations in backward to save memory


# ----------------------------------------------------------------------------- loss seam

def _chunk_loss_and_grads(hc, yc, weight, acc, want_h, want_w):
    """Summed loss of one row chunk and its gradients for hc and weight (None where not wanted).
    A function of its own so the chunk's (rows, V) logits are freed when it returns."""
    logits = (hc @ weight.t()).to(acc)  # (rows, V)
    lse = torch.logsumexp(logits, dim=-1)  # (rows,)
    loss = (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
    if not (want_h or want_w):
        return loss, None, None
    dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place ...
    dlogits[torch.arange(len(yc), device=yc.device), yc] -= 1.0  # ... minus the one-hot target
    dlogits = dlogits.to(hc.dtype)
    return loss, dlogits @ weight if want_h else None, dlogits.t() @ hc if want_w else None


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients computed together, one row chunk at a time, so that only one (chunk, V) block
    of logits is ever alive and the backward keeps just the (n, C) and (V, C) gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, keep, chunk_size, grad_enabled):
        # needs_input_grad stays True under torch.no_grad: eval must not pay for gradients.
        want_h, want_w = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        h, y = hidden[keep], labels[keep]  # (n, C), (n,): only the rows that count
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 for bf16/fp16 inputs, fp64 stays fp64
        loss_sum = torch.zeros((), device=h.device, dtype=acc)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if want_w else None
        for s in range(0, h.size(0), chunk_size):
            loss, gh, gw = _chunk_loss_and_grads(h[s:s + chunk_size], y[s:s + chunk_size], weight, acc, want_h, want_w)
            loss_sum += loss
            if want_h:
                grad_h[s:s + chunk_size] = gh
            if want_w:
                grad_w += gw
        ctx.save_for_backward(keep, grad_h, grad_w)
        ctx.hidden_shape, ctx.n, ctx.weight_dtype = hidden.shape, h.size(0), weight.dtype
        return loss_sum / ctx.n

    @staticmethod
    def backward(ctx, grad_loss):
        keep, grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n
        grad_hidden = grad_weight = None
        if grad_h is not None:  # masked rows get exactly zero gradient
            grad_hidden = grad_h.new_zeros(ctx.hidden_shape).index_copy_(0, keep, grad_h * scale.to(grad_h.dtype))
        if grad_w is not None:
            grad_weight = (grad_w * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=1024):
    """Mean cross-entropy of softmax(hidden @ weight.T) over labels != ignore_index.

    hidden (N, C), weight (V, C), labels (N,). Masked rows (the prompt half of an SFT batch) are dropped
    before the matmul, and rows go through in chunks of chunk_size so the (N, V) logits never exist
    at once. With nothing to predict it returns a zero that is still connected to the graph. Under
    torch.compile it runs outside the graph (train_sft.prepare_model wraps it), so importing the model
    does not load the compiler."""
    keep = (labels != ignore_index).nonzero().squeeze(1)  # (n,)
    if keep.numel() == 0:
        return hidden[:0].sum() + weight[:0].sum()  # exactly 0.0; backward gives zero gradients
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, keep, chunk_size, torch.is_grad_enabled())


# ----------------------------------------------------------------------------- the transformer

def causal_mask(T, window, device):
    """(T, T) bool, True where query i may attend key j: j <= i, and i - j < window when window > 0."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j < window) if window > 0 else j <= i


def packed_positions_and_mask(segment_ids, window):
    """For packed rows: positions that restart at each segment start, and a block-diagonal causal mask."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = torch.where(starts, idx, 0).cummax(dim=1).values  # (B, T) index where each token's segment began
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    mask = same_segment & causal_mask(T, window, segment_ids.device)
    return idx - segment_start, mask[:, None]  # (B, T), (B, 1, T, T)


class KVCache:
    """One layer's keys and values of the tokens seen so far, preallocated so that decoding writes in place."""

    def __init__(self, batch, n_head, capacity, head_dim, like):
        self.k = like.new_empty(batch, n_head, capacity, head_dim)
        self.v = like.new_empty(batch, n_head, capacity, head_dim)
        self.length = 0

    def append(self, k, v):
        """Store k, v (B, nh, T, hs) after the past ones and return all of them (B, nh, length, hs)."""
        end = self.length + k.size(2)
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None):
        """mask None means plain causal attention (SDPA's flash path); otherwise a bool (B|1, 1, T, S) mask."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, S, hs), S = past + T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)  # pre-LayerNorm residual blocks, as GPT-2
        return x + self.mlp(self.ln_2(x))


# Hugging Face GPT-2 stores these as Conv1D weights, i.e. transposed relative to nn.Linear.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head or config.attn_window < 0:
            raise ValueError(f"need n_embd a multiple of n_head and attn_window >= 0, got n_embd={config.n_embd}, "
                             f"n_head={config.n_head}, attn_window={config.attn_window}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied: the output layer reuses the token embedding
        self.loss_fn = linear_cross_entropy  # the trainer may swap in sft_kernels.fused_masked_linear_cross_entropy
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual writes scaled so the stream's variance stays put
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the position table (wte counts: it is also the head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token, 6N plus attention (PaLM appendix B), for MFU; a window shortens the span."""
        cfg = self.config
        span = min(seq_len, cfg.attn_window) if cfg.attn_window > 0 else seq_len
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * span

    def _trunk(self, idx, pos, mask, caches=None):
        """Embeddings, blocks and the final LayerNorm: idx (B, T), pos (B|1, T) -> hidden (B, T, C)."""
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if self.config.gradient_checkpointing and self.training and caches is None:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, caches[i] if caches is not None else None)
        return self.transformer.ln_f(x)

    def forward(self, idx, labels=None, segment_ids=None):
        """idx (B, T) -> logits (B, T, V), or with labels (B, T) (already shifted, -100 ignored) the mean loss."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos, mask = torch.arange(T, device=idx.device)[None], None  # (1, T); None: the flash path
        if segment_ids is not None:
            pos, mask = packed_positions_and_mask(segment_ids, self.config.attn_window)
        elif 0 < self.config.attn_window < T:
            mask = causal_mask(T, self.config.attn_window, idx.device)[None, None]
        x = self._trunk(idx, pos, mask)  # (B, T, C)
        if labels is None:
            return self.lm_head(x)
        return self.loss_fn(x.reshape(B * T, -1), self.lm_head.weight, labels.reshape(B * T))

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 vocab_limit=None):
        """Continue each prompt; returns the new tokens per prompt, cut before eos_id. Ids at or above
        vocab_limit are never produced (a vocabulary padded for speed has rows that are no token).

        Prompts of different lengths are left-padded into one batch; padding is masked out and positions
        count from each row's first real token, so a row's tokens do not depend on its batch mates. Once
        prompt + output exceeds block_size, the context is cropped to the last block_size tokens (as
        nanoGPT does) and, since the cached keys carry old positions, re-encoded every step: correct, slow."""
        if torch.is_tensor(prompts):
            prompts = prompts.tolist()
        if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and every prompt at least one token")
        device = self.lm_head.weight.device
        T0 = max(len(p) for p in prompts)
        seq = torch.tensor([[0] * (T0 - len(p)) + list(p) for p in prompts], device=device)  # (B, T0)
        pad = torch.tensor([T0 - len(p) for p in prompts], device=device)  # (B,) padding in front of each row
        capacity = min(self.config.block_size, T0 + max_new_tokens)
        caches, new = None, []
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits, caches = self._next_token_logits(seq, pad, caches, capacity)  # (B, V)
            if vocab_limit is not None:
                logits[:, vocab_limit:] = float("-inf")
            token = sample_next_token(logits, temperature, top_k, top_p)  # (B,)
            new.append(token)
            if eos_id is not None:
                done |= token == eos_id
                if done.all():
                    break
            seq = torch.cat([seq, token[:, None]], dim=1)
        rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]
        return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]

    def _next_token_logits(self, seq, pad, caches, capacity):
        """Logits (B, V) after the last token of seq (B, T), encoding only what the caches have not seen."""
        B, T = seq.shape
        if T > self.config.block_size:
            crop = T - self.config.block_size
            seq, pad, caches, T = seq[:, crop:], (pad - crop).clamp(min=0), None, self.config.block_size
        if caches is None:
            hs = self.config.n_embd // self.config.n_head
            caches = [KVCache(B, self.config.n_head, capacity, hs, self.lm_head.weight)
                      for _ in range(self.config.n_layer)]
        start = caches[0].length
        q = torch.arange(start, T, device=seq.device)[:, None]  # (Tq, 1) query indices
        k = torch.arange(T, device=seq.device)[None, :]  # (1, T) key indices
        mask = causal_mask(T, self.config.attn_window, seq.device)[start:]  # (Tq, T)
        # (B, Tq, T): padding is never attended to; a padding query sees itself, because some attention
        # backends return NaN for a row with nothing to attend to, and NaN would leak through the cache
        mask = (mask & (k >= pad[:, None, None])) | (q == k)
        pos = (q.view(1, -1) - pad[:, None]).clamp(min=0)  # (B, Tq)
        x = self._trunk(seq[:, start:], pos, mask[:, None], caches)  # (B, Tq, C)
        return self.lm_head(x[:, -1]), caches

    # ------------------------------------------------------------------------- Hugging Face format

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a local Hugging Face GPT-2 directory (never the network; nothing unpickled but tensors).

        Dropout is 0.0 unless overridden (e.g. dropout=0.1); overrides may also set attn_window and
        gradient_checkpointing. The vocabulary size is the checkpoint's own (50257 for GPT-2)."""
        path = Path(path)
        hf = read_hf_config(path / "config.json")
        config = GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                           n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768),
                           dropout=0.0)
        model = cls(replace(config, **overrides))
        weights_file, tensors = read_hf_weights(path)
        ours = model.state_dict()
        loaded = set()
        for name, tensor in tensors.items():
            key = name if name.startswith("transformer.") or name.startswith("lm_head.") else "transformer." + name
            if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # the head is tied to wte; attn.bias is an old causal-mask buffer, not a weight
            if key not in ours:
                raise ValueError(f"{weights_file}: unexpected tensor {name!r}: not part of a GPT-2 LM")
            transposed = key.endswith(HF_TRANSPOSED)
            want = tuple(ours[key].shape[::-1] if transposed else ours[key].shape)  # in the file's layout
            if tuple(tensor.shape) != want:
                raise ValueError(f"{weights_file}: tensor {name!r} has shape {tuple(tensor.shape)} but the config "
                                 f"(n_embd={config.n_embd}, vocab_size={config.vocab_size}, n_positions="
                                 f"{config.block_size}, from {path / 'config.json'} and overrides) needs {want}")
            with torch.no_grad():
                ours[key].copy_(tensor.t() if transposed else tensor)
            loaded.add(key)
        missing = sorted(set(ours) - loaded - {"lm_head.weight"})
        if missing:
            raise ValueError(f"{weights_file}: missing tensors for the config in {path / 'config.json'}: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return model

    @torch.no_grad()
    def save_pretrained(self, path):
        """Write config.json + model.safetensors that transformers' GPT2LMHeadModel loads.

        LoRA deltas are merged into the written weights (the model itself is left as it is); missing
        biases (bias=False) are written as zeros. Each file goes to a temporary name first and is then
        renamed, so a crash never leaves a half-written file under the final name. attn_window is not
        part of GPT-2's format: pass it again to from_pretrained."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = self.state_dict()
        for name, m in self.named_modules():
            if isinstance(m, LoRALinear) and not m.merged:
                weights[name + ".weight"] = m.weight + m.delta_weight()
            if isinstance(m, (nn.Linear, nn.LayerNorm, LoRALinear)) and m.bias is None and name != "lm_head":
                weights[name + ".bias"] = m.weight.new_zeros(m.weight.shape[0])
        tensors = {name: (t.t() if name.endswith(HF_TRANSPOSED) else t).detach().contiguous().cpu()
                   for name, t in weights.items() if name != "lm_head.weight" and "lora_" not in name}
        _write_atomically(path / "model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"}))
        _write_atomically(path / "config.json", lambda f: Path(f).write_text(json.dumps(self.hf_config(), indent=2)))

    def hf_config(self):
        """This model's config in Hugging Face GPT-2 terms."""
        cfg = self.config
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                    n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                    n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                    resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                    initializer_range=0.02, tie_word_embeddings=True,
                    # GPT-2's end-of-text is 50256; for a small vocabulary (the byte tokenizer) it is the last id
                    bos_token_id=min(50256, cfg.vocab_size - 1), eos_token_id=min(50256, cfg.vocab_size - 1))


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None):
    """Pick one token per row of logits (B, V): argmax at temperature 0, else sample after top-k/top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(-1)


def read_hf_config(file):
    """Read a Hugging Face config.json and refuse anything this GPT-2 would compute differently."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: from_pretrained expects a local Hugging Face GPT-2 directory "
                                "(config.json plus model.safetensors or pytorch_model.bin)")
    try:
        hf = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{file} must hold a JSON object (a GPT-2 config), got a {type(hf).__name__}")
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{file}: model_type is {hf.get('model_type')!r}, but only GPT-2 ('gpt2') is supported")
    if not set(hf.get("architectures") or []) <= {"GPT2LMHeadModel", "GPT2Model"}:
        raise ValueError(f"{file}: architectures is {hf['architectures']}; expected GPT2LMHeadModel")
    n_embd = hf.get("n_embd", 768)
    supported = {"activation_function": ("gelu_new", ["gelu_new", "gelu_pytorch_tanh"]),
                 "n_inner": (None, [None, 4 * n_embd]), "layer_norm_epsilon": (1e-5, [1e-5]),
                 "scale_attn_weights": (True, [True]), "scale_attn_by_inverse_layer_idx": (False, [False]),
                 "tie_word_embeddings": (True, [True])}
    for field, (default, allowed) in supported.items():
        if hf.get(field, default) not in allowed:
            raise ValueError(f"{file}: {field}={hf[field]!r} is not supported (this GPT-2 needs one of {allowed})")
    return hf


def read_hf_weights(path):
    """Tensors of a Hugging Face checkpoint: model.safetensors, else pytorch_model.bin loaded weights_only.
    A file that does not read (truncated, emptied, not tensors) is a ValueError naming it."""
    from safetensors.torch import load_file
    for name, load in (("model.safetensors", load_file),
                       ("pytorch_model.bin", lambda f: torch.load(f, map_location="cpu", weights_only=True))):
        file = path / name
        if file.is_file():
            try:
                tensors = load(file)
            except Exception as e:  # safetensors, zipfile and unpickling errors share no base class
                raise ValueError(f"{file} cannot be read, it may be truncated or damaged: "
                                 f"{type(e).__name__}: {e}") from None
            if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise ValueError(f"{file} does not hold a dictionary of named tensors")
            return file, tensors
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin "
                            "(sharded checkpoints are not supported)")


def _write_atomically(file, write):
    """Call write(temporary name) then rename onto file, so readers never see a partial file."""
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    write(str(tmp))
    os.replace(tmp, file)


# ----------------------------------------------------------------------------- LoRA (DeepSpeed-Chat)

class LoRALinear(nn.Module):
    """DeepSpeed-Chat's LinearLayer_LoRA: y = x W^T + b + (s / r) * dropout(x) @ right @ left.

    right (in, r) starts Kaiming-uniform and left (r, out) at zero, so wrapping changes nothing until
    training moves left. The wrapped weight is frozen, as in DeepSpeed-Chat; weight and bias keep their
    names, so state dicts and the Hugging Face export see the usual tensors."""

    def __init__(self, linear, lora_dim, lora_scaling=1.0, lora_dropout=0.0):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        out_features, in_features = self.weight.shape
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_right_weight = nn.Parameter(torch.empty(in_features, lora_dim, **kw))
        self.lora_left_weight = nn.Parameter(torch.zeros(lora_dim, out_features, **kw))
        nn.init.kaiming_uniform_(self.lora_right_weight, a=math.sqrt(5))
        self.lora_scaling = lora_scaling / lora_dim
        self.lora_dropout = nn.Dropout(lora_dropout)
        self.merged = False  # True while the delta lives inside self.weight (then it must not be added again)

    def delta_weight(self):
        """The low-rank update in nn.Linear layout (out, in)."""
        return self.lora_scaling * (self.lora_right_weight @ self.lora_left_weight).t()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + (self.lora_dropout(x) @ self.lora_right_weight @ self.lora_left_weight) * self.lora_scaling


def apply_lora(model, lora_dim, lora_scaling=1.0, lora_dropout=0.0, module_name="h."):
    """Wrap every nn.Linear whose qualified name contains one of the comma-separated patterns; returns the count."""
    if lora_dim <= 0:
        raise ValueError(f"lora_dim must be positive, got {lora_dim}")
    patterns = [p.strip() for p in module_name.split(",") if p.strip()]
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(p in name for p in patterns)]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = [name for name, m in targets if id(m.weight) in embeddings]
    if tied:  # checked before wrapping anything, so a refused call leaves the model as it was
        raise ValueError(f"LoRA on {tied} would also change the token embedding tied to it; "
                         "choose a module_name pattern that excludes it")
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linear, lora_dim, lora_scaling, lora_dropout))
    return len(targets)


def only_optimize_lora(model):
    """Freeze everything except the LoRA factors (DeepSpeed-Chat's --only_optimize_lora)."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_right_weight" in name or "lora_left_weight" in name)


@torch.no_grad()
def merge_lora(model):
    """Fold each LoRA delta into its weight (for export or faster inference); forward then skips the LoRA path."""
    for m in model.modules():
        if isinstance(m, LoRALinear) and not m.merged:
            m.weight += m.delta_weight()
            m.merged = True


@torch.no_grad()
def unmerge_lora(model):
    """Take the deltas back out of the weights, undoing merge_lora up to float rounding."""
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.merged:
            m.weight -= m.delta_weight()
            m.merged = False
