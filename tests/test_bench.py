"""`npgpt bench` (output shape and errors, never timings) and the fast paths added for speed, each
checked against its reference path: row-block kernels split across threads, the one-hot
embedding backward and its scatter fallback, the engine's profiling hook."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from npgpt import Tensor
from npgpt.cli.main import cli
from npgpt.ops import nn as N
from npgpt.ops import parallel

TINY = ["--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2", "--batch-size", "2",
        "--block-size", "8", "--iters", "2", "--warmup", "1"]


def run(*args):
    return CliRunner().invoke(cli, ["bench", *args])


# ---- the command -------------------------------------------------------------------------------
def test_json_has_the_figures():
    r = run("--json", *TINY)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    for key in ("ms_per_iter", "ms_median", "ms_min", "ms_max", "tokens_per_s", "gflops",
                "gemm_peak_gflops", "mfu", "flops_per_token"):
        assert isinstance(out[key], float | int) and out[key] > 0, key
    assert out["ms_min"] <= out["ms_median"] <= out["ms_max"]
    assert out["n_layer"] == 1 and out["block_size"] == 8 and out["dropout"] == 0.0


def test_default_json_runs_baby():
    r = run("--iters", "2", "--warmup", "1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert (out["preset"], out["batch_size"], out["vocab_size"]) == ("baby", 12, 65)


def test_bench_with_replicas_closes_their_threads():
    """bench_train (and `with TrainStep(...)`) shut the replicas' thread pool down when done."""
    import threading

    from npgpt.bench import TrainStep, bench_train

    def replica_threads():
        return [t.name for t in threading.enumerate() if t.name.startswith("npgpt-replica")]

    assert not replica_threads()
    out = bench_train(overrides={"n_layer": 1, "n_embd": 16, "n_head": 2}, batch_size=4, block_size=8, iters=1,
                      warmup=1, peak_gflops=1.0, replicas=2)
    assert out["replicas"] == 2 and out["final_loss"] > 0
    assert not replica_threads()
    with TrainStep(overrides={"n_layer": 1, "n_embd": 16, "n_head": 2}, batch_size=4, block_size=8,
                   replicas=2) as step:
        step(0)
        assert replica_threads()
    assert not replica_threads() and step.replicas._pool is None
    step.close()                                                   # twice is fine


def test_profile_lists_op_kinds():
    r = run("--profile", *TINY)
    assert r.exit_code == 0, r.output
    for kind in ("matmul", "attention", "layernorm", "gelu", "cross-entropy", "embedding", "optimizer",
                 "other/Python"):
        assert kind in r.output
    assert "MFU" in r.output and "6*N_non_embedding" in r.output


def test_generate_reports_both_speeds():
    r = run("--generate", "--json", "--gemv-mb", "1", *TINY)
    assert r.exit_code == 0, r.output
    g = json.loads(r.output)["generate"]
    assert g["tokens_per_s_cache"] > 0 and g["tokens_per_s_no_cache"] > 0


@pytest.mark.parametrize("args, words", [
    (["--iters", "0"], "--iters"),
    (["--warmup", "-1"], "--warmup"),
    (["--batch-size", "0"], "--batch-size"),
    (["--preset", "nope"], "unknown preset"),
    (["--set", "n_layers=2"], "unknown model setting"),
    (["--set", "n_layer"], "key=value"),
    (["--set", "n_layer=two"], "n_layer"),
    (["--device", "tpu"], "unknown device"),
])
def test_bad_input_is_a_clean_error(args, words):
    r = run(*args)
    assert r.exit_code != 0
    assert "Error:" in r.output and words in r.output
    assert "Traceback" not in r.output


