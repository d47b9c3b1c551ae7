"""A GPT written by hand, readable top to bottom (after nanoGPT's model.py): GPT-2 and the Llama family
(Llama, Mistral, Qwen2, Qwen3) in one class, switched by GPTConfig fields.

Also here: the loss seam (GPT.loss_fn, by default sft_kernels/chunked_cross_entropy.py's masked linear +
cross-entropy), generation with a KV cache, and LoRA as DeepSpeed-Chat offers it. Hugging Face directories
are read and written by hf_format.py, which from_pretrained and save_pretrained call.
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from sft_kernels.chunked_cross_entropy import linear_cross_entropy
from sft_kernels.lean_autograd import rms_norm, swiglu, swiglu_linear


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
    model_type: str = "gpt2"  # the Hugging Face family save_pretrained writes, a key of FAMILIES
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
    intermediate_size: int = 0  # MLP width; 0 (or absent): 4 * n_embd
    n_kv_head: int = 0  # key/value heads, grouped-query attention; 0 (or absent): n_head
    head_dim: int = 0  # channels per head; 0 (or absent): n_embd // n_head
    qkv_bias: bool = False  # biases on q, k and v even without bias (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before the rotation (Qwen3)
    tie_word_embeddings: bool = True  # the output head is the token embedding

    def __post_init__(self):
        """Resolve the three sizes whose 0 means "the default", once, so every reader sees the size itself
        under one name. 0 stays accepted because callers and older checkpoints write it; a config made with
        dataclasses.replace keeps the sizes already resolved (pass them as 0 to have them resolved again)."""
        if not self.head_dim:
            if self.n_head <= 0 or self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head} "
                                 "(or set head_dim)")
            self.head_dim = self.n_embd // self.n_head
        self.n_kv_head = self.n_kv_head or self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd


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
    if config.n_kv_head <= 0 or config.n_head % config.n_kv_head:
        raise ValueError(f"n_head={config.n_head} must be a multiple of n_kv_head={config.n_kv_head}")
    if config.positions == "rotary" and config.head_dim % 2:
        raise ValueError(f"rotary positions need an even head size, got head_dim={config.head_dim}")


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
    """Radians per position of each of the head_dim / 2 rotated channel pairs, fastest first (fp32, computed
    as Hugging Face does). rope_scaling='llama3' divides the slow frequencies, whose wavelength exceeds the
    pre-training context / low_freq_factor, by rope_factor, keeps the fast ones (wavelength below context /
    high_freq_factor), and blends linearly in between."""
    hs = config.head_dim
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


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (its parameter, state-dict name and forward values) through sft_kernels.lean_autograd.rms_norm,
    which keeps only the input and 1/rms for the backward, not also the normalized input."""

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps if self.eps is not None else torch.finfo(x.dtype).eps)


def make_norm(config, size):
    """The family's normalisation: GPT-2's LayerNorm (with bias when config.bias) or the Llama family's RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(size, eps=config.norm_eps)
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
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=config.bias or config.qkv_bias)  # q, k, v
        self.c_proj = nn.Linear(q_size, config.n_embd, bias=config.bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, mask=None, cache=None):
        """rope: (cos, sin) for rotary positions, else None. mask None means plain causal attention (SDPA's
        flash path); otherwise a bool (B|1, 1, T, S) mask."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.qkv_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hs)
        if self.qk_norm:
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
        width = config.intermediate_size
        self.c_fc = nn.Linear(config.n_embd, 2 * width if self.swiglu else width, bias=config.bias)  # [gate; up]
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu and type(self.c_proj) is nn.Linear:  # silu(gate) * up of h = [gate; up], then c_proj
            return self.dropout(swiglu_linear(h, self.c_proj.weight, self.c_proj.bias))
        h = swiglu(h) if self.swiglu else self.gelu(h)  # with LoRA on c_proj: its own input kept
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


