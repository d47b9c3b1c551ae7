"""A GPT written by hand, readable top to bottom (after nanoGPT's model.py): GPT-2 and the Llama family
(Llama, Mistral, Qwen2, Qwen3) in one class, switched by GPTConfig fields.

Also here: the masked linear + cross-entropy loss seam that sft_kernels/ replaces, import and export of
Hugging Face directories of those families, generation with a KV cache, and LoRA as DeepSpeed-Chat offers it.
"""
import json
import math
import os
from dataclasses import dataclass, fields, replace
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
    # The switches between GPT-2 (the defaults) and the Llama family; FAMILIES holds each family's settings.
    model_type: str = "gpt2"  # the Hugging Face family save_pretrained writes: gpt2, llama, mistral, qwen2, qwen3
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    positions: str = "learned"  # learned (a table of block_size positions) | rotary
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | llama3 (Llama 3.1's stretch of the slow rotary frequencies)
    rope_factor: float = 8.0  # llama3 scaling: how much longer the context is than in pre-training ...
    rope_low_freq_factor: float = 1.0  # ... the wavelengths (in original contexts) between which it blends
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192  # ... and that pre-training context
    mlp: str = "gelu"  # gelu (GPT-2's tanh approximation) | swiglu (silu(gate) * up)
    intermediate_size: int = 0  # MLP width; 0: 4 * n_embd
    n_kv_head: int = 0  # key/value heads, grouped-query attention; 0: n_head
    head_dim: int = 0  # 0: n_embd // n_head
    qkv_bias: bool = False  # biases on q, k and v even without bias (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before the rotation (Qwen3)
    tie_word_embeddings: bool = True  # the output head is the token embedding

    @property
    def head_size(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self):
        return self.intermediate_size or 4 * self.n_embd


LLAMA_SHAPE = dict(bias=False, norm="rmsnorm", norm_eps=1e-6, positions="rotary", mlp="swiglu",
                   tie_word_embeddings=False)
FAMILIES = {  # model_type -> the GPTConfig fields that make that family (beyond its sizes)
    "gpt2": {},
    "llama": LLAMA_SHAPE,
    "mistral": LLAMA_SHAPE,
    "qwen2": dict(LLAMA_SHAPE, qkv_bias=True),
    "qwen3": dict(LLAMA_SHAPE, qk_norm=True),
}


def family_config(model_type, **sizes):
    """A GPTConfig shaped like a Hugging Face family, e.g. family_config("llama", n_layer=4, ...) for a model
    from scratch; sizes may override any field."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not one of {', '.join(FAMILIES)}")
    return GPTConfig(**{**FAMILIES[model_type], "model_type": model_type, **sizes})


def check_config(config):
    """Refuse, in one sentence naming the field, a config this GPT cannot build."""
    choices = {"model_type": tuple(FAMILIES), "norm": ("layernorm", "rmsnorm"), "positions": ("learned", "rotary"),
               "mlp": ("gelu", "swiglu"), "rope_scaling": ("none", "llama3")}
    for field, allowed in choices.items():
        if getattr(config, field) not in allowed:
            raise ValueError(f"{field}={getattr(config, field)!r} is not one of {', '.join(allowed)}")
    for field in ("n_kv_head", "head_dim", "intermediate_size", "attn_window"):
        if getattr(config, field) < 0:
            raise ValueError(f"{field}={getattr(config, field)} must be >= 0 (0 picks the default)")
    if not config.head_dim and config.n_embd % config.n_head:
        raise ValueError(f"n_embd={config.n_embd} must be a multiple of n_head={config.n_head} (or set head_dim)")
    if config.n_head % config.kv_heads:
        raise ValueError(f"n_head={config.n_head} must be a multiple of n_kv_head={config.n_kv_head}")
    if config.positions == "rotary" and config.head_size % 2:
        raise ValueError(f"rotary positions need an even head size, got head_dim={config.head_size}")


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


def rotary_frequencies(config, device):
    """Radians per position of each of the head_size / 2 rotated channel pairs, fastest first (fp32, computed
    as Hugging Face does). rope_scaling='llama3' divides the slow frequencies, whose wavelength exceeds the
    pre-training context / low_freq_factor, by rope_factor, keeps the fast ones (wavelength below context /
    high_freq_factor), and blends linearly in between."""
    hs = config.head_size
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hs, 2, device=device).float() / hs)  # (hs/2,)
    if config.rope_scaling != "llama3":
        return inv_freq
    context, low, high = (config.rope_original_max_position_embeddings, config.rope_low_freq_factor,
                          config.rope_high_freq_factor)
    wavelength = 2 * math.pi / inv_freq
    kept = (context / wavelength - low) / (high - low)  # share of the frequency kept: 1 fast ... 0 slow
    blended = kept * inv_freq + (1 - kept) * inv_freq / config.rope_factor
    return torch.where(wavelength < context / high, inv_freq,
                       torch.where(wavelength > context / low, inv_freq / config.rope_factor, blended))


def rotary_cos_sin(config, pos):
    """cos and sin (B|1, 1, T, hs/2) of the rotation angles of positions pos (B|1, T), in fp32."""
    angles = pos[:, None, :, None].float() * rotary_frequencies(config, pos.device)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """Rotary positions on x (B, nh, T, hs): channel i and i + hs/2 turn together (Hugging Face's layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def make_norm(config, size):
    """The family's normalisation: GPT-2's LayerNorm (with bias when config.bias) or the Llama family's RMSNorm."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.bias)


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
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.dropout = config.dropout
        q_size, kv_size = self.n_head * self.head_size, self.n_kv_head * self.head_size
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=config.bias or config.qkv_bias)  # q, k, v
        self.c_proj = nn.Linear(q_size, config.n_embd, bias=config.bias)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_size, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_size, eps=config.norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, mask=None, cache=None):
        """rope: (cos, sin) for rotary positions, else None. mask None means plain causal attention (SDPA's
        flash path); otherwise a bool (B|1, 1, T, S) mask."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.qkv_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hs)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nkv, S, hs), S = past + T
        grouped = self.n_kv_head != self.n_head
        if grouped and mask is not None:  # SDPA's GQA runs on the flash and math kernels only; masks take others
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=grouped and mask is None)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        width = config.mlp_width
        self.c_fc = nn.Linear(config.n_embd, 2 * width if self.swiglu else width, bias=config.bias)  # [gate; up]
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, mask, cache)  # pre-norm residual blocks, as GPT-2 and Llama
        return x + self.mlp(self.ln_2(x))


