"""Dynamic loss scaling for fp16 training (`--precision fp16`).

fp16 gradients underflow: `DynamicLossScaler` multiplies the loss by `scale` (2^16 to start) before
backward, then unscales the float32 gradients, skips the step and halves the scale when any
gradient is inf/NaN, and doubles the scale after `growth_interval` good steps in a row (PyTorch's
GradScaler policy). The trainer makes one per run; its state goes into the checkpoint.
"""

from __future__ import annotations

import math

from npgpt.errors import NpgptError


class DynamicLossScaler:
    """Loss scaling for fp16 training (PyTorch GradScaler's policy).

        loss = scaler.scale_loss(loss); loss.backward()
        stepped, norm = scaler.step(optimizer, lr, grad_clip)     # unscale, check, clip, step

    On an overflow (any gradient inf/NaN) the step is skipped and `scale` is multiplied by
    `backoff_factor`; after `growth_interval` overflow-free steps in a row it is multiplied by
    `growth_factor`. With enabled=False it is a pass-through (scale 1, never skips).
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 min_scale=1.0, max_scale=2.0 ** 24, enabled=True):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise NpgptError("loss scaler: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 "
                             "and growth_interval >= 1")
        self.enabled = bool(enabled)
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.good_steps = 0        # overflow-free steps since the last change of scale
        self.skipped_steps = 0     # steps skipped for overflow, over the whole run

    def scale_loss(self, loss):
        """loss * scale (a Tensor stays a Tensor, so backward sees the scaled loss)."""
        return loss * self.scale if self.enabled else loss

    def unscale_(self, grads):
        """Divide gradients (an array or list of arrays) by the scale, in place."""
        if not self.enabled or self.scale == 1.0:
            return grads
        inv = 1.0 / self.scale
        for g in (grads if isinstance(grads, (list, tuple)) else [grads]):
            if g is not None:
                g *= inv
        return grads

    def update(self, found_inf: bool):
        """Adjust the scale after a step that did (found_inf) or did not overflow."""
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            self.skipped_steps += 1
        else:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale = min(self.scale * self.growth_factor, self.max_scale)
                self.good_steps = 0

    def step(self, optimizer, lr=None, grad_clip=0.0):
        """Check, unscale, clip and step an npgpt AdamW whose flat `grad` holds scaled gradients.

        Returns (stepped, norm): stepped False when the step was skipped for overflow; norm is the
        unscaled gradient norm before clipping (inf/NaN on overflow). One host sync (the check).
        """
        norm = optimizer.grad_norm()             # also re-attaches replaced .grad arrays
        found_inf = not math.isfinite(float(norm))
        if found_inf:
            self.update(True)
            return False, float("inf")
        self.unscale_(optimizer.grad)
        # Unscaling divides every gradient by `scale`, so it divides their norm too: no second pass.
        norm = optimizer.clip_grad_norm(grad_clip, norm=norm / self.scale if self.enabled else norm)
        optimizer.step(lr)
        self.update(False)
        return True, norm

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps,
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "enabled": self.enabled}

    def load_state_dict(self, state: dict):
        try:
            scale, good = float(state["scale"]), int(state["good_steps"])
        except (KeyError, TypeError, ValueError):
            raise NpgptError("loss scaler state needs 'scale' and 'good_steps'; the checkpoint is damaged") from None
        if not scale > 0 or not math.isfinite(scale) or good < 0:
            raise NpgptError(f"loss scaler state is invalid (scale {scale}, good_steps {good})")
        self.scale, self.good_steps = scale, good
        self.skipped_steps = int(state.get("skipped_steps", 0))
        return self
