"""npgpt: a GPT you can read, train and run, on NumPy (CPU) and CuPy (GPU), with its own autograd.

Reading order for study (README's "Learn" section has the same list, with the lessons beside it):

     1. tensor.py              Tensor, Function, the backward loop                      lesson 01
     2. ops/elementwise.py, ops/reduce.py, ops/shape.py, ops/linalg.py   primitives      lessons 02-03
     3. gradcheck.py           finite differences: how every backward is tested         lesson 03
     4. ops/nn.py              the fused GPT ops; read each `*_reference` first          lessons 04-06
     5. nn.py                  Module, Linear, Embedding, LayerNorm
     6. model.py               GPTConfig, the block, GPT.forward                         lessons 06-07
     7. optim.py               AdamW over flat buffers, the schedule, clipping           lesson 08
     8. tokenizer/             characters and byte-level BPE                             lesson 09
     9. train.py               the training loop as a function                           lesson 08
    10. generate.py            sampling, the KV cache, batching                          lessons 10, 13
    11. sft.py, quant.py, compress.py, ops/distill.py, interpret.py, viz.py              lessons 11-14
    12. ops/llama.py, llama.py the Llama family: RMSNorm, RoPE, SwiGLU, grouped-query attention

Skip on a first read: backend.py (NumPy/CuPy plumbing), ops/parallel.py and the row-block
kernels inside ops/nn.py (speed), ops/cuda_kernels.py and precision.py (GPU), model.py's
forward_cached and the Hugging Face loading (until lesson 13), data.py, checkpoint.py, safeio/,
training/, distributed/ (several processes), serve/ (the HTTP server), bench.py, perf.py, cli/.
`npgpt.reference.reference_ops()` runs the model on the readable reference ops.

Loading a model has one answer, npgpt/loading.py:

    model = npgpt.from_pretrained("out")              # a run, checkpoint, model folder or .gguf file
    model, tok, folder, state = npgpt.load_run("out")  # with its tokenizer and the run's state.json
"""

__version__ = "0.1.0"

from npgpt.errors import NpgptError  # noqa: E402
from npgpt import ops  # noqa: E402,F401  (binds operators onto Tensor)
from npgpt.gradcheck import gradcheck  # noqa: E402
from npgpt.tensor import Function, Tensor, no_grad  # noqa: E402
from npgpt.model import GPT, GPTConfig  # noqa: E402
from npgpt.llama import Llama, LlamaConfig  # noqa: E402


def __getattr__(name):
    """`npgpt.from_pretrained` and `npgpt.load_run`, imported on first use: the loader pulls in the
    tokenizers, GGUF and LoRA readers, which `import npgpt` alone does not need."""
    if name in ("from_pretrained", "load_run"):
        from npgpt import loading  # lazily: keeps `import npgpt` light
        return getattr(loading, name)
    raise AttributeError(f"module 'npgpt' has no attribute {name!r}")