# Hugging Face GPT-2 stores these as Conv1D weights, i.e. transposed relative to nn.Linear.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        embeddings = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":
            embeddings["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **embeddings,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # the output layer reuses the token embedding
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
        """Parameter count; non_embedding leaves out the lookup tables, which cost no matmul: the position
        table, and the token embedding when the head is untied (a tied wte counts: it is also the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() if "wpe" in self.transformer else 0
            n -= 0 if self.config.tie_word_embeddings else self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token, 6N plus attention (PaLM appendix B), for MFU; a window shortens the span."""
        cfg = self.config
        span = min(seq_len, cfg.attn_window) if cfg.attn_window > 0 else seq_len
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * span

    def head_weight(self):
        """The output head's weight as the loss sees it: tied or untied, with an unmerged LoRA delta added."""
        head = self.lm_head
        return head.weight + head.delta_weight() if isinstance(head, LoRALinear) and not head.merged else head.weight

    def _trunk(self, idx, pos, mask, caches=None):
        """Embeddings, blocks and the final norm: idx (B, T), pos (B|1, T) -> hidden (B, T, C)."""
        x, rope = self.transformer.wte(idx), None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        else:
            rope = rotary_cos_sin(self.config, pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if self.config.gradient_checkpointing and self.training and caches is None:
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, caches[i] if caches is not None else None)
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
        return self.loss_fn(x.reshape(B * T, -1), self.head_weight(), labels.reshape(B * T))

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
            caches = [KVCache(B, self.config.kv_heads, capacity, self.config.head_size, self.lm_head.weight)
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
        """Load a local Hugging Face directory of model_type gpt2, llama, mistral, qwen2 or qwen3 (never the
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
        window = overrides.pop("attn_window", 0)
        if config.attn_window and window > config.attn_window:
            raise ValueError(f"attn_window={window} is wider than the sliding window of {config.attn_window} "
                             f"in {config_file} that the model was trained with")
        model = cls(replace(config, attn_window=window or config.attn_window, **overrides))
        weights_file, tensors = read_hf_weights(path)
        model._load_hf_tensors(tensors, weights_file, config_file)
        return model

    @torch.no_grad()
    def _load_hf_tensors(self, tensors, weights_file, config_file):
        """Copy Hugging Face tensors into this model, after checking that they are exactly the ones it needs."""
        cfg = self.config
        if cfg.model_type == "gpt2":  # original GPT-2 files have no 'transformer.' prefix
            tensors = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: t
                       for k, t in tensors.items()}
        ours = self.state_dict()
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
    def save_pretrained(self, path, token_ids=None):
        """Write config.json + model.safetensors of this model's family (config.model_type), which
        transformers' AutoModelForCausalLM loads. token_ids (e.g. {"eos_token_id": 2}) go into config.json.

        LoRA deltas are merged into the written weights (the model itself is left as it is); GPT-2's missing
        biases (bias=False) are written as zeros. Each file goes to a temporary name first and is then
        renamed, so a crash never leaves a half-written file under the final name. attn_window is written as
        the sliding window of mistral, qwen2 and qwen3; gpt2 and llama cannot say it: pass it again to
        from_pretrained. A config the family's format cannot express is refused."""
        from safetensors.torch import save_file
        self._check_hf_expressible()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = self.state_dict()
        for name, m in self.named_modules():
            if isinstance(m, LoRALinear) and not m.merged:
                weights[name + ".weight"] = m.weight + m.delta_weight()
            gpt2_linear_or_norm = isinstance(m, (nn.Linear, nn.LayerNorm, LoRALinear)) and name != "lm_head"
            if self.config.model_type == "gpt2" and gpt2_linear_or_norm and m.bias is None:
                weights[name + ".bias"] = m.weight.new_zeros(m.weight.shape[0])
        weights = {key: t for key, t in weights.items() if "lora_" not in key}
        tensors = {}
        for key, parts in hf_tensor_names(self.config, weights).items():
            t = weights[key].t() if self.config.model_type == "gpt2" and key.endswith(HF_TRANSPOSED) else weights[key]
            for name, piece in zip(parts, t.split(hf_part_rows(self.config, key, t.shape[0], len(parts)))):
                tensors[name] = piece.detach().contiguous().cpu()
        hf = {**self.hf_config(), **(token_ids or {})}
        _write_atomically(path / "model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"}))
        _write_atomically(path / "config.json", lambda f: Path(f).write_text(json.dumps(hf, indent=2)))

    def _check_hf_expressible(self):
        """Refuse to export a config that its family's config.json would read back as another model."""
        def sizes_spelled_out(c):  # 0 means "the default size": compare the sizes themselves
            return replace(c, head_dim=c.head_size, n_kv_head=c.kv_heads, intermediate_size=c.mlp_width)
        ours = sizes_spelled_out(self.config)
        back = sizes_spelled_out(gpt_config_from_hf(self.hf_config(), "the exported config.json"))
        not_in_format = {"dropout", "attn_window", "gradient_checkpointing"}  # the run's choices (see docstrings)
        if ours.model_type == "gpt2":
            not_in_format.add("bias")  # written as zeros
        for field in fields(ours):
            mine, theirs = getattr(ours, field.name), getattr(back, field.name)
            if field.name not in not_in_format and mine != theirs:
                raise ValueError(f"{field.name}={mine!r} cannot be written as a Hugging Face {ours.model_type} model "
                                 f"(its config.json would load as {field.name}={theirs!r})")

    def hf_config(self):
        """This model's config in Hugging Face terms for its family."""
        cfg = self.config
        if cfg.model_type == "gpt2":
            return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                        n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_inner=None, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                        initializer_range=0.02, tie_word_embeddings=True,
                        # GPT-2's end-of-text is 50256; for a small vocabulary (the byte tokenizer) it is the last id
                        bos_token_id=min(50256, cfg.vocab_size - 1), eos_token_id=min(50256, cfg.vocab_size - 1))
        hf = dict(architectures=[HF_ARCHITECTURES[cfg.model_type]], model_type=cfg.model_type,
                  vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_width,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                  head_dim=cfg.head_size, hidden_act="silu", max_position_embeddings=cfg.block_size,
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
        return [config.n_head * config.head_size] + [config.kv_heads * config.head_size] * 2
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
    if not set(hf.get("architectures") or []) <= {"GPT2LMHeadModel", "GPT2Model"}:
        raise ValueError(f"{file}: architectures is {hf['architectures']}; expected GPT2LMHeadModel")
    n_embd = hf.get("n_embd", 768)
    supported = {"activation_function": ("gelu_new", ["gelu_new", "gelu_pytorch_tanh"]),
                 "n_inner": (None, [None, 4 * n_embd]),
                 "scale_attn_weights": (True, [True]), "scale_attn_by_inverse_layer_idx": (False, [False]),
                 "tie_word_embeddings": (True, [True])}
    for field, (default, allowed) in supported.items():
        if hf.get(field, default) not in allowed:
            raise ValueError(f"{file}: {field}={hf[field]!r} is not supported (this GPT-2 needs one of {allowed})")
    return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                     n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd, dropout=0.0,
                     norm_eps=hf.get("layer_norm_epsilon", 1e-5))


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
    if (hf.get("architectures") or [expected]) != [expected]:
        raise ValueError(f"{file}: architectures is {hf['architectures']}; expected [{expected!r}]")
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}  # transformers 4 | 5 spelling
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
        llama3 = {ours: rope[theirs] for theirs, ours in LLAMA3_ROPE.items()}
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    return family_config(model_type, block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                         n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=width,
                         n_kv_head=hf.get("num_key_value_heads") or heads,
                         head_dim=hf.get("head_dim") or width // heads,
                         intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                         rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                         rope_scaling="llama3" if llama3 else "none", **llama3,
                         tie_word_embeddings=hf.get("tie_word_embeddings", False),
                         attn_window=hf_sliding_window(hf, file))


