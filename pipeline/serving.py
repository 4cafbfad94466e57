"""The served model: the chain's chat model (and its guard) as an MLflow pyfunc that ``mlflow models serve`` runs.

MLflow logs this file as *models from code* (no pickled object: the file itself is the model's definition and
:func:`mlflow.models.set_model` at its end names the model), with the chain's model folder, and the guard's when
there is one, as artifacts. :class:`ChatModel` answers a request the way ``evaluate`` measured the variant:

- each prompt is one user turn rendered through the model's own chat template, with the generation prompt;
- greedy decoding through :func:`pipeline.generation.generate`, which stops at the end of the assistant's turn;
- with a guard (the ``classify`` stage's classifier, which ``evaluate`` measured in front of every variant): a
  flagged request gets :data:`pipeline.suite.REFUSAL` and is never generated.

Input: a column ``prompt`` of strings (``{"inputs": {"prompt": ["..."]}}`` or ``{"dataframe_records": [{"prompt":
"..."}]}``); the optional param ``max_new_tokens``. Output: one answer string per prompt. A request MLflow's
schema refuses (no ``prompt`` column, a wrong type) or one this model refuses (an empty prompt, one longer than
the model's context) gets HTTP 400 with the reason.
"""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

# Artifact names inside the logged model.
MODEL, GUARD = "model", "guard"


def chat_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user turn through the chat template, ending in the generation prompt."""
    from pipeline.models import render_ids

    return render_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def prompts_of(model_input) -> list[str]:
    """The prompts of a request: the ``prompt`` column, whose cells are strings (or, when the request sent
    ``{"prompt": [...]}`` in process, one cell holding the list)."""
    column = model_input["prompt"] if hasattr(model_input, "columns") else model_input
    prompts = []
    for value in column:
        many = not isinstance(value, str) and (isinstance(value, (list, tuple)) or hasattr(value, "__array__"))
        for item in (list(value) if many else [value]):
            if not isinstance(item, str):
                raise MlflowException(f"prompt {len(prompts)} is {type(item).__name__}, not a string",
                                      error_code=INVALID_PARAMETER_VALUE)
            prompts.append(item)
    return prompts


class ChatModel(PythonModel):
    """A chat model folder (any stage's output that :func:`pipeline.adapters.load_trained` reads) behind an optional
    guard; ``max_new_tokens`` comes from the model config ``register`` logged."""

    def load_context(self, context) -> None:
        from pipeline.adapters import load_trained
        from pipeline.models import load_tokenizer

        folder = context.artifacts[MODEL]
        self.tokenizer = load_tokenizer(folder)
        self.model = load_trained(folder).eval()
        config = context.model_config or {}
        self.max_new_tokens = int(config.get("max_new_tokens", 128))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.guard = None
        if GUARD in context.artifacts:
            from pipeline.classification import Guard

            self.guard = Guard(context.artifacts[GUARD])

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        from pipeline import suite
        from pipeline.generation import generate

        prompts = prompts_of(model_input)
        asked = (params or {}).get("max_new_tokens")
        limit = self.max_new_tokens if asked is None else int(asked)
        if limit < 1:
            raise MlflowException(f"max_new_tokens = {limit} must be at least 1", error_code=INVALID_PARAMETER_VALUE)
        ids = []
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise MlflowException(f"prompt {i} is empty", error_code=INVALID_PARAMETER_VALUE)
            ids.append(chat_prompt(self.tokenizer, prompt))
            if len(ids[-1]) + limit > self.context:
                raise MlflowException(f"prompt {i} takes {len(ids[-1])} tokens; with max_new_tokens = {limit} that "
                                      f"exceeds the model's context of {self.context}", error_code=INVALID_PARAMETER_VALUE)
        flagged = self.guard.flags(prompts) if self.guard is not None else [False] * len(prompts)
        keep = [i for i, f in enumerate(flagged) if not f]
        answers = [suite.REFUSAL] * len(prompts)
        if keep:
            outs, _ = generate(self.model, self.tokenizer, [ids[i] for i in keep], limit, batch_size=8)
            for i, out in zip(keep, outs, strict=True):
                answers[i] = out.text
        return answers


mlflow.models.set_model(ChatModel())
