"""Loads our exports with the peers and writes their logits: the live check of checkpoints.save_hf and
gemma.train.export.save_peft (tests/test_export.py runs it under $GEMMA_REFERENCE_PYTHON).

    /work/venvref/bin/python tests/reference/hf_export_logits.py DIR

DIR holds ids.npy [B, T] and the exports: merged/ (save_hf of base + adapters), base/ (save_hf of the
base) and adapter/ (save_peft). Writes DIR/peer.npz:
  merged   logits of AutoModelForCausalLM.from_pretrained(DIR/merged)
  peft     logits of PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base), DIR/adapter)
  token_ids  (when DIR/text.txt and DIR/merged/tokenizer.model exist) AutoTokenizer(DIR/merged)'s ids of the text
and DIR/peer.json with the classes loaded and the versions.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(root: str):
    torch.set_num_threads(2)
    ids = torch.tensor(np.load(os.path.join(root, "ids.npy")), dtype=torch.long)
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    out, info = {}, {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft")}
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(root, "merged"), **kwargs).eval()
        info["merged_class"] = type(merged).__name__
        out["merged"] = merged(input_ids=ids).logits.float().numpy()
        del merged
        base = AutoModelForCausalLM.from_pretrained(os.path.join(root, "base"), **kwargs).eval()
        adapted = PeftModel.from_pretrained(base, os.path.join(root, "adapter")).eval()
        info["peft_class"] = type(adapted).__name__
        out["peft"] = adapted(input_ids=ids).logits.float().numpy()
    text_file = os.path.join(root, "text.txt")
    if os.path.isfile(text_file) and os.path.isfile(os.path.join(root, "merged", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(root, "merged"))
        info["tokenizer_class"] = type(tokenizer).__name__
        with open(text_file) as f:
            out["token_ids"] = np.asarray(tokenizer(f.read())["input_ids"], np.int64)
    np.savez(os.path.join(root, "peer.npz"), **out)
    with open(os.path.join(root, "peer.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