def hf_sliding_window(hf, file):
    """attn_window for config.json's sliding window. Hugging Face's sliding mask lets query i see key j when
    i - w < j <= i, exactly attn_window's mask, so the window is honoured; a mix of sliding and full
    layers is refused. Mistral slides on every layer; Qwen2/3 on the layers that layer_types names (or,
    in older files, those from max_window_layers on when use_sliding_window)."""
    window = hf.get("sliding_window") or 0
    if hf["model_type"] == "mistral":
        return window
    window = window if hf.get("use_sliding_window") else 0
    n_layer = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if window and i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(n_layer)]
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
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
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
    from safetensors.torch import load_file
    try:
        tensors = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu",
                                                                                  weights_only=True)
    except Exception as e:  # safetensors, zipfile and unpickling errors share no base class
        raise ValueError(f"{file} cannot be read, it may be truncated or damaged: {type(e).__name__}: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{file} does not hold a dictionary of named tensors")
    return tensors


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
    """Wrap every nn.Linear whose qualified name contains one of the comma-separated patterns; returns the count.

    The default, "h.", is every Linear in the blocks, i.e. the attention and MLP projections of every family:
    attn.c_attn (q, k, v), attn.c_proj (the output), mlp.c_fc (GPT-2's up; the Llama family's gate and up)
    and mlp.c_proj (down). Fused q/k/v and gate/up share one LoRA input factor (right) per layer."""
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
