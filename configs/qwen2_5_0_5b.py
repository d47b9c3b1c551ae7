# Full fine-tuning of Qwen2.5-0.5B (Instruct or base) from a local Hugging Face directory on one 80 GB GPU,
# on conversations rendered with the model's own chat template (only the assistant turns are trained).
#   torchrun --standalone --nproc_per_node=1 train_sft.py configs/qwen2_5_0_5b.py \
#       --init_from=/path/to/Qwen2.5-0.5B-Instruct --data_path=chats.jsonl
# The directory is one you already have (config.json, model.safetensors, tokenizer.json, tokenizer_config.json);
# its tokenizer and chat template are used, nothing is downloaded. Without --init_from the run stops at once:
# the placeholder below is no directory.
init_from = "/path/to/Qwen2.5-0.5B-Instruct"
data_path = "chats.jsonl"         # {"messages": [{"role": ..., "content": ...}, ...]} per line (ShareGPT and
template = "model"                # prompt/response rows are rendered through the same template)
max_seq_len = 2048
# 8 x 2048 tokens of activations are about 2 MB per token (24 layers of ~70 KB in bf16), ~35 GB, beside ~8 GB of
# fp32 weights, gradients and Adam moments: it fits without recomputing activations, which would cost a third
# more compute; --gradient_checkpointing=true for longer sequences or a larger batch.
batch_size = 8
gradient_accumulation_steps = 4   # 32 conversations per optimizer step on each GPU
gradient_checkpointing = False
learning_rate = 1e-5              # full fine-tuning of a small instruct model: 1e-5 to 2e-5
weight_decay = 0.0
lr_scheduler = "cosine"
warmup_steps = 50
min_lr_ratio = 0.1
num_train_epochs = 2
dtype = "bfloat16"
compile = True
kernels = "triton"                # fused masked loss: no (tokens x 151,936) logits are ever held
log_interval = 10
eval_interval = 200
checkpoint_interval = 500         # a checkpoint holds fp32 weights and Adam moments: ~6 GB
output_dir = "out/qwen2_5_0_5b"
