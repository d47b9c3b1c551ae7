"""
The native training engine: what DeepSpeed's engine does for this trainer, in plain torch.distributed.

    engine = Engine(model, optimizer, stage=0, dtype=torch.float32, grad_clip=1.0, initial_scale_power=16)
    loss = engine(idx, labels, segment_ids, boundary=i == accum - 1)   # forward under autocast
    engine.backward(loss * weight)                                       # gradients: mean over ranks at the boundary
    grad_norm, applied = engine.step(lr_multiplier, loss_is_finite)     # clip, update or skip, zero gradients

Stage 0 is data parallelism as DDP does it: every rank holds the whole model, gradients and optimizer
state, and the gradients are averaged over ranks once per optimizer step, in the backward of the step's
last (boundary) micro-batch. On a process group every gradient is a view into one of a few flat buckets
(filled from the last layer back); the hook of a bucket's last gradient launches its all-reduce, which runs
while the backward goes on with earlier layers, and the step waits for them all after the backward.

Stages 1-3 are ZeRO (Rajbhandari et al., 2020), which removes that redundancy step by step. The trained
parameters are grouped into units, one per transformer block plus a root unit (the embeddings, the final
LayerNorm and the tied head). A unit's parameters are views into one flat fp32 buffer, padded to a multiple
of the world size, so that rank r owns slice r of it: its shard.

  stage 1  Adam moments exist for the rank's shard only. At the boundary each unit's flat gradient buffer
           is reduce-scattered in place as soon as the backward has produced its last gradient (each rank
           receives the sum over ranks of its own slice), the rank updates its shard of the weights, and an
           all-gather brings every rank all the updated weights.
  stage 2  as 1, without full gradient buffers: a hook on every parameter notices when the backward has
           produced a unit's last gradient, copies the unit's gradients into a bucket, drops them and launches
           its reduce-scatter while the backward goes on with earlier blocks. Only the gradient shard is kept;
           the buckets (two at a time, plus the root's) are reused from step to step, not allocated anew.
  stage 3  as 2, and the weights are sharded too: a unit's flat buffer is gathered just before its forward
           or backward runs (the next unit's gather prefetched) and let go after; in between its parameters
           are empty tensors. What the forward saves for the backward from a block's weights (a matrix
           product's transposed weight) is kept as a place in the unit's buffer rather than as a tensor, which
           would keep the whole buffer alive until the block's backward.

Weights are fp32 at every stage (bfloat16 and float16 mean autocast), so they are the master weights and a
rank's master shard is a view of its own slice: no extra copy. Before the boundary micro-batch nothing
crosses ranks: gradients accumulate locally at full size. Any world size works, including 1 (no
communication) and sizes that do not divide the parameter counts (the padding is zeros and stays zero).

train_sft.make_engine builds this engine or, with --engine=deepspeed, the adapter with the same
interface in deepspeed_engine.py.
"""

import contextlib
import glob
import os
import re
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 25 * 2**20  # stage 0: gradients cross ranks in flat buckets of about this size (DDP's default)
SHARD_FILE = "zero_lite-shard{rank:05d}-of{world:05d}.pt"  # stages 1-3: one per rank in each checkpoint


# What torch.save writes besides the tensors' bytes: per tensor its zip entries, alignment and pickle
# record (about 220 bytes), per file the archive's own records and the pickled plain values.
TENSOR_RECORD_BYTES, FILE_RECORD_BYTES = 256, 4096


def _bytes(tensors):
    """Bytes of the distinct storages behind tensors (views of one buffer count once; a freed one is 0)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def saved_bytes(tensors):
    """About what torch.save writes for tensors: every distinct storage whole (a view saves all it views)."""
    tensors = list(tensors)
    return _bytes(tensors) + TENSOR_RECORD_BYTES * len(tensors)


def optimizer_state_bytes(optimizer):
    """About what optimizer.state_dict() adds to a torch.save file: the state tensors it holds and, for each
    parameter whose first step has not made them yet, what AdamW's will be (two moments like it, a step)."""
    held = sum(saved_bytes(t for t in state.values() if torch.is_tensor(t)) for state in optimizer.state.values())
    fresh = [p for group in optimizer.param_groups for p in group["params"] if not optimizer.state.get(p)]
    return held + sum(2 * p.numel() * p.element_size() + 4 + 3 * TENSOR_RECORD_BYTES for p in fresh)


# ----------------------------------------------------------------------------- buckets (stage 0)


