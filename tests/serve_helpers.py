"""Shared pieces of the server tests: tiny model folders and a live `npgpt serve` subprocess."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from npgpt import GPT, GPTConfig
from npgpt.sft import ensure_chat_tokens
from npgpt.tokenizer import CharTokenizer

from helpers import corpus


def model_folder(path, chat=True, block=64, n_embd=32, seed=0, scale=4.0, n_layer=2):
    """A tiny char-level model (random weights scaled up so its distributions are peaked: greedy
    decoding never hinges on float noise between near-equal logits) saved with its tokenizer."""
    tok = CharTokenizer.train(corpus(300))
    if chat:
        ensure_chat_tokens(tok)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=n_layer, n_head=2, n_embd=n_embd), seed=seed)
    for p in m.parameters():
        if p.data.ndim > 1:
            p.data *= scale
    m.save_pretrained(path)
    tok.save(path)
    return path


class LiveServer:
    """`npgpt serve` in a subprocess on a free port (port 0; the ready line names the port)."""

    def __init__(self, folder, *args):
        # one BLAS thread: tests run beside other processes, where BLAS threads fight for the cores
        env = dict(os.environ, PYTHONUNBUFFERED="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "npgpt.cli.main", "serve", "--checkpoint", str(folder),
                                      "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines = []
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if "http://" in line:
                    found.set()
        self.errors = []                  # stderr lines (the per-request JSON log lines among them)

        def drain():                      # an unread pipe would block the server once it fills up
            for line in self.proc.stderr:
                self.errors.append(line)
        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(60):
            self.stop()
            time.sleep(0.2)
            raise RuntimeError(f"server did not start: {self.lines} {''.join(self.errors)}")
        self.port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", "".join(self.lines)).group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def eot_bias(folder):
    """logit_bias that bans end-of-text, so a request runs its full max_tokens."""
    from npgpt.tokenizer import load
    return {str(load(folder).eot_id): -100}


def wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def greedy_reference(folder, prompt_ids, max_tokens, stop_ids, **controls):
    """What the library's generate gives for the same request (the server must agree)."""
    from npgpt.loading import load_run
    from npgpt.generate import generate
    model, tok = load_run(folder)[:2]
    out = []
    for t in generate(model, prompt_ids, max_tokens, temperature=0, **controls):
        if t in stop_ids:
            break
        out.append(t)
    return out, model, tok


__all__ = ["eot_bias", "model_folder", "LiveServer", "wait_until", "greedy_reference", "np"]
