"""PEP 562 lazy attributes for a package: `import moco_tf` stays light (no TensorFlow) until a
name that needs it is used."""

import importlib


def attributes(package, namespace, api, submodules):
    """(`__getattr__`, `__dir__`) for `package`: its `submodules` and the names of `api`
    ({name: module}) are imported on first use and then kept in `namespace` (its globals)."""

    def __getattr__(name):
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name not in api:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(api[name]), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(api) | set(submodules))

    return __getattr__, __dir__
