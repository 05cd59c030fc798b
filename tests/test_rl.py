"""RL on verifiable rewards: the tasks and checkers, the advantages and the policy-gradient loss against
hand formulas, and `finetune --rl` / finetune_rl end to end (a user's reward, LoRA's reference, resume)."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from npgpt import GPT, GPTConfig, Tensor
from npgpt.cli.main import cli
from npgpt.errors import NpgptError
from npgpt.gradcheck import gradcheck
from npgpt.ops.preference import group_advantages, policy_gradient_loss
from npgpt.rl import finetune_rl
from npgpt.tokenizer import CharTokenizer
from npgpt.training.config import TrainConfig
from npgpt.verifiable import (TASKS, arithmetic, chinese, exact_match, facts_reward, get_task, number_words,
                              summary_facts)


# ---- tasks ---------------------------------------------------------------------------------------------
def test_tasks_hold_out_pairs_training_never_sees():
    for make in (arithmetic, number_words, lambda s: summary_facts(s, n_train=300, n_test=50)):
        train, test = make(1)
        assert train and test and not {p for p, _ in train} & {p for p, _ in test}
        assert make(1) == (train, test)                  # a pure function of the seed
    assert [chinese(n) for n in (342, 105, 15, 110)] == ["三百四十二", "一百零五", "十五", "一百一十"]
    assert ("7+5=", "12") in arithmetic(0)[0] + arithmetic(0)[1]


def test_checkers():
    assert exact_match(" 12", "12") == 1.0 and exact_match("13", "12") == 0.0
    want = "Tom bought apples and bread on Monday."
    assert facts_reward(want, want) == 1.0
    assert facts_reward("Tom bought apples on Friday.", want) == 0.5
    assert facts_reward("", want) == 0.0
    with pytest.raises(NpgptError, match="unknown RL task 'chess'; choose one of arithmetic, number-words"):
        get_task("chess")
    for name, task in TASKS.items():          # every true answer fits the task's answer bound (char-level)
        train, test = task.make(0) if name != "summary-facts" else summary_facts(0, n_train=300)
        assert max(len(a) for _, a in train + test) < task.max_new_tokens, name


# ---- advantages and the loss ---------------------------------------------------------------------------
def test_group_advantages_by_hand():
    a = group_advantages(np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 1.0]), 3)
    s = np.std([1, 0, 0])
    np.testing.assert_allclose(a[:3], np.array([2 / 3, -1 / 3, -1 / 3]) / (s + 1e-4))
    assert (a[3:6] == 0).all()                      # a group that all scored alike teaches nothing
    np.testing.assert_allclose(a[6:], np.array([0, -0.5, 0.5]) / (np.std([0.5, 0, 1]) + 1e-4))


def test_policy_gradient_loss_and_gradient_by_hand():
    r = np.random.default_rng(0)
    lp = -r.random((3, 4))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=bool)
    lp[~mask] = 0
    adv, ref, kl = np.array([1.0, -0.5, 2.0]), -r.random((3, 4)), 0.3
    x = Tensor(lp, requires_grad=True)
    loss = policy_gradient_loss(x, adv, mask, ref, kl)
    loss.backward()
    n = mask.sum(axis=1)
    d = ref - lp
    want = -np.mean([(adv[i] * lp[i][mask[i]] - kl * (np.exp(d[i]) - d[i] - 1)[mask[i]]).sum() / n[i] for i in range(3)])
    assert float(loss.data) == pytest.approx(want, rel=1e-12)
    # d/d logp: -(A_i - kl (1 - exp(ref - logp))) / (|o_i| N) on the answer's tokens
    g = -(adv[:, None] - kl * (1 - np.exp(d))) / n[:, None] / 3 * mask
    np.testing.assert_allclose(x.grad, g, rtol=1e-10, atol=1e-15)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), kl=st.sampled_from([0.0, 0.1]))
def test_gradcheck_policy_gradient_loss(seed, kl):
    r = np.random.default_rng(seed)
    lp, ref, adv = -r.random((4, 5)), -r.random((4, 5)), r.standard_normal(4)
    mask = r.random((4, 5)) < 0.7
    res = gradcheck(lambda x: policy_gradient_loss(x, adv, mask, ref, kl).reshape(1), lp, seed=seed)
    assert res.ok, str(res)


# ---- end to end ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random char model over the arithmetic task's characters."""
    d = tmp_path_factory.mktemp("rl")
    train, test = arithmetic(0)
    tok = CharTokenizer.train("".join(p + a for p, a in train + test))
    GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0).save_pretrained(d / "m")
    tok.save(d / "m")
    return d / "m"


