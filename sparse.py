"""
Sparse fine-tuning: train a small, chosen set of entries of each weight matrix (SpIEL, Ansell et
al. 2024), so the optimizer state and the update grow with the trained entries, not the model.

    python sparse.py merge --base=HF_DIR --delta=FILE --out=HF_DIR   # base + delta -> a plain HF directory

It lives in the optimizer, not the model. Per chosen matrix, SparseAdamW keeps int32 flat
`indices`, fp32 `delta` (the change over the frozen base), the Adam moments and the base values at
those entries. The weight itself always holds base + delta, so forward, eval, generate and the
Hugging Face export see the fine-tuned model without knowing about any of this.

- Gradients: a hook on each sparse matrix gathers its gradient at the indices as soon as the
  backward has produced it and frees the dense gradient, so at most one matrix's dense gradient
  exists at a time. Accumulation adds the gathered values; `optimizer.sparse_grads` lists them for
  the engine, which averages them over ranks with the dense gradients (only the selected entries
  cross the network), counts them in the gradient norm and clips them.
- Update: sft_kernels/sparse_adam.py, AdamW on the delta (decoupled weight decay pulls it back to the
  base), writing base + delta into the weight: the Triton kernel on a GPU, its reference on a CPU.
- Selection (SpIEL-AG): the initial indices are random, or the largest accumulated gradients over
  a few probe batches (select_by_gradient). Every regrow_interval steps, each matrix drops the
  share of its entries with the smallest |delta| (their weights go back to the base) and regrows as
  many where the gradient accumulated over that step is largest; the share decays from
  regrow_share to 0 over training (cosine). Those steps hold one dense fp32 gradient sum per
  matrix, the memory of a dense gradient, for the length of one step.
- Parameters that are not sparse matrices (biases, LayerNorm, whatever the trainer leaves
  trainable) get plain dense AdamW, the same update torch.optim.AdamW makes.
- Files: save_delta writes the indices and deltas alone as safetensors, with each matrix's shape
  and a fingerprint of its base values; load_delta checks both and adds the delta onto a base model.
"""
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

DELTA_FORMAT = "sparse-delta-v1"


def sparse_matrices(model, pattern="h.", embedding=False):
    """[(name, weight)] to train sparsely: the weights of nn.Linear modules whose name contains one
    of the comma-separated patterns (default: every Linear in the blocks), and with embedding=True
    the embedding tables and the output head. A weight tied to an embedding (GPT-2's lm_head) counts
    as the embedding; an untied head (most of the Llama family) counts as an embedding of its own.
    Names are state_dict keys. Raises ValueError when nothing matches."""
    patterns = [p.strip() for p in pattern.split(",") if p.strip()]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen, seen = [], set()
    for name, module in model.named_modules():
        wanted = (embedding and (isinstance(module, nn.Embedding) or name == "lm_head")) or (
            isinstance(module, nn.Linear) and id(module.weight) not in embeddings
            and any(p in name for p in patterns))
        if wanted and id(module.weight) not in seen:
            seen.add(id(module.weight))
            chosen.append((f"{name}.weight", module.weight))
    if not chosen:
        raise ValueError(f"pattern {pattern!r} matches no Linear weight"
                         + ("" if embedding else " (and the embedding is not chosen)"))
    return chosen


