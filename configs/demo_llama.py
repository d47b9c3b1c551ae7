# The demo with a Llama-shaped model: the same built-in tasks, template and eval as configs/demo.py, learned
# from scratch on a CPU by RMSNorm, rotary positions, a SwiGLU MLP and grouped-query attention (4 query
# heads share 2 key/value heads), with an untied output head, as Llama has.
#   torchrun --nproc_per_node=2 train_sft.py configs/demo_llama.py
data_path = "demo"
tokenizer = "byte"
template = "{prompt}={response}"  # one byte of template: a tiny model's compute goes to the task
group_by_length = False           # a demo sample's length gives away its task: keep batches mixed
max_seq_len = 32
model_type = "llama"
n_layer = 4
n_head = 4
n_kv_head = 2
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
output_dir = "out/demo_llama"