def _cfg(base, out, **kw):
    return TrainConfig(**{**dict(init_from=str(base), rl="arithmetic", out=str(out), max_iters=6, eval_interval=3,
                                 eval_iters=1, batch_size=4, learning_rate=5e-2, min_lr=5e-3, warmup_iters=0,
                                 rl_group_size=8, rl_eval_prompts=16, weight_decay=0.0, quiet=True), **kw}).validate()


def starts_with_one(prompt, got, want):
    return float(got.startswith("1"))


def test_a_users_reward_is_learned_and_resume_is_exact(base, tmp_path):
    res = finetune_rl(_cfg(base, tmp_path / "a"), reward_fn=starts_with_one)
    ev = res.history
    assert ev[0]["val_reward"] == 0.0                    # the random model never starts with "1"
    assert ev[-1]["sampled_reward"] > ev[1]["sampled_reward"] and ev[-1]["val_reward"] == 1.0, ev
    # stop at 3, resume to 6: the same answers are sampled (seeds from the step), the same weights
    finetune_rl(_cfg(base, tmp_path / "b", max_iters=3, lr_decay_iters=6), reward_fn=starts_with_one)
    finetune_rl(_cfg(base, tmp_path / "b", lr_decay_iters=6, resume=True), reward_fn=starts_with_one)
    a, b = (load_file(str(tmp_path / x / "ckpt" / "model.safetensors")) for x in ("a", "b"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_rl_with_lora_uses_the_base_as_reference(base, tmp_path, capsys):
    finetune_rl(_cfg(base, tmp_path / "l", lora_rank=2, rl_kl=0.1, quiet=False, max_iters=2, eval_interval=2),
                reward_fn=starts_with_one)
    out = capsys.readouterr().out
    assert "KL penalty 0.1 to the reference (the LoRA base, adapters disabled)" in out
    assert (tmp_path / "l" / "ckpt" / "adapter_model.safetensors").is_file()
    rows = [json.loads(x) for x in (tmp_path / "l" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("sampled_reward", 0) > 0 for r in rows)


def test_bad_reward_and_bad_task_are_one_line_errors(base, tmp_path):
    with pytest.raises(NpgptError, match="returned nan for the answer"):
        finetune_rl(_cfg(base, tmp_path / "n", max_iters=1), reward_fn=lambda p, g, w: float("nan"))
    r = CliRunner().invoke(cli, ["finetune", "--init-from", str(base), "--rl", "chess", "--out", str(tmp_path / "c")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert re.search(r"^Error: unknown RL task 'chess'", r.output, re.M), r.output
    r = CliRunner().invoke(cli, ["finetune", "--init-from", str(base), "--rl", "arithmetic", "--group-size", "1",
                                 "--out", str(tmp_path / "c")])
    assert r.exit_code != 0 and "rl_group_size must be in [2, 256]" in r.output


def test_a_chat_models_prompts_use_its_template_and_stop_tokens():
    from npgpt.rl import PromptSource
    from npgpt.sft import ensure_chat_tokens
    train, test = arithmetic(0)
    tok = CharTokenizer.train("".join(p + a for p, a in train + test))
    sp = ensure_chat_tokens(tok)
    src = PromptSource.build(tok, get_task("arithmetic"), 0, n_pos=32)
    p = src.prompts["train"][0]
    assert p[0] == sp["<|user|>"] and p[-1] == sp["<|assistant|>"] and tok.decode(p[1:-2]) == src.texts["train"][0]
    assert sp["<|end|>"] in src.stop_ids and tok.eot_id in src.stop_ids
    ids, targets = src.answer_rows([p], [tok.encode("12") + [sp["<|end|>"]]])
    assert list(targets[0][targets[0] >= 0]) == tok.encode("12") + [sp["<|end|>"]]
    assert list(ids[0][:len(p)]) == p
