# A real pretrained chat model fine-tuned on a laptop CPU: SmolLM2-135M-Instruct (Llama architecture,
# 49,152-token vocabulary, ChatML template) learns the built-in demo tasks (reverse, sort, shift, double,
# upper), each prompt and answer rendered as a chat through the model's own template, on 2 CPU cores,
# sized for under 10 minutes on a quiet machine. It evaluates before the first step too (eval_at_start), so the log shows the
# pretrained model's exact match and eval loss on the 500 held-out prompts beside the fine-tuned one's.
#   bash setup.sh --model=smollm2-135m   # once: the model file, 93 MB
#   torchrun --standalone --nproc_per_node=2 train_sft.py configs/smollm2_cpu.py
#   python bench/bench_demo.py --config=configs/smollm2_cpu.py   # the same command, timed -> bench/results/
#
# LoRA rather than full fine-tuning: in 20-step trials on the same batches, LoRA (rank 16, lr 1e-3) ran
# 1.8x the positions per second of full fine-tuning (lr 5e-5) at 0.56x its peak memory, and ended at eval
# loss 2.03 and 4% exact match against 2.79 and 1%; so in a fixed time it takes more steps, each better.
# Only the LoRA factors train, so the export adds hf/adapter/, PEFT's adapter of the model file below.

# The Q4_1 GGUF file that `bash setup.sh --model=smollm2-135m` places here (dequantized to float32). Its
# tokenizer and chat template come from the file's metadata.
init_from = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
template = "model"                     # the model's own chat template; only the answers are trained
data_path = "demo"
max_seq_len = 64                       # a chat with the default system prompt is about 40 tokens
batch_size = 8
lora_dim = 16
lora_scaling = 32.0                    # the delta is scaled by lora_scaling / lora_dim = 2
only_optimize_lora = True
learning_rate = 1e-3
warmup_steps = 10
lr_scheduler = "cosine"
min_lr_ratio = 0.1
max_steps = 100
log_interval = 10
eval_at_start = True
eval_exact_match = 500
output_dir = "out/smollm2_cpu"
