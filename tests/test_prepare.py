"""`python -m moco_tf.data.prepare`, the command the unprepared-tfds errors advise (`tfds build`
stops on a missing apache_beam in the pinned environment): it really prepares imagenet2012 from
its manual-download archives (a few JPEGs in the official tar layout, no internet)."""
import os
import re
import shlex
import subprocess
import sys

import ml_collections
import pytest

from moco_tf.config import DataError
from moco_tf.data import tfds_source
from test_imagenet import ROOT, make_imagenet_archives


def tfds_cfg(data_dir, **overrides):
    cfg = ml_collections.ConfigDict(dict(name="imagenet2012", data_dir=str(data_dir),
                                         tfds_manual_dir="", tfds_download=True))
    cfg.update(overrides)
    return cfg


def run(command):
    """The command as a user types it, with this interpreter as `python`."""
    args = shlex.split(command)
    assert args[0] == "python"
    return subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_the_advised_command_prepares_imagenet2012_from_its_archives(tmp_path):
    manual = tmp_path / "manual"
    make_imagenet_archives(str(manual))
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataError, match="is not prepared in") as refused:
        tfds_source.prepare(tfds_cfg(data_dir))
    advised = re.search(r"run `(python -m moco_tf\.data\.prepare [^`]+)`", str(refused.value))
    assert advised, str(refused.value)
    command = advised.group(1)
    assert command == (f"python -m moco_tf.data.prepare imagenet2012 --manual_dir=DIR "
                       f"--data_dir={data_dir}")

    # Archives without the images tfds expects: one line, exit status 2.
    (tmp_path / "empty").mkdir()
    failed = run(command.replace("DIR", str(tmp_path / "empty"), 1))
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert failed.stderr.strip().splitlines()[-1].startswith(
        "Data error: could not prepare tfds dataset 'imagenet2012'")

    done = run(command.replace("DIR", str(manual), 1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imagenet2012 is prepared in {data_dir}" in done.stdout
    assert os.path.isdir(data_dir / "imagenet2012")
    cfg = tfds_cfg(data_dir)
    assert tfds_source.prepare(cfg, ["train", "validation"]) == str(data_dir)
    assert tfds_source.num_examples(cfg, "train") == 12  # 3 classes x 4 images
    assert tfds_source.num_examples(cfg, "validation") == 6


def test_an_unprepared_downloadable_set_advises_the_command_too(tmp_path):
    cfg = tfds_cfg(tmp_path / "no_tfds", name="cifar10", tfds_download=False)
    with pytest.raises(DataError, match=re.escape(
            f"Run `python -m moco_tf.data.prepare cifar10 --data_dir={tmp_path / 'no_tfds'}` "
            f"(it downloads it)")):
        tfds_source.prepare(cfg)