# ---- fast paths against their references ------------------------------------------------------
@pytest.fixture
def split_everything(monkeypatch):
    """Force the row-block path even on tiny arrays: many blocks, over two threads."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMS", 1)
    monkeypatch.setattr(parallel, "BLOCK_ELEMS", 8)
    monkeypatch.setenv("NPGPT_THREADS", "2")


def same(fused, ref, *arrays, seed=0):
    """Forward values and every gradient of fused == reference, for one random upstream gradient."""
    results = []
    for fn in (fused, ref):
        ts = [Tensor(a.copy(), requires_grad=a.dtype.kind == "f") for a in arrays]
        y = fn(*ts)
        y.backward(np.random.default_rng(seed).standard_normal(y.shape))
        results.append((y.data, [t.grad for t in ts if t.requires_grad]))
    (y0, g0), (y1, g1) = results
    np.testing.assert_allclose(y0, y1, rtol=1e-10, atol=1e-12)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def rnd(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape) * 2.0


def test_split_rows_cover_everything_once(split_everything):
    seen = np.zeros(37, dtype=int)

    def kernel(r):
        seen[r] += 1
        return r.start

    starts = parallel.for_row_blocks(37, 3, kernel)
    assert (seen == 1).all() and starts == sorted(starts)


def test_split_everything_really_uses_two_threads(split_everything):
    # The fixture lowers MIN_PARALLEL_ELEMS; for_row_blocks must read it at call time, or every
    # row-block test here would run on one thread and never exercise the sharing of blocks.
    import threading
    idents = set()
    parallel.for_row_blocks(37, 3, lambda r: idents.add(threading.get_ident()))
    assert len(idents) == 2


def test_layer_norm_row_blocks(split_everything):
    same(N.layer_norm, N.layer_norm_reference, rnd(0, 3, 7, 5), rnd(1, 5), rnd(2, 5))


def test_gelu_row_blocks(split_everything):
    same(N.gelu, N.gelu_reference, rnd(3, 3, 7, 5))


def test_attention_row_blocks(split_everything):
    qkv = rnd(4, 3, 6, 3 * 8)
    same(lambda t: N.causal_self_attention(t, 2), lambda t: N.causal_self_attention_reference(t, 2), qkv)


@pytest.mark.parametrize("one_hot_max", [N.Embedding.ONE_HOT_MAX, 0])   # one-hot matmul, then add.at
def test_embedding_backward_paths(monkeypatch, one_hot_max):
    monkeypatch.setattr(N.Embedding, "ONE_HOT_MAX", one_hot_max)
    ids = np.array([[1, 1, 4, 0], [4, 4, 4, 2]])                 # repeated ids must add up
    same(lambda w: N.embedding(w, ids), lambda w: N.embedding_reference(w, ids), rnd(5, 6, 3))


def test_profiling_hook_sees_every_op_and_is_removed():
    from npgpt.tensor import profiling

    class Recorder:
        def __init__(self):
            self.calls = []

        def clock(self):
            return 0.0

        def record(self, fn, phase, seconds):
            self.calls.append((type(fn).__name__, phase))

    rec = Recorder()
    x = Tensor(rnd(6, 4, 5), requires_grad=True)
    with profiling(rec):
        N.gelu(x).sum().backward()
    assert ("GELU", "forward") in rec.calls and ("GELU", "backward") in rec.calls
    n = len(rec.calls)
    N.gelu(x).sum().backward()                                   # hook off again: nothing recorded
    assert len(rec.calls) == n


def test_generate_sweeps_the_batch():
    r = run("--generate", "--json", "--batches", "1,4", "--new-tokens", "3", "--prompt-len", "4", "--gemv-mb", "1",
            *TINY)
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)["decode"]
    assert [row["batch"] for row in d["rows"]] == [1, 4]
    for row in d["rows"]:
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["bandwidth_use"] > 0
    assert d["gemv_gbs"] > 0 and d["prefill_tokens_per_s"] > 0 and d["new_tokens"] == 3
    assert d["limit_tokens_per_s"] == pytest.approx(d["gemv_gbs"] * 1e9 / (d["weight_mb"] * 1e6))


def test_decode_of_a_model_folder_and_its_errors(tmp_path):
    from npgpt import GPT, GPTConfig
    from npgpt.tokenizer import CharTokenizer
    GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path)
    CharTokenizer.train("abcdefghij klmnopqrstuvwxyz.,\n").save(tmp_path)
    r = run("--checkpoint", str(tmp_path), "--batches", "1,2", "--new-tokens", "2", "--prompt-len", "3",
            "--gemv-mb", "1")
    assert r.exit_code == 0, r.output
    assert "bandwidth use" in r.output and "GEMV bandwidth" in r.output and len(r.output.splitlines()) == 4
    for args, word in ((["--batches", "1,x"], "--batches"), (["--batches", "0"], "--batches"),
                       (["--new-tokens", "0"], "--new-tokens"), (["--gemv-mb", "0"], "--gemv-mb"),
                       (["--new-tokens", "40"], "context")):
        r = run("--checkpoint", str(tmp_path), *args)
        assert r.exit_code != 0 and word in r.output and "Traceback" not in r.output, r.output


def test_decode_weight_bytes_counts_what_a_step_reads():
    from npgpt import GPT, GPTConfig
    from npgpt.bench import decode_weight_bytes
    from npgpt.llama import Llama, LlamaConfig
    gpt = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16))
    params = sum(p.data.nbytes for p in gpt.parameters())
    # tied head counted once; the position table not at all; small buffers (RoPE's frequencies) may add a little
    assert params - gpt.transformer.wpe.weight.data.nbytes <= decode_weight_bytes(gpt) <= params
    untied = Llama(LlamaConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, n_inner=32))
    params = sum(p.data.nbytes for p in untied.parameters())
    assert untied.lm_head is not None
    expect = params - untied.input_embedding.data.nbytes
    assert expect <= decode_weight_bytes(untied) <= expect * 1.01


def _fake_llama_batched_bench(folder, body):
    """An executable named llama-batched-bench in `folder` that runs `body` (Python) with argv."""
    import stat
    import sys
    prog = folder / "llama-batched-bench"
    prog.write_text(f"#!{sys.executable}\nimport json, sys\nargs = sys.argv[1:]\n{body}\n")
    prog.chmod(prog.stat().st_mode | stat.S_IXUSR)
    return prog


def test_decode_of_a_gguf_beside_llama_cpp(tmp_path):
    """With a .gguf checkpoint and llama.cpp's llama-batched-bench, `npgpt bench` runs the same sweep
    there: one run per batch size with that batch's -npl, the file's path, -npp/-ntg as given; its
    step time follows from its tokens/s; a program that fails or prints nothing is one clean error."""
    from npgpt import GPT, GPTConfig
    from npgpt.gguf_models import export_gguf
    from npgpt.tokenizer import BPETokenizer
    gguf = tmp_path / "m.gguf"
    tok = BPETokenizer.train("the quick brown fox jumps over the lazy dog " * 20, 270)
    export_gguf(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)), tok, gguf)
    log = tmp_path / "calls.jsonl"
    prog = _fake_llama_batched_bench(tmp_path, f"""