class GPT(nn.Module):
    def __init__(self, config, init_weights=True):
        """init_weights=False leaves out GPT-2's initialisation, for a loader that overwrites every parameter
        (filling SmolLM2-135M's with random numbers costs most of a second on a CPU)."""
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
        if not init_weights:
            return
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual writes scaled so the stream's variance stays put
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True, trained_only=False):
        """Parameter count; non_embedding leaves out the lookup tables, which cost no matmul: the position
        table, and the token embedding when the head is untied (a tied wte counts: it is also the head);
        trained_only counts only the parameters that require a gradient."""
        tables = []
        if non_embedding:
            tables += [self.transformer.wpe.weight] if self.config.positions == "learned" else []
            tables += [] if self.config.tie_word_embeddings else [self.transformer.wte.weight]
        return sum(p.numel() for p in self.parameters()
                   if (p.requires_grad or not trained_only) and not any(p is table for table in tables))

    def flops_per_token(self, seq_len):
        """Training FLOPs per token for MFU, PaLM's (appendix B) 6N plus attention: 2 per weight for the
        forward, 2 for the gradient of its input and 2 for its own gradient, which a frozen weight (LoRA's
        base) does not compute, so it counts 4. A window shortens the attention span."""
        cfg = self.config
        span = min(seq_len, cfg.attn_window) if cfg.attn_window > 0 else seq_len
        weights = 4 * self.num_params() + 2 * self.num_params(trained_only=True)
        return weights + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * span

    def head_weight(self):
        """The output head's weight as the loss sees it: tied or untied, with an unmerged LoRA delta added."""
        head = self.lm_head
        return head.weight + head.delta_weight() if isinstance(head, LoRALinear) and not head.merged else head.weight

    def _trunk(self, idx, pos, mask, caches=None):
        """Embeddings, blocks and the final norm: idx (B, T), pos (B|1, T) -> hidden (B, T, C)."""
        x, rope = self.transformer.wte(idx), None
        if self.config.positions == "learned":
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
            caches = [KVCache(B, self.config.n_kv_head, capacity, self.config.head_dim, self.lm_head.weight)
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
        """A GPT from a local Hugging Face directory of model_type gpt2, llama, mistral, qwen2 or qwen3, or a
        .gguf file of those architectures; overrides may set dropout, attn_window and gradient_checkpointing
        (see hf_format.load_pretrained)."""
        if str(path).endswith(".gguf"):
            import gguf_format  # the formats rooms build on this one, so they are imported when used
            return gguf_format.load_gguf(path, **overrides)
        import hf_format
        return hf_format.load_pretrained(path, **overrides)

    def save_pretrained(self, path, token_ids=None):
        """Write this model as a Hugging Face directory of its family (see hf_format.save_pretrained)."""
        import hf_format
        hf_format.save_pretrained(self, path, token_ids)


# ----------------------------------------------------------------------------- MFU's yardsticks

GPU_PEAK_FLOPS = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12))  # dense bf16, datasheets
CPU_RESULTS = Path(__file__).resolve().parent / "bench" / "results"


def cpu_machine_name():
    """This CPU's model name as a file-name part, e.g. AMD_EPYC_7B13 (from /proc/cpuinfo; 'cpu' elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "cpu"
    name = next((line.split(":", 1)[1] for line in lines if line.startswith("model name")), "cpu")
    return re.sub(r"[^A-Za-z0-9]+", "_", name.replace("Processor", "")).strip("_") or "cpu"


def cpu_peak_path():
    """Where bench/bench_cpu.py records this machine's measured float32 matmul peak."""
    return CPU_RESULTS / f"cpu_{cpu_machine_name()}.json"


def peak_flops(device, threads=None):
    """The FLOP/s that MFU divides by: a known GPU's dense bf16 datasheet peak; on a CPU, the float32 matmul
    throughput that bench/bench_cpu.py measured on this machine at the model's GEMM shapes with as many
    threads (torch.get_num_threads() by default). None where neither is known."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in GPU_PEAK_FLOPS if key in name), None)
    if device.type != "cpu" or not cpu_peak_path().exists():
        return None
    try:
        record = json.loads(cpu_peak_path().read_text())
    except (OSError, ValueError):
        return None
    # Timed in wall and in CPU seconds, each of which can only undercount the machine: the larger is the peak.
    key = str(threads or torch.get_num_threads())
    measured = [record.get(name, {}).get(key) for name in ("matmul_peak_flops", "matmul_peak_flops_of_cpu_time")]
    return max(filter(None, measured), default=None)


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
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        # The low-rank product accumulates onto the frozen projection's output in place, inside one GEMM whose
        # alpha is the scaling: no full-size product, scaled copy or sum, forward or backward. The projection's
        # output is made 2-D (rows, out) and is no view, so the in-place update costs autograd no copy either.
        rows = x.flatten(0, -2)
        y = F.linear(rows, self.weight, self.bias)
        low_rank = self.lora_dropout(rows) @ self.lora_right_weight  # (rows, r)
        left = self.lora_left_weight.to(y.dtype)  # under autocast y is bfloat16, and an in-place op casts nothing
        return y.addmm_(low_rank.to(y.dtype), left, alpha=self.lora_scaling).view(*x.shape[:-1], -1)


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
    # A rank above a matrix's smaller side adds nothing a full-rank delta lacks, only memory (at 10**9 the
    # factors' allocation itself fails): refused before any factor exists.
    narrowest = min(targets, key=lambda target: min(target[1].weight.shape), default=None)
    if narrowest is not None and lora_dim > min(narrowest[1].weight.shape):
        name, linear = narrowest
        raise ValueError(f"a LoRA rank can be at most the smaller side of the matrices it adapts, and {name} is "
                         f"{linear.out_features}x{linear.in_features}")
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
