"""Reinforcement learning on verifiable rewards: `npgpt finetune --rl TASK` (group-relative policy gradient).

Each optimizer step, for every prompt of the batch:

    sample G answers with the model as it is now      (npgpt.generate: the one sampler, the KV cache)
    reward each with the task's checker               (npgpt.verifiable: 1 for a right answer, 0 for a wrong one;
                                                       summary-facts gives partial credit)
    advantage A_i = (r_i - mean of the group) / std of the group          (GRPO, Shao et al. 2024)
    loss = -(1/N) sum_i (1/|o_i|) sum_t [A_i log pi(o_it) - kl * KL_t(pi || pi_ref)]

(npgpt.ops.preference.policy_gradient_loss). The group mean is the baseline: an answer is pushed up
when it did better than its siblings and down when it did worse, so a prompt that all G answers get
right (or all wrong) teaches nothing. The KL term keeps the policy near the reference model (the
starting model: a LoRA model's own base with its adapters disabled, else a frozen copy of
--init-from). Lesson 19 derives the estimator.

How it plugs into the trainer (npgpt.train, nothing forked):

    PromptSource   the batch source: a batch is x (B, 3) = [split (0 train, 1 held out), prompt
                   number, sampling seed] and y (B,) the prompt numbers (the data-parallel weighting
                   counts one per prompt). The seed comes from the step's generator, so a resumed
                   run samples what the uninterrupted one would have.
    rl_plugin      the loss above (hooks.loss_fn); evaluation: val loss = 1 - the mean reward of
                   greedy answers, and at each evaluation the held-out reward of greedy answers to
                   the first rl_eval_prompts held-out prompts and the mean reward of the answers
                   sampled since the last evaluation.
    finetune_rl    the whole run (what the CLI calls); task= a Task of your own, reward_fn= your own
                   checker over a built-in task's prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from npgpt.backend import asnumpy, to_device
from npgpt.checkpoint import find_checkpoint
from npgpt.dpo import model_tokenizer
from npgpt.errors import NpgptError
from npgpt.generate import generate
from npgpt.layers import adapters_disabled
from npgpt.loading import from_pretrained
from npgpt.lora import has_lora
from npgpt.ops.preference import group_advantages, policy_gradient_loss, token_logprobs
from npgpt.sampling import SamplingParams
from npgpt.sft import is_chat_model, render_chat
from npgpt.tensor import Tensor, no_grad
from npgpt.train import train
from npgpt.verifiable import Task, get_task

SPLITS = ("train", "val")


@dataclass
class PromptSource:
    """A task's prompts as a batch source for npgpt.train (see the module docstring)."""
    tok: object
    task: Task
    prompts: dict                       # split -> [prompt token ids]
    answers: dict                       # split -> [true answer text]
    texts: dict                         # split -> [prompt text]
    stop_ids: list
    max_new_tokens: int
    block_size: int
    path: str = ""
    grow_vocab: bool = False
    vocab_size: int = field(init=False)

    def __post_init__(self):
        self.vocab_size = self.tok.vocab_size

    @classmethod
    def build(cls, tok, task: Task, seed, n_pos, max_new_tokens=None):
        """The task's pairs for `seed`, prompts tokenized as the model reads them: a chat model's
        (its own template, or npgpt's after --sft) as one user message with the generation prompt,
        any other as plain text."""
        train_pairs, test_pairs = task.make(seed)
        if not train_pairs or not test_pairs:
            raise NpgptError(f"task {task.name} made {len(train_pairs)} training and {len(test_pairs)} held-out "
                             f"prompts; it needs some of each")
        chat = is_chat_model(tok)
        encode = ((lambda p: render_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True)[0])
                  if chat else tok.encode_plain)
        n_new = int(max_new_tokens or task.max_new_tokens)
        prompts, answers, texts = {}, {}, {}
        for split, pairs in zip(SPLITS, (train_pairs, test_pairs)):
            prompts[split] = [encode(p) or [tok.eot_id] for p, _ in pairs]
            answers[split] = [a for _, a in pairs]
            texts[split] = [p for p, _ in pairs]
        longest = max(len(p) for ps in prompts.values() for p in ps)
        if longest >= n_pos:
            raise NpgptError(f"task {task.name}: a prompt of {longest} tokens leaves no room for an answer in the "
                             f"model's context of {n_pos}; use a longer-context model")
        stops = tok.chat_stop_ids() if chat else [tok.eot_id]
        return cls(tok, task, prompts, answers, texts, stops, n_new, min(n_pos, longest + n_new - 1))

    @classmethod
    def for_training(cls, cfg, task, stream=None):
        tok, n_pos = model_tokenizer(find_checkpoint(cfg.init_from or cfg.out))
        src = cls.build(tok, task, cfg.seed, n_pos, cfg.rl_max_new_tokens)
        if not cfg.quiet:
            print(f"RL: task {task.name} ({task.description}): {len(src.prompts['train']):,} prompts, "
                  f"{len(src.prompts['val']):,} held out; {cfg.rl_group_size} answers of up to {src.max_new_tokens} "
                  f"tokens per prompt, {cfg.batch_size} prompts per micro-batch", file=stream)
        return src

    def tokenizer(self):
        return self.tok

    def check_split_sizes(self, block_size):
        if block_size < self.block_size:
            raise NpgptError(f"RL rows need {self.block_size} tokens (prompt + answer), block_size is {block_size}")

    def get_batch(self, split, batch_size, block_size, rng, device=None):
        """x (B, 3) int64 [split, prompt number, sampling seed], y (B,) the prompt numbers."""
        pick = rng.integers(0, len(self.prompts[split]), size=batch_size)
        seed = int(rng.integers(0, 2**31 - 1))
        x = np.stack([np.full(batch_size, SPLITS.index(split)), pick, np.full(batch_size, seed)], axis=1)
        return x.astype(np.int64), pick.astype(np.int64)

    def answer_rows(self, prompts, answers):
        """Prompt + answer token rows, right-padded: (ids (N, T), targets (N, T): the answer's
        tokens, -1 elsewhere). An answer that ran past the model's context (the sampler slides its
        window) keeps the tokens that fit: T <= block_size."""
        answers = [a[:self.block_size + 1 - len(p)] for p, a in zip(prompts, answers)]
        T = max(len(p) + len(a) for p, a in zip(prompts, answers)) - 1
        ids = np.full((len(prompts), T), self.tok.eot_id, dtype=np.int64)
        targets = np.full((len(prompts), T), -1, dtype=np.int64)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            row = list(p) + list(a)
            ids[i, :len(row) - 1] = row[:-1]
            targets[i, len(p) - 1:len(row) - 1] = a
        return ids, targets

    def text(self, tokens):
        return self.tok.decode([t for t in tokens if t not in self.stop_ids])