def entries_for(numel, density):
    """How many entries a matrix of numel trains at this density: at least one."""
    return max(1, min(numel, round(density * numel)))


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over the chosen entries of `matrices` ([(name, weight)], see sparse_matrices) and
    dense AdamW over `dense_groups` (param groups as torch.optim.AdamW takes them, each with
    "base_lr"). The sparse matrices form the last param group, with learning rate lr and weight
    decay weight_decay (on the delta).

    kernel: use the Triton kernel (default: on CUDA; the reference elsewhere). total_steps sets
    the decay of the regrown share. seed makes the random selection the same on every rank."""

    def __init__(self, matrices, dense_groups, density, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 regrow_interval=0, regrow_share=0.2, total_steps=1, seed=0, kernel=None):
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        self.names = [name for name, _ in matrices]
        sparse_group = {"params": [p for _, p in matrices], "lr": lr, "base_lr": lr, "weight_decay": weight_decay,
                        "sparse": True}
        groups = [dict(g, sparse=False) for g in dense_groups]
        groups.append(sparse_group)
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step=0))
        self.density, self.regrow_interval, self.regrow_share = density, regrow_interval, regrow_share
        self.total_steps, self.kernel = max(1, total_steps), kernel
        generator = torch.Generator().manual_seed(seed)
        self.sparse_grads = []
        for slot, p in enumerate(self.matrices):
            n = entries_for(p.numel(), density)
            order = torch.arange(p.numel()) if n == p.numel() else torch.randperm(p.numel(), generator=generator)[:n]
            self._set_indices(p, order.sort().values.to(torch.int32))
            self.sparse_grads.append(torch.zeros(n, device=p.device))
            p.requires_grad_(True)
            p.register_post_accumulate_grad_hook(lambda weight, slot=slot: self._gather(slot, weight))
        self._grad_sums = [None] * len(self.matrices)  # dense fp32 gradient sums, while collecting
        self.collecting = self._regrow_due(1)

    @property
    def matrices(self):
        return self.param_groups[-1]["params"]

    def name_of(self, weight):
        return next(name for name, p in zip(self.names, self.matrices) if p is weight)

    def load_state_dict(self, state_dict):
        """As torch's, except that the sparse state keeps its dtypes (the base class would cast
        the int32 indices to the weight's dtype), and a regrow due at the next step collects."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        first_sparse = len(params) - len(self.matrices)
        for i, weight in enumerate(self.matrices):
            saved = state_dict["state"][first_sparse + i]
            if saved["indices"].numel() != self.sparse_grads[i].numel():
                raise ValueError(f"optimizer state of {self.names[i]} holds {saved['indices'].numel()} entries, "
                                 f"not {self.sparse_grads[i].numel()} (another density?)")
            self.state[weight] = {key: value.to(weight.device) for key, value in saved.items()}
        self.collecting = self._regrow_due(self.param_groups[-1]["step"] + 1)

    @torch.no_grad()
    def _set_indices(self, weight, indices):
        """A fresh state for these entries: delta and moments 0, base read from the weight."""
        from sft_kernels.sparse_adam import check_indices  # imported where used: it imports Triton (70 MiB)
        check_indices(indices, weight.numel(), f"indices of {self.name_of(weight)}")
        indices = indices.to(weight.device)
        self.state[weight] = {
            "indices": indices, "delta": torch.zeros(indices.numel(), device=weight.device),
            "exp_avg": torch.zeros(indices.numel(), device=weight.device),
            "exp_avg_sq": torch.zeros(indices.numel(), device=weight.device),
            "base": weight.detach().reshape(-1).index_select(0, indices).float()}

    @torch.no_grad()
    def _gather(self, slot, weight):
        """Backward hook: keep the gradient at the selected entries, free the dense one."""
        grad = weight.grad.reshape(-1)
        self.sparse_grads[slot].add_(grad.index_select(0, self.state[weight]["indices"]))
        if self.collecting:
            if self._grad_sums[slot] is None:
                self._grad_sums[slot] = torch.zeros(weight.numel(), device=weight.device)
            self._grad_sums[slot].add_(grad)
        weight.grad = None

    def zero_grad(self, set_to_none=True):
        """Dense gradients as torch does; the gathered ones are zeroed in place (the engine may hold them)."""
        super().zero_grad(set_to_none)
        for g in self.sparse_grads:
            g.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "SparseAdamW takes no closure"
        for group in self.param_groups:
            if group["sparse"]:
                group["step"] += 1
                for slot, p in enumerate(group["params"]):
                    self._sparse_update(p, self.sparse_grads[slot], group)
            else:
                self._dense_update(group)
        step = self.param_groups[-1]["step"]
        if self._regrow_due(step):
            self._drop_and_regrow(step)
        self.collecting = self._regrow_due(step + 1)

    def _sparse_update(self, weight, grad, group):
        from sft_kernels.sparse_adam import reference_sparse_adamw_, sparse_adamw_
        state = self.state[weight]
        beta1, beta2 = group["betas"]
        use_kernel = weight.device.type == "cuda" if self.kernel is None else self.kernel
        update = sparse_adamw_ if use_kernel else reference_sparse_adamw_
        update(weight.data, state["indices"], grad, state["delta"], state["exp_avg"], state["exp_avg_sq"],
               state["base"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
               weight_decay=group["weight_decay"], step=group["step"])

    def _dense_update(self, group):
        """AdamW, as torch.optim.AdamW computes it, for the parameters trained densely (biases and norms:
        few and small, so a plain loop), with torch's state layout, so its checkpoints read the same."""
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            step = float(state["step"])
            p.mul_(1 - group["lr"] * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))

    # -- selection ---------------------------------------------------------------------------

    def _regrow_due(self, step):
        """Every regrow_interval steps, while the share has not decayed to 0 (the last step)."""
        return (self.regrow_interval > 0 and self.density < 1 and step % self.regrow_interval == 0
                and step < self.total_steps)

    def regrow_fraction(self, step):
        """The share of each matrix's entries replaced at this step: regrow_share decaying to 0 (cosine)."""
        return self.regrow_share * 0.5 * (1 + math.cos(math.pi * min(1.0, step / self.total_steps)))

    def _summed_gradients(self):
        """The collected dense gradient sums, the same on every rank; collection stops."""
        self.collecting = False
        sums, self._grad_sums = self._grad_sums, [None] * len(self.matrices)
        if dist.is_initialized() and dist.get_world_size() > 1:
            for s in sums:
                if s is not None:
                    dist.all_reduce(s)
        return sums

    @torch.no_grad()
    def _drop_and_regrow(self, step):
        """SpIEL-AG: drop the smallest |delta|, regrow where the accumulated gradient is largest.
        State tensors are rewritten in place and kept sorted by index."""
        share = self.regrow_fraction(step)
        for weight, grad_sum, grad in zip(self.matrices, self._summed_gradients(), self.sparse_grads):
            state = self.state[weight]
            n = state["indices"].numel()
            k = min(int(share * n), weight.numel() - n)
            if k == 0 or grad_sum is None:
                continue
            order = state["delta"].abs().argsort(descending=True)
            kept, dropped = order[:n - k], order[n - k:]
            flat = weight.data.view(-1)
            flat.index_copy_(0, state["indices"][dropped].long(), state["base"][dropped].to(weight.dtype))
            score = grad_sum.abs()
            score[state["indices"][kept].long()] = -1.0  # entries still trained cannot be chosen twice
            grown = score.topk(k).indices.to(torch.int32)
            indices = torch.cat([state["indices"][kept], grown])
            zeros = torch.zeros(k, device=weight.device)
            new = {"indices": indices, "delta": torch.cat([state["delta"][kept], zeros]),
                   "exp_avg": torch.cat([state["exp_avg"][kept], zeros]),
                   "exp_avg_sq": torch.cat([state["exp_avg_sq"][kept], zeros]),
                   "base": torch.cat([state["base"][kept], flat.index_select(0, grown).float()])}
            by_index = indices.argsort()
            for key, value in new.items():
                state[key].copy_(value[by_index])
            grad.zero_()

    @torch.no_grad()
    def select_by_gradient(self, run_probe):
        """Initial selection by gradient magnitude: run_probe() runs forward and backward on a few
        batches; each matrix then trains the entries whose summed gradient (over those batches and
        all ranks) is largest. Every gradient is cleared afterwards. Only before the first step."""
        if self.param_groups[-1]["step"]:
            raise RuntimeError("select_by_gradient must come before the first optimizer step")
        self.collecting = True
        with torch.enable_grad():
            run_probe()
        for weight, grad_sum in zip(self.matrices, self._summed_gradients()):
            if grad_sum is None:
                raise RuntimeError(f"the probe batches produced no gradient for {self.name_of(weight)}")
            n = self.state[weight]["indices"].numel()
            self._set_indices(weight, grad_sum.abs().topk(n).indices.sort().values.to(torch.int32))
        self.zero_grad(set_to_none=True)
        self.collecting = self._regrow_due(1)

    # -- reporting ---------------------------------------------------------------------------

    def trainable_entries(self):
        """(entries trained sparsely, parameters trained densely)."""
        sparse = sum(self.state[p]["indices"].numel() for p in self.matrices)
        dense = sum(p.numel() for g in self.param_groups if not g["sparse"] for p in g["params"])
        return sparse, dense

    def state_bytes(self):
        """Bytes of optimizer state: indices, deltas, moments and base values of the sparse entries,
        and the two moments of each dense parameter, whether or not its first step has made them
        yet (the gathered gradients are not counted: they are gradients)."""
        sparse = sum(t.numel() * t.element_size() for p in self.matrices for t in self.state[p].values())
        dense = sum(2 * p.numel() * p.element_size() for g in self.param_groups if not g["sparse"] for p in g["params"])
        return sparse + dense


