"""One GKD step of the real Gemma 3 270M as teacher and student at seq 512 on CPU, with its peak memory."""

import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np
import checkpoints
from gemma.train import data, distill_trainer, trainer
tok = checkpoints.load_tokenizer("gemma3-270m")
student, teacher = checkpoints.load("gemma3-270m"), checkpoints.load("gemma3-270m")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
text = " ".join(["The history of the river valley begins with small farming villages."] * 40)
record = {{"prompt": "Summarise: " + text, "response": "Farming villages grew along the river."}}
ex = data.render(record, tok)
cfg = trainer.TrainConfig(steps=1, batch_size=1, seq_len=512, lora_rank=8, learning_rate=1e-4)
tr = distill_trainer.DistillTrainer(student, teacher, tok, cfg, distill_trainer.DistillConfig(
    lmbda=1.0, beta=0.5, max_new_tokens=512 - int(np.flatnonzero(ex.loss_mask)[0])))
it = data.make_iterator([ex], batch_size=1, seq_len=512, seed=0, packing=False, prefetch=0)
t0 = time.time()
m = tr.step([next(it)])
m.update(seconds=time.time() - t0, prompt_tokens=int(np.flatnonzero(ex.loss_mask)[0]),
         peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
         loaded_rss_gib=before / 2**20)
print(json.dumps(m))
"""


def test_one_gkd_step_of_the_270m_at_seq_512():
    r = subprocess.run([sys.executable, "-c", STEP.format(root=ROOT)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    m = json.loads(r.stdout.strip().splitlines()[-1])
    print(m)
    assert m["on_policy"] == 1.0 and m["tokens"] >= 1 and m["loss"] >= 0 and m["peak_rss_gib"] < 12