def sample_answers(model, src, prompts, temperature, seed):
    """[answer token ids] for each prompt (the stop token kept at the end when one was drawn)."""
    params = SamplingParams(temperature=temperature, seed=seed, max_new_tokens=src.max_new_tokens,
                            stop_token_ids=tuple(src.stop_ids))
    with no_grad():
        return generate(model, [list(p) for p in prompts], params=params)


def greedy_reward(model, src, split, numbers, reward):
    """Mean reward of greedy answers to the prompts `numbers` of `split`."""
    got = sample_answers(model, src, [src.prompts[split][i] for i in numbers], 0.0, None)
    return float(np.mean([reward(src.texts[split][i], src.text(a), src.answers[split][i])
                          for i, a in zip(numbers, got)]))


def rl_plugin(src: PromptSource, reward, stream=None):
    """The trainer plugin of an RL run: reward(prompt text, answer text, true answer) -> float."""
    def plugin(model, folder, cfg, hooks):
        log = (lambda msg: None) if cfg.quiet else (lambda msg: print(msg, file=stream))
        G, kl, temperature = cfg.rl_group_size, cfg.rl_kl, cfg.rl_temperature
        lora = has_lora(model)
        reference = None
        if kl and not lora:
            reference = from_pretrained(find_checkpoint(cfg.init_from), device=cfg.device).eval()
            for p in reference.parameters():
                p.requires_grad = False
        if kl:
            log(f"RL: KL penalty {kl:g} to the reference (" + ("the LoRA base, adapters disabled" if lora else
                f"a frozen copy of {cfg.init_from}") + ")")
        sampled = []                                     # rewards of the answers sampled since the last eval

        def reference_logprobs(ids, targets):
            with no_grad():
                if reference is not None:
                    return token_logprobs(reference(ids)[0], targets).data
                with adapters_disabled():
                    return token_logprobs(model(ids)[0], targets).data

        def loss_fn(model, x, y):
            x = asnumpy(x)
            split, seed = SPLITS[int(x[0, 0])], int(x[0, 2])
            numbers = [int(i) for i in x[:, 1] for _ in range(G)]        # each prompt G times, adjacent
            prompts = [src.prompts[split][i] for i in numbers]
            answers = sample_answers(model, src, prompts, temperature, seed)
            r = np.array([reward(src.texts[split][i], src.text(a), src.answers[split][i])
                          for i, a in zip(numbers, answers)], dtype=np.float64)
            sampled.extend(r.tolist())
            ids, targets = src.answer_rows(prompts, answers)
            if str(cfg.device) != "cpu":
                ids, targets = to_device(ids, cfg.device), to_device(targets, cfg.device)
            logp = token_logprobs(model(ids)[0], targets)                                 # (N, T)
            ref = reference_logprobs(ids, targets) if kl else None
            return policy_gradient_loss(logp, group_advantages(r, G), asnumpy(targets) >= 0, ref, kl)

        def eval_loss(model, x, y):
            x = asnumpy(x)
            err = 1.0 - greedy_reward(model, src, SPLITS[int(x[0, 0])], [int(i) for i in x[:, 1]], reward)
            return Tensor(np.asarray(err, dtype=np.float32))

        def held_out(model, it):
            n = min(cfg.rl_eval_prompts, len(src.prompts["val"]))
            out = {"val_reward": greedy_reward(model, src, "val", range(n), reward)}
            if sampled:
                out["sampled_reward"] = float(np.mean(sampled))
                sampled.clear()
            return out

        hooks.loss_fn = loss_fn
        hooks.eval_loss = eval_loss
        hooks.eval_metrics.append(held_out)
        log(f"RL: group-relative policy gradient, {G} answers per prompt at temperature {temperature:g}; "
            f"val loss = 1 - mean reward of greedy answers")
    return plugin


