"""
Generate from a trained model: one prompt, or an interactive chat, in the training template.

    python sample.py --model=out/demo --prompt="reverse hello"
    python sample.py --model=out/demo --history=false      # chat; an empty line or Ctrl-D quits
    python sample.py --model=/path/to/gpt2 --tokenizer=gpt2 --prompt="..." --temperature=0.7 --top_p=0.9
    python sample.py --model=/path/to/Qwen2.5-0.5B-Instruct --prompt="..."   # its own tokenizer and chat template

    python sample.py --model=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf --prompt="..."   # a GGUF file

--model is a run directory (its latest checkpoint), a checkpoint directory, a Hugging Face directory
of model_type gpt2, llama, mistral, qwen2 or qwen3 (the hf/ export of a run, or any such model on disk),
or a GGUF file of those architectures (with its own tokenizer and chat template). A model trained with
--template=model, or a Hugging Face directory or GGUF file whose tokenizer has a chat template, is
prompted through that template and stops at its end-of-turn token.
"""

import os
import sys

import torch

from checkpoint import load_model
from options import OptionError, parse_options
from tokenizer import (DEFAULT_TEMPLATE, MODEL_TEMPLATE, ChatTemplate, get_tokenizer, render_prompt,
                       tokenizer_identity)

OPTIONS = {
    "model": ("out/demo", "run directory, checkpoint directory (ckpt-<step>), Hugging Face directory or .gguf file"),
    "prompt": ("", "generate one response to this prompt and exit; empty = interactive chat"),
    "history": (True, "chat: show the model the earlier turns (false for models trained on single turns)"),
    "tokenizer": ("", "gpt2 | byte | a directory with tokenizer.json | a .gguf file; empty = what the model was "
                      "trained with (a Hugging Face directory's or GGUF file's own tokenizer, else gpt2)"),
    "max_new_tokens": (200, "most tokens generated per response"),
    "temperature": (0.0, "0 = greedy; higher = more random"),
    "top_k": (0, "sample from the k most likely tokens; 0 = all"),
    "top_p": (1.0, "sample from the smallest set of tokens whose probability reaches p"),
    "seed": (1337, "random seed for sampling"),
    "device": ("auto", "auto | cpu | cuda"),
}
CHOICES = {"device": ("auto", "cpu", "cuda")}
RANGES = {"top_p": (0.01, 1.0), "max_new_tokens": (1, None)}


def same_tokenizer(a, b):
    """Whether two tokenizer names mean one tokenizer: the same name, or two directories or GGUF files holding
    the same tokenizer (a run's hf/ export holds a copy of the one it was trained with)."""
    if a == b:
        return True
    if not all(os.path.isdir(name) or name.endswith(".gguf") and os.path.isfile(name) for name in (a, b)):
        return False
    try:
        return tokenizer_identity(get_tokenizer(a)) == tokenizer_identity(get_tokenizer(b))
    except ValueError:
        return False


def check_tokenizer(requested, trained_with, model, model_path):
    """The tokenizer to prompt with: the one the model was trained with, when it is known. Another one
    would feed it ids that mean other text (or lie past its vocabulary) and the answer would be noise."""
    if requested and trained_with and not same_tokenizer(requested, trained_with):
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


def chat_template_of(tokenizer, template):
    """The model's own chat template when it was trained with one (or, from a foreign Hugging Face directory,
    when its tokenizer has one); None for a text template."""
    if template == MODEL_TEMPLATE or template is None and getattr(tokenizer, "chat_template", None):
        try:
            return ChatTemplate(tokenizer)
        except ValueError as e:
            raise OptionError(str(e)) from None
    return None


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
    chat = chat_template_of(tokenizer, trained_with.get("template"))
    template = trained_with.get("template") or DEFAULT_TEMPLATE

    def respond(ids, end):
        new = model.generate([fit_to_context(ids, model.config.block_size)], args["max_new_tokens"],
                             temperature=args["temperature"], top_k=args["top_k"] or None, top_p=args["top_p"],
                             eos_id=end, vocab_limit=tokenizer.n_vocab)[0]
        return tokenizer.decode(new)

    if chat is not None:  # the model's chat template: messages in, its end-of-turn token ends each reply
        def reply_to(messages):
            return respond(chat.encode(messages, add_generation_prompt=True), chat.end_of_turn)
    else:
        def reply_to(messages):
            context = "".join(render_prompt(m["content"], template) if m["role"] == "user" else
                              m["content"] + tokenizer.decode([tokenizer.eot_token]) for m in messages)
            return respond(tokenizer.encode(context, allowed_special="all"), tokenizer.eot_token)

    if args["prompt"]:
        print(reply_to([{"role": "user", "content": args["prompt"]}]))
        return
    messages = []  # earlier turns, so the model sees the conversation
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages = (messages if args["history"] else []) + [{"role": "user", "content": user}]
        reply = reply_to(messages)
        print(f"model> {reply}")
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OptionError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
