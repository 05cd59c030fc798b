"""The trainer's data-parallel plug: N copies of the model each take their own micro-batches, and after
the last backward of a step the N flat gradient buffers are summed, so every copy applies the same
update:

    rank r:  grad_r = d loss_r / d params, loss_r its token mean  (backward, into the flat buffer)
             grad_r *= n_r / N     (its non-ignored targets over the GLOBAL batch's: loss_weight)
    all:     grad   = allreduce_sum(grad_r)                      (one collective per step)
             clip(grad, global norm); AdamW step                 (identical on every rank)

Weighting each rank by its share of the global batch's target tokens (not 1/N) makes the loss the
mean over all non-ignored targets of the global batch, exactly what one process would compute on
the concatenated batch -- SFT masks give ranks different counts, and a mean of per-rank means
would weight a rank's few answer tokens as much as another's many.
"""

from __future__ import annotations

import hashlib

from npgpt.backend import asnumpy
from npgpt.distributed.comm import Communicator, count_targets, loss_weight
from npgpt.distributed.zero import reduce_gradients
from npgpt.errors import NpgptError


def check_ranks_agree(comm: Communicator, tokenizer, model) -> None:
    """Before the first collective of a run: every rank must hold the same tokenizer (its fingerprint)
    and a model of the same parameter names and shapes, else the same one-line NpgptError on every rank.

    Two ranks whose data were prepared with different tokenizers of one vocabulary size would train
    together silently on ids that mean different things; a different size would die inside MPI with a
    buffer-size stack. One broadcast (rank 0's summary) and one small all-reduce (who differs) decide."""
    shapes = hashlib.sha256(repr(sorted((n, tuple(p.shape)) for n, p in model.named_parameters())).encode())
    mine = {"tokenizer": tokenizer.fingerprint(), "vocab": tokenizer.vocab_size, "shapes": shapes.hexdigest()[:16],
            "params": int(sum(p.size for p in model.parameters()))}
    root = comm.broadcast_object(mine)
    n = comm.world_size
    flags = [0.0] * (2 * n)
    flags[comm.rank] = float(mine["tokenizer"] != root["tokenizer"])
    flags[n + comm.rank] = float(mine["shapes"] != root["shapes"])
    flags = comm.allreduce_scalars(flags, op="max")
    bad_tok = [r for r in range(n) if flags[r]]
    bad_shape = [r for r in range(n) if flags[n + r]]
    if not bad_tok and not bad_shape:
        return
    ranks = ", ".join(map(str, sorted(set(bad_tok + bad_shape))))
    what = []
    if bad_tok:
        what.append(f"a different tokenizer (rank 0's has {root['vocab']:,} tokens, fingerprint "
                    f"{root['tokenizer'][:12]}; prepare every rank's data with the same one)")
    if bad_shape:
        what.append(f"a model of other shapes (rank 0's has {root['params']:,} parameters; give every rank "
                    f"the same --data vocabulary, --set and --init-from)")
    raise NpgptError(f"data-parallel ranks disagree before the first step: rank {ranks} has " + " and ".join(what))


class DataParallel:
    """Makes `npgpt.train.train` data-parallel over `comm` (filled into the trainer's Hooks).

    After the last micro-batch's backward the flat buffer of rank r holds g_r, the gradient of its
    loss as one process defines it (the mean over its M micro-batches of each one's token-mean
    loss). reduce_grads then weights g_r by n_r / N -- rank r's non-ignored targets over the global
    batch's, from one small all-reduce of [n_r, sum of n L, stop flag] -- and sums over ranks:

        grad = sum_r (n_r / N) g_r                  (in the flat buffer, before clipping)

    With one micro-batch per step (or equal counts in a rank's micro-batches) this is exactly the
    gradient of the mean over all non-ignored targets of the global batch; a rank with few answer
    tokens (SFT masks) weighs less, where 1/N would over-weight it. The loss hook only observes
    (counts targets, sums n * loss for the log), so whatever loss earlier plugins set (distillation,
    in-process thread replicas) passes through unchanged, and a reduce_grads already
    in the hooks (replicas summing their threads) runs first. The same all-reduce gives the step's
    global loss (the log line and the NaN check, identical on every rank) and agrees on Ctrl-C.
    """

    def __init__(self, comm: Communicator):
        self.comm = comm
        self.optimizer = None                     # set by install()
        self.local_stop = lambda: False           # the trainer's Ctrl-C flag
        self.stop_agreed = False
        self.global_loss = float("nan")
        self._tokens, self._loss_num = 0, 0.0

    @property
    def rank(self):
        return self.comm.rank

    def wrap_loss(self, loss_fn):
        """loss_fn(model, x, y) -> the same loss; counts the micro-batch's targets on the way."""
        def counted(model, x, y):
            loss = loss_fn(model, x, y)
            n = count_targets(y)
            self._tokens += n
            self._loss_num = self._loss_num + loss.data * n      # stays on the device until reduce_grads
            return loss
        return counted

    def reduce_grads(self, flat_grad, n_tokens=None):
        """After the last micro-batch, before clipping: weight by targets, sum over ranks, agree."""
        mine = self._tokens
        tokens, loss_num, stop = self.comm.allreduce_scalars(
            [mine, float(asnumpy(self._loss_num)), 1.0 if self.local_stop() else 0.0])
        self._tokens, self._loss_num = 0, 0.0
        self.stop_agreed = self.stop_agreed or stop > 0
        self.global_loss = loss_num / tokens if tokens > 0 else 0.0
        flat_grad *= loss_weight(mine, tokens)                   # n_r / N (0 when nothing counts)
        reduce_gradients(self.comm, self.optimizer)

    def interrupted(self):
        """Ctrl-C as agreed by all ranks at the last gradient reduction (identical everywhere)."""
        return self.stop_agreed

    def eval_losses(self, model, batches, loss_fn=None):
        """Shared evaluation: rank r computes the batches i with i % N == r of the same sequence of
        batches one process would draw; returns the mean over all of them (one all-reduce).
        loss_fn(model, x, y): one batch's loss (default: the model's cross-entropy)."""
        total = 0.0
        count = 0
        for i, (x, y) in enumerate(batches):
            count += 1
            if i % self.comm.world_size == self.comm.rank:
                total += float(asnumpy((loss_fn(model, x, y) if loss_fn else model(x, y)[1]).data))
        return self.comm.allreduce_scalars([total])[0] / max(count, 1)

    def install(self, hooks, optimizer):
        """Plug into the trainer's Hooks, after the other plugins (their reduce_grads runs first),
        and its optimizer."""
        hooks.loss_fn = self.wrap_loss(hooks.loss_fn)
        previous = hooks.reduce_grads

        def reduce_grads(flat_grad, n_tokens):
            if previous is not None:
                previous(flat_grad, n_tokens)                   # e.g. thread replicas sum in-process first
            self.reduce_grads(flat_grad, n_tokens)

        hooks.reduce_grads = reduce_grads
        self.optimizer = optimizer
        self.comm.broadcast(optimizer.flat, root=0)         # every rank starts from rank 0's weights

    def agree_on(self, local_stop):
        """The trainer's Ctrl-C flag -> the flag all ranks agreed on (see reduce_grads)."""
        self.local_stop = local_stop
        return self.interrupted

    def saved_optimizer(self, optimizer):
        """Collective: an object whose state_dict() is the optimizer's full state, for rank 0 to save
        (ZeroAdamW gathers its shards; every rank must call this at the same point)."""
        return _SavedOptimizer(optimizer.state_dict())


class _SavedOptimizer:
    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state