def finetune_rl(cfg, task: Task | None = None, reward_fn=None, stream=None, comm=None, plugins=()):
    """Run an RL fine-tune as `cfg` says; returns npgpt.train's TrainResult.

    task: a npgpt.verifiable.Task of your own (default: the built-in task cfg.rl names).
    reward_fn(prompt, answer, true_answer) -> float: your own checker, replacing the task's.
    """
    task = task or get_task(cfg.rl)
    if cfg.rl != task.name:
        cfg = dataclasses.replace(cfg, rl=task.name)
    if reward_fn is None:
        reward = lambda prompt, got, want: task.reward(got, want)     # noqa: E731
    else:
        reward = _checked(reward_fn)
    src = PromptSource.for_training(cfg, task, stream)
    return train(cfg, stream=stream, batch_source=src, plugins=(rl_plugin(src, reward, stream), *plugins), comm=comm)


def _checked(reward_fn):
    """A user's reward function whose results are checked: a finite number, else a clear error."""
    def reward(prompt, got, want):
        r = reward_fn(prompt, got, want)
        if isinstance(r, bool) or not isinstance(r, (int, float, np.integer, np.floating)) or not np.isfinite(r):
            raise NpgptError(f"the reward function returned {r!r} for the answer {got[:60]!r}; it must return a "
                             f"finite number")
        return float(r)
    return reward
