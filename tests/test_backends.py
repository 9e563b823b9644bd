"""Backend selection order and the torch-free CUDA extension's build machinery."""

import multiprocessing as mp
import os
import time

import pytest
import torch

import fastformer
from fastformer import _build, _ext, backends


def test_selection_order(monkeypatch):
    monkeypatch.delenv("FASTFORMER_BACKEND", raising=False)
    assert backends.selected() == "auto"
    monkeypatch.setenv("FASTFORMER_BACKEND", "torch")
    assert backends.selected() == "torch"
    with fastformer.use_backend("triton"):
        assert backends.selected() == "triton"  # context beats environment
        with fastformer.use_backend("cuda"):
            assert backends.selected() == "cuda"
        assert backends.selected() == "triton"
        assert backends.selected("torch") == "torch"  # argument beats context
    assert backends.selected() == "torch"


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with fastformer.use_backend("fast"):
            pass
    monkeypatch.setenv("FASTFORMER_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTFORMER_BACKEND"):
        backends.selected()


def test_auto_picks_torch_on_cpu_and_explicit_requests_are_checked(monkeypatch):
    monkeypatch.delenv("FASTFORMER_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert backends.select("op", cpu) == "torch"
    assert backends.select("op", cpu, "triton") == "triton"  # the interpreter is on in tests
    with pytest.raises(backends.BackendError, match="op: backend 'cuda'"):
        backends.select("op", cpu, "cuda")
    with pytest.raises(backends.BackendError, match="because"):
        backends.select("op", cpu, "triton", why_not=lambda b: "because" if b == "triton" else None)


def test_environment_variable_reaches_ops(monkeypatch):
    # a CPU tensor: the cuda backend named by the environment cannot serve it on any machine, so it must refuse
    monkeypatch.setenv("FASTFORMER_BACKEND", "cuda")
    with pytest.raises(fastformer.BackendError, match="cuda"):
        fastformer.layer_norm(torch.randn(2, 4), 4)


def test_available_backends_on_this_machine():
    names = fastformer.available_backends("cpu")
    assert "torch" in names and "cuda" not in names
    status = backends.status("cpu")
    assert status["torch"] is None and "CUDA" in status["cuda"]


needs_nvcc = pytest.mark.skipif(_build.find_nvcc() is None, reason="nvcc is not installed on this machine")


@needs_nvcc
def test_extension_builds_imports_and_exports_its_functions():
    mod = _ext.load()
    expected = {"cuda_runtime_version", "cuda_device_count", "layer_norm_fwd", "layer_norm_bwd"}
    expected |= {"attention_fwd", "attention_bwd", "ffn_bias_act_fwd", "ffn_act_bwd"}
    assert expected <= set(dir(mod))
    assert mod.cuda_runtime_version() >= 12000
    assert mod.cuda_device_count() == torch.cuda.device_count()
    assert _ext.is_built()


@needs_nvcc
def test_extension_does_not_link_torch():
    path = _build.jit_build()
    data = path.read_bytes()
    assert b"libtorch" not in data and b"libc10" not in data


def _fake_build(out_dir, **_options):
    # stands in for nvcc: slow enough that a second process must wait on the lock
    with open(os.path.join(os.environ["FF_TEST_COUNTER"]), "a") as f:
        f.write("x")
    time.sleep(1.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / _build.ext_filename()
    target.write_text("built")
    return target


def _jit_worker(q):
    _build.build = _fake_build
    q.put(str(_build.jit_build()))


@needs_nvcc
def test_concurrent_builds_share_one_result_and_stale_locks_do_not_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFORMER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FF_TEST_COUNTER", str(tmp_path / "count"))
    # a lock file left behind by a killed build: flock locks die with their process, so this must not block
    key = _build.build_key(_build.source_dir(), _build.find_nvcc())
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{key}.lock").write_text("")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_jit_worker, args=(q,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    paths = {q.get(timeout=5), q.get(timeout=5)}
    assert len(paths) == 1, paths
    assert (tmp_path / "count").read_text() == "x", "exactly one process should have built"
    assert open(paths.pop()).read() == "built"


def test_philox_reference_known_answers():
    from fastformer.ops.dropout import philox4x32, philox4x32_10, philox_uint32

    # Random123's Philox4x32-10 known-answer vector: zero counter and key give 0x6627e8d5 as the first word
    assert int(philox_uint32(0, torch.tensor([0]))[0]) == 0x6627E8D5
    # ... and all four words, which dropout uses (one call decides 4 elements)
    assert philox4x32(0, torch.tensor([0]))[0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # Random123's other two philox4x32 10 vectors (counter words, key words -> output words)
    ones = philox4x32_10(*[0xFFFFFFFF] * 6)
    assert [int(w) for w in ones] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = philox4x32_10(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(w) for w in pi] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    # counters above 2**32 and keys above 2**32 use both words; the result is always a uint32
    out = philox_uint32(2**62 + 12345, torch.tensor([0, 1, 2**32, 2**40 + 7]))
    assert out.min() >= 0 and out.max() < 2**32 and out.unique().numel() == 4


def test_dropout_element_uses_word_col_mod_4_of_its_group():
    from fastformer.ops.dropout import keep_mask, philox4x32, threshold24

    # element (row, col) of a row length n is word col % 4 of the counter row * ceil(n / 4) + col // 4
    seed, n, p = 2**40 + 3, 10, 0.5
    rows = torch.tensor([0, 1, 2**31 + 5])
    row, col = rows[:, None], torch.arange(n)[None, :]
    words = philox4x32(seed, row * 3 + col // 4)  # ceil(10 / 4) = 3 groups per row
    expect = words.gather(-1, (col % 4).expand(3, n)[..., None])[..., 0] >> 8 >= threshold24(p)
    assert torch.equal(keep_mask(seed, rows, n, p), expect)
    assert torch.equal(keep_mask(seed, rows, n, p, 7), expect[:, :7])


def test_import_registers_ops_without_importing_triton():
    import subprocess
    import sys

    code = (
        "import sys, torch, fastformer; "
        "[getattr(torch.ops.fastformer, n) for n in ('layer_norm_fwd', 'layer_norm_bwd', 'attention_fwd', "
        "'attention_bwd', 'linear_fwd', 'linear_bwd', 'ffn_fwd', 'ffn_bwd')]; "
        "assert 'triton' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cli_bad_arguments_and_environment_are_one_line_errors(monkeypatch, capsys):
    """``info --bogus`` and a bad FASTFORMER_BACKEND exit 2 with one line before running anything; --help is plain."""
    from fastformer import cli

    for argv, env, needle in ((["info", "--bogus"], None, "unrecognized arguments: --bogus"),
                              (["info"], "bogus", "FASTFORMER_BACKEND: unknown backend 'bogus'")):  # fmt: skip
        if env:
            monkeypatch.setenv("FASTFORMER_BACKEND", env)
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        out, err = capsys.readouterr()
        assert exit_info.value.code == 2 and needle in err and out == "" and "Traceback" not in err
    monkeypatch.delenv("FASTFORMER_BACKEND")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "``" not in out and "info, bench" in out
