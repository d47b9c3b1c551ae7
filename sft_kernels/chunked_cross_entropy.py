"""The masked linear + cross-entropy of the LM head in plain PyTorch, computed in row chunks: GPT's
default loss (model.py), which the Triton kernel in cross_entropy.py replaces on a GPU.

Masked rows are dropped before the matmul and the loss and its gradients are computed together, one
chunk of rows at a time, so only one (chunk, vocabulary) block of logits is ever alive. It imports no
Triton, so sample.py and a CPU run never load it.
"""
import torch


def _chunk_loss_and_grads(hc, yc, weight, acc, want_h, grad_w, want_w):
    """Summed loss of one row chunk, its gradient for hc (None where not wanted) and the weight's gradient
    so far (grad_w, None before the first chunk) plus this chunk's. A function of its own so the chunk's
    (rows, V) logits are freed when it returns."""
    logits = (hc @ weight.t()).to(acc)  # (rows, V)
    lse = torch.logsumexp(logits, dim=-1)  # (rows,)
    loss = (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
    if not (want_h or want_w):
        return loss, None, None
    dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place ...
    dlogits[torch.arange(len(yc), device=yc.device), yc] -= 1.0  # ... minus the one-hot target
    dlogits = dlogits.to(hc.dtype)
    if want_w:  # the first chunk's product is the buffer; later ones add into it with no (V, C) temporary
        if grad_w is None:
            grad_w = (dlogits.t() @ hc).to(acc)
        elif hc.dtype == acc:
            grad_w.addmm_(dlogits.t(), hc)
        else:
            grad_w += dlogits.t() @ hc
    return loss, dlogits @ weight if want_h else None, grad_w


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients computed together, one row chunk at a time, so that only one (chunk, V) block
    of logits is ever alive and the backward keeps just the (n, C) and (V, C) gradients, which it scales
    in place (so one backward per forward)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, keep, chunk_size, grad_enabled):
        # needs_input_grad stays True under torch.no_grad: eval must not pay for gradients.
        want_h, want_w = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        h, y = hidden[keep], labels[keep]  # (n, C), (n,): only the rows that count
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 for bf16/fp16 inputs, fp64 stays fp64
        loss_sum = torch.zeros((), device=h.device, dtype=acc)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = None
        for s in range(0, h.size(0), chunk_size):
            loss, gh, grad_w = _chunk_loss_and_grads(h[s:s + chunk_size], y[s:s + chunk_size], weight, acc, want_h,
                                                     grad_w, want_w)
            loss_sum += loss
            if want_h:
                grad_h[s:s + chunk_size] = gh
        ctx.save_for_backward(keep)
        ctx.grads = (grad_h, grad_w)  # scaled in place by the backward, so not saved tensors
        ctx.hidden_shape, ctx.n, ctx.weight_dtype = hidden.shape, h.size(0), weight.dtype
        return loss_sum / ctx.n

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy supports one backward per forward (its gradients are computed "
                               "in the forward and scaled in place)")
        (grad_h, grad_w), ctx.grads = ctx.grads, None
        (keep,) = ctx.saved_tensors
        scale = grad_loss / ctx.n
        grad_hidden = grad_weight = None
        if grad_h is not None:  # masked rows get exactly zero gradient
            grad_hidden = grad_h.new_zeros(ctx.hidden_shape).index_copy_(0, keep, grad_h.mul_(scale.to(grad_h.dtype)))
        if grad_w is not None:  # in place: a (V, C) copy would stand beside it at the backward's start
            grad_weight = grad_w.mul_(scale).to(ctx.weight_dtype)
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
