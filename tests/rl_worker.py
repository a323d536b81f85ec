"""An RL run of a tiny policy on the permutation task in its own process, for the kill-and-resume tests.

    python tests/rl_worker.py OUT [--kill-at-step N | --kill-in-save N] [--baseline group|value] [--lag L]

--kill-at-step N SIGKILLs the process once step N is done and logged (between checkpoints);
--kill-in-save N right after the checkpoint of step N was handed to orbax's async writer.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import rl_task as RT  # noqa: E402
from gemma.train import rl_run, rl_trainer, trainer  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--kill-in-save", type=int)
    p.add_argument("--baseline", default="value")
    p.add_argument("--lag", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args()
    if a.kill_at_step is not None:
        step = rl_trainer.RLTrainer.step

        def killing_step(self, batches=None):
            if self.step_count == a.kill_at_step:  # step N's metrics line is written before step N + 1 runs
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, batches)
        rl_trainer.RLTrainer.step = killing_step
    if a.kill_in_save is not None:
        save = ocp.CheckpointManager.save

        def killing_save(self, step, *args, **kw):
            result = save(self, step, *args, **kw)
            if step == a.kill_in_save and self.directory.name == "checkpoints":
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        ocp.CheckpointManager.save = killing_save
    task = RT.Task(n=3, digits=6, seed=0)
    prompts = RT.pairs(task.prompts("train", 16, np.random.default_rng(0)))
    held = RT.pairs(task.prompts("heldout", 8, np.random.default_rng(1)))
    cfg = trainer.TrainConfig(steps=a.steps, batch_size=4, seq_len=task.seq_len, learning_rate=3e-3, seed=0)
    rc = rl_trainer.RLConfig(samples_per_prompt=2 if a.baseline == "group" else 3, baseline=a.baseline,
                             kl_alpha=0.1, max_new_tokens=task.n + 1, stop_ids=(task.tok.end_of_turn_id,),
                             rollout_lag=a.lag, max_staleness=max(a.lag, 1))
    rl_run.rl(RT.B.make_model(task, RT.SIZE, 0), task.tok, prompts, a.out, config=cfg, rl_config=rc,
              reward=RT.dense, metric=RT.valid, eval_prompts=held, eval_every=3, save_every=2,
              model_source="tiny-permutations", data_source="permutations:0", progress=False)


if __name__ == "__main__":
    main()
