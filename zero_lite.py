"""The native engine: data parallelism (stage 0) and ZeRO-style sharding (stages 1-3) in one file.

    engine = Engine(model, optimizer, stage=2, dtype=torch.bfloat16, grad_clip=1.0)
    loss = engine(idx, labels, boundary=True)     # forward under autocast
    engine.backward(loss * weight)                # at the boundary: gradients averaged over ranks
    grad_norm, applied = engine.step(lr_multiplier, loss_is_finite)

Plain data parallelism keeps the same weights, gradients and Adam moments on every rank. ZeRO
(Rajbhandari et al., 2020) removes that redundancy step by step. The trained parameters are grouped
into units (one per transformer block, plus a root unit: the embeddings, the final LayerNorm and the
tied head); a unit's parameters are views into one flat fp32 buffer, padded to a multiple of the world
size, so that rank r owns slice r of it, its shard.

  stage 1  Adam moments exist for the rank's shard only. At the boundary the flat gradient buffer is
           reduce-scattered in place (each rank receives the mean over ranks of its own slice), the rank
           updates its shard of the weights, and an all-gather gives every rank all updated weights.
  stage 2  as 1, without a full gradient buffer: a hook on every parameter notices when the backward
           has produced the unit's last gradient, copies the unit's gradients into a bucket and launches
           its reduce-scatter while the backward goes on; the rank keeps its gradient shard only.
  stage 3  as 2, and the weights are sharded too: a unit's flat buffer has memory only while its forward
           or backward runs (gathered just before, freed after, the next unit's gather prefetched).

Weights are fp32 at every stage (bfloat16 and float16 mean autocast, as in the trainer), so they are the
master weights and a rank's master shard is a view of its own slice: no extra copy. Before the boundary
micro-batch nothing crosses ranks: gradients accumulate locally at full size.
"""
import glob
import os
import re
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

GROWTH_INTERVAL = 2000  # float16: the loss scale doubles after this many overflow-free steps (torch's GradScaler)


def zero_formula_bytes(n_params, stage, world):
    """Model-state bytes per rank by the ZeRO paper's count, for fp32 weights with Adam: 4 bytes of weight,
    4 of gradient and 8 of moments per parameter, the sharded ones divided by the world size."""
    weights, grads, moments = 4.0, 4.0, 8.0
    if stage >= 1:
        moments /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    return round(n_params * (weights + grads + moments))


def _bytes(tensors):
    """Bytes of the distinct storages behind tensors (views of one buffer count once; a freed one is 0)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


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
        self.offsets = []
        offset = 0
        for p in self.params:
            self.offsets.append(offset)
            self.flat[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
            begin, _ = self.segments.get(group_of[p], (offset, offset))
            self.segments[group_of[p]] = (begin, offset + p.numel())
            offset += p.numel()
        self.begin = rank * self.shard_size  # where this rank's shard starts in the flat buffer
        self.shard = self.flat[self.begin:self.begin + self.shard_size]
        self.grad_flat = None  # stages 0-1: every parameter's .grad is a view of it
        self.grad_shard = None  # the reduced gradient of the shard
        self.handle = None  # an all-gather in flight (stage 3 prefetch)
        self.gathered = True
        self.arrived = 0  # gradients produced by the current backward (stages 2-3)

    def own_weights(self):
        """Stage 3: the shard becomes a tensor of its own, so that the flat buffer can be freed."""
        self.shard = self.shard.clone()
        self.free()

    def gather(self, world, wait=True):
        """Stage 3: give the flat buffer memory again and fill it from every rank's shard."""
        if not self.gathered:
            self.flat.untyped_storage().resize_(self.flat.numel() * self.flat.element_size())
            if world == 1:
                self.flat.copy_(self.shard)
            else:
                self.handle = dist.all_gather_single(self.flat, self.shard, async_op=True)
            self.gathered = True
        if wait and self.handle is not None:
            self.handle.wait()
            self.handle = None

    def free(self):
        """Stage 3: drop the flat buffer's memory; the parameters keep their shapes (views of no memory)."""
        if self.gathered:
            if self.handle is not None:
                self.handle.wait()
                self.handle = None
            self.flat.untyped_storage().resize_(0)
            self.gathered = False


