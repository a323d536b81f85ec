"""A fine-tuning run of a tiny model in its own process, for the kill-and-resume tests.

    python tests/finetune_worker.py OUT [--kill-at-step N | --kill-in-save N] [--lora-rank R]

--kill-at-step N SIGKILLs the process once step N is done and logged (between checkpoints);
--kill-in-save N right after the checkpoint of step N was handed to orbax's async writer.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402

import checkpoints  # noqa: E402
from gemma import config  # noqa: E402
from gemma.transformer import Transformer  # noqa: E402
from gemma.train import run, trainer  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "finetune", "sample.jsonl")
TINY = config.tiny(vocab_size=262_144, d_model=32, hidden_dim=64, head_dim=8, num_heads=2, num_kv_heads=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--kill-in-save", type=int)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args()
    if a.kill_at_step is not None:
        step = trainer.Trainer.step

        def killing_step(self, batches):
            result = step(self, batches)
            if self.step_count == a.kill_at_step + 1:  # step N's metrics line is written before step N + 1 runs
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        trainer.Trainer.step = killing_step
    if a.kill_in_save is not None:
        save = ocp.CheckpointManager.save

        def killing_save(self, step, *args, **kw):
            result = save(self, step, *args, **kw)
            if step == a.kill_in_save and self.directory.name == "checkpoints":
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        ocp.CheckpointManager.save = killing_save
    tokenizer = checkpoints.load_tokenizer("gemma3-270m")
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    cfg = trainer.TrainConfig(steps=a.steps, batch_size=2, seq_len=64, learning_rate=1e-3, warmup_steps=1,
                              lora_rank=a.lora_rank, grad_accum=2)
    run.finetune(model, tokenizer, DATA, a.out, config=cfg, eval_path=DATA, save_every=2, eval_every=3,
                 model_source="tiny", progress=False)


if __name__ == "__main__":
    main()
