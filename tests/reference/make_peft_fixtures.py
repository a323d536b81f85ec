"""PEFT adapter fixtures: LoRA adapters made by `peft` itself on the tiny HF Gemma 3 models, with their logits.

Run from the repository root with the reference environment (torch, transformers 5.x, peft; the test
suite itself needs none of them):

    /work/venvref/bin/python tests/reference/make_peft_fixtures.py

A few seconds. Deterministic (f32, eager attention, one thread, fixed seeds).

For each case, loads the HF directory tests/fixtures/tiny/<base> (written by make_tiny_fixtures.py) as
Gemma3ForCausalLM, wraps it with peft.get_peft_model(LoraConfig(r, lora_alpha, target_modules,
init_lora_weights=False)) -- both factors random, so the adapter changes the logits -- and writes
tests/fixtures/peft/<case>/:
  adapter_config.json, adapter_model.safetensors   peft's save_pretrained output, unedited (its
                                                   README.md model card is not kept)
  io.npz   ids [2, 12] int32, logits [2, 12, V] f32 of the PeftModel (adapters active),
           base_logits of the same ids with the adapters disabled
  versions.json   torch, transformers, peft
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import numpy as np
import torch

torch.set_num_threads(1)
torch.manual_seed(0)

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = os.path.join("tests", "fixtures")  # relative: peft records the base's path in adapter_config.json
CASES = {
    # name: (base, rank, alpha, target_modules, use_rslora)
    "all_targets": ("window", 4, 8.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    False),
    "qv_rank2": ("mqa", 2, 16.0, ["q_proj", "v_proj"], False),
}


def main():
    if not os.path.isdir(os.path.join(ROOT, "tiny")):
        raise SystemExit("run from the repository root (tests/fixtures/tiny must exist)")
    for seed, (case, (base, rank, alpha, targets, rslora)) in enumerate(CASES.items()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "tiny", base), dtype=torch.float32,
                                                     attn_implementation="eager")
        model.eval()
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                            init_lora_weights=False, use_rslora=rslora, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        peft_model.eval()
        vocab = model.config.vocab_size
        ids = torch.tensor(np.random.default_rng(1).integers(3, vocab, (2, 12)), dtype=torch.long)
        ids[:, 0] = 2
        with torch.no_grad():
            logits = peft_model(input_ids=ids).logits.float().numpy()
            with peft_model.disable_adapter():
                base_logits = peft_model(input_ids=ids).logits.float().numpy()
        out = os.path.join(ROOT, "peft", case)
        os.makedirs(out, exist_ok=True)
        peft_model.save_pretrained(out)
        os.remove(os.path.join(out, "README.md"))
        np.savez(os.path.join(out, "io.npz"), ids=ids.numpy().astype(np.int32), logits=logits,
                 base_logits=base_logits)
        with open(os.path.join(out, "versions.json"), "w") as f:
            json.dump({"base": f"tiny/{base}", **{p: importlib.metadata.version(p)
                                                  for p in ("torch", "transformers", "peft")}}, f, indent=1)
        print(case, "max |logits - base|", float(np.abs(logits - base_logits).max()), sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
