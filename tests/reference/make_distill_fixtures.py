"""Distillation loss fixture: TRL's `GKDTrainer.generalized_jsd_loss` (value and gradient wrt the student logits).

Run from the repository root with the reference environment (torch CPU and trl; the test suite needs neither):

    /work/venvref/bin/python tests/reference/make_distill_fixtures.py

Random logits (numpy seed 0, f32, scaled so that some rows are peaked and some flat) [B=2, L=7, V=300],
a mask with False on some positions, turned into TRL's labels (-100 outside the mask, 0 inside: only
`labels != -100` is read). For beta in 0, 0.1, 0.5, 0.9, 1 and temperature in 0.7, 1, 2: TRL's loss
(reduction "batchmean": sum over the labelled positions / their number) and d loss / d student_logits by
torch autograd, f32. Also the loss with every position labelled for beta 0.5, temperature 1 (our mask=None;
TRL without labels divides the sum by the batch size, not the number of positions).

Writes tests/fixtures/distill/trl_jsd.npz: student, teacher [B, L, V] f32, mask [B, L] bool, betas,
temperatures, value [len(betas), len(temps)], grad [len(betas), len(temps), B, L, V], value_nomask, and
the versions as a JSON string `meta`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import numpy as np
import torch

try:
    from trl import GKDTrainer
except ImportError:  # newer TRL keeps GKD under experimental
    from trl.experimental.gkd import GKDTrainer

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "distill", "trl_jsd.npz")
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPS = (0.7, 1.0, 2.0)


def main():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    b, l, v = 2, 7, 300
    scale = rng.uniform(0.5, 6.0, size=(b, l, 1))
    student = (rng.standard_normal((b, l, v)) * scale).astype(np.float32)
    teacher = (rng.standard_normal((b, l, v)) * scale[:, ::-1] + 0.5 * student).astype(np.float32)
    mask = rng.random((b, l)) > 0.3
    mask[0, 0] = mask[1, -1] = False
    labels = torch.tensor(np.where(mask, 0, -100))
    values = np.zeros((len(BETAS), len(TEMPS)), np.float32)
    grads = np.zeros((len(BETAS), len(TEMPS), b, l, v), np.float32)
    for i, beta in enumerate(BETAS):
        for j, temp in enumerate(TEMPS):
            s = torch.tensor(student, requires_grad=True)
            loss = GKDTrainer.generalized_jsd_loss(s, torch.tensor(teacher), labels=labels, beta=beta,
                                                   temperature=temp)
            loss.backward()
            values[i, j] = loss.item()
            grads[i, j] = s.grad.numpy()
    # every position labelled: our mask=None (TRL without labels divides the sum by the batch size instead)
    nomask = GKDTrainer.generalized_jsd_loss(torch.tensor(student), torch.tensor(teacher),
                                             labels=torch.zeros((b, l), dtype=torch.long), beta=0.5).item()
    meta = {"torch": torch.__version__, "trl": importlib.metadata.version("trl")}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, student=student, teacher=teacher, mask=mask, betas=np.asarray(BETAS),
                        temperatures=np.asarray(TEMPS), value=values, grad=grads,
                        value_nomask=np.float32(nomask), meta=json.dumps(meta))
    print(f"wrote {OUT}: {meta}, values {values.round(5).tolist()}")


if __name__ == "__main__":
    main()
