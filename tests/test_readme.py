"""Every Python block of the README and of the docs pages below runs as written, each in a fresh
interpreter, at a tiny size: the only changes are the sizes in TINY (and the lines of PROMISES
appended: an assertion on what the block promises).

A block that cannot run here (a TPU, ImageNet, files from another framework) is marked on its page
by the line `<!-- not run: <reason> -->` right before its fence; that marker is the only way to
leave a block out.
"""
import glob
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"

# page -> the blocks it has, in order, each named by a string it contains.
BLOCKS = {
    "README.md": ["model.fit", "saved_model"],
    "docs/evaluation.md": ["linear_classifier"],
    "docs/distributed.md": [],
    "docs/design.md": [],
    "docs/results.md": [],
    "docs/momentum_study.md": [],
}
# Pages this test does not read yet (their owners check their blocks; then they move to BLOCKS).
NOT_COVERED = ["docs/checkpoints.md", "docs/data.md", "docs/performance.md", "docs/pytorch.md",
               "docs/reliability.md", "docs/troubleshooting.md"]

TINY = {  # (page, block) -> {text on the page: what the test runs instead (sizes only)}
    ("README.md", "model.fit"): {
        "steps_per_epoch=60_000 // 256": "steps_per_epoch=2",
        "batch_size=256": "batch_size=16",
        "queue_size=4096": "queue_size=64",
        "shuffle(10_000)": "shuffle(100)",
    },
    ("docs/evaluation.md", "linear_classifier"): {
        # 8 batches: fewer images in smaller batches make a noisy probe whose loss can rise.
        "shuffle(10_000).batch(256)": "shuffle(2048).take(2048).batch(256)",
        "epochs=100)": "epochs=3)",
        "epochs=10)": "epochs=1)",
    },
}
PROMISES = {  # (page, block) -> lines appended: what its text says it gives
    ("README.md", "model.fit"): """
import numpy as np
assert features.shape == (8, 128), features.shape
assert np.isfinite(features).all()
scaled = model.predict(np.asarray(test_images, np.float32) / 255.0)  # "uint8 is fine": same values
np.testing.assert_allclose(features, scaled, atol=1e-5)
""",
    ("README.md", "saved_model"): """
assert features.shape == (8, 128), features.shape
assert history.history['loss'][-1] < history.history['loss'][0]
""",
    ("docs/evaluation.md", "linear_classifier"): """
import numpy as np
losses = probe.history['loss'] + tuned.history['loss']
assert np.isfinite(losses).all(), losses
assert probe.history['loss'][-1] < 0.9 * probe.history['loss'][0], losses  # the probe learns
assert max(losses) < 1.5 * losses[0], losses  # nothing diverges (lr 30 on raw features: x80)
""",
}
# Blocks that load a training run's export: made first, as train.py writes it; "trained": from a
# backbone whose features tell the classes apart (an untrained ResNet's pooled features point in
# nearly one direction, so no probe on them learns much), here by one supervised epoch.
NEEDS_EXPORT = {("README.md", "saved_model"): "untrained",
                ("docs/evaluation.md", "linear_classifier"): "trained"}

_FENCE = re.compile(r"^(?:<!-- not run: ([^\n]*?) -->[ \t]*\n)?([ \t]*)```(?:python|py)[ \t]*\n"
                    r"(.*?)^[ \t]*```", re.M | re.S)


def python_blocks(page, text=None):
    """[(code, reason it is not run, or None)] of the page's Python blocks, in order."""
    text = open(os.path.join(ROOT, page)).read() if text is None else text
    return [(textwrap.dedent(code), reason or None) for reason, _, code in _FENCE.findall(text)]


def _cases():
    return [(page, key) for page, keys in BLOCKS.items() for key in keys]


def test_every_docs_page_is_covered_or_listed_as_not_yet():
    pages = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}
    assert pages == (set(BLOCKS) - {"README.md"}) | set(NOT_COVERED)
    assert not set(BLOCKS) & set(NOT_COVERED)


@pytest.mark.parametrize("page", list(BLOCKS))
def test_the_page_has_the_blocks_this_test_knows(page):
    blocks = python_blocks(page)
    assert len(blocks) == len(BLOCKS[page]), [code[:60] for code, _ in blocks]
    for (code, reason), key in zip(blocks, BLOCKS[page]):
        assert key in code, (key, code[:200])
        assert reason is None or reason.strip(), "a `not run` marker gives its reason"
        if reason is None:  # a block that runs has its promise and its sizes made tiny here
            assert (page, key) in PROMISES, (page, key)
            for text in TINY.get((page, key), {}):
                assert text in code, (page, key, text)


def test_the_marker_is_read():
    text = ("<!-- not run: needs a TPU -->\n```python\nx = 1\n```\n<!-- not run: far -->\n\n"
            "- a list item:\n\n  ```python\n  y = 2\n  ```\n")
    assert python_blocks("page.md", text) == [("x = 1\n", "needs a TPU"), ("y = 2\n", None)]


def _make_export(path, kind):
    import keras
    import tensorflow as tf

    from moco_tf import config, data, export
    from moco_tf.models.backbones import build_backbone

    keras.utils.set_random_seed(0)
    backbone = build_backbone("resnet18", (28, 28, 1), cifar_stem=True, width=16,
                              mean=(0.286,), std=(0.353,))
    if kind == "trained":
        images = data.images(config.defaults().data, "train").take(2048).batch(128).map(
            lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))
        classifier = keras.Sequential([backbone, keras.layers.Dense(10)])
        classifier.compile(optimizer=keras.optimizers.Adam(1e-3),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        classifier.fit(images, epochs=1, verbose=0)
    export.export_backbone(backbone, str(path), image_shape=(28, 28, 1))


@pytest.mark.parametrize("page,key", _cases())
def test_block_runs_as_written(page, key, tmp_path):
    if not os.path.isdir(FMNIST):
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
    code, reason = next((c, r) for c, r in python_blocks(page) if key in c)
    if reason:
        pytest.skip(f"{page}: not run: {reason}")
    for text, tiny in TINY.get((page, key), {}).items():
        code = code.replace(text, tiny)
    if (page, key) in NEEDS_EXPORT:
        _make_export(tmp_path / "runs" / "fashion_mnist" / "export", NEEDS_EXPORT[(page, key)])
    script = tmp_path / "block.py"
    script.write_text(code + PROMISES[(page, key)])
    proc = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