def sparse_report(optimizer):
    """The start-up line of a sparse run: what trains and what the optimizer holds."""
    entries, dense = optimizer.trainable_entries()
    total = sum(p.numel() for p in optimizer.matrices)
    dense_adamw = 8 * (total + dense)  # two fp32 moments per trained parameter
    return (f"sparse: {entries:,} of {total:,} entries in {len(optimizer.matrices)} matrices "
            f"({entries / total:.2%}) and {dense:,} dense parameters train; optimizer state "
            f"{optimizer.state_bytes() / 2**20:.2f} MiB (dense AdamW over the same parameters: "
            f"{dense_adamw / 2**20:.2f} MiB)")


# -- delta files ---------------------------------------------------------------------------------


def _fingerprint(base):
    """Two numbers that tell one base apart from another at the trained entries."""
    base = base.double()
    return [float(base.sum()), float((base * base).sum())]


def save_delta(optimizer, path, base_name=""):
    """The trained deltas alone, as safetensors: `<name>.indices` (int32) and `<name>.delta` (fp32)
    per matrix; metadata holds each matrix's shape and base fingerprint. Written atomically."""
    tensors, metadata = {}, {"format": DELTA_FORMAT, "base": base_name}
    for name, weight in zip(optimizer.names, optimizer.matrices):
        state = optimizer.state[weight]
        tensors[f"{name}.indices"] = state["indices"].cpu().contiguous()
        tensors[f"{name}.delta"] = state["delta"].cpu().contiguous()
        metadata[name] = json.dumps({"shape": list(weight.shape), "base": _fingerprint(state["base"])})
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


