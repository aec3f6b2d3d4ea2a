"""Tasks, prompt templates, TFDS builders and grain input pipelines."""

from deltal_jax.data.builders import (
    CountdownConfig,
    DeltalCountdown,
    DeltalMathJsonl,
    MathJsonlConfig,
    countdown_builder,
    extract_gsm8k_answer,
    gsm8k_builder,
    math_jsonl_builder,
    read_math_jsonl,
)
from deltal_jax.data.countdown import (
    CountdownInstance,
    CountdownSpec,
    generate_split,
    instance_split,
    sample_instance,
    solve,
)
from deltal_jax.data.pipeline import (
    TASKS,
    PromptTask,
    get_task,
    pad_prompt,
    prompt_dataset,
    render_prompt,
    reward_metas,
)
from deltal_jax.data.templates import (
    BASE_TEMPLATE,
    base_prompt,
    chat_prompt,
    countdown_problem,
    math_problem,
)

__all__ = [
    "BASE_TEMPLATE",
    "TASKS",
    "CountdownConfig",
    "CountdownInstance",
    "CountdownSpec",
    "DeltalCountdown",
    "DeltalMathJsonl",
    "MathJsonlConfig",
    "PromptTask",
    "base_prompt",
    "chat_prompt",
    "countdown_builder",
    "countdown_problem",
    "extract_gsm8k_answer",
    "generate_split",
    "get_task",
    "gsm8k_builder",
    "instance_split",
    "math_jsonl_builder",
    "math_problem",
    "pad_prompt",
    "prompt_dataset",
    "read_math_jsonl",
    "render_prompt",
    "reward_metas",
    "sample_instance",
    "solve",
]
