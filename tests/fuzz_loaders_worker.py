"""Fuzz worker: mutate one kind of file npgpt reads and check that loading it fails cleanly.

Run by tests/test_fuzz_loaders.py as a subprocess:

    python tests/fuzz_loaders_worker.py TARGET PRISTINE_DIR MAX_EXAMPLES

PRISTINE_DIR holds valid folders made through the CLI (see the test module). For each example,
hypothesis mutates one file of a fresh copy (random bytes, truncation, byte flips, a JSON value
swapped for a hostile one: a 5,000-digit integer, 1e999, NaN, deep nesting, a string where a number
belongs, a path out of the folder, a huge size), then the command that reads it runs in-process via
click's CliRunner. Passing means: exit 0, or one `Error:` line with exit 1/2, and never "out of
memory", a traceback, or a hang (each example has an alarm).

The whole process runs under an address-space limit (RLIMIT_AS) of what the imports took plus
MEMORY_BOUND, so a loader that allocates what a file's numbers claim, before checking them against
the data present, fails with MemoryError here instead of swapping the machine.

Environment: FUZZ_RANDOM=1 explores fresh random examples (the default is derandomized, as CI wants);
FUZZ_TRACE=1 prints the address space and each example as it runs.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npgpt.cli.main import cli
from npgpt.errors import NpgptError

MEMORY_BOUND = 1 << 30            # bytes of address space beyond the imports
EXAMPLE_SECONDS = 30              # a hang (catastrophic regex, endless loop) fails the example

HOSTILE = ["1e999", "-1e999", "NaN", "Infinity", "1" * 5000, "-" + "9" * 30, "[" * 3000 + "]" * 3000,
           '"abc"', "true", "null", "[]", "{}", "-1", "0", "2147483648", "9007199254740993", "1.5",
           '"../../etc/hostname"', '"/etc/hostname"', "1e300", "1000000000", "4294967296", "65536",
           '"(a+)+$"', '"\\ud800"', '{"a": ' * 200 + "1" + "}" * 200]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"an example ran longer than {EXAMPLE_SECONDS} s")


# ------------------------------------------------------------------------------------ mutation

def _paths(obj, prefix=()):
    """Every path to a value inside a parsed JSON document (the root included)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            yield from _paths(v, prefix + (i,))


