"""What the experiment scripts share: running jobs as child processes, and the tiny config.

Each job is one training run in its own Python process: its own TensorFlow state and dtype
policy, and a run killed half-way resumes from its checkpoints when the script is run again.
"""

import os
import subprocess
import sys
import time


def run_processes(jobs, parallel=1, log_dir="."):
    """Runs `jobs` = [(label, argv)] as `python argv...`, `parallel` at a time.

    Each child's output goes to `<log_dir>/<label>.log` (appended: a resumed run adds to it).
    With `parallel > 1` every child gets one intra-op thread, so runs do not fight over the cores.
    Returns {label: exit code}.
    """
    queue, running, codes = list(jobs), [], {}
    print(f"{len(queue)} runs to do", flush=True)
    while queue or running:
        while queue and len(running) < parallel:
            label, argv = queue.pop(0)
            log = open(os.path.join(log_dir, f"{label}.log"), "a")
            env = dict(os.environ)
            if parallel > 1:
                env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
            proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=log, env=env)
            running.append((label, proc, log))
            print(f"started {label}", flush=True)
        time.sleep(5)
        for label, proc, log in list(running):
            if proc.poll() is not None:
                running.remove((label, proc, log))
                log.close()
                codes[label] = proc.returncode
                print(f"finished {label} (exit {proc.returncode})", flush=True)
    return codes


def shrink(config):
    """`config` at a size that trains in seconds (synthetic 16 px images, width 8): `--small`,
    for checking a script end to end."""
    config.data.source, config.data.image_size, config.data.num_classes = "synthetic", 16, 4
    config.data.synthetic_examples = 256
    config.model.width, config.moco.queue_size = 8, 128
    config.train.batch_size, config.train.steps_per_epoch = 32, 4
    return config
