# The demo: a tiny GPT learns the built-in synthetic instruction tasks (reverse, sort, shift, double,
# upper) from scratch on a CPU, scored by greedy exact match on 500 held-out prompts.
#   torchrun --nproc_per_node=2 train_sft.py configs/demo.py
data_path = "demo"
tokenizer = "byte"
template = "{prompt}={response}"  # one byte of template: a tiny model's compute goes to the task
group_by_length = False           # a demo sample's length gives away its task: keep batches mixed
max_seq_len = 32
n_layer = 4
n_head = 4
n_embd = 128
batch_size = 32
learning_rate = 2e-3
warmup_steps = 100
lr_scheduler = "cosine"
min_lr_ratio = 0.05
max_steps = 2000
log_interval = 100
eval_interval = 500
eval_exact_match = 500
output_dir = "out/demo"
