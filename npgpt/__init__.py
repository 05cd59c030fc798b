"""npgpt: a GPT you can read, train and run, on NumPy (CPU) and CuPy (GPU), with its own autograd.

Reading order for study: backend -> tensor -> ops -> gradcheck -> nn -> model -> optim -> train.
"""

__version__ = "0.1.0"

from npgpt.errors import NpgptError  # noqa: E402
from npgpt import ops  # noqa: E402,F401  (binds operators onto Tensor)
from npgpt.gradcheck import gradcheck  # noqa: E402
from npgpt.tensor import Function, Tensor, no_grad  # noqa: E402
from npgpt.model import GPT, GPTConfig  # noqa: E402