def _replace(obj, path, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


def _delete(obj, path):
    if not path:
        return obj
    obj = json.loads(json.dumps(obj))
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    del cur[path[-1]]
    return obj


SENTINEL = "\u0001RAW\u0001"


@st.composite
def mutated_json(draw, text: str) -> bytes:
    """A mutation of valid JSON text: structural (a value swapped or deleted) or at the byte level."""
    obj = json.loads(text)
    how = draw(st.sampled_from(["swap", "swap", "swap", "delete", "bytes", "truncate", "flip"]))
    raw = text.encode("utf-8")
    if how in ("swap", "delete"):
        paths = list(_paths(obj))
        path = paths[draw(st.integers(0, len(paths) - 1))]
        if how == "delete":
            return json.dumps(_delete(obj, path)).encode()
        value = draw(st.one_of(st.sampled_from(HOSTILE),
                               st.integers(-2**70, 2**70).map(str),
                               st.floats(allow_nan=False, allow_infinity=False).map(repr),
                               st.text(max_size=20).map(json.dumps)))
        doc = json.dumps(_replace(obj, path, SENTINEL), ensure_ascii=False)
        return doc.replace(json.dumps(SENTINEL, ensure_ascii=False), value).encode("utf-8", "surrogatepass")
    if how == "bytes":
        return draw(st.binary(max_size=300))
    if how == "truncate":
        return raw[:draw(st.integers(0, max(len(raw) - 1, 0)))]
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        if data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    return bytes(data)


@st.composite
def mutated_lines(draw, raw: bytes, line_value=None) -> bytes:
    """A mutation of a line-based file: a line replaced, duplicated, dropped, or bytes changed."""
    lines = raw.split(b"\n")
    how = draw(st.sampled_from(["replace", "replace", "duplicate", "drop", "truncate", "flip", "bytes"]))
    i = draw(st.integers(0, max(len(lines) - 1, 0)))
    if how == "replace":
        lines[i] = draw(line_value) if line_value is not None else draw(st.binary(max_size=60))
    elif how == "duplicate":
        lines.insert(i, lines[i])
    elif how == "drop":
        del lines[i]
    elif how == "truncate":
        return raw[:draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif how == "bytes":
        return draw(st.binary(max_size=300))
    else:
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            j = draw(st.integers(0, len(data) - 1))
            data[j] ^= draw(st.integers(1, 255))
        return bytes(data)
    return b"\n".join(lines)


def _tiktoken_line():
    token = st.binary(max_size=6).map(lambda b: base64.b64encode(b))
    rank = st.one_of(st.integers(-5, 2**64).map(str), st.sampled_from(HOSTILE)).map(str.encode)
    return st.tuples(token, rank).map(lambda tr: tr[0] + b" " + tr[1])


def _sft_line():
    return st.one_of(st.sampled_from(HOSTILE).map(str.encode),
                     st.fixed_dictionaries({"prompt": st.text(max_size=10),
                                            "completion": st.one_of(st.text(max_size=10), st.integers())})
                     .map(lambda d: json.dumps(d).encode()),
                     st.builds(lambda r, c: json.dumps({"messages": [{"role": r, "content": c}]}).encode(),
                               st.sampled_from(["user", "assistant", "system", "tool", 1]),
                               st.one_of(st.text(max_size=10), st.none())))


def mutated_safetensors(raw: bytes):
    """A mutation of a safetensors file: its JSON header (offsets, shapes, dtypes) or its bytes."""
    n = int.from_bytes(raw[:8], "little")
    header, body = raw[8:8 + n].decode("utf-8"), raw[8 + n:]

    @st.composite
    def build(draw):
        how = draw(st.sampled_from(["header", "header", "header", "length", "truncate", "flip"]))
        if how == "header":
            new = draw(mutated_json(header))
            return len(new).to_bytes(8, "little") + new + body
        if how == "length":
            return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + raw[8:]
        if how == "truncate":
            return raw[:draw(st.integers(0, len(raw) - 1))]
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            j = draw(st.integers(0, min(len(data), 8 + n) - 1))
            data[j] ^= draw(st.integers(1, 255))
        return bytes(data)
    return build()


# ------------------------------------------------------------------------------------- targets

def _run(args, input=None):
    """Run `npgpt ARGS` in-process (`input` on stdin); AssertionError unless it ends cleanly."""
    result = CliRunner().invoke(cli, args, catch_exceptions=True, input=input)
    exc = result.exception
    out = result.output
    if exc is not None and not isinstance(exc, SystemExit):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        raise AssertionError(f"npgpt {' '.join(args)} raised {type(exc).__name__}:\n{tb}")
    if result.exit_code not in (0, 1, 2):
        raise AssertionError(f"npgpt {' '.join(args)} exited {result.exit_code}:\n{out}")
    if result.exit_code == 1 and "Error:" not in out:
        raise AssertionError(f"npgpt {' '.join(args)} failed without an Error: line:\n{out}")
    if "out of memory" in out:
        raise AssertionError(f"npgpt {' '.join(args)} ran out of memory (a number read from a file was "
                             f"allocated before it was checked):\n{out}")
    return result


def _sample(folder):
    _run(["sample", "--checkpoint", str(folder), "--prompt", "ab", "--max-new-tokens", "2", "--seed", "0",
          "--no-stream"])


def _fresh(pristine: Path, name: str) -> Path:
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    shutil.copytree(pristine / name, work / name)
    return work / name


def target_config(pristine):
    run = pristine / "run" / "ckpt"
    text = (run / "config.json").read_text()

    def case(data):
        folder = _fresh(pristine / "run", "ckpt")
        (folder / "config.json").write_bytes(data)
        (folder / "manifest.json").unlink()
        _run(["info", str(folder)])
        _sample(folder)
    return mutated_json(text), case


def target_safetensors(pristine):
    raw = (pristine / "run" / "ckpt" / "model.safetensors").read_bytes()

    def case(data):
        folder = _fresh(pristine / "run", "ckpt")
        (folder / "model.safetensors").write_bytes(data)
        (folder / "manifest.json").unlink()
        _sample(folder)
    return mutated_safetensors(raw), case


def target_state(pristine):
    text = (pristine / "run" / "ckpt" / "state.json").read_text()

    def case(data):
        run = _fresh(pristine, "run")
        (run / "ckpt" / "state.json").write_bytes(data)
        (run / "ckpt" / "manifest.json").unlink()
        _run(["info", str(run)])
        # the work-sizing settings (batch size, accumulation, eval length) are the user's to give: a
        # state.json asking for 2**31 sequences per batch would only ever get the one-line out-of-memory
        # error; they are still read and type-checked, then overridden here to keep each example short
        _run(["train", "--resume", "--out", str(run), "--max-iters", "3", "--quiet", "--batch-size", "2",
              "--set", "gradient_accumulation_steps=1", "--set", "eval_iters=1", "--set", "log_interval=1"])
    return mutated_json(text), case


def target_manifest(pristine):
    text = (pristine / "run" / "ckpt" / "manifest.json").read_text()

    def case(data):
        run = _fresh(pristine, "run")
        (run / "ckpt" / "manifest.json").write_bytes(data)
        _run(["info", str(run)])
        _sample(run)
    return mutated_json(text), case


def target_bpe_files(pristine):
    vocab = (pristine / "bpe" / "vocab.json").read_text(encoding="utf-8")
    merges = (pristine / "bpe" / "merges.txt").read_bytes()
    strategy = st.one_of(mutated_json(vocab).map(lambda b: ("vocab.json", b)),
                         mutated_lines(merges).map(lambda b: ("merges.txt", b)))

    def case(which):
        name, data = which
        folder = _fresh(pristine, "bpe")
        (folder / name).write_bytes(data)
        (folder / "tokenizer_npgpt.json").unlink()          # a GPT-2 / HF folder: vocab + merges only
        out = folder.parent / "prepared"
        _run(["prepare", "--input", str(pristine / "corpus.txt"), "--tokenizer-from", str(folder),
              "--out", str(out)])
    return strategy, case


def target_tokenizer_meta(pristine):
    text = (pristine / "run" / "ckpt" / "tokenizer_npgpt.json").read_text(encoding="utf-8")

    def case(data):
        folder = _fresh(pristine / "run", "ckpt")
        (folder / "tokenizer_npgpt.json").write_bytes(data)
        (folder / "manifest.json").unlink()
        _sample(folder)
    return mutated_json(text), case


def target_tiktoken(pristine):
    from npgpt.tokenizer import BPETokenizer

    raw = (pristine / "ranks.tiktoken").read_bytes()

    def case(data):
        work = Path(tempfile.mkdtemp(prefix="fuzz-"))
        (work / "ranks.tiktoken").write_bytes(data)
        try:
            tok = BPETokenizer.from_tiktoken_file(work / "ranks.tiktoken", pattern="gpt2",
                                                  special_tokens={"<|endoftext|>": 100000})
            tok.decode(tok.encode("the quick brown fox"))
        except NpgptError:
            pass
    return mutated_lines(raw, _tiktoken_line()), case


def target_sft(pristine):
    raw = (pristine / "sft.jsonl").read_bytes()
    first = raw.split(b"\n")[0].decode()
    strategy = st.one_of(mutated_lines(raw, _sft_line()),
                         mutated_json(first).map(lambda b: b + b"\n" + raw))

    def case(data):
        work = Path(tempfile.mkdtemp(prefix="fuzz-"))
        (work / "sft.jsonl").write_bytes(data)
        _run(["finetune", "--init-from", str(pristine / "run"), "--sft", str(work / "sft.jsonl"),
              "--out", str(work / "out"), "--max-iters", "1", "--batch-size", "2", "--quiet",
              "--set", "eval_iters=1", "--set", "eval_interval=1"])
    return strategy, case


def target_meta(pristine):
    text = (pristine / "data" / "meta.json").read_text(encoding="utf-8")

    def case(data):
        folder = _fresh(pristine, "data")
        (folder / "meta.json").write_bytes(data)
        _run(["eval", "--checkpoint", str(pristine / "run"), "--data", str(folder)])
    return mutated_json(text), case


def mutated_gguf(raw: bytes):
    """A mutation of a GGUF file: a length, count, dimension or offset field overwritten with a hostile
    number, header bytes flipped, or the file cut short."""
    header_end = min(len(raw), 4096)

    @st.composite
    def build(draw):
        how = draw(st.sampled_from(["u64", "u64", "u32", "flip", "truncate"]))
        data = bytearray(raw)
        if how in ("u64", "u32"):
            n = 8 if how == "u64" else 4
            j = draw(st.integers(4, header_end - n))
            value = draw(st.one_of(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]),
                                   st.integers(0, 2**(8 * n) - 1)))
            data[j:j + n] = value.to_bytes(n, "little")
            return bytes(data)
        if how == "truncate":
            return raw[:draw(st.integers(0, len(raw) - 1))]
        for _ in range(draw(st.integers(1, 4))):
            j = draw(st.integers(0, header_end - 1))
            data[j] ^= draw(st.integers(1, 255))
        return bytes(data)
    return build()