@torch.no_grad()
def load_delta(model, path):
    """Adds a saved delta onto a model holding its base weights; returns the matrices' names.
    Raises ValueError naming the file and tensor when a shape or the base does not fit; then the
    model is unchanged (everything is checked before anything is written)."""
    from sft_kernels.sparse_adam import check_indices
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # a missing or corrupt file: say which
        raise ValueError(f"delta file {path} cannot be read: {type(e).__name__}: {e}") from None
    if metadata.get("format") != DELTA_FORMAT:
        raise ValueError(f"delta file {path} is not a sparse delta (format {metadata.get('format')!r})")
    params = dict(model.named_parameters(remove_duplicate=False))
    updates = []
    for name in sorted(k for k in metadata if k not in ("format", "base")):
        info = json.loads(metadata[name])
        weight = params.get(name)
        if weight is None:
            raise ValueError(f"delta file {path}: tensor {name} is not in the model")
        if list(weight.shape) != info["shape"]:
            raise ValueError(f"delta file {path}: tensor {name} has shape {info['shape']} but the model's is "
                             f"{list(weight.shape)}")
        indices, delta = tensors.get(f"{name}.indices"), tensors.get(f"{name}.delta")
        if indices is None or delta is None or delta.shape != indices.shape or delta.dtype != torch.float32:
            raise ValueError(f"delta file {path}: tensor {name} lacks matching .indices and fp32 .delta")
        check_indices(indices, weight.numel(), f"delta file {path}: indices of {name}")
        base = weight.detach().reshape(-1).index_select(0, indices.to(weight.device)).float().cpu()
        fingerprints = torch.tensor([_fingerprint(base), info["base"]], dtype=torch.float64)
        if not torch.allclose(fingerprints[0], fingerprints[1], rtol=1e-6, atol=1e-6):
            raise ValueError(f"delta file {path}: tensor {name} was trained on other base weights than the "
                             f"model's (base {metadata.get('base')!r})")
        updates.append((weight, indices, base + delta))
    for weight, indices, value in updates:
        weight.data.view(-1).index_copy_(0, indices.long().to(weight.device), value.to(weight.device, weight.dtype))
    return sorted(k for k in metadata if k not in ("format", "base"))


MERGE_OPTIONS = {
    "base": ("", "the Hugging Face directory the delta was trained on"),
    "delta": ("", "the delta file a sparse run wrote (sparse_delta.safetensors)"),
    "out": ("", "where the merged Hugging Face directory is written"),
}


def main(argv):
    """merge --base=HF_DIR --delta=FILE --out=HF_DIR: a Hugging Face directory with the delta added."""
    from checkpoint import EXPORT_MANIFEST_FILE, check_export, write_export_manifest
    from model import GPT
    from options import OptionError, parse_options
    try:
        if argv[:1] != ["merge"]:
            raise OptionError("usage: python sparse.py merge --base=HF_DIR --delta=FILE --out=HF_DIR")
        o, _ = parse_options(argv[1:], MERGE_OPTIONS, doc=main.__doc__)
        missing = [f"--{name}" for name in MERGE_OPTIONS if not o[name]]
        if missing:
            raise OptionError(f"merge needs {', '.join(missing)}")
        check_export(o["base"], "--base")
        model = GPT.from_pretrained(o["base"])
        names = load_delta(model, o["delta"])
    except (OSError, ValueError) as e:  # OptionError included
        print(f"sparse.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    model.save_pretrained(o["out"])
    if os.path.exists(os.path.join(o["out"], EXPORT_MANIFEST_FILE)):  # an export merged in place: new sums
        write_export_manifest(o["out"])
    print(f"merged {len(names)} matrices -> {o['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
