"""Registry components: register the evaluated model, then promote it if it wins.

Both talk to the MLflow server over the network, so the pipeline retries them; neither is cached
(a cached "register" would skip creating the version the run is about).
"""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output


def register(
    config: Input[Artifact],
    model: Input[Model],
    results: Input[Artifact],
    store: Input[Dataset],
    registration: Output[Markdown],
) -> str:
    """A new registry version (evaluation metrics as tags, alias ``challenger``); its number."""
    from pathlib import Path

    from rima_core import steps
    from rima_core.kfp_support import load_task_config, summary_markdown

    result = steps.register(
        model.path,
        Path(results.path) / "metrics.json",
        load_task_config(config.path),
        store=store.path,
    )
    Path(registration.path).write_text(summary_markdown("Model registration", result))
    return str(result["version"])


def promote(config: Input[Artifact], version: str, decision: Output[Markdown]) -> bool:
    """Move ``champion`` to the challenger only if the promotion policy says it wins."""
    from pathlib import Path

    from rima_core import steps
    from rima_core.kfp_support import load_task_config, summary_markdown
    from rima_core.registry import format_table

    result = steps.promote(load_task_config(config.path))
    text = summary_markdown(f"Promotion of version {result['challenger']}", result)
    if str(result["challenger"]) != str(version):
        # another run registered a newer challenger between this run's register and promote
        text += f"\n\n**Note:** this run registered version {version}; the decision above is "
        text += f"about the newer challenger {result['challenger']}.\n"
    Path(decision.path).write_text(f"{text}\n\n```\n{format_table(result)}\n```\n")
    return bool(result["promoted"])