def target_gguf(pristine):
    from npgpt.gguf_models import export_gguf
    from npgpt.model import GPT, GPTConfig
    from npgpt.tokenizer import load

    tok = load(pristine / "bpe")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    raw = export_gguf(model, tok, work / "m.gguf", "q8_0").read_bytes()

    def case(data):
        path = Path(tempfile.mkdtemp(prefix="fuzz-")) / "m.gguf"
        path.write_bytes(data)
        _run(["sample", "--checkpoint", str(path), "--prompt", "the", "--max-new-tokens", "2", "--seed", "0",
              "--no-stream"])
    return mutated_gguf(raw), case


def _chat(folder):
    _run(["chat", "--checkpoint", str(folder), "--max-new-tokens", "2", "--seed", "0"], input="the fox\n/quit\n")


def target_tokenizer_json(pristine):
    text = (pristine / "hf" / "tokenizer.json").read_text(encoding="utf-8")

    def case(data):
        folder = _fresh(pristine, "hf")
        (folder / "tokenizer.json").write_bytes(data)
        _chat(folder)
    return mutated_json(text), case


# Pieces of Jinja, joined at random: loops, ranges, repetition, concatenation, filters, recursion.
JINJA_PIECES = ["{% for m in messages %}", "{% endfor %}", "{% for i in range(", "100000", "10**9", ") %}",
                "{{ ", " }}", "{% if ", " %}", "{% endif %}", "'x'", " * ", " ~ ", " + ", "|join", "|center(",
                "|replace('', ", "m.content", "messages[0]", ".role", "{% set ns = namespace(s='ab') %}",
                "{% set ns.s = ns.s ~ ns.s %}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}", "f(1)",
                "raise_exception('no')", "bos_token", "{% generation %}", "{% endgeneration %}", "(", ")", ",",
                "loop.index", "{% break %}", "tojson", "lipsum(", "'%09999999d' % 1", "messages.__class__",
                "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}", "add_generation_prompt"]


