"""Fine-tuning: SFT records, loss masking, chat template, finetune lowers loss, chat and sample CLIs."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from npgpt import GPT, GPTConfig, Tensor
from npgpt.cli.main import cli
from npgpt.errors import NpgptError
from npgpt.ops.nn import cross_entropy
from npgpt.sft import CHAT_TOKENS, SFTData, read_records, render_chat, render_record
from npgpt.tokenizer import BPETokenizer, CharTokenizer

from helpers import TINY, corpus

QA = [{"prompt": f"Q: what is {a} plus {b}?\nA:", "completion": f" {a + b}\n"} for a in range(6) for b in range(6)]


@pytest.fixture
def tok():
    return CharTokenizer.train(corpus() + "".join(r["prompt"] + r["completion"] for r in QA) + "0123456789?:+QA")


def test_prompt_completion_masks_prompt(tok):
    ids, mask = render_record(tok, {"prompt": "ab", "completion": "cd"})
    assert ids == tok.encode("abcd") + [tok.eot_id]
    assert mask == [False, False, True, True, True]


def test_chat_template_adds_special_tokens(tok):
    n = tok.vocab_size
    ids, mask = render_chat(tok, [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "yo"}])
    sp = tok.special_tokens
    assert tok.vocab_size == n + 4 and all(t in sp for t in CHAT_TOKENS)
    assert ids == ([sp["<|system|>"]] + tok.encode("be") + [sp["<|end|>"], sp["<|user|>"]] + tok.encode("hi")
                   + [sp["<|end|>"], sp["<|assistant|>"]] + tok.encode("yo") + [sp["<|end|>"], tok.eot_id])
    learn = [i for i, m in zip(ids, mask) if m]
    assert learn == tok.encode("yo") + [sp["<|end|>"]]


def test_bpe_user_text_with_special_strings_is_plain_text():
    t = BPETokenizer.train(corpus(), 300)
    ids, _ = render_record(t, {"prompt": "<|endoftext|>", "completion": "x"})
    assert ids.count(t.eot_id) == 1          # only the closing one


def test_rows_targets_only_on_completion(tok):
    data = SFTData.build(tok, [{"prompt": "abc", "completion": "de"}], block_size=8, val_fraction=0)
    x, y = data.rows["train"]
    # x = a b c d e <eot-pad>..., y[t] = next token only where it is completion (d, e, eot)
    assert list(y[0][:5]) == [-1, -1] + tok.encode("de") + [tok.eot_id]
    assert (y[0][5:] == -1).all()


def test_masked_targets_change_nothing_and_get_no_gradient(tok):
    data = SFTData.build(tok, QA[:4], block_size=24, val_fraction=0)
    x, y = data.rows["train"]
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=16)
    m = GPT(cfg, seed=0)
    logits, loss = m(x, y)
    # the loss is the mean over completion tokens only
    manual = cross_entropy(Tensor(logits.data), y).data
    valid = y >= 0
    z = logits.data.astype(np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    expected = -logp[valid, y[valid]].mean()
    np.testing.assert_allclose(float(loss.data), expected, rtol=1e-5)
    np.testing.assert_allclose(float(manual), expected, rtol=1e-5)
    # changing the (ignored) prompt positions' targets changes nothing
    logits_t = Tensor(logits.data, requires_grad=True)
    cross_entropy(logits_t, y).backward()
    assert np.all(logits_t.grad[~valid] == 0)


def test_record_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{not json}\n')
    with pytest.raises(NpgptError, match="line 2 is not valid JSON"):
        read_records(f)
    f.write_text('{"messages": [{"role": "wizard", "content": "x"}]}\n')
    with pytest.raises(NpgptError, match="line 1: unknown role 'wizard'"):
        read_records(f)
    f.write_text('{"prompt": "a"}\n')
    with pytest.raises(NpgptError, match="line 1: a record needs 'prompt' and 'completion'"):
        read_records(f)


def test_strict_rejects_long_records_and_truncation_is_counted(tok):
    recs = [{"prompt": "a" * 30, "completion": "b"}, {"prompt": "a", "completion": "b"}]
    with pytest.raises(NpgptError, match="record 1 is 32 tokens, longer than block_size"):
        SFTData.build(tok, recs, block_size=16, strict=True)
    d = SFTData.build(tok, recs, block_size=40, val_fraction=0)
    assert d.truncated == 0
    d = SFTData.build(tok, [recs[0], recs[1], recs[1]], block_size=16, val_fraction=0)
    assert d.truncated == 1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    text = corpus() + "".join(r["prompt"] + r["completion"] for r in QA) * 3
    (d / "c.txt").write_text(text)
    r = CliRunner().invoke(cli, ["prepare", "--input", str(d / "c.txt"), "--out", str(d / "data")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["train", "--data", str(d / "data"), "--out", str(d / "base"), "--max-iters", "30",
                                 "--eval-interval", "30", *TINY[:8], "--block-size", "32", "--batch-size", "8",
                                 "--lr", "3e-3"])
    assert r.exit_code == 0, r.output
    return d


def test_finetune_on_new_data_lowers_its_loss(pretrained):
    d = pretrained
    (d / "new.txt").write_text("".join(r["prompt"] + r["completion"] for r in QA) * 20)
    r = CliRunner().invoke(cli, ["prepare", "--input", str(d / "new.txt"), "--out", str(d / "newdata"),
                                 "--tokenizer-from", str(d / "base")])
    assert r.exit_code == 0, r.output
    before = json.loads(CliRunner().invoke(cli, ["eval", "--checkpoint", str(d / "base"), "--data",
                                                 str(d / "newdata"), "--json"]).output)["loss"]
    r = CliRunner().invoke(cli, ["finetune", "--init-from", str(d / "base"), "--data", str(d / "newdata"),
                                 "--out", str(d / "ft"), "--max-iters", "40", "--eval-interval", "20",
                                 "--lr", "3e-3", "--batch-size", "8", "--quiet"])
    assert r.exit_code == 0, r.output
    after = json.loads(CliRunner().invoke(cli, ["eval", "--checkpoint", str(d / "ft"), "--data",
                                                str(d / "newdata"), "--json"]).output)["loss"]
    assert after < before - 0.1


def test_sft_then_chat(pretrained, tmp_path):
    d = pretrained
    f = tmp_path / "chat.jsonl"
    recs = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in QA]
    f.write_text("\n".join(json.dumps(x) for x in recs) + "\n")
    r = CliRunner().invoke(cli, ["finetune", "--init-from", str(d / "base"), "--sft", str(f), "--out",
                                 str(tmp_path / "chat"), "--max-iters", "20", "--eval-interval", "10",
                                 "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    assert "SFT: 36 records" in r.output and "adding 4 embedding rows" in r.output
    r = CliRunner().invoke(cli, ["chat", "--checkpoint", str(tmp_path / "chat"), "--max-new-tokens", "8",
                                 "--seed", "0"], input="Q: what is 1 plus 2?\n/reset\nhello\n/quit\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("bot> ") == 2 and "(conversation cleared)" in r.output
    r = CliRunner().invoke(cli, ["chat", "--checkpoint", str(d / "base")])
    assert r.exit_code == 1 and "not a chat model" in r.output


def test_sample_show_probs_and_bad_inputs(pretrained):
    ck = str(pretrained / "base")
    r = CliRunner().invoke(cli, ["sample", "--checkpoint", ck, "--prompt", "the", "--max-new-tokens", "4",
                                 "--show-probs", "--seed", "3"])
    assert r.exit_code == 0, r.output
    rows = [x for x in r.output.splitlines() if x.startswith("[0]")]
    assert len(rows) == 4
    for row in rows:
        probs = [float(p) for p in __import__("re").findall(r" (\d\.\d{3})(?=\s|$)", row.split("top-5:")[1])]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.001
    bad = [(["--prompt", "\u2603"], "'\u2603'"), (["--max-new-tokens", "0"], "max_new_tokens"),
           (["--top-p", "0"], "top_p"), (["--top-p", "1.5"], "top_p"), (["--top-k", "0"], "top_k"),
           (["--temperature", "-1"], "temperature")]
    for args, msg in bad:
        r = CliRunner().invoke(cli, ["sample", "--checkpoint", ck, *args])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(cli, ["sample", "--checkpoint", str(pretrained / "nope")])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = CliRunner().invoke(cli, ["sample", "--checkpoint", ck, "--prompt", "", "--max-new-tokens", "5", "--seed", "1"])
    assert r.exit_code == 0       # an empty prompt starts from end-of-text
