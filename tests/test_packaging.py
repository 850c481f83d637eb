"""The wheel: one top-level package (`moco_tf`, the bundled configs inside it as `moco_tf.configs`),
importable from an installed copy; the editable install maps the checkout's configs/ the same way.

Built from a copy of the sources, so that no build/ or egg-info lands in the checkout.
"""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

# Run in a process whose sys.path starts with an installed copy (argv[1]): only that copy, not
# the editable install of the checkout this test runs from, if any (its finder module has the
# same name as the copy's, and maps a top-level `configs` in older versions).
ONLY_THIS_COPY = """
import os, site, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
for name in [name for name in sys.modules if name.startswith("__editable__")]:
    del sys.modules[name]
sys.path.insert(0, sys.argv[1])
site.addsitedir(sys.argv[1])       # the installed copy, its .pth files included (editable)
"""
PROBE = ONLY_THIS_COPY + """
import moco_tf
import moco_tf.configs.fashion_mnist as fashion_mnist
from moco_tf import configs
config = fashion_mnist.get_config()
assert config.data.source == "fashion_mnist", config.data.source
print(os.path.dirname(moco_tf.__file__))
print(os.path.dirname(configs.__file__))
print(os.path.dirname(fashion_mnist.__file__))
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), out / name)
    for folder in ("moco_tf", "configs"):
        shutil.copytree(os.path.join(ROOT, folder), out / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return out


@pytest.fixture(scope="module")
def wheel(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", str(sources),
                           "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(str(out / "moco_tf-*.whl"))
    return path


def _probe(site_dir, cwd):
    proc = subprocess.run([sys.executable, "-c", PROBE, str(site_dir)], cwd=str(cwd),
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_the_wheel_has_one_top_level_package_with_the_configs_inside(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = archive.read(next(n for n in names if n.endswith("top_level.txt")))
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"moco_tf"}
    assert top_level.decode().split() == ["moco_tf"]
    assert b"moco-tf-train = moco_tf.train_cli:run" in entry_points
    # Every package of the checkout (pyproject lists them by hand) and every bundled config.
    packages = {os.path.relpath(os.path.dirname(p), ROOT)
                for p in glob.glob(os.path.join(ROOT, "moco_tf", "**", "__init__.py"),
                                   recursive=True)}
    for package in packages:
        assert f"{package}/__init__.py" in names, package
    for config in glob.glob(os.path.join(ROOT, "configs", "*.py")):
        assert f"moco_tf/configs/{os.path.basename(config)}" in names, config


def test_the_installed_wheel_imports_its_configs_as_moco_tf_configs(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([*PIP, "install", "--no-deps", "--target", str(target), wheel],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (target / "configs").exists()
    package, configs, config = _probe(target, tmp_path)  # from outside any checkout
    assert package == str(target / "moco_tf")
    assert configs == config == str(target / "moco_tf" / "configs")


def test_an_editable_install_maps_the_checkouts_configs_folder(sources, tmp_path):
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; "
         "print(build_meta.build_editable(sys.argv[1]))", str(out)],
        cwd=str(sources), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    target = tmp_path / "site"
    proc = subprocess.run([*PIP, "install", "--no-deps", "--target", str(target),
                           str(out / proc.stdout.split()[-1])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, configs, config = _probe(target, tmp_path)
    assert package == str(sources / "moco_tf")
    assert configs == config == str(sources / "configs")


BUNDLED = ONLY_THIS_COPY + """
import importlib.util
from moco_tf import train_cli
for name in ("fashion_mnist", "moco_v3", "simclr_momentum"):
    (arg,) = train_cli.bundled_config([f"--config={name}"])
    path = arg[len("--config="):]
    assert path.startswith(sys.argv[1]), path
    spec = importlib.util.spec_from_file_location("config_file", path)  # as config_flags loads it
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.get_config()
"""


def test_moco_tf_train_finds_the_bundled_configs_of_an_installed_copy(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([*PIP, "install", "--no-deps", "--target", str(target), wheel],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", BUNDLED, str(target)], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