def make_units(model, group_of):
    """The root unit (everything outside the blocks: embeddings, final LayerNorm, the tied head) and one unit per
    transformer block, each holding the trained parameters only (frozen ones, e.g. under LoRA, stay whole)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
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


def check_stage_options(model, optimizer, stage):
    """Refuse, before anything is sharded, what a stage cannot do; the message names the option."""
    if stage >= 1 and hasattr(optimizer, "sparse_grads"):
        raise ValueError(f"--sparse_density needs --zero_stage=0: stage {stage} shards the dense AdamW state, "
                         "and sparse fine-tuning keeps its own small state instead")
    if stage >= 1 and not isinstance(optimizer, torch.optim.AdamW):
        raise ValueError(f"--zero_stage={stage} shards torch.optim.AdamW only, got {type(optimizer).__name__}")
    if stage >= 1 and any(group["amsgrad"] for group in optimizer.param_groups):
        raise ValueError(f"--zero_stage={stage} does not shard AdamW's amsgrad state")
    if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        raise ValueError("the native engine keeps fp32 weights (--dtype selects autocast); got other trained weights")
    if stage == 3 and model.config.gradient_checkpointing:
        raise ValueError("--gradient_checkpointing cannot be combined with --zero_stage=3: the recomputed forward "
                         "would run after the block's weights were gathered for its backward and free them")


class Engine:
    """Forward, backward and optimizer step of one data-parallel rank at ZeRO stage 0, 1, 2 or 3."""

    def __init__(self, model, optimizer, stage=0, dtype=torch.float32, grad_clip=1.0, initial_scale_power=16):
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero_stage must be 0, 1, 2 or 3, got {stage}")
        check_stage_options(model, optimizer, stage)
        self.module, self.stage, self.dtype, self.grad_clip = model, stage, dtype, grad_clip
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = next(model.parameters()).device
        self.loss_scale = 2.0 ** initial_scale_power if dtype == torch.float16 else 1.0
        self.good_steps = 0  # float16: applied steps since the loss scale last changed
        self.boundary = True
        self.pending = []  # collectives in flight during the backward, with the buffer each one reads
        group_of = {p: g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.units, self.blocks = make_units(model, group_of)
        self.names = {p: name for name, p in model.named_parameters()}
        for unit in self.units:
            if stage <= 1:  # gradients accumulate straight into one flat buffer per unit
                unit.grad_flat = torch.zeros_like(unit.flat)
                for p, offset in zip(unit.params, unit.offsets):
                    p.grad = unit.grad_flat[offset:offset + p.numel()].view_as(p)
                unit.grad_shard = unit.grad_flat[unit.begin:unit.begin + unit.shard_size]
            else:  # only the shard is kept; the hooks reduce each unit as soon as its gradients exist
                unit.grad_shard = torch.zeros(unit.shard_size, device=self.device)
                for p in unit.params:
                    p.register_post_accumulate_grad_hook(partial(self._on_gradient, unit))
            if stage == 3:
                unit.own_weights()
        if stage == 3:
            self._install_gather_hooks()
        self.optimizer = optimizer if stage == 0 else self._shard_optimizer(optimizer)
        self._allocate_moments()

    # ------------------------------------------------------------------------- setup

    def _shard_optimizer(self, optimizer):
        """The caller's optimizer with the same groups and settings, over this rank's shards: per unit and group,
        one parameter viewing the part of the group's segment inside the shard, its gradient the matching view of
        the gradient shard. Updating it in place updates the shard."""
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": []} for group in optimizer.param_groups]
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
        return type(optimizer)(groups)

    def _allocate_moments(self):
        """AdamW's state exists from the start (torch would create it at the first step), so the memory report at
        start shows what the step holds. At stages 1-3 the moments are views of one flat buffer per unit's shard,
        the layout the checkpoint files use."""
        if not isinstance(self.optimizer, torch.optim.AdamW):
            return
        flat_moments = {view: (unit.exp_avg[lo:hi], unit.exp_avg_sq[lo:hi]) for unit, lo, hi, view in
                        getattr(self, "views", [])}
        for group in self.optimizer.param_groups:
            step_device = self.device if group["fused"] or group["capturable"] else "cpu"  # where AdamW wants it
            for p in group["params"]:
                exp_avg, exp_avg_sq = flat_moments.get(p) or (torch.zeros_like(p), torch.zeros_like(p))
                self.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=step_device),
                                           "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def _install_gather_hooks(self):
        """Stage 3: each block gathers its weights just before its forward and frees them after; a hook on the
        block's output gathers them again just before its backward. Each gather prefetches the unit that runs
        next. The root unit is gathered when the token embedding runs (first in every forward and in generate)
        and freed once its gradients are reduced, or at the next step."""
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
        unit.free()
        if output.requires_grad:
            output.register_hook(partial(self._before_backward, unit, preceding))

    def _before_backward(self, unit, preceding, grad):
        unit.gather(self.world)
        if preceding is not None:
            preceding.gather(self.world, wait=False)

    # ------------------------------------------------------------------------- forward, backward, step

    def __call__(self, idx, labels, segment_ids=None, boundary=True):
        """The mean loss of one micro-batch, under autocast for bfloat16/float16. boundary=False marks a micro-batch
        whose gradients only accumulate locally; the boundary one sends them across ranks."""
        self.boundary = boundary
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.module(idx, labels, segment_ids=segment_ids)

    def backward(self, loss):
        """Backward (float16: of the scaled loss). After the boundary micro-batch, every rank holds the mean over
        ranks of the gradients it keeps: all of them at stage 0, its shard at stages 1-3."""
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        if self.stage >= 2:
            for unit in self.units:
                if unit.arrived != -1:  # some parameter got no gradient in this backward: it counts as zero
                    self._unit_backward_done(unit)
                unit.arrived = 0
        if self.boundary:
            if self.stage == 0:
                for unit in self.units:
                    self._average(unit.grad_flat)
            if self.stage == 1:
                for unit in self.units:
                    self._reduce_scatter(unit.grad_flat, unit.grad_shard)
            for work, _ in self.pending:
                work.wait()
            self.pending = []

    def _on_gradient(self, unit, param):
        """Stages 2-3: called after each parameter's gradient is accumulated; the unit's last one finishes it."""
        unit.arrived += 1
        if unit.arrived == len(unit.params):
            self._unit_backward_done(unit)

    def _unit_backward_done(self, unit):
        """A unit's gradients for this micro-batch are complete. At the boundary they are copied into a bucket whose
        reduce-scatter runs while the backward goes on with earlier units; at stage 3 the weights are freed."""
        unit.arrived = -1
        if self.boundary:
            bucket = torch.zeros(unit.flat.shape, device=self.device)
            for p, offset in zip(unit.params, unit.offsets):
                if p.grad is not None:
                    bucket[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
                    p.grad = None
            self._reduce_scatter(bucket, unit.grad_shard)
        if self.stage == 3:
            unit.free()

    def _average(self, flat):
        """All-reduce to the mean over ranks, divided first as DDP does."""
        if self.world > 1:
            flat.div_(self.world)
            self.pending.append((dist.all_reduce(flat, async_op=True), flat))

    def _reduce_scatter(self, bucket, shard):
        """shard = this rank's slice of the mean over ranks of bucket (shard may be a view into bucket)."""
        if self.world == 1:
            shard.copy_(bucket)  # a no-op when shard is bucket's own view
            return
        bucket.div_(self.world)
        self.pending.append((dist.reduce_scatter_single(shard, bucket, async_op=True), bucket))

    def step(self, lr_multiplier, loss_is_finite):
        """Set the learning rates, unscale (float16), take the global gradient norm over all shards, clip, update
        unless the loss or the norm is not finite, then zero the gradients. One host sync. Returns
        (pre-clip norm as a 0-dim tensor, whether the update was applied)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_multiplier
        grads = [unit.grad_flat if self.stage == 0 else unit.grad_shard for unit in self.units]
        if self.loss_scale != 1.0:
            for grad in grads:
                grad.mul_(1.0 / self.loss_scale)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if self.stage >= 1 and self.world > 1:  # each rank has the norm of its shards: sum the squares
            norm = norm.square()
            dist.all_reduce(norm)
            norm = norm.sqrt()
        if self.grad_clip > 0:
            clip = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
            for grad in grads:
                grad.mul_(clip)
        applied = bool(torch.as_tensor(loss_is_finite, device=norm.device) & torch.isfinite(norm))  # the sync
        if applied:
            self.optimizer.step()
            if self.stage in (1, 2):
                self._gather_weights()
        if self.loss_scale != 1.0:
            self._update_loss_scale(applied)
        for unit in self.units:
            (unit.grad_flat if self.stage <= 1 else unit.grad_shard).zero_()
        if self.stage == 3:
            for unit in self.units:  # a unit gathered for evaluation holds the old weights
                unit.free()
        return norm, applied

    def _gather_weights(self):
        """Stages 1-2: every rank updated its shard; the all-gather writes all of them into every flat buffer."""
        if self.world > 1:
            work = [dist.all_gather_single(unit.flat, unit.shard, async_op=True) for unit in self.units]
            for w in work:
                w.wait()

    def _update_loss_scale(self, applied):
        """Dynamic loss scaling as torch's GradScaler: halve on overflow, double after GROWTH_INTERVAL good steps."""
        self.good_steps = self.good_steps + 1 if applied else 0
        if not applied:
            self.loss_scale /= 2
        elif self.good_steps == GROWTH_INTERVAL:
            self.loss_scale, self.good_steps = self.loss_scale * 2, 0

    # ------------------------------------------------------------------------- state, checkpoints, memory

    def full_state_dict(self):
        """Collective: the whole model's state_dict (fp32, CPU) on rank 0, None elsewhere."""
        copies = {}
        for unit in self.units:
            if self.stage == 3:
                unit.gather(self.world)
            if self.rank == 0:
                copies.update({p: p.detach().to("cpu", copy=True) for p in unit.params})
            if self.stage == 3:
                unit.free()
        if self.rank != 0:
            return None
        return {name: copies[t] if t in copies else t.detach().to("cpu", copy=True)
                for name, t in self.module.state_dict(keep_vars=True).items()}

    def layout(self):
        """What a checkpoint shard must agree with: each unit's parameter names and shapes."""
        return [[unit.name, [[self.names[p], list(p.shape)] for p in unit.params]] for unit in self.units]

    def shard_path(self, ckpt_dir, rank, world):
        return os.path.join(ckpt_dir, f"zero-{rank:05d}-of-{world:05d}.pt")

    def save(self, ckpt_dir):
        """Every rank writes its own file, atomically: its shard of the weights and of both moments per unit, the
        optimizer step, the loss scale and the layout. Stage 0 has no shards: rank 0 writes all as one shard."""
        rank, world = (self.rank, self.world) if self.stage >= 1 else (0, 1)
        if self.stage == 0 and self.rank != 0:
            return
        if self.stage == 0:
            moments = [self._flat_moments(unit) for unit in self.units]
        else:
            moments = [(unit.exp_avg, unit.exp_avg_sq) for unit in self.units]
        steps = [s["step"] for s in self.optimizer.state.values()]
        state = {"format": "zero_lite", "stage": self.stage, "rank": rank, "world": world, "layout": self.layout(),
                 "weights": [(unit.flat if self.stage == 0 else unit.shard).cpu() for unit in self.units],
                 "exp_avg": [m.cpu() for m, _ in moments], "exp_avg_sq": [v.cpu() for _, v in moments],
                 "step": float(steps[0]) if steps else 0.0, "loss_scale": self.loss_scale,
                 "good_steps": self.good_steps}
        path = self.shard_path(ckpt_dir, rank, world)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def _flat_moments(self, unit):
        """Stage 0: a unit's AdamW moments laid out like its flat buffer, the form the shard files use."""
        flats = torch.zeros_like(unit.flat), torch.zeros_like(unit.flat)
        for p, offset in zip(unit.params, unit.offsets):
            for flat, key in zip(flats, ("exp_avg", "exp_avg_sq")):
                flat[offset:offset + p.numel()] = self.optimizer.state[p][key].reshape(-1)
        return flats

    def load(self, ckpt_dir):
        """Every rank reads the shard files that overlap its own shard, written at any stage and world size (a
        different world size re-shards here). A missing, unreadable or mismatched file on any rank stops every
        rank with the same sentence, before anything is loaded: none is left waiting in a collective."""
        try:
            shards, error = self._read_shards(ckpt_dir), None
        except ValueError as e:
            shards, error = None, str(e)
        self._raise_if_any_rank_failed(error)
        for i, unit in enumerate(self.units):
            begin, size = (0, unit.flat.numel()) if self.stage == 0 else (unit.begin, unit.shard_size)
            targets = self._load_targets(unit)
            for key, target in zip(("weights", "exp_avg", "exp_avg_sq"), targets):
                target.zero_()
                copy_overlap(target, begin, unit.numel, [s[key][i] for s in shards])
            if self.stage == 0:  # AdamW keeps stage 0's moments per parameter
                for p, offset in zip(unit.params, unit.offsets):
                    for key, flat in zip(("exp_avg", "exp_avg_sq"), targets[1:]):
                        self.optimizer.state[p][key].view(-1).copy_(flat[offset:offset + p.numel()])
        for state in self.optimizer.state.values():
            state["step"].fill_(shards[0]["step"])
        self.loss_scale, self.good_steps = shards[0]["loss_scale"], shards[0]["good_steps"]
        if self.stage in (1, 2):
            self._gather_weights()
        if self.stage == 3:
            for unit in self.units:
                unit.free()

    def _load_targets(self, unit):
        """Where a unit's loaded weights and moments go: its shard, or at stage 0 the whole flat buffer."""
        if self.stage == 0:
            return unit.flat, torch.zeros_like(unit.flat), torch.zeros_like(unit.flat)
        return unit.shard, unit.exp_avg, unit.exp_avg_sq

    def _read_shards(self, ckpt_dir):
        """All shard files of a checkpoint, memory-mapped (only the slices copied are read), checked against this
        model's layout. Raises ValueError naming the file."""
        paths = glob.glob(os.path.join(ckpt_dir, "zero-*-of-*.pt"))
        worlds = {int(re.search(r"-of-(\d+)\.pt$", p).group(1)) for p in paths}
        if len(worlds) != 1:
            found = "no zero-*-of-*.pt shard files" if not worlds else f"shard files of {sorted(worlds)} ranks"
            raise ValueError(f"{ckpt_dir} holds {found}; the native engine writes one set per checkpoint")
        world = worlds.pop()
        shards = []
        for rank in range(world):
            path = self.shard_path(ckpt_dir, rank, world)
            if not os.path.isfile(path):
                raise ValueError(f"{path} is missing: the checkpoint was written by {world} ranks")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ValueError(f"{path} cannot be read (truncated or corrupt?): {type(e).__name__}") from None
            if not isinstance(state, dict) or state.get("format") != "zero_lite" or state.get("rank") != rank:
                raise ValueError(f"{path} is not shard {rank} of a native-engine checkpoint")
            if state["layout"] != self.layout():
                raise ValueError(f"{path} was written for another model: {layout_difference(state['layout'], self.layout())}")
            shards.append(state)
        return shards

    def _raise_if_any_rank_failed(self, error):
        """Every rank learns every rank's error (or None), so all of them stop together with the same sentence."""
        errors = [error] * self.world
        if self.world > 1:
            dist.all_gather_object(errors, error)
        failed = [e for e in errors if e]
        if failed:
            raise ValueError(failed[0])

    def memory_report(self):
        """Bytes of model state this rank holds now (weights, gradients, optimizer state, total), beside the ZeRO
        formula for its stage and fp32 weights ("formula"). Transient buckets and gathered units are not counted."""
        params = list(self.module.parameters()) + ([unit.shard for unit in self.units] if self.stage == 3 else [])
        grads = [unit.grad_flat if unit.grad_flat is not None else unit.grad_shard for unit in self.units]
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        report = {"params": _bytes(params), "grads": _bytes(grads + [p.grad for p in self.module.parameters()]),
                  "optimizer_state": _bytes(state)}
        report["total"] = sum(report.values())
        n_trained = sum(unit.numel for unit in self.units)
        report["formula"] = zero_formula_bytes(n_trained, self.stage, self.world)
        return report


def copy_overlap(target, begin, numel, sources):
    """Fill target, the slice [begin, begin + len(target)) of a unit's flat vector, from saved shards that cut the
    same vector into equal slices (for any world size). Positions at or past numel are padding and stay zero."""
    size = sources[0].numel()
    end = min(begin + target.numel(), numel)
    for k, source in enumerate(sources):
        lo, hi = max(begin, k * size), min(end, (k + 1) * size)
        if hi > lo:
            target[lo - begin:hi - begin].copy_(source[lo - k * size:hi - k * size])


def layout_difference(saved, ours):
    """The first unit or parameter where two layouts differ, in words."""
    for (saved_name, saved_params), (name, params) in zip(saved, ours):
        if saved_params != params:
            for a, b in zip(saved_params, params):
                if a != b:
                    return f"unit {name} has {a[0]} {a[1]} there but {b[0]} {b[1]} here"
            return f"unit {name} has {len(saved_params)} trained parameters there but {len(params)} here"
    return f"{len(saved)} units there but {len(ours)} here"
