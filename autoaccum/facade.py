"""An ``Optimizer`` that *is* its inner optimizer for everything but ``step``.

``param_groups``, ``state``, ``defaults`` and the hook registries are read from (and written to)
the inner optimizer at every access, not copied once: ``Optimizer.load_state_dict``,
``add_param_group`` or anything else that rebinds them on the inner optimizer stays visible
through the wrapper, so an LR scheduler built on the wrapper always changes the learning rate the
inner optimizer really uses. Attributes the wrapper does not have are looked up on the inner
optimizer (``consolidate_state_dict`` of ``ZeroRedundancyOptimizer``, ``train()``/``eval()`` of
schedule-free optimizers, ...).
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer


def _delegated(name: str) -> property:
    def get(self: Any) -> Any:
        return getattr(self.optimizer, name)

    def set_(self: Any, value: Any) -> None:
        setattr(self.optimizer, name, value)

    return property(get, set_, doc=f"The inner optimizer's ``{name}`` (live, not a copy).")


class InnerFacade(Optimizer):
    """Base of :class:`~autoaccum.AutoAccumOptimizer`: the Optimizer contract, delegated."""

    optimizer: Optimizer

    param_groups = _delegated("param_groups")  # type: ignore[assignment]
    state = _delegated("state")  # type: ignore[assignment]
    defaults = _delegated("defaults")  # type: ignore[assignment]
    # Hooks registered on the wrapper fire on each real (inner) step, state_dict and load.
    _optimizer_step_pre_hooks = _delegated("_optimizer_step_pre_hooks")  # type: ignore[assignment]
    _optimizer_step_post_hooks = _delegated("_optimizer_step_post_hooks")  # type: ignore[assignment]
    _optimizer_state_dict_pre_hooks = _delegated(  # type: ignore[assignment]
        "_optimizer_state_dict_pre_hooks")
    _optimizer_state_dict_post_hooks = _delegated(  # type: ignore[assignment]
        "_optimizer_state_dict_post_hooks")
    _optimizer_load_state_dict_pre_hooks = _delegated(  # type: ignore[assignment]
        "_optimizer_load_state_dict_pre_hooks")
    _optimizer_load_state_dict_post_hooks = _delegated(  # type: ignore[assignment]
        "_optimizer_load_state_dict_post_hooks")

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails.
        inner = self.__dict__.get("optimizer")
        if inner is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
