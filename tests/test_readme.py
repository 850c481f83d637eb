"""Every Python block of the README runs as written, each in a fresh interpreter, at a tiny size:
the only changes are the sizes below (and an assertion on what the block promises)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"
TINY = {  # README text -> what the test runs instead (sizes only)
    "steps_per_epoch=60_000 // 256": "steps_per_epoch=2",
    "batch_size=256": "batch_size=16",
    "queue_size=4096": "queue_size=64",
    "shuffle(10_000)": "shuffle(100)",
}
PROMISES = {  # block -> lines appended: what its comments say it gives
    "model.fit": "assert features.shape == (8, 128), features.shape\n"
                 "assert np.isfinite(features).all()\n",
    "saved_model": "assert features.shape == (8, 128), features.shape\n"
                   "assert history.history['loss'][-1] < history.history['loss'][0]\n",
}


def python_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_readme_has_the_blocks_this_test_knows():
    blocks = python_blocks()
    assert len(blocks) == len(PROMISES)
    for block, key in zip(blocks, PROMISES):
        assert key in block


@pytest.mark.parametrize("key", list(PROMISES))
def test_readme_block_runs_as_written(key, tmp_path):
    if not os.path.isdir(FMNIST):
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
    block = next(b for b in python_blocks() if key in b)
    for text, tiny in TINY.items():
        block = block.replace(text, tiny)
    if key == "saved_model":  # the block loads a training run's export: make one, as train.py does
        from moco_tf import export
        from moco_tf.models.backbones import build_backbone

        backbone = build_backbone("resnet18", (28, 28, 1), cifar_stem=True, width=16,
                                  mean=(0.286,), std=(0.353,))
        export.export_backbone(backbone, str(tmp_path / "runs" / "fashion_mnist" / "export"),
                               image_shape=(28, 28, 1))
    script = tmp_path / "block.py"
    script.write_text("import numpy as np\n" + block + PROMISES[key])
    proc = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
