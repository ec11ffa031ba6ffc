"""MixDA two-stage training (DESIGN.md section 2): data, losses, task adapters, Trainer."""

from .task_adapters import (TaskAdapter, add_task_adapters, has_task_adapters, load_task_adapters,
                            remove_task_adapters, save_task_adapters, task_adapter_modules)

__all__ = ["TaskAdapter", "add_task_adapters", "remove_task_adapters", "task_adapter_modules",
           "has_task_adapters", "save_task_adapters", "load_task_adapters"]
