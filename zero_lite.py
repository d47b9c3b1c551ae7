"""
The native training engine: what DeepSpeed's engine does for this trainer, in plain torch.distributed.

    engine = Engine(model, optimizer, stage=0, dtype=torch.float32, grad_clip=1.0, initial_scale_power=16)
    loss = engine(idx, labels, segment_ids, boundary=i == accum - 1)   # forward under autocast
    engine.backward(loss * weight)                                       # gradients: mean over ranks at the boundary
    grad_norm, applied = engine.step(lr_multiplier, loss_is_finite)     # clip, update or skip, zero gradients

Stage 0 is data parallelism as DDP does it: every rank holds the whole model, gradients and optimizer
state, and the gradients are averaged over ranks once per optimizer step, after the backward of the
step's last (boundary) micro-batch, in flat buckets. Stages 1-3 (ZeRO: optimizer state, then gradients,
then parameters sharded over ranks) belong in this class beside it.

train_sft.make_engine builds this engine or, with --engine=deepspeed, an adapter with the same interface.
"""

import contextlib
import os

import torch
import torch.distributed as dist

STAGES_BUILT = (0,)
BUCKET_BYTES = 25 * 2**20  # gradients cross ranks in flat buckets of about this size (DDP's default)


class Engine:
    def __init__(self, model, optimizer, stage=0, dtype=torch.float32, grad_clip=1.0, initial_scale_power=16,
                 compile=False):
        if stage not in STAGES_BUILT:
            raise ValueError(f"ZeRO stage {stage} is not built into the native engine yet "
                             f"(it has stage {', '.join(map(str, STAGES_BUILT))})")
        self.module, self.optimizer, self.stage, self.grad_clip = model, optimizer, stage, grad_clip
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = next(model.parameters()).device
        self._forward = torch.compile(model) if compile else model
        self.autocast = (torch.autocast(self.device.type, dtype=dtype) if dtype != torch.float32
                         else contextlib.nullcontext())
        # float16 only: a dynamic loss scale keeps small gradients from underflowing.
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0 ** initial_scale_power,
                                           enabled=dtype == torch.float16)
        self.boundary = True
        if self.world > 1:  # every rank starts from rank 0's weights, as DDP does
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)

    # ------------------------------------------------------------------------- the step

    def __call__(self, idx, labels, segment_ids=None, boundary=True):
        """The micro-batch's mean loss over its trained tokens; boundary marks the step's last micro-batch."""
        self.boundary = boundary
        with self.autocast:
            return self._forward(idx, labels, segment_ids=segment_ids)

    def backward(self, loss):
        """Accumulates gradients; after the boundary micro-batch they are the mean over ranks."""
        self.scaler.scale(loss).backward()
        if self.boundary and self.world > 1:
            self._average_gradients()

    def step(self, lr_multiplier, loss_is_finite):
        """Sets the learning rates, clips by the global norm, updates unless the loss or the norm is
        NaN/Inf, zeroes the gradients. Returns (pre-clip norm as a 0-dim tensor, whether it updated)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_multiplier
        grads = self._gradients()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # the dense gradients; the sparse ones are the optimizer's own
            if self._sparse_gradients():
                torch._foreach_div_(self._sparse_gradients(), self.scaler.scale(torch.ones((), device=self.device)))
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if self.grad_clip > 0:  # the same arithmetic as torch.nn.utils.clip_grad_norm_
            torch._foreach_mul_(grads, (self.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0))
        applied = bool(torch.isfinite(grad_norm) & loss_is_finite)  # the step's one host sync
        if applied:
            self.optimizer.step()
        if self.scaler.is_enabled():  # grow the scale after enough good steps, lower it after a skipped one
            if applied:
                self.scaler.update()
            else:
                self.scaler.update(self.scaler.scale(torch.ones((), device=self.device))
                                   * self.scaler.get_backoff_factor())
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    @property
    def loss_scale(self):
        """The float16 loss scale (1.0 otherwise); reading it syncs with the device."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def _sparse_gradients(self):
        """Gradients that sparse fine-tuning's optimizer gathers itself (the trained entries only)."""
        return list(getattr(self.optimizer, "sparse_grads", ()))

    def _gradients(self):
        """Every gradient the optimizer will use, in the same order on every rank."""
        dense = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        return dense + self._sparse_gradients()

    def _average_gradients(self):
        """Sum over ranks, then divide, one flat bucket of about BUCKET_BYTES at a time: a few large
        collectives instead of one per tensor."""
        bucket, size = [], 0
        for grad in self._gradients():
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
            if size >= BUCKET_BYTES:
                self._all_reduce_mean(bucket)
                bucket, size = [], 0
        if bucket:
            self._all_reduce_mean(bucket)

    def _all_reduce_mean(self, grads):
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world)
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])

    # ------------------------------------------------------------------------- state

    def memory_report(self):
        """Bytes this rank holds for the model state, to set beside the ZeRO paper's formula
        (fp32: 4 + 4 + 8 bytes per parameter at stage 0). Gradients count at their size during a step."""
        params = sum(p.numel() * p.element_size() for p in self.module.parameters())
        grads = sum(p.numel() * p.element_size() for group in self.optimizer.param_groups for p in group["params"])
        grads += sum(g.numel() * g.element_size() for g in self._sparse_gradients())
        optimizer_state = sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                              for t in state.values() if torch.is_tensor(t))
        return {"params": params, "grads": grads, "optimizer_state": optimizer_state,
                "total": params + grads + optimizer_state}

    def full_state_dict(self):
        """The whole model's weights in fp32 on the CPU, on rank 0 (None elsewhere); every rank calls it.
        Tied weights stay one tensor under both names, as in model.state_dict()."""
        if self.rank != 0:
            return None
        copies = {}
        state = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():  # tied: the same object
            if id(tensor) not in copies:
                copies[id(tensor)] = tensor.detach().to("cpu", torch.float32, copy=True)
            state[name] = copies[id(tensor)]
        return state

    def _file(self, ckpt_dir):
        # Stage 0: every rank holds the same state, so rank 0's one file serves any number of ranks.
        return os.path.join(ckpt_dir, "zero_lite-stage0.pt")

    def _meta(self):
        """What a checkpoint must agree with to be loaded into this engine."""
        return {"engine": "native", "stage": self.stage,
                "shapes": {name: list(t.shape) for name, t in self.module.state_dict().items()}}

    def save(self, ckpt_dir):
        """Writes this rank's state into ckpt_dir (which the trainer renames when every rank is done)."""
        if self.rank == 0:
            torch.save({"meta": self._meta(), "model": self.module.state_dict(),
                        "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()},
                       self._file(ckpt_dir))

    def load(self, ckpt_dir):
        """Reads what save wrote; a checkpoint of another engine, stage or model shape is a ValueError."""
        path = self._file(ckpt_dir)
        if not os.path.isfile(path):
            raise ValueError(f"{ckpt_dir} holds no native stage-{self.stage} engine state ({os.path.basename(path)})")
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain types: no code
        if state["meta"] != self._meta():
            raise ValueError(f"{path} was written for another engine stage or model shape than this run's")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
