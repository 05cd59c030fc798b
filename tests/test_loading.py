"""npgpt.loading, the one loader: every kind of model path dispatches through one table (FORMATS) to
its reader, `npgpt.from_pretrained` / `npgpt.load_run` are the front door, and a new family or file
format is one more entry."""

import subprocess
import sys

import numpy as np
import pytest

import npgpt
from npgpt import GPT, GPTConfig
from npgpt.checkpoint import write_manifest
from npgpt.errors import NpgptError
from npgpt.fileio import atomic_write_json
from npgpt.layers import LoRALinear, QuantizedLinear
from npgpt.llama import Llama, LlamaConfig
from npgpt.loading import FORMATS, Format, architecture, from_pretrained, load_run, register_format, resolve
from npgpt.lora import LoRAConfig, apply_lora, save_adapter
from npgpt.quant import save_quantized
from npgpt.tokenizer import CharTokenizer

from helpers import corpus

TINY = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)
IDS = np.array([[1, 2, 3, 4, 5]])


@pytest.fixture
def folder(tmp_path):
    """A GPT-2 model folder with its tokenizer (what `npgpt train` leaves in OUT/ckpt, minus the state)."""
    tok = CharTokenizer.train(corpus(200))
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16), seed=3)
    m.save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    return tmp_path / "m"


def logits(model):
    return model(IDS)[0].data


def test_the_front_door_is_the_loader_and_import_npgpt_stays_light():
    assert npgpt.from_pretrained is from_pretrained and npgpt.load_run is load_run
    code = "import sys, npgpt; print(any(m in sys.modules for m in ('npgpt.loading', 'npgpt.tokenizer', 'npgpt.lora')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    with pytest.raises(AttributeError):
        npgpt.no_such_thing


def test_a_gpt2_folder_loads_in_eval_mode_with_overrides(folder):
    m = from_pretrained(folder, dropout=0.25)
    assert isinstance(m, GPT) and not m.training and m.config.dropout == 0.25
    assert resolve(folder)[2].name == "gpt2"
    np.testing.assert_array_equal(logits(m), logits(GPT.from_pretrained(folder)))


def test_load_run_brings_the_tokenizer_and_the_state(folder, tmp_path):
    run = load_run(folder)
    assert run.folder == folder and run.state is None and run.tokenizer.vocab_size == run.model.config.vocab_size
    atomic_write_json(folder / "state.json", {"iter": 7, "best_val_loss": 1.5, "config": {"max_iters": 9}})
    state = load_run(folder).state
    assert state["iter"] == 7 and state["best_val_loss"] == 1.5 and state["config"] == {"max_iters": 9}
    atomic_write_json(folder / "state.json", {"iter": -1, "config": {}})
    with pytest.raises(NpgptError, match="iter"):
        load_run(folder)


def test_a_run_folder_means_its_ckpt_and_the_manifest_is_checked(folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    folder.rename(run / "ckpt")
    write_manifest(run / "ckpt")
    assert load_run(run).folder == run / "ckpt"
    with open(run / "ckpt" / "model.safetensors", "r+b") as f:        # one byte changed after the save
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(NpgptError, match="modified since it was saved"):
        from_pretrained(run)


def test_quantised_folders_load_with_quantised_layers(tmp_path):
    m = GPT(TINY, seed=1)
    save_quantized(m, tmp_path / "q", bits=8)
    q = from_pretrained(tmp_path / "q")
    assert isinstance(q.transformer.h[0].attn.c_attn, QuantizedLinear)
    assert q.quantization == {"bits": 8, "group_size": None, "embedding": False}
    np.testing.assert_allclose(logits(q), logits(m.eval()), atol=0.05)


def test_a_lora_run_folder_loads_its_base_and_adapter(tmp_path):
    base = GPT(TINY, seed=1)
    base.save_pretrained(tmp_path / "base")
    tuned = GPT.from_pretrained(tmp_path / "base")
    apply_lora(tuned, LoRAConfig(r=2, alpha=4.0))
    for _, lin in [(n, m) for n, m in tuned.named_modules() if isinstance(m, LoRALinear)]:
        lin.lora_B.data[...] = 0.1                                       # a non-zero update
    save_adapter(tuned, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    loaded = from_pretrained(tmp_path / "adapter")
    assert loaded.lora_base == str(tmp_path / "base") and loaded.lora.r == 2
    np.testing.assert_allclose(logits(loaded), logits(tuned.eval()), atol=1e-5)
    # adapter= applies the same adapter on the base
    np.testing.assert_allclose(logits(from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")),
                               logits(loaded), atol=1e-6)


def test_a_llama_folder_dispatches_on_its_architecture(tmp_path):
    cfg = LlamaConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, n_inner=32)
    m = Llama(cfg, seed=0)
    m.save_pretrained(tmp_path / "l")
    got = from_pretrained(tmp_path / "l")
    assert isinstance(got, Llama) and resolve(tmp_path / "l")[2].name == "llama"
    np.testing.assert_array_equal(logits(got), logits(m.eval()))


def test_an_unknown_architecture_is_one_clear_error(folder):
    hf = {**npgpt.loading.read_hf_config(folder), "architectures": ["BertForMaskedLM"]}
    atomic_write_json(folder / "config.json", hf)
    with pytest.raises(NpgptError, match=r"architecture 'BertForMaskedLM' is not a model npgpt loads; it loads .*GPT-2"):
        from_pretrained(folder)
    atomic_write_json(folder / "config.json", {**hf, "architectures": "GPT2LMHeadModel"})
    with pytest.raises(NpgptError, match="'architectures' must be a list"):
        from_pretrained(folder)
    assert architecture({"architectures": ["GPT2LMHeadModel", "x"]}) == "GPT2LMHeadModel"
    assert architecture({}) is None


def test_a_missing_path_names_it(tmp_path):
    with pytest.raises(NpgptError, match="does not exist"):
        from_pretrained(tmp_path / "nope")


def test_a_new_format_is_one_table_entry(tmp_path, folder):
    """What a new file format or family adds: an entry that recognises its paths and loads them."""
    (tmp_path / "m.toy").write_text(str(folder))         # a "format" that points at a GPT-2 folder
    seen = []

    def load(path, hf, device="cpu", **overrides):
        seen.append((path, hf, device, overrides))
        return GPT.from_pretrained(path.read_text(), **overrides)

    toy = register_format(Format("toy", "toy files", lambda p, hf: str(p).endswith(".toy"), load,
                                 lambda p, trust_pattern=False: load_run(p.read_text()).tokenizer), before="gpt2")
    try:
        assert [f.name for f in FORMATS].index("toy") == [f.name for f in FORMATS].index("gpt2") - 1
        run = load_run(tmp_path / "m.toy", dropout=0.5)
        assert run.model.config.dropout == 0.5 and not run.model.training and run.state is None
        assert seen[0][0] == tmp_path / "m.toy" and seen[0][1] is None and seen[0][3] == {"dropout": 0.5}
        with pytest.raises(ValueError, match="registered already"):
            register_format(toy)
    finally:
        FORMATS.remove(toy)


def test_declared_fields_on_every_model():
    for m in (GPT(TINY), Llama(LlamaConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_kv_head=1,
                                           n_embd=4, n_inner=8))):
        assert m.quantization is None and m.lora is None and m.lora_base is None