def target_chat_template(pristine):
    text = (pristine / "hf" / "tokenizer_config.json").read_text(encoding="utf-8")
    soup = st.lists(st.sampled_from(JINJA_PIECES), max_size=14).map("".join)
    strategy = st.one_of(mutated_json(text),
                         soup.map(lambda t: json.dumps(dict(json.loads(text), chat_template=t)).encode()))

    def case(data):
        folder = _fresh(pristine, "hf")
        (folder / "tokenizer_config.json").write_bytes(data)
        _chat(folder)
    return strategy, case


# Rank patterns and targets a stranger's adapter_config.json may hold: regular-expression bombs, inline flags.
ADAPTER_VALUES = ['{"(a+)+$": 2}', '{"c_(?i)attn": 2}', '{"c_attn": 4.5}', '{"c_attn": 0}', '{"[": 2}',
                  '"(.*)*c_attn"', '"(c|c_)*attn"', '["q_proj"]', '[""]', '"x(?i)"', '4.5', '0', '-1', "1e999"]


def target_adapter(pristine):
    """A LoRA adapter folder (adapter_config.json, adapter_model.safetensors) applied with --adapter."""
    from npgpt.loading import from_pretrained
    from npgpt.lora import LoRAConfig, apply_lora, lora_layers, save_adapter
    model = from_pretrained(pristine / "run")
    apply_lora(model, LoRAConfig(r=2, alpha=4))
    for _, lin in lora_layers(model):
        lin.lora_B.data[...] = 0.01
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    save_adapter(model, work / "ad", base_model=str(pristine / "run" / "ckpt"))
    config = (work / "ad" / "adapter_config.json").read_text()
    weights = (work / "ad" / "adapter_model.safetensors").read_bytes()
    keys = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "lora_dropout"]
    swapped = st.tuples(st.sampled_from(keys), st.sampled_from(ADAPTER_VALUES)).map(
        lambda kv: json.dumps({**json.loads(config), kv[0]: "@@"}).replace('"@@"', kv[1]).encode())
    strategy = st.one_of(st.tuples(st.just("adapter_config.json"), st.one_of(mutated_json(config), swapped)),
                         st.tuples(st.just("adapter_model.safetensors"), mutated_safetensors(weights)))

    def case(change):
        name, data = change
        folder = Path(tempfile.mkdtemp(prefix="fuzz-")) / "ad"
        shutil.copytree(work / "ad", folder)
        (folder / name).write_bytes(data)
        _run(["sample", "--checkpoint", str(pristine / "run"), "--adapter", str(folder), "--prompt", "ab",
              "--max-new-tokens", "2", "--seed", "0", "--no-stream"])
    return strategy, case


