"""Task registry, prompt builders and scoring rules."""

from trimix.tasks.base import Example, RenderedPrompt, Task
from trimix.tasks.registry import TASKS, get_task

__all__ = ["TASKS", "Example", "RenderedPrompt", "Task", "get_task"]
