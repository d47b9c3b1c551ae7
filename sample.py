"""
Generate from a trained model: one prompt, or an interactive chat, in the training template.

    python sample.py --model=out/demo --prompt="reverse: hello"
    python sample.py --model=out/demo                      # chat; an empty line or Ctrl-D quits
    python sample.py --model=/path/to/gpt2 --tokenizer=gpt2 --prompt="..." --temperature=0.7 --top_p=0.9

--model is a run directory (its latest checkpoint), a checkpoint file, or a Hugging Face GPT-2
directory (the hf/ export of a run, or any GPT-2 checkpoint on disk).
"""

import json
import os
import sys

import torch

from data import DEFAULT_TEMPLATE, get_tokenizer, render_prompt
from model import GPT, GPTConfig, apply_lora

OPTIONS = {
    "model": ("out/demo", "run directory, checkpoint file, or Hugging Face GPT-2 directory"),
    "prompt": ("", "generate one response to this prompt and exit; empty = interactive chat"),
    "tokenizer": ("", "gpt2 | byte; empty = what the model was trained with (gpt2 for foreign directories)"),
    "max_new_tokens": (200, "most tokens generated per response"),
    "temperature": (0.0, "0 = greedy; higher = more random"),
    "top_k": (0, "sample from the k most likely tokens; 0 = all"),
    "top_p": (1.0, "sample from the smallest set of tokens whose probability reaches p"),
    "seed": (1337, "random seed for sampling"),
    "device": ("auto", "auto | cpu | cuda"),
}


def parse_args(argv):
    args = {name: default for name, (default, _) in OPTIONS.items()}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__.strip() + "\n\nOptions:\n" + "\n".join(
                f"  --{n:<16} {m} [default: {d!r}]" for n, (d, m) in OPTIONS.items()))
            sys.exit(0)
        name, _, value = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or name not in OPTIONS:
            sys.exit(f"sample.py: error: unknown option {arg} (--help lists them)")
        try:
            args[name] = type(OPTIONS[name][0])(value)
        except ValueError:
            sys.exit(f"sample.py: error: --{name} must be {type(OPTIONS[name][0]).__name__}, got {value!r}")
    return args


def load_model(path):
    """Returns (model, what it was trained with: {"tokenizer", "template"} or {}) from a run
    directory, a checkpoint file, or a Hugging Face directory (ours carry sft_config.json)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        meta = os.path.join(path, "sft_config.json")
        return GPT.from_pretrained(path), json.load(open(meta)) if os.path.isfile(meta) else {}
    from train_sft import find_checkpoint
    checkpoint_path = find_checkpoint(path)
    if checkpoint_path is None:
        sys.exit(f"sample.py: error: --model={path} is neither a Hugging Face directory nor holds a checkpoint")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    options = checkpoint["options"]
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    if options["lora_dim"]:
        apply_lora(model, options["lora_dim"], lora_scaling=options["lora_scaling"],
                   module_name=options["lora_module_name"])
    model.load_state_dict(checkpoint["model"])
    return model, {"tokenizer": options["tokenizer"], "template": options["template"]}


def main(argv):
    args = parse_args(argv)
    torch.manual_seed(args["seed"])
    device = "cuda" if args["device"] == "auto" and torch.cuda.is_available() else args["device"]
    device = "cpu" if device == "auto" else device
    model, trained_with = load_model(args["model"])
    model.to(device).eval()
    tokenizer = get_tokenizer(args["tokenizer"] or trained_with.get("tokenizer", "gpt2"))
    template = trained_with.get("template", DEFAULT_TEMPLATE)

    def respond(context):
        ids = tokenizer.encode(context, allowed_special="all")[-model.config.block_size + 1:]
        new = model.generate([ids], args["max_new_tokens"], temperature=args["temperature"],
                             top_k=args["top_k"] or None, top_p=args["top_p"], eos_id=tokenizer.eot_token)[0]
        return tokenizer.decode(new)

    if args["prompt"]:
        print(respond(render_prompt(args["prompt"], template)))
        return
    history = ""  # earlier turns, so the model sees the conversation
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        context = history + render_prompt(user, template)
        reply = respond(context)
        print(f"model> {reply}")
        history = context + reply + tokenizer.decode([tokenizer.eot_token])


if __name__ == "__main__":
    main(sys.argv[1:])