open({str(log)!r}, "a").write(json.dumps(args) + "\\n")
a = dict(zip(args[::2], args[1::2]))
B = int(a["-npl"])
print("some log line")
print(json.dumps({{"pl": B, "pp": int(a["-npp"]), "tg": int(a["-ntg"]), "speed_pp": 500.0 * B, "speed_tg": 40.0 * B}}))""")
    r = run("--checkpoint", str(gguf), "--batches", "1,4", "--new-tokens", "2", "--prompt-len", "3", "--gemv-mb", "1",
            "--llama-cpp", str(tmp_path), "--json")
    assert r.exit_code == 0, r.output
    lc = json.loads(r.output)["decode"]["llama_cpp"]
    calls = [dict(zip(c[::2], c[1::2])) for c in map(json.loads, log.read_text().splitlines())]
    assert [c["-npl"] for c in calls] == ["1", "4"] and all(c["-m"] == str(gguf) for c in calls)
    assert all((c["-npp"], c["-ntg"]) == ("3", "2") for c in calls)
    assert [(row["batch"], row["tokens_per_s"]) for row in lc["rows"]] == [(1, 40.0), (4, 160.0)]
    assert lc["rows"][1]["step_ms"] == pytest.approx(1e3 * 4 / 160.0) and lc["prefill_tokens_per_s"] == 500.0
    r = run("--checkpoint", str(gguf), "--batches", "1", "--new-tokens", "2", "--prompt-len", "3", "--gemv-mb", "1",
            "--llama-cpp", str(prog))
    assert r.exit_code == 0 and "npgpt / llama.cpp" in r.output and "llama.cpp (" in r.output, r.output
    _fake_llama_batched_bench(tmp_path, "print('error: unable to load model', file=sys.stderr); sys.exit(1)")
    for where, word in ((str(tmp_path), "unable to load model"), (str(tmp_path / "nope"), "--llama-cpp")):
        r = run("--checkpoint", str(gguf), "--batches", "1", "--new-tokens", "2", "--prompt-len", "3",
                "--gemv-mb", "1", "--llama-cpp", where)
        assert r.exit_code != 0 and word in r.output and "Traceback" not in r.output, r.output
    r = run("--llama-cpp", str(prog), *TINY)             # llama.cpp compares GGUF files only
    assert r.exit_code != 0 and "--llama-cpp" in r.output and "Traceback" not in r.output, r.output


def _grads(fn, arrays, seed=0):
    ts = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    y = fn(*ts)
    y.backward(np.random.default_rng(seed).standard_normal(y.shape).astype(y.data.dtype))
    return [y.data] + [t.grad for t in ts]


@pytest.mark.parametrize("op", ["rms_norm", "rope", "rope_per_row", "swiglu", "gqa"])
def test_llama_ops_row_blocks_change_no_bit(monkeypatch, op):
    """The Llama ops' row blocks (RMSNorm, RoPE, SwiGLU threaded; GQA one block after another) give
    exactly the float32 values and gradients of one whole-array pass, at 1 and 2 threads."""
    from npgpt.ops import llama as L
    rng = np.random.default_rng(7)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    pos = np.arange(5)
    cos, sin = L.rope_tables(pos, L.rope_inv_freq(8))
    cases = {"rms_norm": (lambda x, w: L.rms_norm(x, w), [f32(3, 5, 8), f32(8)]),
             "rope": (lambda x: L.rope(x, cos, sin), [f32(3, 5, 4, 8)]),
             "rope_per_row": (lambda x: L.rope(x, *(np.stack([t] * 3) for t in (cos, sin))), [f32(3, 5, 4, 8)]),
             "swiglu": (L.swiglu, [f32(3, 5, 8), f32(3, 5, 8)]),
             "gqa": (L.gqa_attention, [f32(3, 5, 4, 8), f32(3, 5, 2, 8), f32(3, 5, 2, 8)])}
    fn, arrays = cases[op]
    whole = _grads(fn, arrays)                              # tiny arrays: one block, the calling thread
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMS", 1)
    monkeypatch.setattr(parallel, "BLOCK_ELEMS", 8)
    for threads in ("1", "2"):
        monkeypatch.setenv("NPGPT_THREADS", threads)
        for a, b in zip(whole, _grads(fn, arrays)):
            np.testing.assert_array_equal(a, b)
