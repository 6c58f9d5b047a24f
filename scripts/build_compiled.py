"""Build or remove the optional compiled modules, in place (docs/compiled.md).

    python scripts/build_compiled.py build    # needs mypy (mypyc) and setuptools >= 77
    python scripts/build_compiled.py remove   # stdlib only

Run through ``bash scripts/compiled.sh``, which sets up the virtualenv first. The build
compiles ``shared.compiled.MODULES`` with mypyc into one shared library
(``shared/_native__mypyc.*``) and a small extension module beside each ``.py``, then
records each source's hash (``shared/compiled.<abi>.json``) for ``shared._check_compiled_build``.
Everything it writes is git-ignored; ``remove`` deletes it, for every Python version.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "shared")
#: The shared library's module name: inside the package, so that it imports wherever
#: the package does (an editable install maps the package, not the checkout's root).
GROUP = "shared._native"
BUILD_DIR = os.path.join("build", "mypyc")


def _compiled() -> ModuleType:
    # shared/compiled.py on its own: importing the package refuses a stale build.
    spec = importlib.util.spec_from_file_location("_workerbus_compiled", os.path.join(PACKAGE, "compiled.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _built_files() -> list[str]:
    shorts = [name.rpartition(".")[2] for name in _compiled().MODULES] + [GROUP.rpartition(".")[2] + "__mypyc"]
    found = []
    for short in shorts:
        for ext in (".so", ".pyd"):
            found += glob.glob(os.path.join(PACKAGE, f"{short}.*{ext}"))
    return found + glob.glob(os.path.join(PACKAGE, "compiled.*.json"))


def _record_path() -> str:
    # Where the build records its sources' hashes, per interpreter ABI; read by
    # shared._check_compiled_build (shared/__init__.py), which must name it the same.
    return os.path.join(PACKAGE, "compiled" + importlib.machinery.EXTENSION_SUFFIXES[0].rsplit(".", 1)[0] + ".json")


def _hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def remove() -> None:
    files = _built_files()
    for path in files:
        os.remove(path)
    shutil.rmtree(os.path.join(ROOT, BUILD_DIR), ignore_errors=True)
    print(f"compiled build removed ({len(files)} files): pure Python")


def build() -> None:
    from mypyc.build import mypycify
    from setuptools import setup  # type: ignore[import-untyped]

    compiled = _compiled()
    # Only this interpreter's build is replaced; another version's stays beside it.
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for path in _built_files():
        if path.endswith(suffix) or path == _record_path():
            os.remove(path)
    os.chdir(ROOT)  # mypyc reads pyproject's [tool.mypy] (strict) from here
    sources = [os.path.join("shared", name.rpartition(".")[2] + ".py") for name in compiled.MODULES]
    abi = suffix.rsplit(".", 1)[0].lstrip(".")
    out = os.path.join(BUILD_DIR, abi)
    setup(
        name="workerbus-compiled",
        ext_modules=mypycify(sources, group_name=GROUP, target_dir=os.path.join(out, "c")),
        script_args=["-q", "build_ext", "--inplace", "--build-temp", os.path.join(out, "temp"),
                     "--build-lib", os.path.join(out, "lib")],
    )
    hashes = {name: _hash(os.path.join(ROOT, src)) for name, src in zip(compiled.MODULES, sources, strict=True)}
    with open(_record_path(), "w", encoding="utf-8") as f:
        json.dump(hashes, f, indent=1, sort_keys=True)
    # Success means the modules really load compiled: asked of a fresh interpreter.
    check = "import shared.compiled as c, sys; sys.exit(not all(c.status().values()))"
    if subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=False).returncode:
        sys.exit("build_compiled: built, but the modules do not load compiled (workerbus info)")


def main() -> None:
    what = sys.argv[1:]
    if what == ["build"]:
        build()
    elif what == ["remove"]:
        remove()
    else:
        sys.exit("usage: python scripts/build_compiled.py build|remove")


if __name__ == "__main__":
    main()
