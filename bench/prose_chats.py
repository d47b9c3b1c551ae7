"""Chats of realistic length from real prose that is on every machine with the project installed: the long
descriptions (README text) in the METADATA files of the packages in .venv, which requirements.lock pins.

    .venv/bin/python bench/prose_chats.py OUT_DIR [--turns=2] [--max_chars=700]

Each package's description is cut into prose paragraphs (code blocks, tables, headings, lists and
lines that are mostly links left out). Each window of consecutive paragraphs makes one conversation: the user quotes
a paragraph and asks what the documentation says next; the assistant answers with the following
paragraph; the user asks again and the trained answer is the paragraph after that. So a row is a
system-less two-turn chat of three paragraphs (a few hundred tokens), written as TRL's conversational
prompt/completion (only the final answer is trained, as both bench/compare_trl.py sides do).
Each package's paragraphs are cut in blocks of 8 and a conversation stays inside its block; the
conversations of every fifth block go to eval.jsonl (so no paragraph is in both files), the rest to
train.jsonl; the order is the sorted package names', so the same .venv gives the same files
(their sha256 is printed).
"""
import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from options import parse_script_options  # noqa: E402

OPTIONS = {"turns": (2, "assistant answers per chat (the last one is trained)"),
           "max_chars": (700, "longest paragraph kept"),
           "min_chars": (150, "shortest paragraph kept")}
BLOCK = 8  # paragraphs per block; every fifth block (counted over all packages) is held out


def site_packages():
    """The .venv's site-packages directory."""
    found = sorted((ROOT / ".venv" / "lib").glob("python*/site-packages"))
    if not found:
        raise SystemExit("prose_chats.py: error: no .venv/lib/python*/site-packages; run setup.sh first")
    return found[0]


def description(metadata_text):
    """The long description: what follows the first blank line of a METADATA file."""
    return metadata_text.split("\n\n", 1)[1] if "\n\n" in metadata_text else ""


def prose_paragraphs(text, min_chars, max_chars):
    """Paragraphs of running prose: blank-line separated, outside code fences, mostly letters."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or any(line.startswith(("#", "|", "*", "-", ">", "..", ":", "<", "[!", "=", "$", "+"))
                            or line[:3].rstrip(".").isdigit() for line in lines):
            continue
        paragraph = " ".join(lines)
        letters = sum(c.isalpha() or c == " " for c in paragraph)
        if min_chars <= len(paragraph) <= max_chars and letters > 0.85 * len(paragraph) and "http" not in paragraph:
            kept.append(paragraph)
    return kept


def chats(paragraphs, package, turns):
    """Conversations over consecutive paragraphs of one package's description."""
    out, size = [], turns + 1
    for start in range(len(paragraphs) - size + 1):  # every window: a paragraph is context in one, answer in another
        first, *answers = paragraphs[start:start + size]
        prompt = [{"role": "user", "content": f"This is from the documentation of {package}:\n\n{first}\n\n"
                                              f"What does it say next?"}]
        for answer in answers[:-1]:
            prompt += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And after that?"}]
        out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answers[-1]}]})
    return out


def main(argv):
    if not argv or argv[0].startswith("--"):
        raise SystemExit(__doc__)
    out_dir, args = Path(argv[0]), parse_script_options(argv[1:], OPTIONS, __doc__)
    train, held_out, blocks = [], [], 0
    for metadata in sorted(site_packages().glob("*.dist-info/METADATA")):
        package = metadata.parent.name.split("-")[0]
        paragraphs = prose_paragraphs(description(metadata.read_text(errors="replace")), args["min_chars"],
                                      args["max_chars"])
        for start in range(0, len(paragraphs), BLOCK):  # windows stay inside a block: no paragraph in both files
            blocks += 1
            (held_out if blocks % 5 == 0 else train).extend(chats(paragraphs[start:start + BLOCK], package,
                                                                  args["turns"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", train), ("eval.jsonl", held_out)):
        data = "".join(json.dumps(row) + "\n" for row in part).encode()
        (out_dir / name).write_bytes(data)
        print(f"{out_dir / name}: {len(part)} chats, sha256 {hashlib.sha256(data).hexdigest()[:16]}")


if __name__ == "__main__":
    main(sys.argv[1:])
