"""
Generate from a trained model: one prompt, or an interactive chat, in the training template.

    python sample.py --model=out/demo --prompt="reverse hello"
    python sample.py --model=out/demo --history=false      # chat; an empty line or Ctrl-D quits
    python sample.py --model=/path/to/gpt2 --tokenizer=gpt2 --prompt="..." --temperature=0.7 --top_p=0.9

--model is a run directory (its latest checkpoint), a checkpoint directory, or a Hugging Face GPT-2
directory (the hf/ export of a run, or any GPT-2 checkpoint on disk).
"""

import sys

import torch

from checkpoint import load_model
from data import DEFAULT_TEMPLATE, get_tokenizer, render_prompt
from options import OptionError, parse_options

OPTIONS = {
    "model": ("out/demo", "run directory, checkpoint directory (ckpt-<step>), or Hugging Face GPT-2 directory"),
    "prompt": ("", "generate one response to this prompt and exit; empty = interactive chat"),
    "history": (True, "chat: show the model the earlier turns (false for models trained on single turns)"),
    "tokenizer": ("", "gpt2 | byte; empty = what the model was trained with (gpt2 for foreign directories)"),
    "max_new_tokens": (200, "most tokens generated per response"),
    "temperature": (0.0, "0 = greedy; higher = more random"),
    "top_k": (0, "sample from the k most likely tokens; 0 = all"),
    "top_p": (1.0, "sample from the smallest set of tokens whose probability reaches p"),
    "seed": (1337, "random seed for sampling"),
    "device": ("auto", "auto | cpu | cuda"),
}
CHOICES = {"tokenizer": ("", "gpt2", "byte"), "device": ("auto", "cpu", "cuda")}
RANGES = {"top_p": (0.01, 1.0), "max_new_tokens": (1, None)}


def check_tokenizer(requested, trained_with, model, model_path):
    """The tokenizer to prompt with: the one the model was trained with, when it is known. Another one
    would feed it ids that mean other text (or lie past its vocabulary) and the answer would be noise."""
    if requested and trained_with and requested != trained_with:
        raise OptionError(f"--tokenizer={requested} but --model={model_path} was trained with the {trained_with} "
                          f"tokenizer; leave --tokenizer empty to use that one")
    name = requested or trained_with or "gpt2"
    try:
        tokenizer = get_tokenizer(name)
    except (OSError, ValueError) as e:
        raise OptionError(f"--tokenizer={name}: {e}") from None
    if tokenizer.n_vocab > model.config.vocab_size:
        raise OptionError(f"--tokenizer={name} has {tokenizer.n_vocab} tokens but --model={model_path} only "
                          f"{model.config.vocab_size}: the model was not trained with this tokenizer")
    return tokenizer


def fit_to_context(ids, block_size):
    """The prompt's last block_size - 1 tokens, leaving a position for the answer, with a notice when its
    start is cut: the model cannot see that part, and its answer would ignore it without a word."""
    keep = block_size - 1
    if len(ids) > keep:
        print(f"sample.py: the prompt has {len(ids)} tokens but the model sees {block_size} positions: its first "
              f"{len(ids) - keep} tokens are left out", file=sys.stderr)
    return ids[-keep:]


def main(argv):
    args, _ = parse_options(argv, OPTIONS, CHOICES, RANGES, __doc__)
    torch.manual_seed(args["seed"])
    device = args["device"] if args["device"] != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device=cuda but no CUDA device is available")
    model, trained_with = load_model(args["model"])
    model.to(device).eval()
    tokenizer = check_tokenizer(args["tokenizer"], trained_with.get("tokenizer"), model, args["model"])
    template = trained_with.get("template", DEFAULT_TEMPLATE)

    def respond(context):
        ids = fit_to_context(tokenizer.encode(context, allowed_special="all"), model.config.block_size)
        new = model.generate([ids], args["max_new_tokens"], temperature=args["temperature"],
                             top_k=args["top_k"] or None, top_p=args["top_p"], eos_id=tokenizer.eot_token,
                             vocab_limit=tokenizer.n_vocab)[0]
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
        if args["history"]:
            history = context + reply + tokenizer.decode([tokenizer.eot_token])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OptionError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
