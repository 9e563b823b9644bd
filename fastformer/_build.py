"""Build ``fastformer._C`` from ``csrc/`` with nvcc and ninja, without torch.

The extension is a pybind11 module that takes raw device pointers, sizes, dtype codes and a stream
handle. It includes no torch header and links no torch library, so one build works with every torch
version (no "undefined symbol" on a torch upgrade). cudart is linked statically.

Used three ways: by setup.py at install time (when nvcc is found), by ``python -m fastformer._build``
(what ``make test`` runs, so a compile error fails the tests), and lazily at run time, when the
module is missing and nvcc exists, into a per-user cache directory under an exclusive file lock.
The lock is ``fcntl.flock``: the kernel drops it when a build is killed, so a stale lock cannot hang
the next build. Builds go to a private temporary directory and are renamed into place atomically.

This file must stay importable without torch (setup.py loads it by path).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

MODULE = "_C"
DEFAULT_ARCHS = "80;90a"  # 90a: sm_90 with wgmma (arch-specific; the PTX shipped is plain compute_90)


def source_dir() -> Path:
    """csrc/ of a source checkout (editable install) or the copy installed as fastformer/csrc."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here / "csrc"):
        if (cand / "bindings.cpp").is_file():
            return cand
    raise FileNotFoundError("fastformer: CUDA sources (csrc/) not found next to the package")


def find_nvcc() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # type: ignore[import-not-found]

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        return None


def archs() -> list[str]:
    """The SASS targets, e.g. ['80', '90a'] ('a': the arch-specific features, such as sm_90a's wgmma)."""
    raw = os.environ.get("FASTFORMER_CUDA_ARCHS", DEFAULT_ARCHS)
    out = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not out or not all(a.rstrip("a").isdigit() and a.count("a") <= 1 for a in out):
        raise ValueError(f"FASTFORMER_CUDA_ARCHS must look like '80;90a', got {raw!r}")
    return out


def ext_filename() -> str:
    return MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _sources(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.suffix in (".cu", ".cpp"))


def build_key(src: Path, nvcc: str) -> str:
    """Hash of everything the binary depends on: sources, headers, archs, nvcc and Python ABI."""
    h = hashlib.sha256()
    for p in sorted(src.iterdir()):
        if p.suffix in (".cu", ".cpp", ".h", ".cuh"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    h.update(";".join(archs()).encode())
    h.update(ext_filename().encode())
    h.update(os.environ.get("FASTFORMER_WERROR", "").encode())
    return h.hexdigest()[:16]


def _ninja_file(src: Path, out: Path, nvcc: str) -> str:
    import pybind11

    py_inc = sysconfig.get_paths()["include"]
    gencode = " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in archs())
    top = archs()[-1].rstrip("a")  # arch-specific PTX (compute_90a) would run on no other GPU
    gencode += f" -gencode arch=compute_{top},code=compute_{top}"  # PTX for newer GPUs
    if "90a" in archs():
        gencode += " -DFF_HAVE_SM90A"  # the host code may launch the sm_90a (wgmma) kernels
    werror = " -Werror all-warnings" if os.environ.get("FASTFORMER_WERROR") == "1" else ""
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        "cuflags = -O3 -std=c++17 -lineinfo --expt-relaxed-constexpr -Xcompiler -fPIC,-Wall --threads 2 "
        f"{gencode}{werror}",
        # the bindings are host code: nvcc hands them to the host compiler with CUDA's include path added
        f"cxxflags = -O2 -std=c++17 -Xcompiler -fPIC,-fvisibility=hidden,-Wall{werror} "
        f"-I{py_inc} -I{pybind11.get_include()} -I{src}",
        "rule nvcc",
        "  command = $nvcc $cuflags -I" + str(src) + " -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule cxx",
        "  command = $nvcc $cxxflags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule link",
        "  command = $nvcc -shared --cudart static $in -o $out",
    ]
    objs = []
    for s in _sources(src):
        obj = f"{s.stem}{s.suffix.replace('.', '_')}.o"
        objs.append(obj)
        lines.append(f"build {obj}: {'nvcc' if s.suffix == '.cu' else 'cxx'} {s}")
    lines.append(f"build {out}: link {' '.join(objs)}")
    lines.append(f"default {out}")
    return "\n".join(lines) + "\n"


def build(out_dir: Path, build_dir: Path | None = None, verbose: bool = False) -> Path:
    """Compile csrc/ into ``out_dir/_C<ext>``; raise RuntimeError with the compiler output on failure."""
    nvcc = find_nvcc()
    ninja = find_ninja()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if ninja is None:
        raise RuntimeError("ninja not found (pip install ninja)")
    src = source_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    build_dir = build_dir or out_dir / "build"
    build_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ext_filename()
    (build_dir / "build.ninja").write_text(_ninja_file(src, target.resolve(), nvcc))
    jobs = os.environ.get("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 4))))
    cmd = [ninja, "-C", str(build_dir), "-j", jobs] + (["-v"] if verbose else [])
    proc = subprocess.run(cmd, capture_output=not verbose, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fastformer._C build failed:\n{proc.stdout or ''}{proc.stderr or ''}")
    _check_import(target)
    return target


def _check_import(target: Path) -> None:
    """Load the module in a fresh interpreter: a shared object links with undefined symbols, imports fail."""
    code = (
        "import importlib.util, sys; s = importlib.util.spec_from_file_location('fastformer._C', sys.argv[1]); "
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fastformer._C was built but does not import:\n{proc.stderr}")


def cache_dir() -> Path:
    root = os.environ.get("FASTFORMER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastformer"
    )
    return Path(root)


def jit_build(verbose: bool = False) -> Path:
    """Build (once) into the per-user cache and return the module path; safe across processes."""
    import fcntl

    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    final = cache_dir() / build_key(source_dir(), nvcc)
    target = final / ext_filename()
    if target.is_file():
        return target
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if target.is_file():  # another process finished the build while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.", dir=final.parent))
        try:
            t0 = time.time()
            build(tmp, verbose=verbose)
            shutil.rmtree(tmp / "build", ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if verbose:
                print(f"fastformer._C built in {time.time() - t0:.0f}s -> {target}", file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(jit_build(verbose="-v" in sys.argv))