# A Hugging Face cache folder (hf:ORG/NAME): huggingface_hub's layout, refs/<branch> -> snapshots/<commit>/ of
# links into blobs/. A stranger's cache (a tarball, a shared disk) may hold anything in those places.
HUB_REPO = "npgpt-fuzz/tiny-chat"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_LINKS = ["/dev/zero", "/dev/null", "/etc/hostname", "/", "loop", "dir", "broken", "fifo", "../..", "blobs"]


def _hub_cache(root: Path, folder: Path) -> Path:
    import hashlib
    repo = root / ("models--" + HUB_REPO.replace("/", "--"))
    snap = repo / "snapshots" / HUB_COMMIT
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return repo


def target_hub(pristine):
    """A Hub cache folder read offline: refs/main's text, a snapshot entry swapped for a device, a FIFO, a
    folder, a loop or a link out of the cache, or a blob's JSON mutated."""
    import huggingface_hub.constants as hub_constants
    files = sorted(p.name for p in (pristine / "hf").iterdir())
    json_files = [f for f in files if f.endswith(".json")]
    texts = {f: (pristine / "hf" / f).read_text(encoding="utf-8") for f in json_files}
    refs = st.tuples(st.just("refs"), st.one_of(st.sampled_from(HOSTILE), st.text(max_size=60),
                                                 st.just(HUB_COMMIT + "\n"), st.just("../" * 8 + "etc")))
    links = st.tuples(st.just("link"), st.tuples(st.sampled_from(files), st.sampled_from(HUB_LINKS)))
    blobs = st.sampled_from(json_files).flatmap(lambda f: st.tuples(st.just("blob"),
                                                                    st.tuples(st.just(f), mutated_json(texts[f]))))

    def case(change):
        kind, what = change
        root = Path(tempfile.mkdtemp(prefix="fuzz-hub-"))
        repo = _hub_cache(root, pristine / "hf")
        snap = repo / "snapshots" / HUB_COMMIT
        if kind == "refs":
            (repo / "refs" / "main").write_bytes(what.encode("utf-8", "surrogatepass"))
        elif kind == "link":
            name, target = what
            (snap / name).unlink()
            if target == "loop":
                (snap / name).symlink_to(name)
            elif target == "dir":
                (snap / name).mkdir()
            elif target == "broken":
                (snap / name).symlink_to("no-such-blob")
            elif target == "fifo":
                os.mkfifo(snap / name)
            else:
                (snap / name).symlink_to(target)
        else:
            name, data = what
            (snap / name).resolve().write_bytes(data)
        hub_constants.HF_HUB_CACHE = str(root)
        os.environ["HF_HUB_OFFLINE"] = "1"
        hub_constants.HF_HUB_OFFLINE = True
        _chat(f"hf:{HUB_REPO}")
    return st.one_of(refs, links, blobs), case