class Bucket:
    """Stage 0 on a process group: gradients of neighbouring parameters as views into one flat buffer, so that
    the backward accumulates straight into it and one all-reduce averages them all, with no copy either way."""

    def __init__(self, params):
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        sizes = [p.numel() for p in params]
        self.views = [part.view_as(p) for part, p in zip(self.flat.split(sizes), params)]
        self.arrived = set()  # parameters whose gradient the current backward has produced
        self.received = set()  # those of the step's earlier backwards
        self.handle = None  # the all-reduce in flight

    def attach(self):
        """Every parameter's .grad becomes its view again (the step may have dropped one that got none)."""
        for p, view in zip(self.params, self.views):
            p.grad = view

    def launch(self):
        """Starts summing the bucket over ranks; the backward goes on meanwhile."""
        self.handle = dist.all_reduce(self.flat, async_op=True)


def make_buckets(params, bucket_bytes):
    """Consecutive parameters of one dtype in buckets of about bucket_bytes (a larger parameter gets a bucket of
    its own). params should come in the order the backward produces their gradients: the last layer's first."""
    buckets, current, size = [], [], 0
    for p in params:
        if current and (size >= bucket_bytes or p.dtype != current[0].dtype):
            buckets.append(Bucket(current))
            current, size = [], 0
        current.append(p)
        size += p.numel() * p.element_size()
    return buckets + ([Bucket(current)] if current else [])


# ----------------------------------------------------------------------------- collectives (stages 1-3)
#
# On gloo (the CPU backend) all_gather_single and reduce_scatter_single copy their buffers through staging
# tensors, and at a GPT-2 block's size they take longer than point-to-point messages and broadcasts that carry
# the same bytes straight from and into the tensors (bench/compare_engines.py --preset=gpt2_124m_cpu shows the
# whole step). Other backends (NCCL) get the collectives, which they implement well.


def start_gather(flat, shard, rank, world):
    """Starts filling flat with every rank's shard in rank order (shard may be this rank's slice of flat);
    returns the works to wait for. On gloo, one broadcast per rank, each straight into its slice of flat."""
    if dist.get_backend() != "gloo":
        return [dist.all_gather_single(flat, shard, async_op=True)]
    slices = flat.chunk(world)  # flat holds world shards of equal size
    if slices[rank].data_ptr() != shard.data_ptr():
        slices[rank].copy_(shard)
    return [dist.broadcast(part, src=src, async_op=True) for src, part in enumerate(slices)]


def start_reduce_scatter(bucket, shard, rank, world, inbox):
    """Starts making shard the sum over ranks of their slice `rank` of bucket (shard may be this rank's slice of
    bucket itself). inbox (gloo only): world - 1 tensors like shard that receive the other ranks' slices, one of
    which may be shard itself when it is not a slice of bucket. Returns a function that waits and leaves the sum
    in shard."""
    if dist.get_backend() != "gloo":
        work = dist.reduce_scatter_single(shard, bucket, async_op=True)
        return work.wait
    slices = bucket.chunk(world)
    peers = [r for r in range(world) if r != rank]
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, slices[peer], peer) for peer in peers]
                                   + [dist.P2POp(dist.irecv, box, peer) for box, peer in zip(inbox, peers)])

    def finish():
        for work in works:
            work.wait()
        parts = [slices[rank], *inbox]
        if all(part.data_ptr() != shard.data_ptr() for part in parts):
            shard.copy_(parts.pop(0))
        for part in parts:
            if part.data_ptr() != shard.data_ptr():  # shard is one of the parts already
                shard.add_(part)
    return finish


# ----------------------------------------------------------------------------- units (stages 1-3)


