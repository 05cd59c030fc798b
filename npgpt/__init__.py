"""npgpt: a GPT you can read, train and run, on NumPy (CPU) and CuPy (GPU), with its own autograd.

Reading order for study: backend -> tensor -> ops -> gradcheck -> nn -> model -> optim -> train.
"""

__version__ = "0.1.0"

from npgpt.errors import NpgptError  # noqa: E402