def target_llama_config(pristine):
    """config.json of a Llama folder (LlamaForCausalLM, grouped-query attention)."""
    text = (pristine / "llama" / "ckpt" / "config.json").read_text()

    def case(data):
        folder = _fresh(pristine / "llama", "ckpt")
        (folder / "config.json").write_bytes(data)
        (folder / "manifest.json").unlink()
        _run(["info", str(folder)])
        _sample(folder)
    return mutated_json(text), case


def _sharded_llama(pristine) -> Path:
    """The Llama folder with its weights split over two shards and model.safetensors.index.json."""
    from safetensors.numpy import load_file, save_file
    folder = _fresh(pristine / "llama", "ckpt")
    (folder / "manifest.json").unlink()
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate((sorted(tensors)[::2], sorted(tensors)[1::2])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def target_llama_index(pristine):
    """model.safetensors.index.json of a sharded Llama folder (shard names, the weight map)."""
    text = (_sharded_llama(pristine) / "model.safetensors.index.json").read_text()

    def case(data):
        folder = _sharded_llama(pristine)
        (folder / "model.safetensors.index.json").write_bytes(data)
        _sample(folder)
    return mutated_json(text), case


TARGETS = {"gguf": target_gguf, "llama_config": target_llama_config, "llama_index": target_llama_index, "config": target_config, "safetensors": target_safetensors, "state": target_state,
           "manifest": target_manifest, "bpe_files": target_bpe_files, "tokenizer_meta": target_tokenizer_meta,
           "tiktoken": target_tiktoken, "sft": target_sft, "meta": target_meta,
           "tokenizer_json": target_tokenizer_json, "chat_template": target_chat_template, "hub": target_hub,
           "adapter": target_adapter}


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    target, pristine, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    strategy, case = TARGETS[target](pristine)
    import npgpt.evaluate, npgpt.generate, npgpt.sft, npgpt.train  # noqa: E401,F401  (imports before the limit)
    CliRunner().invoke(cli, ["--help"])
    limit = _address_space() + MEMORY_BOUND
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _alarm)

    @settings(max_examples=n, deadline=None, derandomize=not os.environ.get("FUZZ_RANDOM"), database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(data):
        signal.alarm(EXAMPLE_SECONDS)
        if os.environ.get("FUZZ_TRACE"):
            print("AS MB", _address_space() >> 20, repr(data)[:100], file=sys.stderr, flush=True)
        try:
            case(data)
        finally:
            signal.alarm(0)

    run()
    print(f"{target}: {n} examples passed")


if __name__ == "__main__":
    np.seterr(all="ignore")
    os.environ.setdefault("NPGPT_DEVICE", "cpu")
    main()