class Unit:
    """Parameters gathered, reduced and updated together, as views into one flat, padded buffer.

    Parameters are ordered by optimizer group, so each group is one contiguous segment of the buffer and
    the optimizer can update the part of it inside this rank's shard through a single view."""

    def __init__(self, name, params, group_of, rank, world):
        self.name = name
        self.params = sorted(params, key=lambda p: group_of[p])  # stable: module order within a group
        self.numel = sum(p.numel() for p in self.params)
        self.shard_size = -(-self.numel // world)  # padding makes every shard the same size
        self.flat = torch.zeros(self.shard_size * world, dtype=torch.float32, device=self.params[0].device)
        self.segments = {}  # optimizer group -> (begin, end) in the flat buffer
        self.offsets, self.shapes = [], [p.shape for p in self.params]
        offset = 0
        for p in self.params:
            self.offsets.append(offset)
            self.flat[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
            begin, _ = self.segments.get(group_of[p], (offset, offset))
            self.segments[group_of[p]] = (begin, offset + p.numel())
            offset += p.numel()
        self.rank, self.begin = rank, rank * self.shard_size  # where this rank's shard starts in flat
        self.shard = self.flat[self.begin:self.begin + self.shard_size]
        self.grad_flat = None  # stage 1: every parameter's .grad is a view of it
        self.grad_shard = None  # the gradient of the shard, summed over ranks at the boundary
        self.handle = None  # stage 3: the works of a gather in flight (a prefetch)
        self.gathered = True
        self.arrived = 0  # stages 2-3: gradients the current backward has produced; -1 once handled

    def own_weights(self):
        """Stage 3: the shard becomes a tensor of its own, so that the flat buffer can be freed."""
        self.shard = self.shard.clone()
        self.free()

    def gather(self, world, wait=True):
        """Stage 3: a new flat buffer filled from every rank's shard; the parameters view it again."""
        if not self.gathered:
            self.flat = torch.empty(len(self.shard) * world, device=self.shard.device)
            if world == 1:
                self.flat.copy_(self.shard)
            else:
                self.handle = start_gather(self.flat, self.shard, self.rank, world)
            for p, offset, shape in zip(self.params, self.offsets, self.shapes):
                p.data = self.flat[offset:offset + shape.numel()].view(shape)  # read only after the wait
            self.gathered = True
        if wait:
            self.wait_for_gather()

    def wait_for_gather(self):
        """Waits for a gather in flight, if any (a prefetch)."""
        if self.handle is not None:
            for work in self.handle:
                work.wait()
            self.handle = None

    def free(self):
        """Stage 3: the parameters become empty tensors and the flat buffer goes (autograd keeps the
        parameters, not their data, so nothing holds it). Reading a freed parameter finds no elements."""
        if self.gathered:
            self.wait_for_gather()
            for p in self.params:
                p.data = self.shard.new_empty(0)
            self.flat, self.gathered = None, False


def make_units(model, group_of, rank, world):
    """The root unit (everything outside the blocks) and one unit per transformer block, each holding the
    trained parameters only (frozen ones, e.g. under LoRA, stay whole on every rank).
    Returns (units, [(block, its unit)])."""
    in_blocks = {p for block in model.transformer.h for p in block.parameters()}
    root = [p for p in model.parameters() if p.requires_grad and p not in in_blocks]
    units = [Unit("root", root, group_of, rank, world)] if root else []
    blocks = []
    for i, block in enumerate(model.transformer.h):
        params = [p for p in block.parameters() if p.requires_grad]
        if params:
            units.append(Unit(f"h.{i}", params, group_of, rank, world))
            blocks.append((block, units[-1]))
    return units, blocks


def check_stage_options(model, optimizer, stage, compile):
    """Refuse, before anything is sharded, what a stage cannot do; the message names the option."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if stage >= 1 and hasattr(optimizer, "sparse_grads"):
        raise ValueError(f"--sparse_density needs --zero_stage=0: stage {stage} shards the dense AdamW state, "
                         "and sparse fine-tuning keeps its own small state instead")
    if stage >= 1 and type(optimizer) is not torch.optim.AdamW:
        raise ValueError(f"stage {stage} shards torch.optim.AdamW only, got {type(optimizer).__name__}")
    if stage >= 1 and any(group["amsgrad"] for group in optimizer.param_groups):
        raise ValueError(f"stage {stage} does not shard AdamW's amsgrad state")
    if stage >= 1 and any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        raise ValueError(f"stage {stage} keeps fp32 weights (--dtype selects autocast); got other trained weights")
    if stage == 3 and model.config.gradient_checkpointing:
        raise ValueError("--gradient_checkpointing cannot be combined with stage 3: the recomputed forward "
                         "would free the block's weights that its backward has just gathered")
    if stage == 3 and compile:
        raise ValueError("--compile cannot be combined with stage 3: its weights are gathered and freed by hooks "
                         "around every block, which a compiled graph does not run")


# ----------------------------------------------------------------------------- the engine


class Engine:
    def __init__(self, model, optimizer, stage=0, dtype=torch.float32, grad_clip=1.0, initial_scale_power=16,
                 compile=False):
        check_stage_options(model, optimizer, stage, compile)
        self.module, self.stage, self.grad_clip = model, stage, grad_clip
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = next(model.parameters()).device
        self._forward = torch.compile(model) if compile else model
        self.autocast = (torch.autocast(self.device.type, dtype=dtype) if dtype != torch.float32
                         else contextlib.nullcontext())
        # float16 only: a dynamic loss scale keeps small gradients from underflowing.
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0 ** initial_scale_power,
                                           enabled=dtype == torch.float16)
        self.boundary = True
        self.pending = []  # stages 1-3: (finish, borrowed buffers) of the reductions launched during the backward
        self.spare = {}  # stages 1-3: size -> buffers lent to reductions and given back, reused every step
        if self.world > 1:  # every rank starts from rank 0's weights, as DDP does
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
        self.names = {p: name for name, p in model.named_parameters()}
        self.units, self.blocks, self.optimizer, self.buckets = [], [], optimizer, []
        if stage == 0 and dist.is_initialized():
            self._attach_buckets()
        if stage >= 1:
            group_of = {p: g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
            self.units, self.blocks = make_units(model, group_of, self.rank, self.world)
            self._attach_gradients()
            if stage == 3:
                for unit in self.units:
                    unit.own_weights()
                self._install_gather_hooks()
            self.optimizer = self._shard_optimizer(optimizer)
        self._allocate_moments()

    # ------------------------------------------------------------------------- setup of stages 1-3

    def _attach_buckets(self):
        """Stage 0 on a process group: the dense trained parameters' gradients live in flat buckets (each .grad a
        view), filled from the last layer back as the backward produces them, so that the boundary micro-batch's
        hooks can launch a bucket's all-reduce as soon as its last gradient arrives, while the backward goes on
        (DDP's overlap). Sparse fine-tuning's matrices keep their own gathered gradients and stay out."""
        position = {p: i for i, p in enumerate(self.module.parameters())}
        dense = [p for group in self.optimizer.param_groups if not group.get("sparse")
                 for p in group["params"] if p.requires_grad]
        self.buckets = make_buckets(sorted(dense, key=lambda p: position.get(p, -1), reverse=True), BUCKET_BYTES)
        for bucket in self.buckets:
            bucket.attach()
            for p in bucket.params:
                p.register_post_accumulate_grad_hook(partial(self._on_bucket_gradient, bucket))

    def _attach_gradients(self):
        """Stage 1: gradients accumulate straight into one flat buffer per unit (each .grad a view of it), whose
        own slice is the shard. Stages 2-3: only the shard exists. At every stage a hook reduces each unit as
        it completes."""
        for unit in self.units:
            if self.stage == 1:
                unit.grad_flat = torch.zeros_like(unit.flat)
                for p, offset in zip(unit.params, unit.offsets):
                    p.grad = unit.grad_flat[offset:offset + p.numel()].view_as(p)
                unit.grad_shard = unit.grad_flat[unit.begin:unit.begin + unit.shard_size]
            else:
                unit.grad_shard = torch.zeros(unit.shard_size, device=self.device)
            for p in unit.params:
                p.register_post_accumulate_grad_hook(partial(self._on_gradient, unit))

    def _shard_optimizer(self, optimizer):
        """The caller's AdamW with the same groups and settings, over this rank's shards: per unit and group, one
        parameter viewing the part of the group's segment inside the shard, its gradient the matching view of the
        gradient shard. Updating it in place updates the shard."""
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": []}
                  for group in optimizer.param_groups]
        self.views = []  # (unit, begin, end within the shard, the parameter viewing it)
        for unit in self.units:
            unit.exp_avg, unit.exp_avg_sq = torch.zeros_like(unit.shard), torch.zeros_like(unit.shard)
            for g, (begin, end) in unit.segments.items():
                lo = max(begin, unit.begin) - unit.begin
                hi = min(end, unit.begin + unit.shard_size) - unit.begin
                if hi > lo:
                    view = nn.Parameter(unit.shard[lo:hi])
                    view.grad = unit.grad_shard[lo:hi]
                    groups[g]["params"].append(view)
                    self.views.append((unit, lo, hi, view))
        return torch.optim.AdamW(groups)

    def _allocate_moments(self):
        """AdamW's state exists from the start (torch would create it at the first step), so the memory report at
        start shows what a step holds. At stages 1-3 the moments are views of one flat buffer per unit shard,
        the layout of the checkpoint files."""
        if type(self.optimizer) is not torch.optim.AdamW:
            return
        flat_moments = {view: (unit.exp_avg[lo:hi], unit.exp_avg_sq[lo:hi])
                        for unit, lo, hi, view in getattr(self, "views", [])}
        for group in self.optimizer.param_groups:
            step_device = self.device if group["fused"] or group["capturable"] else "cpu"  # where AdamW keeps it
            for p in group["params"]:
                exp_avg, exp_avg_sq = flat_moments.get(p) or (torch.zeros_like(p), torch.zeros_like(p))
                self.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=step_device),
                                           "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def _install_gather_hooks(self):
        """Stage 3: each block gathers its weights just before its forward and frees them after; a hook on the
        block's output gathers them again just before its backward. Each gather prefetches the unit that runs
        next. The last block stays gathered from its forward into its backward, which comes right after the head.
        The root unit is gathered when the token embedding runs (first in every forward and in generate) and freed
        once its gradients are reduced, or at the next step."""
        root = self.units[0] if self.units and self.units[0].name == "root" else None
        if root is not None:
            self.module.transformer.wte.register_forward_pre_hook(lambda module, args: root.gather(self.world))
        for i, (block, unit) in enumerate(self.blocks):
            following = self.blocks[i + 1][1] if i + 1 < len(self.blocks) else None
            preceding = self.blocks[i - 1][1] if i > 0 else None
            block.register_forward_pre_hook(partial(self._before_forward, unit, following))
            block.register_forward_hook(partial(self._after_forward, unit, preceding))

    def _before_forward(self, unit, following, module, args):
        unit.gather(self.world)
        if following is not None:
            following.gather(self.world, wait=False)

    def _after_forward(self, unit, preceding, module, args, output):
        if output.requires_grad:
            output.register_hook(partial(self._before_backward, unit, preceding))
            if unit is self.blocks[-1][1]:  # the backward starts with it, right after the head: no gather again
                return
        unit.free()

    def _before_backward(self, unit, preceding, grad):
        unit.gather(self.world)
        if preceding is not None:
            preceding.gather(self.world, wait=False)

    # ------------------------------------------------------------------------- the step

    def __call__(self, idx, labels, segment_ids=None, boundary=True):
        """The micro-batch's mean loss over its trained tokens; boundary marks the step's last micro-batch."""
        self.boundary = boundary
        saved = (torch.autograd.graph.saved_tensors_hooks(self._save, self._restore) if self.stage == 3
                 else contextlib.nullcontext())
        with self.autocast, saved:
            return self._forward(idx, labels, segment_ids=segment_ids)

    def _save(self, tensor):
        """Stage 3, for each tensor the forward saves for the backward: one that views a block's gathered weights
        (a matrix product saves the transposed weight) is kept as where it lies in the unit's flat buffer, so
        that the buffer can go after the block's forward; the backward gathers it again before it is read."""
        storage = tensor.untyped_storage().data_ptr()
        for _, unit in self.blocks:
            if unit.gathered and unit.flat.untyped_storage().data_ptr() == storage:
                return unit, tensor.storage_offset(), tensor.shape, tensor.stride()
        return tensor

    def _restore(self, saved):
        if torch.is_tensor(saved):
            return saved
        unit, offset, shape, stride = saved
        unit.gather(self.world)  # _before_backward has started it
        return unit.flat.as_strided(shape, stride, offset)

    def backward(self, loss):
        """Accumulates gradients; after the boundary micro-batch they are the mean over ranks (at stages 1-3:
        of the gradient shard this rank keeps)."""
        self.scaler.scale(loss).backward()
        for unit in self.units:
            if unit.arrived != -1:  # some parameter got no gradient in this backward: it counts as zero
                self._unit_backward_done(unit)
            unit.arrived = 0
        if self.boundary and self.stage >= 1:
            self._finish_reductions(keep=0)
            for unit in self.units:
                unit.grad_shard.div_(self.world)
        if self.buckets:
            self._finish_buckets()
        if self.boundary and self.world > 1 and self._sparse_gradients():
            self._all_reduce_mean(self._sparse_gradients())

    def _on_bucket_gradient(self, bucket, param):
        """Stage 0: called after each gradient is accumulated into its bucket; in the boundary micro-batch's
        backward the bucket's last one launches its all-reduce."""
        bucket.arrived.add(param)
        if self.boundary and len(bucket.arrived) == len(bucket.params):
            bucket.launch()

    def _finish_buckets(self):
        """Stage 0 after each backward. At the boundary: the buckets no hook launched (one of their parameters
        got no gradient) are launched, every all-reduce is waited for and the sums become means. A parameter
        that got no gradient in the whole step has none (None), as in a single process: the optimizer skips it."""
        for bucket in self.buckets:
            bucket.received.update(bucket.arrived)
            bucket.arrived.clear()
        if not self.boundary:
            return
        for bucket in self.buckets:
            if bucket.handle is None:
                bucket.launch()
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.handle = None
            bucket.flat.div_(self.world)
            for p in bucket.params:
                if p not in bucket.received:
                    p.grad = None

    def _on_gradient(self, unit, param):
        """Stages 1-3: called after each parameter's gradient is accumulated; the unit's last one finishes it."""
        unit.arrived += 1
        if unit.arrived == len(unit.params):
            self._unit_backward_done(unit)

    def _unit_backward_done(self, unit):
        """A unit's gradients for this micro-batch are complete. At the boundary their reduce-scatter starts and
        runs while the backward goes on with earlier units: at stage 1 in place in the unit's gradient buffer, at
        stages 2-3 from a bucket they are copied into (whereupon autograd's full-size gradients go). At stage 3
        the weights are freed."""
        unit.arrived = -1
        if self.boundary and self.stage == 1:
            self._reduce_scatter(unit.grad_flat, unit.grad_shard)
        elif self.boundary:
            self._finish_reductions(keep=1)  # so that at most two buckets are lent at a time
            bucket = self._borrow(unit.shard_size * self.world)
            for p, offset, shape in zip(unit.params, unit.offsets, unit.shapes):  # (stage 3: p may be freed)
                part = bucket[offset:offset + shape.numel()]
                if p.grad is None:  # no gradient in the whole step: it counts as zero
                    part.zero_()
                else:
                    part.copy_(p.grad.reshape(-1))
                p.grad = None
            bucket[unit.numel:].zero_()  # the padding
            self._reduce_scatter(bucket, unit.grad_shard, lent=[bucket])
        if self.stage == 3:
            unit.free()

    def _reduce_scatter(self, bucket, shard, lent=()):
        """Starts making shard this rank's slice of the sum over ranks of bucket (shard may be a view into bucket);
        _finish_reductions completes it and takes back the buffers in lent."""
        if self.world == 1:
            shard.copy_(bucket[:shard.numel()])  # a no-op when shard is bucket's own view
            self.pending.append((lambda: None, lent))
            return
        inbox = []
        if dist.get_backend() == "gloo":
            aliased = shard.data_ptr() == bucket.chunk(self.world)[self.rank].data_ptr()
            inbox = [self._borrow(shard.numel()) for _ in range(self.world - (1 if aliased else 2))]
            inbox += [] if aliased else [shard]  # shard holds nothing yet: it can take one rank's slice
        finish = start_reduce_scatter(bucket, shard, self.rank, self.world, inbox)
        self.pending.append((finish, [*lent, *(box for box in inbox if box is not shard)]))

    def _finish_reductions(self, keep):
        """Waits for all but the `keep` latest reductions and takes back the buffers they borrowed."""
        while len(self.pending) > keep:
            finish, lent = self.pending.pop(0)
            finish()
            for buffer in lent:
                self.spare.setdefault(buffer.numel(), []).append(buffer)

    def _borrow(self, numel):
        """A 1-d fp32 buffer of numel elements, with whatever it held: one given back earlier, or a new one."""
        spare = self.spare.get(numel)
        return spare.pop() if spare else torch.empty(numel, device=self.device)

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
        if self.stage >= 1 and self.world > 1:  # each rank has the norm of its shards: add up the squares
            grad_norm = grad_norm.square()
            dist.all_reduce(grad_norm)
            grad_norm = grad_norm.sqrt()
        if self.grad_clip > 0:  # the same arithmetic as torch.nn.utils.clip_grad_norm_
            torch._foreach_mul_(grads, (self.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0))
        applied = bool(torch.isfinite(grad_norm) & loss_is_finite)  # the step's one host sync
        if applied:
            self.optimizer.step()
            if self.stage in (1, 2):
                self._gather_weights()
        if self.scaler.is_enabled():  # grow the scale after enough good steps, lower it after a skipped one
            if applied:
                self.scaler.update()
            else:
                self.scaler.update(self.scaler.scale(torch.ones((), device=self.device))
                                   * self.scaler.get_backoff_factor())
        self._zero_gradients()
        return grad_norm, applied

    def _zero_gradients(self):
        """Stage 0 drops the gradients; stages 1-3 zero their buffers, which the optimizer's views point into.
        Stage 3 also frees a unit still gathered (for an evaluation): it holds the weights before this step."""
        if self.stage == 0:
            self.optimizer.zero_grad(set_to_none=True)
        for bucket in self.buckets:  # stage 0 on a process group: the gradients stay views into the buckets
            bucket.flat.zero_()
            bucket.received.clear()
            bucket.attach()
        for unit in self.units:
            (unit.grad_flat if self.stage == 1 else unit.grad_shard).zero_()
            if self.stage == 3:
                unit.free()

    @property
    def loss_scale(self):
        """The float16 loss scale (1.0 otherwise); reading it syncs with the device."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def _sparse_gradients(self):
        """Gradients that sparse fine-tuning's optimizer gathers itself (the trained entries only)."""
        return list(getattr(self.optimizer, "sparse_grads", ()))

    def _gradients(self):
        """Every gradient the optimizer will use, in the same order on every rank (at stages 1-3: views of the
        gradient shards)."""
        dense = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        return dense + self._sparse_gradients()

    def _all_reduce_mean(self, grads):
        """Sparse fine-tuning's gathered gradients: sum over ranks in one flat tensor, then divide."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world)
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def _gather_weights(self):
        """Stages 1-2: every rank updated its shard; all-gathers write all shards into every flat buffer."""
        if self.world > 1:
            works = [work for unit in self.units
                     for work in start_gather(unit.flat, unit.shard, self.rank, self.world)]
            for work in works:
                work.wait()

    # ------------------------------------------------------------------------- state

    def memory_report(self):
        """Bytes this rank holds for the model state during a step, to set beside the ZeRO paper's formula
        (train_sft.zero_formula_bytes). Stage 0's gradients count at their size (autograd makes them in the backward);
        transient buckets and stage 3's gathered units are left out."""
        params = list(self.module.parameters()) + ([unit.shard for unit in self.units] if self.stage == 3 else [])
        if self.stage == 0:
            grads = sum(p.numel() * p.element_size() for group in self.optimizer.param_groups
                        if not group.get("sparse") for p in group["params"])  # sparse matrices: gathered values only
            grads += sum(g.numel() * g.element_size() for g in self._sparse_gradients())
        else:
            grads = _bytes([unit.grad_flat if self.stage == 1 else unit.grad_shard for unit in self.units])
        optimizer_state = _bytes([t for state in self.optimizer.state.values() for t in state.values()
                                  if torch.is_tensor(t)])
        report = {"params": _bytes(params), "grads": grads, "optimizer_state": optimizer_state}
        report["total"] = sum(report.values())
        return report

    def full_state_dict(self):
        """The whole model's weights in fp32 on the CPU, on rank 0 (None elsewhere); every rank calls it (stage 3
        gathers one unit at a time). Tied weights stay one tensor under both names, as in model.state_dict()."""
        copies = {}
        for unit in self.units:
            if self.stage == 3:
                unit.gather(self.world)
            if self.rank == 0:
                copies.update({id(p): p.detach().to("cpu", torch.float32, copy=True) for p in unit.params})
            if self.stage == 3:
                unit.free()
        if self.rank != 0:
            return None
        state = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():  # tied: the same object
            if id(tensor) not in copies:
                copies[id(tensor)] = tensor.detach().to("cpu", torch.float32, copy=True)
            state[name] = copies[id(tensor)]
        return state

    def _meta(self):
        """What a stage-0 checkpoint must agree with to be loaded into this engine."""
        return {"engine": "native", "stage": self.stage,
                "shapes": {name: list(t.shape) for name, t in self.module.state_dict(keep_vars=True).items()}}

    def layout(self):
        """What a stage 1-3 shard must agree with: each unit's parameter names and shapes, in order."""
        return [[unit.name, [[self.names[p], list(shape)] for p, shape in zip(unit.params, unit.shapes)]]
                for unit in self.units]

    def checkpoint_bytes(self):
        """About how many bytes save() writes on this rank, for the space a first checkpoint needs."""
        if self.stage == 0:
            return (FILE_RECORD_BYTES + optimizer_state_bytes(self.optimizer)) if self.rank == 0 else 0
        shards = [t for unit in self.units for t in (unit.shard, unit.exp_avg, unit.exp_avg_sq)]
        return FILE_RECORD_BYTES + sum(t.numel() * t.element_size() + TENSOR_RECORD_BYTES for t in shards)

    def save(self, ckpt_dir):
        """Writes this rank's state into ckpt_dir (which the trainer renames when every rank is done). Stage 0:
        rank 0 writes the optimizer and loss-scaler state, which serves any number of ranks; the weights are
        the checkpoint's consolidated model.pt, which the trainer loads into the model before the engine is
        made, so they are not stored twice. Stages 1-3: every rank writes its shard of the weights and of both
        moments per unit, the optimizer step, the loss scaler and the layout."""
        if self.stage == 0:
            if self.rank == 0:
                torch.save({"meta": self._meta(), "optimizer": self.optimizer.state_dict(),
                            "scaler": self.scaler.state_dict()},
                           os.path.join(ckpt_dir, "zero_lite-stage0.pt"))
            return
        steps = [state["step"] for state in self.optimizer.state.values()]
        torch.save({"format": "zero_lite shard", "rank": self.rank, "world": self.world, "layout": self.layout(),
                    # a copy: on the CPU, .cpu() would return the view and torch.save write the whole flat buffer
                    "weights": [unit.shard.to("cpu", copy=True) for unit in self.units],
                    "exp_avg": [unit.exp_avg.cpu() for unit in self.units],
                    "exp_avg_sq": [unit.exp_avg_sq.cpu() for unit in self.units],
                    "step": float(steps[0]) if steps else 0.0, "scaler": self.scaler.state_dict()},
                   os.path.join(ckpt_dir, SHARD_FILE.format(rank=self.rank, world=self.world)))

    def load(self, ckpt_dir):
        """Reads what save wrote, at any world size (stages 1-3 re-shard here). A missing, unreadable or
        mismatched file on any rank stops every rank with the same ValueError before anything is loaded, so
        that none is left waiting in a collective."""
        try:
            state, error = (self._read_stage0(ckpt_dir) if self.stage == 0 else self._read_shards(ckpt_dir)), None
        except ValueError as e:
            state, error = None, str(e)
        errors = [error] * self.world
        if self.world > 1:
            dist.all_gather_object(errors, error)
        if any(errors):
            raise ValueError(next(e for e in errors if e))
        if self.stage == 0:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            return
        for i, unit in enumerate(self.units):
            for key in ("weights", "exp_avg", "exp_avg_sq"):
                target = unit.shard if key == "weights" else getattr(unit, key)
                copy_overlap(target, unit.begin, unit.numel, [shard[key][i] for shard in state])
        for adam in self.optimizer.state.values():
            adam["step"].fill_(state[0]["step"])
        self.scaler.load_state_dict(state[0]["scaler"])
        if self.stage in (1, 2):
            self._gather_weights()
        if self.stage == 3:
            for unit in self.units:
                unit.free()

    def _read_stage0(self, ckpt_dir):
        path = os.path.join(ckpt_dir, "zero_lite-stage0.pt")
        if not os.path.isfile(path):
            raise ValueError(f"{ckpt_dir} holds no native stage-0 engine state ({os.path.basename(path)})")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain types: no code
        except Exception as e:
            raise ValueError(f"{path} cannot be read (truncated or corrupt?): {type(e).__name__}") from None
        if state["meta"] != self._meta():
            raise ValueError(f"{path} was written for another engine stage or model shape than this run's")
        return state

    def _read_shards(self, ckpt_dir):
        """Every shard file of a checkpoint, memory-mapped (only the slices this rank copies are read), checked
        against this model's layout. Raises ValueError naming the file."""
        pattern = SHARD_FILE.replace("{rank:05d}", "*").replace("{world:05d}", "*")
        worlds = {int(re.search(r"of(\d+)\.pt$", p).group(1)) for p in glob.glob(os.path.join(ckpt_dir, pattern))}
        if len(worlds) != 1:
            found = "none" if not worlds else f"those of {sorted(worlds)} ranks mixed"
            raise ValueError(f"{ckpt_dir} should hold the stage 1-3 shard files ({pattern}) of one run, but holds "
                             f"{found}: a checkpoint of another stage or engine?")
        world = worlds.pop()
        shards = []
        for rank in range(world):
            path = os.path.join(ckpt_dir, SHARD_FILE.format(rank=rank, world=world))
            if not os.path.isfile(path):
                raise ValueError(f"{path} is missing: the checkpoint was written by {world} ranks")
            try:
                shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ValueError(f"{path} cannot be read (truncated or corrupt?): {type(e).__name__}") from None
            if not isinstance(shard, dict) or shard.get("format") != "zero_lite shard" or shard.get("rank") != rank:
                raise ValueError(f"{path} is not shard {rank} of a native-engine checkpoint")
            if shard["layout"] != self.layout():
                raise ValueError(f"{path} was written for another model: "
                                 f"{layout_difference(shard['layout'], self.layout())}")
            shards.append(shard)
        return shards


def copy_overlap(target, begin, numel, sources):
    """Fill target, the slice [begin, begin + len(target)) of a unit's flat vector, from saved shards that cut the
    same vector into equal slices (for any world size). Positions at or past numel are padding and stay zero."""
    target.zero_()
    size = sources[0].numel()
    end = min(begin + target.numel(), numel)
    for k, source in enumerate(sources):
        lo, hi = max(begin, k * size), min(end, (k + 1) * size)
        if hi > lo:
            target[lo - begin:hi - begin].copy_(source[lo - k * size:hi - k * size])


def layout_difference(saved, ours):
    """The first unit or parameter where two layouts differ, in words."""
    for (_, saved_params), (name, params) in zip(saved, ours):
        for a, b in zip(saved_params, params):
            if a != b:
                return f"unit {name} has {a[0]} {a[1]} there but {b[0]} {b[1]} here"
        if len(saved_params) != len(params):
            return f"unit {name} has {len(saved_params)} trained parameters there but {len(params)} here"
    return f"{len(saved)} units there but {len(ours)} here"


def zero_formula_bytes(n_params, n_trained, stage, world):
    """The ZeRO paper's model-state bytes per rank with fp32 weights and Adam: 4 (weights) + 4 (gradients)
    + 8 (moments) per parameter, the moments sharded from stage 1, gradients from 2, weights at 3."""
    share = [1 / world if stage >= s else 1 for s in (3, 2, 1)]
    return 4 * n_params * share[0] + 4 * n_trained * share[1] + 8 * n_trained * share[2]
